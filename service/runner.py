"""One job, run: embed its upload as its options ask, record the outcome, finish it.

:func:`run_job` is what every worker runs (the embedded one in :mod:`.worker`, scale-out
workers in :mod:`.queue`); :func:`finish_job` is how every job ends, including one that
:mod:`.intake` answers from the cache without running anything, and :func:`fail_job` how
one ends that raised or that the queue gave up on.

An upload lives only as long as its job runs, and so do the patient and study names given
with it (kept in the job's options until it ends): whatever state a job ends in, its upload is
deleted (:func:`dispose_upload`), or, for a job that did not end ``done`` and a
``quarantine`` directory, moved there under the job's id, until :func:`purge_quarantine`
deletes it after the retention period. The reports keep the names the client gave its
files (so it can act on failures); they reach only the job's tenant and leave with the job
(:meth:`~.jobs.JobStore.purge`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from radcache.embeddings import EmbeddingStore, EmbedReport, Pipeline
from radcache.embeddings.errors import RadcacheError

from .entry_catalog import EntryCatalog
from .jobs import JobState, JobStore, kind_of
from .options import JobOptions
from .uid_vault import UidVault, read_originals
from .uploads import client_names

__all__ = [
    "OnDone",
    "dispose_upload",
    "error_code",
    "fail_job",
    "finish_job",
    "log_failure",
    "log_job",
    "public_report",
    "purge_quarantine",
    "report_state",
    "run_job",
    "supersede_series",
]

log = logging.getLogger(__name__)
OnDone = Callable[[float, list[dict[str, Any]]], None]  # (seconds, the report's series)


def report_state(report: EmbedReport) -> JobState:
    if report.ok:
        return "done"
    return "partially_failed" if report.series else "failed"


def _unplaced(text: str, upload: Path, names: dict[str, str] | None = None) -> str:
    """``text`` with the upload's server path cut back to the names the client uploaded
    (``names``: the client's name of each file, by the name it was saved under)."""
    text = text.replace(str(upload) + "/", "").replace(str(upload), "")
    for saved, name in (names or {}).items():
        text = text.replace(saved, name)
    return text


def public_report(report: EmbedReport, upload: Path) -> dict[str, Any]:
    """The report with server paths cut back to the names the client uploaded."""
    out = report.to_dict()
    names = client_names(upload)
    for item in (*out["errors"], *out["skipped"]):
        for field in ("path", "message", "reason"):
            if isinstance(item.get(field), str):
                item[field] = _unplaced(item[field], upload, names)
    return out


def dispose_upload(
    upload: Path, job_id: str, state: JobState, quarantine: Path | None = None
) -> Path | None:
    """Delete a finished job's upload, or move it to ``quarantine``/``job_id`` when the job
    did not end ``done`` (its time there counts from now). Returns where it was kept."""
    if upload.name in ("", ".", "..") or not upload.exists():
        return None  # never a directory above the upload's own
    if quarantine is None or state == "done":
        shutil.rmtree(upload, ignore_errors=True)
        return None
    kept = quarantine / job_id
    quarantine.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(kept, ignore_errors=True)  # an earlier delivery's
    shutil.move(upload, kept)
    os.utime(kept)
    return kept


def purge_quarantine(quarantine: Path, older_than: dt.timedelta) -> int:
    """Delete the uploads quarantined more than ``older_than`` ago; returns how many."""
    if not quarantine.is_dir():
        return 0
    cutoff = time.time() - older_than.total_seconds()
    gone = 0
    for kept in quarantine.iterdir():
        try:
            if kept.lstat().st_mtime >= cutoff:
                continue
            if kept.is_dir() and not kept.is_symlink():
                shutil.rmtree(kept)
            else:
                kept.unlink()
        except FileNotFoundError:  # purged by another process meanwhile
            continue
        gone += 1
    return gone


def log_failure(job_id: str, exc: BaseException) -> None:
    """Log a job that raised by its id, the error's type and where it was raised: not the
    error's message, which may name the client's files (the job's failure records it)."""
    where = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    log.error("job %s failed: %s\n%s", job_id, type(exc).__name__, where)


def error_code(exc: BaseException) -> str:
    """An error's stable code (a :class:`RadcacheError`'s), else its type's name."""
    return exc.code if isinstance(exc, RadcacheError) else type(exc).__name__


def log_job(event: str, job_id: str, code: str, kind: str = "embed", **counts: int) -> None:
    """One structured line (``key=value``) in the server log for a job that failed, is
    retried or went dead: its id, kind, error code and counts, never a file name, header
    value or message (those stay in the job's record, for its tenant)."""
    extra = "".join(f" {k}={v}" for k, v in counts.items())
    log.warning("job_event=%s job=%s kind=%s code=%s%s", event, job_id, kind, code, extra)


def fail_job(
    jobs: JobStore,
    job_id: str,
    state: JobState,
    failure: str,
    quarantine: Path | None = None,
    code: str = "unknown",
    **counts: int,
) -> None:
    """End a job without a report: ``failed`` (it raised, or was never queued) or ``dead``
    (the queue gave up on it), logged with ``code`` and ``counts`` (:func:`log_job`).
    ``failure`` is recorded without server paths, and the upload is deleted or
    quarantined."""
    row = jobs.get(job_id)
    log_job(state, job_id, code, kind_of(row) if row is not None else "embed", **counts)
    upload = Path(row.upload) if row is not None else None
    if upload is not None:
        failure = _unplaced(failure, upload, client_names(upload))
    if row is not None and row.options and _without_refs(row.options) != row.options:
        jobs.update(job_id, options=_without_refs(row.options))
    jobs.finish(job_id, state, None, failure=failure[:2000])
    if upload is not None:
        dispose_upload(upload, job_id, state, quarantine)


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


def run_job(
    pipeline: Pipeline,
    jobs: JobStore,
    job_id: str,
    *,
    on_done: OnDone | None = None,
    worker: str | None = None,
    quarantine: Path | None = None,
    vault: UidVault | None = None,
) -> None:
    """Embed one job's upload and record the outcome. A job already finished (a repeated
    delivery) is left alone. Exceptions (a bug, a broken model, a lost store) propagate:
    the caller decides between failing the job (:func:`fail_job`) and trying again."""
    row = jobs.start(job_id, worker)
    if row is None:
        return
    upload = Path(row.upload)
    progress = _JobProgress(jobs, job_id)
    options = JobOptions.model_validate(row.options or {})
    t0 = time.monotonic()
    pipe = options.pipeline(pipeline)
    if options.multi_sequence:
        report = pipe.embed_study(
            [upload],
            mapping=_uploaded_names(upload, options.sequences),
            fusion=options.fusion,
            progress=progress,
            labels=options.labels,
            collection=options.collection,
            refs=options.refs,
        )
    else:  # the intake tried Pipeline.recognise on this upload already
        report = pipe.embed(
            [upload],
            modality=options.modality,
            progress=progress,
            labels=options.labels,
            collection=options.collection,
            recognise=False,
            refs=options.refs,
        )
    progress.flush()
    seconds = time.monotonic() - t0
    finish_job(
        jobs,
        pipe.store,
        job_id,
        report,
        upload,
        seconds,
        on_done,
        quarantine,
        vault,
        pipe,
        supersede=options.supersede or (),
    )
    if options.refs:  # needed while the job runs; its report names what it stored
        jobs.update(job_id, options=_without_refs(row.options))


def finish_job(
    jobs: JobStore,
    store: EmbeddingStore,
    job_id: str,
    report: EmbedReport,
    upload: Path,
    seconds: float,
    on_done: OnDone | None = None,
    quarantine: Path | None = None,
    vault: UidVault | None = None,
    pipeline: Pipeline | None = None,
    *,
    supersede: Collection[str] = (),
) -> None:
    """Record what a job stored (the job database's note, the entry catalog and, with a
    ``vault``, the original UIDs of its DICOM series under ``pipeline``'s pseudonyms),
    remove the earlier entries of the ``supersede`` series it stored again whole
    (:func:`supersede_series`), tell ``on_done`` (before the job reads done: then what it
    stored, and not what it replaced, is searchable when a client sees it), finish the job
    and drop its upload (or quarantine it, unless done)."""
    out = public_report(report, upload)
    jobs.record_entries(job_id, out["series"], lambda key: _space(store, key))
    EntryCatalog(jobs).record(store, [s["entry"] for s in out["series"]])
    if supersede and pipeline is not None:
        tenant = pipeline.pseudonymizer.tenant
        supersede_series(jobs, store, vault, tenant, out["series"], supersede)
    if vault is not None and pipeline is not None and out["series"]:
        pseudo = pipeline.pseudonymizer
        vault.keep(pseudo.tenant, out["series"], read_originals(upload, pseudo))
    if on_done is not None:
        on_done(seconds, out["series"])
    state = report_state(report)
    if state != "done":
        code = report.errors[0].code if report.errors else "unknown"
        n = {k: len(out[k]) for k in ("series", "errors", "skipped")}
        log_job(state, job_id, code, series=n["series"], errors=n["errors"], skipped=n["skipped"])
    jobs.finish(job_id, state, out)
    dispose_upload(upload, job_id, state, quarantine)


def supersede_series(
    jobs: JobStore,
    store: EmbeddingStore,
    vault: UidVault | None,
    tenant: str,
    stored: list[dict[str, Any]],
    series: Collection[str],
) -> list[str]:
    """Remove, as a deletion of their study would, the entries that name ``stored``'s
    series of ``series`` (study, series, part) in the same space, other than the stored
    ones: the DICOM receiver re-embeds a series whole when an instance of it comes late,
    and its study keeps the whole series' entry alone. An entry that another study also
    delivered stays, named by that study. Returns the keys removed."""
    catalog = EntryCatalog(jobs)
    new = {s["entry"] for s in stored}
    gone: list[str] = []
    for s in (s for s in stored if s["series"] in series):
        space = _space(store, s["entry"])
        names = (s["study"], s["series"], s.get("part") or "")
        earlier = set(catalog.study_keys(s["study"], tenant)) - new
        old = [
            key
            for key, attrs in store.entry_attrs(earlier).items()
            if any(
                (r.get("study"), r.get("series"), r.get("part") or "") == names
                for r in (attrs.get("volume") or {}, *attrs.get("aliases", []))
            )
            and _space(store, key) == space
        ]
        if not old:
            continue
        removed = store.delete_study(s["study"], keys=old)
        catalog.forget(removed)
        catalog.record(store, sorted(set(old) - set(removed)))  # named by another study now
        if vault is not None:
            vault.forget(tenant, s["study"], entries=old)
        gone += removed
    if gone:
        log.info("%d earlier entries of series embedded again whole removed", len(gone))
    return gone


def _without_refs(options: dict[str, Any] | None) -> dict[str, Any]:
    """A job's stored options without the patient and study names given for its upload: a
    finished job keeps none (what it stored is named in its report)."""
    return {k: v for k, v in (options or {}).items() if k not in ("patient", "study")}


def _uploaded_names(upload: Path, mapping: dict[str, str] | None) -> dict[str, str] | None:
    """A sequence mapping by the client's file names, extended to the names the upload's
    files were saved under (``00003-flair.nii.gz``: :func:`.uploads.client_names`)."""
    if not mapping:
        return mapping
    sent = {saved: Path(name).name for saved, name in client_names(upload).items()}
    return {**mapping, **{saved: mapping[name] for saved, name in sent.items() if name in mapping}}


def _space(store: EmbeddingStore, key: str) -> str:
    info = store.get(key)
    return info.space if info is not None else ""
