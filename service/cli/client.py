"""The client commands, against a running service: ``radcache submit`` (send studies),
``radcache jobs`` (recent jobs) and ``radcache get`` (an embedding array as .npy). They need
only the base install (httpx, no torch)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from ._common import (
    API_KEY,
    URL,
    api_fail,
    err,
    fit_table,
    id_width,
    out,
    series_warnings,
    service_access,
)

__all__ = ["get", "jobs", "submit"]


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@URL
@API_KEY
@click.option("--wait/--no-wait", default=True, help="Wait for the job to finish.")
@click.option("--modality", help="Modality of NIfTI inputs, e.g. CT or MR.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
def submit(
    inputs: Sequence[str],
    url: str | None,
    api_key: str | None,
    wait: bool,
    modality: str | None,
    as_json: bool,
) -> None:
    """Send files, folders, zips or NIfTI volumes to a running service.

    Exit status: 0 when the job is done (or queued, with --no-wait), 1 when any input failed.
    """
    import httpx

    from radcache.clients import RadcacheAPIError, RadcacheClient

    url, key = service_access(url, api_key)
    try:
        with RadcacheClient(url, api_key=key) as rc:
            job = rc.submit(inputs, wait=False, modality=modality)
            if wait and job.state in ("queued", "running"):
                show = not as_json and err.is_terminal
                with Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    console=err,
                    transient=True,
                    disable=not show,
                ) as p:
                    task = p.add_task(f"job {job.id[:8]}", total=None)
                    while job.state in ("queued", "running"):
                        time.sleep(0.25)
                        job = rc.job(job.id)
                        p.update(
                            task, completed=job.progress.done, total=job.progress.total or None
                        )
    except (RadcacheAPIError, httpx.HTTPError) as exc:
        api_fail(exc, as_json)
        return
    if as_json:
        click.echo(job.model_dump_json())
    else:
        table = Table(title=f"job {job.id} · {job.state}", title_justify="left")
        for col in ("series", "part", "modality", "slices", "cache", "entry"):
            table.add_column(col)
        w = id_width(s.series for s in job.series)
        for s in job.series:
            table.add_row(
                s.series[:w], s.part or "-", s.modality or "-", str(s.slices), s.cache, s.entry
            )
        out.print(fit_table(table, ids=("series", "entry"), lesser=("part", "cache", "slices")))
        series_warnings(job.series)
        for sk in job.skipped:
            err.print(f"[dim]skipped[/] {escape(sk.path)}: {escape(sk.reason)}", highlight=False)
        for e in job.errors:
            err.print(
                f"[bold red]error[/] {escape(f'[{e.code}] {e.path}: {e.message}')}", highlight=False
            )
    sys.exit(1 if job.state in ("failed", "partially_failed", "dead") else 0)


@click.command()
@URL
@API_KEY
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs(url: str | None, api_key: str | None, limit: int, as_json: bool) -> None:
    """List recent jobs of a running service."""
    import httpx

    from radcache.clients import RadcacheAPIError, RadcacheClient

    url, key = service_access(url, api_key)
    try:
        with RadcacheClient(url, api_key=key) as rc:
            rows = rc.jobs(limit)
    except (RadcacheAPIError, httpx.HTTPError) as exc:
        api_fail(exc, as_json)
        return
    if as_json:
        click.echo(json.dumps([j.model_dump(mode="json") for j in rows]))
        return
    table = Table(title=f"{url}: {len(rows)} recent jobs", title_justify="left")
    for col in ("id", "state", "created", "slices", "series", "errors"):
        table.add_column(col)
    for j in rows:
        table.add_row(
            j.id,
            j.state,
            j.created.isoformat(timespec="seconds"),
            f"{j.progress.done}/{j.progress.total}",
            str(len(j.series)),
            str(len(j.errors)),
        )
    lesser = ("errors", "series", "slices", "created")
    out.print(fit_table(table, ids=("id", "state"), lesser=lesser))


@click.command()
@click.argument("series")
@URL
@API_KEY
@click.option(
    "--kind",
    default="pooled",
    show_default=True,
    type=click.Choice(["pooled", "cls", "mean_patch", "patch", "cls_last4", "positions"]),
)
@click.option("--slices", help="A slice range a:b for per-slice arrays.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    required=True,
    help="Where to write the .npy.",
)
def get(
    series: str, url: str | None, api_key: str | None, kind: str, slices: str | None, output: str
) -> None:
    """Fetch an embedding array of a cached series as a .npy file. SERIES is a series
    name, series#part or entry key, or a unique prefix (4 characters or more) of one."""
    import httpx
    import numpy as np

    from radcache.clients import RadcacheAPIError, RadcacheClient

    url, key = service_access(url, api_key)
    try:
        with RadcacheClient(url, api_key=key) as rc:
            arr = rc.embeddings(series, kind, slices=slices)
    except (RadcacheAPIError, httpx.HTTPError) as exc:
        api_fail(exc, False)
        return
    np.save(output, arr)
    err.print(f"{output}: {kind} {tuple(arr.shape)} {arr.dtype}")
