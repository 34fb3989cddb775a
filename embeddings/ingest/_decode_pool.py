"""Compressed DICOM pixel data decoded in worker processes, a few files ahead.

pydicom's decoders (openjpeg, charls, libjpeg through pylibjpeg) hold the GIL, so
threads decode one frame at a time; a process pool decodes as many as there are
workers. Files are still read (and their digests checked) in the loading thread, in
the order their frames are taken; a JPEG-family file's dataset (JPEG, JPEG-LS, JPEG 2000:
compressed bytes, a few hundred kB) goes to a worker, and its decoded array comes back:
at most ``2 × workers`` files are in flight, so memory stays a few slices per worker.
Uncompressed data is read straight from the file's buffer, and RLE decoded, in the
loading thread, as without the pool (an RLE slice decodes faster than its array crosses
between processes: bench/README.md, "Decoding").

The workers start from a fork server (never a fork of a process with model and server
threads) on first use, and live as long as the process. A worker that dies while it
decodes (a decoder's native crash) breaks its pool: the pool is started again, the
files that were in flight are tried once more, and the file that kills a worker a second
time fails with a :class:`DecodeError` naming it. The loading process survives what
would have killed it.

``RADCACHE_DECODE_WORKERS`` sets the pool's size (:func:`use_workers`, called by
``radcache embed``, ``serve`` and ``worker``; a library caller makes its own call); 0
decodes in the loading thread.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DecodeError

if TYPE_CHECKING:  # pydicom loads with the first DICOM file read (ingest/__init__)
    import numpy as np
    from pydicom.dataset import Dataset

__all__ = ["DecodeJob", "DecodePool", "auto_workers", "shared_pool", "use_workers"]


def auto_workers() -> int:
    """The cores this process may run on (its CPU affinity), at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


def _decode(ds: Dataset, name: str) -> np.ndarray:
    from ._dicom_decode import decode_file  # in the worker

    return decode_file(ds, name)


@dataclass
class DecodeJob:
    """One file on its way through a worker (:meth:`DecodePool.result` waits for it)."""

    ds: Dataset
    name: str
    future: Future[np.ndarray]
    executor: ProcessPoolExecutor
    retried: bool = False


class DecodePool:
    """``workers`` processes decoding compressed pixel data; see the module docstring."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([__name__.rsplit(".", 1)[0] + "._dicom_decode"])
                self._executor = ProcessPoolExecutor(self.workers, mp_context=context)
            return self._executor

    def submit(self, ds: Dataset, name: str, *, retried: bool = False) -> DecodeJob:
        """Start decoding every frame of ``ds`` (the file ``name``) in a worker."""
        executor = self._pool()
        try:
            future = executor.submit(_decode, ds, name)
        except BrokenProcessPool:  # broken by another file: start again
            self._restart(executor)
            executor = self._pool()
            future = executor.submit(_decode, ds, name)
        return DecodeJob(ds, name, future, executor, retried)

    def result(self, job: DecodeJob) -> np.ndarray:
        """The decoded frames, or the file's :class:`InputError`. A worker's death fails
        every file in flight in its pool: each is tried once more in a new pool, and the
        file that kills a worker again fails alone."""
        try:
            return job.future.result()
        except BrokenProcessPool as exc:
            self._restart(job.executor)
            if not job.retried:
                return self.result(self.submit(job.ds, job.name, retried=True))
            raise DecodeError(
                "the decoder crashed on this file's pixel data (its worker process died); "
                "the file may be corrupt. The other files go on.",
                path=job.name,
            ) from exc

    def _restart(self, broken: ProcessPoolExecutor | None) -> None:
        """Let ``broken`` go (None: whatever runs), unless another thread already did."""
        with self._lock:
            if self._executor is not None and broken in (None, self._executor):
                self._executor.shutdown(wait=False)
                self._executor = None

    def close(self) -> None:
        self._restart(None)


class _Shared:
    pool: DecodePool | None = None
    lock = threading.Lock()


def use_workers(workers: int | None) -> None:
    """Decode compressed pixel data in ``workers`` processes from now on (None: one per
    core, :func:`auto_workers`; 0: in the loading thread)."""
    n = auto_workers() if workers is None else workers
    with _Shared.lock:
        old = _Shared.pool
        if old is not None and old.workers == n:
            return
        if old is not None:
            old.close()
        _Shared.pool = DecodePool(n) if n > 0 else None


def shared_pool() -> DecodePool | None:
    """The process's decode pool, if :func:`use_workers` made one."""
    return _Shared.pool


@atexit.register
def _close() -> None:
    if _Shared.pool is not None:
        _Shared.pool.close()
