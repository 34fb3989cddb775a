"""Scale-out jobs: Dramatiq on Redis, for many workers on many machines.

The API side (:class:`RedisQueue`) writes the job row and enqueues its id; workers
(:func:`run_worker`, ``radcache worker``) keep the model loaded and run the same
:func:`~.runner.run_job` the embedded worker runs. Delivery is at least once: a message is
acknowledged only after its job is recorded, a worker that stops heartbeating (killed,
lost) has its messages handed to another worker after ``queue_visibility_s``, and writes
are keyed by content, so a repeated delivery stores nothing twice. A job that raises is
retried with exponential back-off up to ``queue_max_retries`` times, then marked ``dead``
(Dramatiq's dead-letter queue keeps the message) — visible in ``GET /v1/jobs``. Deliveries
that never finish (a worker killed each time) count too, so nothing is retried forever.
A job's upload is kept while it may be retried and deleted (or quarantined) once it ends.

Why Dramatiq: acknowledgement after processing, dead-worker requeueing, retries with
back-off and a dead-letter queue are built in and kept up by its maintainers, on the Redis
the deployment already runs; see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from radcache.embeddings.errors import QueueFullError, QueueUnavailableError

from .jobs import JobRow, JobStore
from .runner import OnDone, error_code, fail_job, log_failure, log_job, purge_quarantine, run_job
from .settings import ServiceSettings

__all__ = ["QUEUE", "RedisQueue", "make_broker", "run_worker"]

log = logging.getLogger(__name__)

QUEUE = "radcache-embed"
ACTOR = "radcache.embed"
_WATCHED = 100_000  # queued jobs a replica watches for at most
_GONE = object()


class _Attempt(Exception):
    """A delivery whose job raised ``cause``: what Dramatiq logs (the job id and the error's
    type, not its message, which may name the client's files) and retries."""

    def __init__(self, job_id: str, cause: BaseException) -> None:
        super().__init__(f"job {job_id}: {type(cause).__name__}")
        self.cause = cause


_PURGE_EVERY_S = 600.0


def make_broker(settings: ServiceSettings, middleware: list[Any] | None = None) -> Any:
    """A Redis broker with radcache's delivery rules (``middleware`` sees their outcome)."""
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.middleware import Retries, TimeLimit

    if not settings.queue:
        raise QueueUnavailableError("no queue configured; set RADCACHE_QUEUE=redis://….")
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        url=settings.queue,
        namespace=settings.queue_namespace,
        heartbeat_timeout=int(settings.queue_visibility_s * 1000),
        # Look for dead workers' messages on every poll (a handful of Redis commands),
        # so the visibility timeout is what bounds a lost job's delay.
        maintenance_chance=1_000_000,
        # Dramatiq runs "after" hooks last-to-first: ``middleware`` comes first so that it
        # sees what Retries decided.
        middleware=[
            *(middleware or []),
            TimeLimit(time_limit=int(settings.job_time_limit_s * 1000)),
            Retries(
                max_retries=settings.queue_max_retries,
                min_backoff=int(settings.queue_backoff_s * 1000),
                max_backoff=int(settings.queue_backoff_s * 1000 * 64),
            ),
        ],
    )
    broker.declare_queue(QUEUE)
    return broker


class RedisQueue:
    """The API side: jobs go to Redis for ``radcache worker`` processes (same interface as
    the embedded :class:`~.worker.Worker`).

    A thread watches the job database for the jobs this process queued and tells
    ``on_done`` when each finishes, as the embedded worker does: this replica's metrics
    count the jobs it accepted (so figures summed over replicas count each job once), and
    what a job stored is searchable here without waiting for the periodic refresh. The
    watch lives in memory: a job queued before a restart is not counted after it."""

    def __init__(
        self, settings: ServiceSettings, jobs: JobStore, *, on_done: OnDone | None = None
    ) -> None:
        self.settings, self.jobs = settings, jobs
        self.broker = make_broker(settings)
        self.limit = settings.queue_size
        self.on_done = on_done
        self._key = f"{settings.queue_namespace}:{QUEUE}"
        self._queued: dict[str, None] = {}  # ids queued here, not yet seen finished (in order)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="radcache-jobs", daemon=True)

    def start(self) -> None:
        """Start watching for finished jobs; accepted jobs wait in Redis across restarts."""
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.broker.close()

    @property
    def alive(self) -> bool:
        try:
            return bool(self.broker.client.ping())
        except Exception:
            return False

    @property
    def depth(self) -> int:
        try:
            return int(self.broker.client.llen(self._key))
        except Exception:
            return 0

    def check_capacity(self) -> None:
        """Raise :class:`QueueFullError` (503) when ``queue_size`` jobs already wait."""
        depth = self.depth
        if depth >= self.limit:
            raise QueueFullError(
                f"{depth} jobs are already waiting (limit {self.limit}); retry later, add "
                "workers, or raise RADCACHE_QUEUE_SIZE."
            )

    def submit(self, job_id: str) -> None:
        from dramatiq import Message

        message: Any = Message(
            queue_name=QUEUE, actor_name=ACTOR, args=(job_id,), kwargs={}, options={}
        )
        with self._lock:
            self._queued[job_id] = None
            while len(self._queued) > _WATCHED:  # jobs lost for good: forget the oldest
                del self._queued[next(iter(self._queued))]
        try:
            self.broker.enqueue(message)
        except Exception as exc:
            with self._lock:
                self._queued.pop(job_id, None)
            failure = f"could not be queued: {exc}"
            fail_job(self.jobs, job_id, "failed", failure, code=QueueUnavailableError.code)
            raise QueueUnavailableError(
                f"the job queue at {self.settings.queue} did not take the job ({exc}); "
                "nothing was accepted, send it again."
            ) from exc

    def collect(self) -> int:
        """Tell ``on_done`` about each job queued here that finished since the last look,
        once; returns how many finished. Jobs that ended without a report (dead, or
        failed before embedding) are not counted, as with the embedded worker."""
        with self._lock:
            ids = list(self._queued)
        if not ids:
            return 0
        rows = self.jobs.finished_among(ids)
        with self._lock:  # a concurrent look may have taken some already
            mine = [r for r in rows if self._queued.pop(r.id, _GONE) is not _GONE]
        for row in mine:
            if row.report is None or self.on_done is None:
                continue
            try:
                self.on_done(_seconds(row), list(row.report.get("series", [])))
            except Exception:  # one job's figures lost, not the others'
                log.exception("recording finished job %s failed", row.id)
        return len(mine)

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.index_refresh_s):
            try:
                self.collect()
            except Exception:  # the database is away: look again next time
                log.exception("looking for finished jobs failed")


