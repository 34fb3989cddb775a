"""Background threads: the embedded worker, which runs queued jobs through the pipeline,
and the index keeper, which keeps the search indexes and the entry catalog in step with
the store and compacts its tables.

HTTP stays responsive while a study embeds: handlers only write the upload and a job row
and put the job id on a bounded queue. :func:`~.runner.run_job` is the job itself, the
same code the scale-out workers run (:mod:`.queue`: a Redis queue instead of this
in-process one).
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from radcache.embeddings import IndexSet, Pipeline
from radcache.embeddings.errors import QueueFullError

from .entry_catalog import EntryCatalog
from .jobs import JobStore
from .runner import OnDone, run_job

__all__ = ["IndexKeeper", "Worker"]

log = logging.getLogger(__name__)

#: A table is compacted once its oldest tombstone is this old (deleted vectors leave the
#: table's files within about this long) …
COMPACT_AFTER_S = 3600.0
#: … or once this share of its rows are tombstones.
COMPACT_SHARE = 0.1


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
    """Keeps the search indexes and the entry catalog in step with the store: right after
    each job, and every ``interval`` seconds for embeddings written (or deleted) by other
    processes. Saves changed indexes at most every ``save_every`` seconds, and on stop.

    It also compacts the store's tables, on a thread of its own, once tombstones are
    ``compact_share`` of a table's rows or the oldest is ``compact_after`` seconds old:
    deleted rows then leave the table's files.
    """

    def __init__(
        self,
        indexes: IndexSet,
        interval: float,
        save_every: float = 60.0,
        *,
        catalog: EntryCatalog | None = None,
        compact_after: float = COMPACT_AFTER_S,
        compact_share: float = COMPACT_SHARE,
    ) -> None:
        self.indexes = indexes
        self.catalog = catalog
        self.interval = interval
        self.save_every = save_every
        self.compact_after = compact_after
        self.compact_share = compact_share
        self._saved = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radcache-index", daemon=True)
        self._compactor = threading.Thread(
            target=self._compact_loop, name="radcache-compact", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        if not self.indexes.store.read_only:
            self._compactor.start()

    def stop(self) -> None:
        self._stop.set()
        for t in (self._thread, self._compactor):
            if t.is_alive():
                t.join(timeout=30)
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
            changed = []
        if self.catalog is not None:
            try:
                self.catalog.sync(self.indexes.store)
            except Exception:  # followed from the same place on the next refresh
                log.exception("entry catalog sync failed")
        if changed and time.monotonic() - self._saved >= self.save_every:
            self.indexes.save()
            self._saved = time.monotonic()

    def touch(self, keys: Iterable[str]) -> None:
        """Entries whose labels, collections or references changed."""
        self.indexes.touch(keys)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def due(self, meta: Mapping[str, Any]) -> bool:
        """Whether a table (its metadata) should be compacted now."""
        dead, rows = int(meta.get("deleted", 0)), int(meta.get("count", 0))
        if not dead:
            return False
        since = str(meta.get("tombstoned") or "")
        try:
            when = dt.datetime.fromisoformat(since)
        except ValueError:
            return True  # no time written: compact
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        age = (dt.datetime.now(dt.UTC) - when).total_seconds()
        return dead >= self.compact_share * rows or age >= self.compact_after

    def compact(self) -> dict[str, int]:
        """Compact the tables that are due; returns the rows removed per space."""
        store = self.indexes.store
        done: dict[str, int] = {}
        for space in store.spaces():
            if self.due(store.table_meta(space)):
                done[space] = store.compact(space)[space]
                log.info("compacted table %s: %d deleted rows removed", space, done[space])
        if done:
            self.refresh()
        return done

    def _compact_loop(self) -> None:
        while not self._stop.wait(min(self.compact_after, 60.0)):
            try:
                self.compact()
            except Exception:  # tried again at the next round
                log.exception("table compaction failed")
