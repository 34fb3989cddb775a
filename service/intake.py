"""The one way studies come in: every route that takes a study (``POST /v1/studies``,
STOW-RS) saves it with :func:`receiving` and hands it to :func:`accept` with its validated
:class:`~.options.JobOptions`; the DICOM receiver (:mod:`.dicom`), which runs on threads of
its own, makes its upload directory with :func:`new_upload` and hands it to :func:`accept`.

:func:`accept` tries :meth:`Pipeline.recognise` once: a study whose files were all seen
before is answered from the cache (a job that is done at once); anything else becomes a
queued job. Either way the job ends in :func:`~.runner.finish_job`. An upload with patient
or study references that holds a DICOM file is refused first (422 ``invalid-request``),
before a job exists.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi.concurrency import run_in_threadpool

from radcache.embeddings import Pipeline
from radcache.embeddings.errors import InvalidFieldError

from .deps import Resources
from .jobs import JobRow
from .options import JobOptions
from .runner import finish_job

__all__ = ["Accepted", "accept", "new_upload", "receiving"]


@dataclass(frozen=True)
class Accepted:
    """A study taken in: its job, and whether the cache answered it (the job is done)."""

    job: JobRow
    cached: bool


def new_upload(res: Resources, prefix: str) -> Path:
    """A new, empty upload directory, after the capacity check (:class:`QueueFullError`
    when no more jobs may wait). Blocking: the scale-out queue asks Redis."""
    res.worker.check_capacity()
    dest = res.settings.upload_dir / f"{prefix}{uuid.uuid4().hex}"
    dest.mkdir(parents=True)
    return dest


@asynccontextmanager
async def receiving(res: Resources, prefix: str = "") -> AsyncIterator[Path]:
    """A new upload directory, after the capacity check (503 ``queue-full`` before a byte
    is read); removed with everything in it if saving fails. The checks and file system
    calls run in a worker thread, off the event loop."""
    dest = await run_in_threadpool(new_upload, res, prefix)
    try:
        yield dest
    except BaseException:
        with anyio.CancelScope(shield=True):  # removed even when the request is cancelled
            await run_in_threadpool(shutil.rmtree, dest, ignore_errors=True)
        raise


def _check_refs(pipeline: Pipeline, upload: Path, options: JobOptions) -> None:
    """Refuse references given with a DICOM file, naming it as the client uploaded it."""
    try:
        pipeline.check_refs([upload], options.refs)
    except InvalidFieldError as exc:
        name = (exc.path or "").replace(str(upload) + "/", "")
        raise InvalidFieldError(exc.message, path=name) from None


def accept(res: Resources, upload: Path, options: JobOptions) -> Accepted:
    """Answer a saved upload from the cache, or queue its job. Blocking: call it from a
    worker thread. The upload directory belongs to the job from here on."""
    try:
        t0 = time.monotonic()
        pipeline = options.pipeline(res.pipeline)
        _check_refs(pipeline, upload, options)
        # A multi-sequence study's entry is keyed by all its sequences, and references name
        # non-DICOM files only: no per-file shortcut for either.
        shortcut = not options.multi_sequence and not options.refs
        known = pipeline.recognise([upload], options.modality) if shortcut else None
        row = res.jobs.create(str(upload), options=options.stored(), tenant=options.tenant)
    except BaseException:
        shutil.rmtree(upload, ignore_errors=True)
        raise
    if known is None:
        res.worker.submit(row.id)
        return Accepted(row, cached=False)
    pipeline.label(known, labels=options.labels, collection=options.collection)
    slices = sum(s.slices for s in known.series)
    res.jobs.update(row.id, slices_done=slices, slices_total=slices)
    seconds = time.monotonic() - t0
    finish_job(
        res.jobs,
        res.store,
        row.id,
        known,
        upload,
        seconds,
        res.job_done,
        None,
        res.vault,
        pipeline,
        supersede=options.supersede or (),
    )
    done = res.jobs.get(row.id)
    assert done is not None
    return Accepted(done, cached=True)
