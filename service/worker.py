"""Background threads: the embedded worker, which runs queued jobs through the pipeline,
and the index keeper, which keeps the search indexes in step with the store.

HTTP stays responsive while a study embeds: handlers only write the upload and a job row
and put the job id on a bounded queue. :func:`run_job` is the job itself, the same code
the scale-out workers run (:mod:`.queue`: a Redis queue instead of this in-process one).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from radcache.embeddings import EmbedReport, IndexSet, Pipeline
from radcache.embeddings.errors import RadcacheError

from .jobs import JobState, JobStore
from .options import job_pipeline

__all__ = ["IndexKeeper", "QueueFullError", "Worker", "report_state", "run_job"]

log = logging.getLogger(__name__)


class QueueFullError(RadcacheError):
    code = "queue-full"
    status = 503
    title = "Too many jobs waiting"


def report_state(report: EmbedReport) -> JobState:
    if report.ok:
        return "done"
    return "partially_failed" if report.series else "failed"


def public_report(report: EmbedReport, upload: Path) -> dict[str, Any]:
    """The report with server paths cut back to the names the client uploaded."""
    out = report.to_dict()
    prefix = str(upload) + "/"
    for item in (*out["errors"], *out["skipped"]):
        if isinstance(item.get("path"), str):
            item["path"] = item["path"].replace(prefix, "")
    return out


OnDone = Callable[[float, list[dict[str, Any]]], None]  # (seconds, the report's series)


class _JobProgress:
    """Pipeline progress → the job row, at most a few writes a second."""

    def __init__(self, jobs: JobStore, job_id: str) -> None:
        self.jobs, self.job_id = jobs, job_id
        self.done = 0
        self.last = 0.0

    def total(self, slices: int) -> None:
        self.jobs.update(self.job_id, slices_total=slices)

    def advance(self, slices: int) -> None:
        self.done += slices
        now = time.monotonic()
        if now - self.last > 0.25:
            self.last = now
            self.jobs.update(self.job_id, slices_done=self.done)

    def flush(self) -> None:
        self.jobs.update(self.job_id, slices_done=self.done)


class Worker:
    """Runs jobs one at a time on a background thread."""

    def __init__(
        self,
        pipeline: Pipeline,
        jobs: JobStore,
        *,
        limit: int,
        on_done: OnDone | None = None,
    ) -> None:
        self.pipeline, self.jobs, self.limit = pipeline, jobs, limit
        self.on_done = on_done
        self.queue: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radcache-worker", daemon=True)
        self.busy = False

    def start(self) -> None:
        for row in self.jobs.unfinished():  # accepted before a restart: run them now
            self.queue.put(row.id)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def check_capacity(self) -> None:
        """Raise :class:`QueueFullError` (503) when no more jobs may wait."""
        if self.queue.qsize() >= self.limit:
            raise QueueFullError(
                f"{self.queue.qsize()} jobs are already waiting (limit {self.limit}); "
                "retry later or raise RADCACHE_QUEUE_SIZE."
            )

    def submit(self, job_id: str) -> None:
        self.check_capacity()
        self.queue.put(job_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.busy = True
            try:
                self.process(job_id)
            finally:
                self.busy = False
                self.queue.task_done()

    def process(self, job_id: str) -> None:
        try:
            run_job(self.pipeline, self.jobs, job_id, on_done=self.on_done)
        except Exception as exc:  # a bug or a broken model: the job fails, the worker goes on
            log.exception("job %s failed", job_id)
            self.jobs.finish(job_id, "failed", None, failure=f"{type(exc).__name__}: {exc}"[:2000])

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def run_job(
    pipeline: Pipeline,
    jobs: JobStore,
    job_id: str,
    *,
    on_done: OnDone | None = None,
    worker: str | None = None,
) -> None:
    """Embed one job's upload and record the outcome. A job already finished (a repeated
    delivery) is left alone. Exceptions (a bug, a broken model, a lost store) propagate:
    the caller decides between failing the job and trying again."""
    row = jobs.start(job_id, worker)
    if row is None:
        return
    upload = Path(row.upload)
    progress = _JobProgress(jobs, job_id)
    options = row.options or {}
    t0 = time.monotonic()
    pipeline = job_pipeline(pipeline, options)
    common: dict[str, Any] = {
        "progress": progress,
        "labels": options.get("labels"),
        "collection": options.get("collection"),
    }
    if options.get("multi_sequence") or pipeline.encoder.cfg.multi_sequence:
        report = pipeline.embed_study(
            [upload],
            mapping=_uploaded_names(upload, options.get("sequences")),
            fusion=options.get("fusion"),
            **common,
        )
    else:
        report = pipeline.embed([upload], modality=options.get("modality"), **common)
    progress.flush()
    out = public_report(report, upload)
    jobs.record_entries(job_id, out["series"], lambda key: _space(pipeline, key))
    if on_done is not None:  # before the job reads done: then it is searchable
        on_done(time.monotonic() - t0, out["series"])
    jobs.finish(job_id, report_state(report), out)
    shutil.rmtree(upload, ignore_errors=True)


def _uploaded_names(upload: Path, mapping: dict[str, str] | None) -> dict[str, str] | None:
    """A sequence mapping by the client's file names, extended to the names the upload's
    files were saved under (``00003-flair.nii.gz``)."""
    if not mapping:
        return mapping
    saved = {p.name: p.name.split("-", 1)[-1] for p in upload.iterdir()} if upload.is_dir() else {}
    return {**mapping, **{name: mapping[orig] for name, orig in saved.items() if orig in mapping}}


def _space(pipeline: Pipeline, key: str) -> str:
    info = pipeline.store.get(key)
    return info.space if info is not None else ""


class IndexKeeper:
    """Keeps the search indexes in step with the store: right after each job, and every
    ``interval`` seconds for embeddings written by other processes. Saves changed indexes
    at most every ``save_every`` seconds, and on stop."""

    def __init__(self, indexes: IndexSet, interval: float, save_every: float = 60.0) -> None:
        self.indexes = indexes
        self.interval = interval
        self.save_every = save_every
        self._saved = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radcache-index", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.indexes.save()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def refresh(self) -> None:
        """Absorb what the store gained or lost since the last refresh."""
        try:
            changed = self.indexes.refresh()
        except Exception:  # the index is rebuilt on the next refresh or restart
            log.exception("index refresh failed")
            return
        if changed and time.monotonic() - self._saved >= self.save_every:
            self.indexes.save()
            self._saved = time.monotonic()

    def touch(self, keys: Iterable[str]) -> None:
        """Entries whose labels, collections or references changed."""
        self.indexes.touch(keys)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()
