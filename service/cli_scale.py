"""``radcache worker`` (scale-out: run queued jobs) and ``radcache backfill`` (client side:
send a folder of studies with bounded concurrency, resumable). Added to the main group by
:mod:`.cli`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from radcache.embeddings.errors import ConfigError, RadcacheError

from ._cliutil import URL, api_fail, err, fail, need_server, out, settings

if TYPE_CHECKING:
    from radcache.clients.backfill import BackfillReport

__all__ = ["backfill", "worker"]


@click.command()
@click.option("--queue", help="Redis URL of the job queue. [env RADCACHE_QUEUE]")
@click.option("--db", help="Job database URL (PostgreSQL when several processes share it).")
@click.option("--store", help="Zarr store directory or fsspec URL. [env RADCACHE_STORE]")
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
    from .queue import run_worker

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


class _StudiesPerSecond(ProgressColumn):
    """The bar's rate, in studies per second."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0.0:.2f} studies/s", style="progress.data.speed")


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@URL
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Studies in flight (submitted and not finished) at once.",
)
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Resume file (JSON lines). [default DIRECTORY/.radcache-backfill.jsonl]",
)
@click.option("--modality", help="Modality of NIfTI/NRRD inputs, e.g. CT or MR.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def backfill(
    directory: Path,
    url: str | None,
    concurrency: int,
    state: Path | None,
    modality: str | None,
    as_json: bool,
) -> None:
    """Send every study in DIRECTORY to a running service, resuming an earlier run.

    Each subfolder is one study (DICOM files at any depth), and so is each .zip, .nii,
    .nii.gz, .nrrd, .mha or .dcm file directly in DIRECTORY. A study an earlier run saw
    done (or partially failed: input errors that sending it again would not fix) is skipped
    while its files are unchanged; one whose job was accepted is waited for, not uploaded
    again; failed ones are sent again. Ctrl-C stops sending; run the command again to go on.

    Exit status: 0 when every study is done, 1 when any failed, 2 when the service could
    not be used, 130 when interrupted.
    """
    import httpx

    from radcache.clients import RadcacheAPIError, RadcacheClient
    from radcache.clients.backfill import BackfillInterrupted
    from radcache.clients.backfill import backfill as run_backfill

    url = url or settings().url
    show = not as_json and err.is_terminal
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _StudiesPerSecond(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not show,
    ) as bar:
        task = bar.add_task("studies", total=None)

        def progress(r: BackfillReport) -> None:
            desc = f"studies ({r.skipped} skipped)" if r.skipped else "studies"
            bar.update(task, description=desc, total=r.studies - r.skipped, completed=r.finished)

        try:
            with RadcacheClient(url) as rc:
                report = run_backfill(
                    directory,
                    rc,
                    concurrency=concurrency,
                    state=state,
                    modality=modality,
                    on_progress=progress,
                )
        except BackfillInterrupted as exc:
            report = exc.report
        except (RadcacheAPIError, httpx.HTTPError) as exc:
            api_fail(exc, as_json)
            return
    _print_backfill(report, as_json)
    sys.exit(130 if report.interrupted else 0 if report.ok else 1)


def _print_backfill(report: BackfillReport, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    for r in report.failed:
        err.print(
            f"[bold red]{r.state}[/] {escape(r.study)}: {escape(r.failure or '-')}",
            highlight=False,
            soft_wrap=True,
        )
    line = (
        f"{report.done} done, {report.skipped} skipped, {len(report.failed)} failed of "
        f"{report.studies} studies in {report.seconds:.1f} s ({report.studies_per_s:.2f} "
        "studies/s)"
    )
    if report.interrupted:
        err.print(f"[yellow]interrupted[/] {line}; run the same command again to resume.")
    else:
        out.print(line, highlight=False)
