"""Background threads: the embedded worker, which runs queued jobs through the pipeline,
and the index keeper, which keeps the search indexes and the entry catalog in step with
the store, compacts its tables, finishes consent deletions (:mod:`.erasure`) and deletes
finished jobs (and quarantined uploads) once their retention period is over.

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
from pathlib import Path
from typing import Any

from radcache.embeddings import IndexSet, Pipeline
from radcache.embeddings.errors import QueueFullError

from .entry_catalog import EntryCatalog
from .jobs import JobStore
from .runner import OnDone, error_code, fail_job, log_failure, purge_quarantine, run_job
from .uid_vault import UidVault

__all__ = ["IndexKeeper", "Worker"]

log = logging.getLogger(__name__)

#: A table is compacted once its oldest tombstone is this old (deleted vectors leave the
#: table's files within about this long) …
COMPACT_AFTER_S = 3600.0
#: … or once this share of its rows are tombstones.
COMPACT_SHARE = 0.1
#: Finished jobs (their reports name the client's files) are deleted after this long.
JOB_RETENTION_S = 7 * 86400.0
#: How often the index keeper looks for jobs past their retention.
PURGE_EVERY_S = 600.0
#: An erasure pass starts once no deletion came for ``erase_after`` seconds (a burst of
#: deletions shares one pass), and at the latest this long after the first one waiting.
ERASE_WITHIN_S = 60.0
#: How often the keeper looks for erasures queued by other processes (or before a restart).
ERASE_POLL_S = 30.0


class Worker:
    """Runs jobs one at a time on a background thread. A job's upload is deleted when it
    ends, or moved to ``quarantine`` when it did not end ``done``."""

    def __init__(
        self,
        pipeline: Pipeline,
        jobs: JobStore,
        *,
        limit: int,
        on_done: OnDone | None = None,
        quarantine: Path | None = None,
        vault: UidVault | None = None,
    ) -> None:
        self.pipeline, self.jobs, self.limit = pipeline, jobs, limit
        self.vault = vault
        self.on_done = on_done
        self.quarantine = quarantine
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
        """Queue a job; when no more may wait, the job fails (its upload deleted) and
        :class:`QueueFullError` says nothing was accepted."""
        try:
            self.check_capacity()
        except QueueFullError as exc:
            fail_job(self.jobs, job_id, "failed", f"could not be queued: {exc}", code=exc.code)
            raise
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
            run_job(
                self.pipeline,
                self.jobs,
                job_id,
                on_done=self.on_done,
                quarantine=self.quarantine,
                vault=self.vault,
            )
        except Exception as exc:  # a bug or a broken model: the job fails, the worker goes on
            log_failure(job_id, exc)
            why = f"{type(exc).__name__}: {exc}"
            fail_job(self.jobs, job_id, "failed", why, self.quarantine, code=error_code(exc))

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

    And, on another thread, every ``purge_every`` seconds, it deletes the jobs of the
    catalog's job database that finished more than ``retention`` seconds ago (their reports
    name the client's files) and the uploads quarantined as long ago.

    And, on a third, it finishes consent deletions (:meth:`erase`): ``erase_after`` seconds
    after the last of a burst of deletions (:meth:`erase_soon`), at start, and whenever
    it finds erasure jobs that another process queued.
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
        retention: float = JOB_RETENTION_S,
        quarantine: Path | None = None,
        purge_every: float = PURGE_EVERY_S,
        erase_after: float = 5.0,
    ) -> None:
        self.indexes = indexes
        self.catalog = catalog
        self.interval = interval
        self.save_every = save_every
        self.compact_after = compact_after
        self.compact_share = compact_share
        self.retention = retention
        self.quarantine = quarantine
        self.purge_every = purge_every
        self.erase_after = erase_after
        self._saved = time.monotonic()
        self._erase_wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radcache-index", daemon=True)
        self._compactor = threading.Thread(
            target=self._compact_loop, name="radcache-compact", daemon=True
        )
        self._purger = threading.Thread(target=self._purge_loop, name="radcache-purge", daemon=True)
        self._eraser = threading.Thread(target=self._erase_loop, name="radcache-erase", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self.indexes.store.read_only:
            self._compactor.start()
        if self.catalog is not None or self.quarantine is not None:
            self._purger.start()
        if self.catalog is not None:
            self._eraser.start()

    def stop(self) -> None:
        self._stop.set()
        self._erase_wanted.set()
        for t in (self._thread, self._compactor, self._purger, self._eraser):
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

    def erase_soon(self) -> None:
        """A deletion queued an erasure job: run a pass once the burst is over."""
        self._erase_wanted.set()

    def erase(self) -> int:
        """Finish every pending consent deletion: compact the tables holding tombstones
        (their rows' keys and vectors leave the table files), absorb that, save the indexes
        and delete every earlier saved version (:meth:`IndexSet.save` with ``purge``), then
        mark the erasure jobs done. Returns how many finished."""
        if self.catalog is None:
            return 0
        jobs = self.catalog.jobs
        pending = [r for r in jobs.unfinished("erase") if jobs.start(r.id) is not None]
        if not pending:
            return 0
        store = self.indexes.store
        if not store.read_only:
            for space in store.spaces():
                if int(store.table_meta(space).get("deleted", 0)):
                    store.compact(space)
        self.refresh()
        self.indexes.save(purge=True)
        self._saved = time.monotonic()
        for row in pending:
            jobs.finish(row.id, "done", None)
        log.info("erasure: %d deletion(s) finished", len(pending))
        return len(pending)

    def _erase_loop(self) -> None:
        first = True
        while not self._stop.is_set():
            woke = first or self._erase_wanted.wait(ERASE_POLL_S)
            first = False
            if self._stop.is_set():
                return
            if woke:
                until = time.monotonic() + ERASE_WITHIN_S
                self._erase_wanted.clear()
                while time.monotonic() < until and self._erase_wanted.wait(self.erase_after):
                    if self._stop.is_set():
                        return
                    self._erase_wanted.clear()  # another deletion: wait for the burst's end
            try:
                self.erase()
            except Exception:  # tried again at the next round
                log.exception("erasure pass failed")

    def purge(self) -> tuple[int, int]:
        """Delete the jobs and the quarantined uploads past their retention; returns how
        many of each."""
        age = dt.timedelta(seconds=self.retention)
        jobs = self.catalog.jobs.purge(age) if self.catalog is not None else 0
        kept = purge_quarantine(self.quarantine, age) if self.quarantine is not None else 0
        if jobs or kept:
            log.info(
                "retention: %d finished job(s) and %d quarantined upload(s) deleted", jobs, kept
            )
        return jobs, kept

    def _purge_loop(self) -> None:
        while True:
            try:
                self.purge()
            except Exception:  # tried again at the next round
                log.exception("purging old jobs failed")
            if self._stop.wait(self.purge_every):
                return
