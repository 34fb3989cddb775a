"""Background threads: the embedded worker, which runs queued jobs through the pipeline,
and the index keeper, which keeps the search indexes in step with the store.

HTTP stays responsive while a study embeds: handlers only write the upload and a job row
and put the job id on a bounded queue. :func:`~.runner.run_job` is the job itself, the
same code the scale-out workers run (:mod:`.queue`: a Redis queue instead of this
in-process one).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable

from radcache.embeddings import IndexSet, Pipeline
from radcache.embeddings.errors import QueueFullError

from .jobs import JobStore
from .runner import OnDone, run_job

__all__ = ["IndexKeeper", "Worker"]

log = logging.getLogger(__name__)


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
