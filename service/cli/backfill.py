"""``radcache backfill``: the client side of a bulk load. Sends a folder of studies to a
running service with bounded concurrency, resumable."""

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

from ._common import API_KEY, URL, api_fail, err, out, service_access

if TYPE_CHECKING:
    from radcache.clients.backfill import BackfillReport

__all__ = ["backfill"]


class _StudiesPerSecond(ProgressColumn):
    """The bar's rate, in studies per second."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0.0:.2f} studies/s", style="progress.data.speed")


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@URL
@API_KEY
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
    api_key: str | None,
    concurrency: int,
    state: Path | None,
    modality: str | None,
    as_json: bool,
) -> None:
    """Send every study in DIRECTORY to a running service, resuming an earlier run.

    Each subfolder is one study (DICOM files at any depth), and so is each .zip, .nii,
    .nii.gz, .nrrd, .mha or .dcm file directly in DIRECTORY. A study an earlier run saw
    done is skipped while its files are unchanged; one it saw partially failed (input
    errors that sending the same files again would not fix) is reported as failed still,
    and not sent, until its files change; one whose job was accepted is waited for, not
    uploaded again; failed ones are sent again. Ctrl-C stops sending; run the command again
    to go on.

    Exit status: 0 when every study is done, 1 when any failed (in this run or, files
    unchanged, an earlier one), 2 when the service could not be used, 130 when interrupted.
    """
    import httpx

    from radcache.clients import RadcacheAPIError, RadcacheClient
    from radcache.clients.backfill import BackfillInterrupted
    from radcache.clients.backfill import backfill as run_backfill

    url, key = service_access(url, api_key)
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
            total = r.studies - r.skipped - r.failed_earlier
            bar.update(task, description=desc, total=total, completed=r.finished)

        try:
            with RadcacheClient(url, api_key=key) as rc:
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
        again = " (an earlier run's; its files are unchanged, so not sent again)" * r.earlier
        err.print(
            f"[bold red]{r.state}[/] {escape(r.study)}: {escape(r.failure or '-')}" + escape(again),
            highlight=False,
            soft_wrap=True,
        )
    earlier = f" ({report.failed_earlier} unchanged since an earlier run)" * bool(
        report.failed_earlier
    )
    line = (
        f"{report.done} done, {report.skipped} skipped, {len(report.failed)} failed{earlier} "
        f"of {report.studies} studies in {report.seconds:.1f} s ({report.studies_per_s:.2f} "
        "studies/s)"
    )
    if report.interrupted:
        err.print(f"[yellow]interrupted[/] {line}; run the same command again to resume.")
    else:
        out.print(line, highlight=False)
