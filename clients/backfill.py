"""Send a folder of studies to a running service, a few at a time, resumable.

from pathlib import Path
from radcache.clients import RadcacheClient
from radcache.clients.backfill import backfill
with RadcacheClient("http://127.0.0.1:8000") as rc:
    report = backfill(Path("archive"), rc, concurrency=4)

Each immediate subdirectory of the folder is one study (DICOM files at any depth), and so
is each ``.zip``, ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` or ``.dcm`` file directly in
it; hidden names are ignored. Progress goes to a JSON-lines state file (default
``.radcache-backfill.jsonl`` in the folder), one line per event, flushed and fsync'd:

    {"study": "ct-001", "state": "submitted", "job": "6f1c…", "size": 81920, "mtime": 1.7e9}
    {"study": "ct-001", "state": "done", "job": "6f1c…", "size": 81920, "mtime": 1.7e9,
     "failure": null}

A later run with the same state file skips studies whose last line is ``done`` with an
unchanged size and mtime; reports those whose last line is ``partially_failed`` with an
unchanged size and mtime as failed still, without sending them again (a partial failure
is an input error, such as a non-DICOM file, that sending the same files again would not
fix; :attr:`StudyResult.earlier`), so the run is not ``ok`` while they stay; waits for the
job of a ``submitted`` one instead of uploading it again (or uploads it again if the
service no longer knows the job); and submits ``failed`` and ``dead`` ones again. A study
whose files changed is sent again whatever its last line says.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._base import RadcacheAPIError, finished
from .client import RadcacheClient
from .schemas import JobOut

__all__ = [
    "STATE_FILE",
    "STUDY_SUFFIXES",
    "BackfillInterrupted",
    "BackfillReport",
    "StudyResult",
    "backfill",
    "find_studies",
]

STATE_FILE = ".radcache-backfill.jsonl"
STUDY_SUFFIXES = (".zip", ".nii", ".nii.gz", ".nrrd", ".mha", ".dcm")
_REFUSED = {400, 413, 415, 422}  # answers about the upload itself: that study fails alone


@dataclass(frozen=True)
class StudyResult:
    """How one study ended: a job state, or ``failed`` with no job when the upload was
    refused (``failure`` then holds the service's answer). ``earlier``: a partial failure
    of an earlier run whose files have not changed since, reported again and not sent."""

    study: str
    state: str
    job: str | None = None
    failure: str | None = None
    earlier: bool = False


@dataclass
class BackfillReport:
    """What a run did so far. ``studies`` counts every study found, ``skipped`` those an
    earlier run finished ``done``; ``done`` and ``failed`` (which includes
    ``partially_failed``) count this run's, and ``failed`` also lists the earlier run's
    partial failures whose files are unchanged (:attr:`StudyResult.earlier`, not sent
    again): a run is ``ok`` only when no study is left failed."""

    studies: int = 0
    skipped: int = 0
    done: int = 0
    failed: list[StudyResult] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def failed_earlier(self) -> int:
        """Studies failed by an earlier run and unchanged since (not sent by this one)."""
        return sum(r.earlier for r in self.failed)

    @property
    def finished(self) -> int:
        """Studies this run saw finish."""
        return self.done + len(self.failed) - self.failed_earlier

    @property
    def studies_per_s(self) -> float:
        return self.finished / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def to_dict(self) -> dict[str, Any]:
        return {
            "studies": self.studies,
            "done": self.done,
            "skipped": self.skipped,
            "failed": [
                {"study": r.study, "state": r.state, "failure": r.failure, "earlier": r.earlier}
                for r in self.failed
            ],
            "seconds": round(self.seconds, 3),
            "studies_per_s": round(self.studies_per_s, 3),
            "interrupted": self.interrupted,
        }


class BackfillInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a progress callback's KeyboardInterrupt) stopped the run; the state file
    is consistent and ``report`` says what finished before."""

    def __init__(self, report: BackfillReport) -> None:
        self.report = report
        super().__init__(f"interrupted after {report.finished} of {report.studies} studies")


def find_studies(root: Path, *, exclude: Path | None = None) -> list[Path]:
    """The studies in ``root``, sorted by name (see the module docstring)."""
    skip = exclude.resolve() if exclude else None
    return [
        p
        for p in sorted(root.iterdir())
        if not p.name.startswith(".")
        and p.resolve() != skip
        and (p.is_dir() or (p.is_file() and p.name.lower().endswith(STUDY_SUFFIXES)))
    ]


def _fingerprint(path: Path) -> tuple[int, float]:
    """Total bytes and latest mtime of a study, to notice that it changed."""
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime
    size, mtime = 0, path.stat().st_mtime
    for f in path.rglob("*"):
        if f.is_file():
            st = f.stat()
            size, mtime = size + st.st_size, max(mtime, st.st_mtime)
    return size, mtime


def _read_state(path: Path) -> dict[str, dict[str, Any]]:
    """The last line recorded for each study; a torn last line is ignored."""
    last: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("study"), str):
                last[rec["study"]] = rec
    return last


