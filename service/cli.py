"""The ``radcache`` command line: ``embed``, ``serve``, ``models``, ``show``; the client
commands ``submit``, ``jobs``, ``get``; and (in :mod:`.cli_search`) ``search``,
``classify`` and ``index``.

Settings come from :class:`radcache.embeddings.settings.Settings` (``RADCACHE_*``
environment variables); a flag given on the command line overrides its variable.
Heavy imports (torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from radcache.embeddings.errors import ConfigError, RadcacheError
from radcache.embeddings.runtime import settle
from radcache.embeddings.settings import Settings

from ._cliutil import URL, api_fail, err, fail, need_server, out, settings
from .cli_probe import export, probe
from .cli_scale import backfill, worker
from .cli_search import classify, index, search

__all__ = ["main"]


class _Bar:
    """Adapts a rich progress bar to the pipeline's Progress protocol."""

    def __init__(self, progress: Progress) -> None:
        self.p = progress
        self.task = progress.add_task("embedding", total=None)

    def total(self, slices: int) -> None:
        self.p.update(self.task, total=slices)

    def advance(self, slices: int) -> None:
        self.p.advance(self.task, slices)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="radcache")
def main() -> None:
    """radcache: DINOv2-family embeddings of DICOM and NIfTI studies, cached in Zarr."""
    # Whatever is alive when the command ends is frozen, so that interpreter shutdown does
    # not walk it all (about 1 s once torch and a model are loaded).
    click.get_current_context().call_on_close(settle)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    help="Registry name (see `radcache models`) or checkpoint directory. [env RADCACHE_MODEL]",
)
@click.option("--store", help="Zarr store directory or fsspec URL. [env RADCACHE_STORE]")
@click.option(
    "--recipe", type=click.Path(exists=True, dir_okay=False), help="Recipe file (JSON or YAML)."
)
@click.option(
    "--patch-tokens/--no-patch-tokens", default=None, help="Keep patch-token grids (fp16)."
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where the encoder runs."
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="auto: bf16 where fast.",
)
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Slices per forward pass.")
@click.option("--modality", help="Modality of NIfTI/NRRD inputs (they carry none), e.g. CT or MR.")
@click.option(
    "--sequence",
    "sequences",
    multiple=True,
    metavar="NAME=TYPE",
    help="Multi-sequence MR study: name a file's or series' sequence (t1, t1c, t2, flair); "
    "the inputs are then ONE study (always so with an MM-DINOv2 model).",
)
@click.option(
    "--fusion",
    type=click.Choice(["mm", "concat", "mean"]),
    help="Multi-sequence study with a plain DINOv2: concatenate or average per-sequence CLS.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def embed(
    inputs: Sequence[str],
    model: str | None,
    store: str | None,
    recipe: str | None,
    patch_tokens: bool | None,
    device: str | None,
    precision: str | None,
    batch_size: int | None,
    modality: str | None,
    sequences: Sequence[str],
    fusion: str | None,
    as_json: bool,
) -> None:
    """Embed DICOM files/directories/zips and NIfTI/NRRD/MHA volumes into the store.

    With an MM-DINOv2 model, --sequence or --fusion, all inputs are one multi-sequence MR
    study and become one entry. Exit status: 0 when everything was embedded or cached,
    1 when any input failed (the rest is still stored), 2 when nothing could run (model,
    store or settings).
    """
    need_server("embed")
    from radcache.embeddings import Pipeline

    try:
        s = settings(
            model=model,
            store=store,
            recipe=recipe,
            patch_tokens=patch_tokens,
            device=device,
            precision=precision,
            batch_size=batch_size,
        )
        mapping = dict(_pair(x) for x in sequences)
        pipe = Pipeline.from_settings(s)
        encoder = pipe.encoder
        settle()
    except RadcacheError as exc:
        fail(exc, as_json)
        return
    run: Callable[..., Any] = functools.partial(pipe.embed, inputs, modality=modality)
    if mapping or fusion or encoder.cfg.multi_sequence:
        run = functools.partial(
            pipe.embed_study,
            inputs,
            mapping=mapping,
            fusion=fusion,  # type: ignore[arg-type]
        )
    if not as_json and encoder.cfg.random_weights:
        err.print(
            f"[yellow]warning[/] {encoder.cfg.label}: embeddings are meaningless, for tests only."
        )
    show_bar = not as_json and err.is_terminal
    if show_bar:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as p:
            report = run(progress=_Bar(p))
    else:
        report = run()
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        _print_report(report, encoder.cfg.label, encoder.precision, s.store)
    sys.exit(0 if report.ok else 1)


