"""``radcache worker``: the scale-out worker, running jobs queued in Redis by `radcache serve
--queue` until SIGTERM."""

from __future__ import annotations

import os
import sys

import click

from radcache.embeddings.errors import ConfigError, RadcacheError

from ._common import STORE, encoder_options, err, fail, need_server, settings

__all__ = ["worker"]


@click.command()
@click.option("--queue", help="Redis URL of the job queue. [env RADCACHE_QUEUE]")
@click.option("--db", help="Job database URL (PostgreSQL when several processes share it).")
@STORE
@click.option("--model", help="Registry name or checkpoint directory. [env RADCACHE_MODEL]")
@encoder_options
@click.option(
    "--gpus",
    metavar="0,1,…",
    help="One worker process per GPU (each sees only its GPU: CUDA_VISIBLE_DEVICES), "
    "this process supervising them; indices as torch sees them here.",
)
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
    gpus: str | None,
    threads: int | None,
) -> None:
    """Run queued jobs: keep the model loaded and pull work from Redis until SIGTERM.

    Start any number, on any number of machines, with the settings of `radcache serve
    --queue` (the same store, job database, model and pseudonym secret). On SIGTERM a
    worker takes no new job and lets running ones finish (RADCACHE_WORKER_GRACE_S); a job
    it could not finish goes to another worker after RADCACHE_QUEUE_VISIBILITY_S.
    With --gpus, one such worker runs per GPU."""
    need_server("worker")
    if gpus is not None:
        flags: dict[str, object] = {"queue": queue, "db": db, "store": store, "model": model}
        flags |= {"precision": precision, "threads": threads}
        sys.exit(_per_gpu(gpus, device, flags))
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


def _per_gpu(gpus: str, device: str | None, flags: dict[str, object]) -> int:
    """Run one ``radcache worker`` per GPU in ``gpus`` with ``flags``; their exit status."""
    from ._fanout import child_commands, parse_gpus, supervise, visible_gpus

    try:
        if device not in (None, "auto", "cuda"):
            raise ConfigError(
                f"--gpus sets each worker's device; --device {device} cannot go with it "
                "(leave --device out, or run one worker without --gpus)."
            )
        chosen = parse_gpus(gpus, visible_gpus())
    except RadcacheError as exc:
        fail(exc, False)
    options = [f"--{name}={value}" for name, value in flags.items() if value is not None]
    err.print(f"radcache worker: one process on each of GPUs {', '.join(map(str, chosen))}")
    return supervise(child_commands(chosen, options, dict(os.environ)))