class _StateFile:
    """Appends one JSON line per event, durably, from any thread."""

    def __init__(self, path: Path) -> None:
        self.lock = threading.Lock()
        self.fh = path.open("a", encoding="utf-8")

    def write(self, rec: dict[str, Any]) -> None:
        with self.lock:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()
            os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


@dataclass(frozen=True)
class _Study:
    name: str
    path: Path
    size: int
    mtime: float
    pending: str | None  # the job of an earlier run, accepted but not seen finishing

    def record(self, state: str, job: str | None, **extra: Any) -> dict[str, Any]:
        return {
            "study": self.name,
            "state": state,
            "job": job,
            "size": self.size,
            "mtime": self.mtime,
            **extra,
        }


def _failure(job: JobOut) -> str | None:
    """Why a job did not end ``done``: its failure, else its first input errors."""
    if job.state == "done" or job.failure:
        return job.failure
    return "; ".join(f"{e.path}: [{e.code}] {e.message}" for e in job.errors[:3]) or None


def _plan(root: Path, state: Path, report: BackfillReport) -> list[_Study]:
    recorded = _read_state(state)
    todo: list[_Study] = []
    for path in find_studies(root, exclude=state):
        report.studies += 1
        size, mtime = _fingerprint(path)
        rec = recorded.get(path.name, {})
        same = rec.get("size") == size and rec.get("mtime") == mtime
        if same and rec.get("state") == "done":
            report.skipped += 1
            continue
        if same and rec.get("state") == "partially_failed":  # the same files fail the same way
            report.failed.append(
                StudyResult(path.name, rec["state"], rec.get("job"), rec.get("failure"), True)
            )
            continue
        pending = rec.get("job") if same and rec.get("state") == "submitted" else None
        todo.append(_Study(path.name, path, size, mtime, pending))
    return todo


def backfill(
    root: Path,
    client: RadcacheClient,
    *,
    concurrency: int = 4,
    state: Path | None = None,
    modality: str | None = None,
    poll: float = 0.5,
    on_progress: Callable[[BackfillReport], None] | None = None,
) -> BackfillReport:
    """Submit every study in ``root`` not finished by an earlier run, with at most
    ``concurrency`` jobs in flight; returns when all have finished.

    ``on_progress`` is called once the studies are counted and after each one finishes.
    A refused upload (HTTP 400, 413, 415 or 422) fails that study alone; other errors of the
    service or the network stop the run and propagate. On KeyboardInterrupt no further
    study is submitted, the jobs in flight are left to the service (the next run waits for
    them) and :class:`BackfillInterrupted` is raised.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    state = state or root / STATE_FILE
    start = time.monotonic()
    report = BackfillReport()
    stop = threading.Event()
    log = _StateFile(state)

    def resume(job_id: str) -> JobOut | None:
        try:
            return client.job(job_id)
        except RadcacheAPIError as exc:
            if exc.status == 404:  # the service forgot it: upload again
                return None
            raise

    def run(study: _Study) -> StudyResult | None:
        job = resume(study.pending) if study.pending else None
        if job is None:
            if stop.is_set():
                return None
            try:
                job = client.submit([study.path], wait=False, modality=modality)
            except RadcacheAPIError as exc:
                if exc.status not in _REFUSED:
                    raise
                return StudyResult(study.name, "failed", None, str(exc))
            if not finished(job):
                log.write(study.record("submitted", job.id))
        while not finished(job):
            if stop.wait(poll):
                return None
            job = client.job(job.id)
        return StudyResult(study.name, job.state, job.id, _failure(job))

    recorded: set[str] = set()

    def record(study: _Study, result: StudyResult) -> None:
        recorded.add(study.name)
        log.write(study.record(result.state, result.job, failure=result.failure))
        if result.state == "done":
            report.done += 1
        else:
            report.failed.append(result)
        report.seconds = time.monotonic() - start

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="radcache-backfill")
    futures: dict[Future[StudyResult | None], _Study] = {}
    try:
        todo = _plan(root, state, report)
        if on_progress:
            on_progress(report)
        futures = {pool.submit(run, s): s for s in todo}
        for fut in as_completed(futures):
            if (result := fut.result()) is not None:
                record(futures[fut], result)
                if on_progress:
                    on_progress(report)
    except BaseException as exc:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        for study, result in _finished_unrecorded(futures, recorded):
            record(study, result)
        report.seconds = time.monotonic() - start
        if isinstance(exc, KeyboardInterrupt):
            report.interrupted = True
            raise BackfillInterrupted(report) from exc
        raise
    finally:
        pool.shutdown(wait=True)  # a no-op unless a second Ctrl-C cut the first one short
        log.close()
    report.seconds = time.monotonic() - start
    return report


def _finished_unrecorded(
    futures: dict[Future[StudyResult | None], _Study], recorded: set[str]
) -> Iterator[tuple[_Study, StudyResult]]:
    """Results that came in while the run was stopping, so their lines get written too."""
    for fut, study in futures.items():
        if study.name in recorded or not fut.done() or fut.cancelled() or fut.exception():
            continue
        if (result := fut.result()) is not None:
            yield study, result
