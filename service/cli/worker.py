"""``radcache worker``: the scale-out worker, running jobs queued in Redis by `radcache serve
--queue` until SIGTERM."""

from __future__ import annotations

import click

from radcache.embeddings.errors import ConfigError, RadcacheError

from ._common import STORE, err, fail, need_server, settings

__all__ = ["worker"]


@click.command()
@click.option("--queue", help="Redis URL of the job queue. [env RADCACHE_QUEUE]")
@click.option("--db", help="Job database URL (PostgreSQL when several processes share it).")
@STORE
@click.option("--model", help="Registry name or checkpoint directory. [env RADCACHE_MODEL]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option(
    "--threads",
    type=click.IntRange(1, 64),
    help="Jobs run at once; their slices share forward batches. [env RADCACHE_WORKER_THREADS]",
)
def worker(
    queue: str | None,
    db: str | None,
    store: str | None,
    model: str | None,
    device: str | None,
    precision: str | None,
    threads: int | None,
) -> None:
    """Run queued jobs: keep the model loaded and pull work from Redis until SIGTERM.

    Start any number, on any number of machines, with the settings of `radcache serve
    --queue` (the same store, job database, model and pseudonym secret). On SIGTERM a
    worker takes no new job and lets running ones finish (RADCACHE_WORKER_GRACE_S); a job
    it could not finish goes to another worker after RADCACHE_QUEUE_VISIBILITY_S."""
    need_server("worker")
    from ..queue import run_worker

    try:
        s = settings(
            queue=queue,
            db=db,
            store=store,
            model=model,
            device=device,
            precision=precision,
            worker_threads=threads,
        )
        if not s.queue:
            raise ConfigError("no queue given; pass --queue redis://… or set RADCACHE_QUEUE.")
        err.print(
            f"radcache worker: {s.worker_threads} thread(s), queue {s.queue}, store {s.store}"
        )
        run_worker(s, threads=s.worker_threads)
    except RadcacheError as exc:
        fail(exc, False)