def _seconds(row: JobRow) -> float:
    """Wall time of a job's last attempt, from start to finish."""
    if row.started is None or row.finished is None:
        return 0.0
    return max(0.0, (row.finished - row.started).total_seconds())


def _job_states(jobs: JobStore, quarantine: Path | None = None) -> Any:
    from dramatiq import Middleware

    class JobStates(Middleware):
        """Retries and dead letters, written into the job row (after Retries decided); a
        dead job's upload is deleted (or quarantined)."""

        def after_process_message(
            self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
        ) -> None:
            if exception is None:
                return
            job_id = message.args[0]
            cause = getattr(exception, "cause", exception)  # what the job raised
            why = f"{type(cause).__name__}: {cause}"
            tries = message.options.get("retries", 0)
            code = error_code(cause)
            if message.failed:
                failure = f"gave up after {tries} deliveries: {why}"
                fail_job(jobs, job_id, "dead", failure, quarantine, code=code, deliveries=tries)
            else:
                log_job("retry", job_id, code, delivery=tries)
                jobs.update(
                    job_id,
                    state="queued",
                    failure=f"delivery {tries} failed, retrying: {why}"[:2000],
                )

    return JobStates()


def _purge(quarantine: Path, retention: dt.timedelta) -> None:
    """Delete the uploads quarantined more than ``retention`` ago."""
    try:
        purge_quarantine(quarantine, retention)
    except OSError:  # tried again at the next round
        log.exception("purging quarantined uploads failed")


def run_worker(
    settings: ServiceSettings, *, threads: int = 1, stop: threading.Event | None = None
) -> None:
    """Load the model and run jobs from the queue until SIGTERM/SIGINT (or ``stop``).

    Shutdown stops taking messages, lets running jobs finish for ``worker_grace_s``, and
    leaves any still running to be redelivered after the visibility timeout."""
    import dramatiq

    from radcache.embeddings import Pipeline
    from radcache.embeddings.batching import BatchingEncoder
    from radcache.embeddings.ingest import use_decode_workers
    from radcache.embeddings.tuning import settle

    pipeline = Pipeline.from_settings(settings)
    use_decode_workers(settings.decode_workers)  # started with the first compressed file
    settle()
    if threads > 1:  # slices of concurrent jobs share forward batches
        pipeline.encoder = BatchingEncoder(pipeline.encoder, pipeline.batching)
    jobs = JobStore(settings.db)
    vault = settings.uid_vault(jobs)
    quarantine = settings.quarantine_dir
    broker = make_broker(settings, [_job_states(jobs, quarantine)])
    name = f"{socket.gethostname()}:{os.getpid()}"
    limit = settings.queue_max_retries + 2

    def embed(job_id: str) -> None:
        row = jobs.get(job_id)
        if row is not None and row.state == "running" and (row.attempts or 0) >= limit:
            failure = f"delivered {row.attempts + 1} times and never finished"
            fail_job(
                jobs,
                job_id,
                "dead",
                failure,
                quarantine,
                code="never-finished",
                deliveries=row.attempts + 1,
            )
            return
        try:
            run_job(pipeline, jobs, job_id, worker=name, quarantine=quarantine, vault=vault)
        except Exception as exc:
            log_failure(job_id, exc)
            raise _Attempt(job_id, exc) from None

    dramatiq.Actor(embed, broker=broker, actor_name=ACTOR, queue_name=QUEUE, priority=0, options={})
    # An idle consumer backs off up to worker_timeout between polls: 100 ms keeps a job
    # that arrives at an idle worker from waiting up to a second (Dramatiq's default).
    worker = dramatiq.Worker(broker, queues={QUEUE}, worker_threads=threads, worker_timeout=100)
    worker.queue_prefetch = threads  # hold only what runs: the rest stays for other workers
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    worker.start()
    log.info("radcache worker %s: %d thread(s) on %s", name, threads, settings.queue)
    retention = dt.timedelta(days=settings.job_retention_days)
    try:
        while True:
            if quarantine is not None:  # this worker's, after the retention period
                _purge(quarantine, retention)
            if stop.wait(_PURGE_EVERY_S):
                break
    finally:
        worker.stop(timeout=int(settings.worker_grace_s * 1000))
        broker.close()
