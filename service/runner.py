"""One job, run: embed its upload as its options ask, record the outcome, finish it.

:func:`run_job` is what every worker runs (the embedded one in :mod:`.worker`, scale-out
workers in :mod:`.queue`); :func:`finish_job` is how every job ends, including one that
:mod:`.intake` answers from the cache without running anything.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radcache.embeddings import EmbeddingStore, EmbedReport, Pipeline

from .entry_catalog import EntryCatalog
from .jobs import JobState, JobStore
from .options import JobOptions

__all__ = ["OnDone", "finish_job", "public_report", "report_state", "run_job"]

OnDone = Callable[[float, list[dict[str, Any]]], None]  # (seconds, the report's series)


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
) -> None:
    """Embed one job's upload and record the outcome. A job already finished (a repeated
    delivery) is left alone. Exceptions (a bug, a broken model, a lost store) propagate:
    the caller decides between failing the job and trying again."""
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
        )
    else:  # the intake tried Pipeline.recognise on this upload already
        report = pipe.embed(
            [upload],
            modality=options.modality,
            progress=progress,
            labels=options.labels,
            collection=options.collection,
            recognise=False,
        )
    progress.flush()
    finish_job(jobs, pipe.store, job_id, report, upload, time.monotonic() - t0, on_done)


def finish_job(
    jobs: JobStore,
    store: EmbeddingStore,
    job_id: str,
    report: EmbedReport,
    upload: Path,
    seconds: float,
    on_done: OnDone | None = None,
) -> None:
    """Record what a job stored (the job database's note and the entry catalog), tell
    ``on_done`` (before the job reads done: then what it stored is searchable when a client
    sees it), finish the job and drop its upload."""
    out = public_report(report, upload)
    jobs.record_entries(job_id, out["series"], lambda key: _space(store, key))
    EntryCatalog(jobs).record(store, [s["entry"] for s in out["series"]])
    if on_done is not None:
        on_done(seconds, out["series"])
    jobs.finish(job_id, report_state(report), out)
    shutil.rmtree(upload, ignore_errors=True)


def _uploaded_names(upload: Path, mapping: dict[str, str] | None) -> dict[str, str] | None:
    """A sequence mapping by the client's file names, extended to the names the upload's
    files were saved under (``00003-flair.nii.gz``)."""
    if not mapping:
        return mapping
    saved = {p.name: p.name.split("-", 1)[-1] for p in upload.iterdir()} if upload.is_dir() else {}
    return {**mapping, **{name: mapping[orig] for name, orig in saved.items() if orig in mapping}}


def _space(store: EmbeddingStore, key: str) -> str:
    info = store.get(key)
    return info.space if info is not None else ""