def _print_report(report: Any, model: str, precision: str, store: str) -> None:
    table = Table(title=f"{model} · {precision} · {store}", title_justify="left")
    for col in ("study", "series", "part", "modality", "slices", "cache", "seconds"):
        table.add_column(col, justify="right" if col in ("slices", "seconds") else "left")
    for r in report.series:
        table.add_row(
            r.study[:12],
            r.series[:12],
            r.part or "-",
            r.modality or "-",
            str(r.slices),
            "[green]hit[/]" if r.cache == "hit" else "miss",
            f"{r.seconds:.2f}",
        )
    out.print(table)
    for r in report.series:
        for w in r.warnings:
            err.print(
                f"[yellow]warning[/] series {r.series[:12]}"
                f"{'#' + r.part if r.part else ''}: {escape(w)}",
                highlight=False,
            )
    for path, reason in report.skipped:
        err.print(f"[dim]skipped[/] {escape(path)}: {escape(reason)}", highlight=False)
    for e in report.errors:
        err.print(
            f"[bold red]error[/] {escape(f'[{e.code}] {e}')}", highlight=False, soft_wrap=True
        )
    hits = sum(r.cache == "hit" for r in report.series)
    out.print(f"{len(report.series)} series ({hits} cached), {len(report.errors)} error(s)")


def _settings_help() -> str:
    """Every setting, its environment variable and its default, for --help."""
    lines = ["\b", "Settings (environment variables; flags above override them):"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else "-"
        lines.append(
            f"  RADCACHE_{name.upper():<20} {field.description or ''} [default: {default}]"
        )
    return "\n".join(lines)


def _pair(text: str) -> tuple[str, str]:
    name, sep, kind = text.partition("=")
    if not sep or not name or not kind:
        raise ConfigError(f"--sequence {text!r}: expected NAME=TYPE, e.g. t1.nii.gz=t1.")
    return name, kind.lower()


@main.command(epilog=_settings_help())
@click.option("--host", help="Listen address. [env RADCACHE_HOST; default 127.0.0.1]")
@click.option(
    "--port", type=click.IntRange(1, 65535), help="Port. [env RADCACHE_PORT; default 8000]"
)
@click.option("--model", help="Registry name or checkpoint directory. [env RADCACHE_MODEL]")
@click.option("--store", help="Zarr store directory or fsspec URL. [env RADCACHE_STORE]")
@click.option("--db", help="Job database URL. [env RADCACHE_DB; default sqlite:///./radcache.db]")
@click.option(
    "--queue",
    help="Redis URL: only enqueue jobs, `radcache worker` runs them. [env RADCACHE_QUEUE]",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where the encoder runs."
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="auto: bf16 where fast.",
)
def serve(
    host: str | None,
    port: int | None,
    model: str | None,
    store: str | None,
    db: str | None,
    queue: str | None,
    device: str | None,
    precision: str | None,
) -> None:
    """Run the HTTP service: uploads in, embeddings out (OpenAPI at /docs).

    Every setting is also a RADCACHE_* environment variable (see `radcache embed --help`
    and embeddings/settings.py); flags override them.
    """
    need_server("serve")
    import uvicorn

    from .app import build_resources, create_app

    try:
        s = settings(
            host=host,
            port=port,
            model=model,
            store=store,
            db=db,
            queue=queue,
            device=device,
            precision=precision,
        )
        resources = build_resources(s)  # the model loads here: fail with one clear message
    except RadcacheError as exc:
        fail(exc, False)
        return
    settle()
    if resources.encoder.cfg.random_weights:
        err.print(f"[yellow]warning[/] {resources.encoder.cfg.label}: embeddings are meaningless.")
    label = resources.encoder.cfg.label
    jobs_by = f"workers on {s.queue}" if s.queue else "this process"
    err.print(
        f"radcache serving {label} on http://{s.host}:{s.port} (store {s.store}; jobs run by "
        f"{jobs_by})"
    )
    uvicorn.run(create_app(s, resources=resources), host=s.host, port=s.port, log_level="info")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@URL
@click.option("--wait/--no-wait", default=True, help="Wait for the job to finish.")
@click.option("--modality", help="Modality of NIfTI inputs, e.g. CT or MR.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
def submit(
    inputs: Sequence[str], url: str | None, wait: bool, modality: str | None, as_json: bool
) -> None:
    """Send files, folders, zips or NIfTI volumes to a running service.

    Exit status: 0 when the job is done (or queued, with --no-wait), 1 when any input failed.
    """
    import httpx

    from radcache.clients import RadcacheAPIError, RadcacheClient

    url = url or settings().url
    try:
        with RadcacheClient(url) as rc:
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
        for s in job.series:
            table.add_row(
                s.series[:12], s.part or "-", s.modality or "-", str(s.slices), s.cache, s.entry
            )
        out.print(table)
        for e in job.errors:
            err.print(
                f"[bold red]error[/] {escape(f'[{e.code}] {e.path}: {e.message}')}", highlight=False
            )
    sys.exit(1 if job.state in ("failed", "partially_failed", "dead") else 0)


@main.command()
@URL
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs(url: str | None, limit: int, as_json: bool) -> None:
    """List recent jobs of a running service."""
    import httpx

    from radcache.clients import RadcacheAPIError, RadcacheClient

    url = url or settings().url
    try:
        with RadcacheClient(url) as rc:
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
    out.print(table)


@main.command()
@click.argument("series")
@URL
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
def get(series: str, url: str | None, kind: str, slices: str | None, output: str) -> None:
    """Fetch an embedding array of a cached series as a .npy file."""
    import httpx
    import numpy as np

    from radcache.clients import RadcacheAPIError, RadcacheClient

    url = url or settings().url
    try:
        with RadcacheClient(url) as rc:
            arr = rc.embeddings(series, kind, slices=slices)
    except (RadcacheAPIError, httpx.HTTPError) as exc:
        api_fail(exc, False)
        return
    np.save(output, arr)
    err.print(f"{output}: {kind} {tuple(arr.shape)} {arr.dtype}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """List the model registry."""
    from radcache.embeddings.models import DEFAULT_MODEL, REGISTRY

    if as_json:
        click.echo(json.dumps([c.to_dict() for c in REGISTRY.values()], indent=1))
        return
    table = Table(title=f"models (default: {DEFAULT_MODEL})", title_justify="left")
    for col in ("name", "weights", "dim", "patch", "input", "registers", "note"):
        table.add_column(col)
    for c in REGISTRY.values():
        table.add_row(
            c.name,
            "RANDOM (tests only)" if c.random_weights else (c.hf_id or "-"),
            str(c.dim),
            str(c.patch_size),
            str(c.image_size),
            str(c.num_registers),
            c.note,
        )
    out.print(table)


@main.command()
@click.argument("store", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(store: str | None, as_json: bool) -> None:
    """List what a store holds (default: RADCACHE_STORE)."""
    need_server("show")
    from radcache.embeddings import open_store

    try:
        st = open_store(store or settings().store)
        entries = st.series()
    except RadcacheError as exc:
        fail(exc, as_json)
        return
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "entry": e.key,
                        "study": e.study,
                        "series": e.series,
                        "part": e.part,
                        "modality": e.modality,
                        "slices": e.n_slices,
                        "model": e.model,
                        "dim": e.dim,
                        "recipe": e.recipe_hash,
                        "precision": e.precision,
                        "kinds": list(e.kinds),
                        "created": e.created,
                    }
                    for e in entries
                ],
                indent=1,
            )
        )
        return
    table = Table(title=f"{st.url}: {len(entries)} entries", title_justify="left")
    for col in (
        "entry",
        "series",
        "part",
        "modality",
        "slices",
        "model",
        "recipe",
        "precision",
        "created",
    ):
        table.add_column(col)
    for e in entries:
        table.add_row(
            e.key[:12],
            e.series[:12],
            e.part or "-",
            e.modality or "-",
            str(e.n_slices),
            e.model,
            e.recipe_hash[:8],
            e.precision,
            e.created,
        )
    out.print(table)


main.add_command(search)
main.add_command(classify)
main.add_command(index)
main.add_command(probe)
main.add_command(export)
main.add_command(worker)
main.add_command(backfill)

if __name__ == "__main__":  # pragma: no cover - `python -m radcache.service.cli`
    main()
