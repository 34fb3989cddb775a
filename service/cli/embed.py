"""``radcache embed`` (files into the store, on this machine), ``radcache show`` (what a
store holds) and ``radcache models`` (the model registry)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from radcache.embeddings.errors import ConfigError, RadcacheError
from radcache.embeddings.tuning import settle

from ._common import (
    STORE,
    encoder_options,
    err,
    fail,
    fit_table,
    id_width,
    need_server,
    out,
    series_warnings,
    settings,
)

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["embed", "models", "show"]


class _Bar:
    """Adapts a rich progress bar to the pipeline's Progress protocol."""

    def __init__(self, progress: Progress) -> None:
        self.p = progress
        self.task = progress.add_task("embedding", total=None)

    def total(self, slices: int) -> None:
        self.p.update(self.task, total=slices)

    def advance(self, slices: int) -> None:
        self.p.advance(self.task, slices)


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    help="Registry name (see `radcache models`) or checkpoint directory. [env RADCACHE_MODEL]",
)
@STORE
@click.option(
    "--recipe", type=click.Path(exists=True, dir_okay=False), help="Recipe file (JSON or YAML)."
)
@click.option(
    "--protocol",
    metavar="NAME",
    help="A paper's preprocessing by name instead of --recipe: baharoon2023-knn, "
    "baharoon2023-linear, baharoon2023-fewshot, baharoon2023-seg or scholz2025.",
)
@click.option(
    "--roi",
    metavar="JSON",
    help="Cut every volume to a box first: '{\"voxels\": [z0, z1, y0, y1, x0, x1]}' (slice, "
    "row, column; half-open) or '{\"mm\": [l0, l1, p0, p1, s0, s1]}' (patient LPS, mm).",
)
@click.option(
    "--patch-tokens/--no-patch-tokens",
    default=None,
    help="Older flag: --patch-tokens is --patch-storage fp16, --no-patch-tokens none.",
)
@click.option(
    "--patch-storage",
    metavar="FORM",
    help="Patch-token grids: fp16, int8 (per-token scale), pooled:N (N×N) or none "
    "[default: RADCACHE_PATCH_STORAGE, else int8].",
)
@encoder_options
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    help="At most this many slices per forward pass (default 32 on a CPU, 512 on a GPU; "
    "fewer where RADCACHE_BATCH_MEMORY_MB needs it).",
)
@click.option("--modality", help="Modality of NIfTI/NRRD inputs (they carry none), e.g. CT or MR.")
@click.option(
    "--patient",
    help="Patient of NIfTI/NRRD/MHA inputs (a PatientID; stored as its keyed pseudonym, as "
    "DICOM's is), so probes split and searches exclude by patient. Not with DICOM inputs.",
)
@click.option(
    "--study",
    help="Study of NIfTI/NRRD/MHA inputs (a StudyInstanceUID or a data set's study id; "
    "stored as its keyed pseudonym). Not with DICOM inputs.",
)
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
@click.option(
    "--profile",
    is_flag=True,
    help="Time each stage (decode, preprocess, forward, write, waits) and the encoder's busy "
    'fraction: a table on stderr, or a "profile" key in the --json output.',
)
def embed(
    inputs: Sequence[str],
    model: str | None,
    store: str | None,
    recipe: str | None,
    protocol: str | None,
    roi: str | None,
    patch_tokens: bool | None,
    patch_storage: str | None,
    device: str | None,
    precision: str | None,
    batch_size: int | None,
    modality: str | None,
    patient: str | None,
    study: str | None,
    sequences: Sequence[str],
    fusion: str | None,
    as_json: bool,
    profile: bool,
) -> None:
    """Embed DICOM files/directories/zips and NIfTI/NRRD/MHA volumes into the store.

    --protocol NAME preprocesses as a paper's public code does (radcache.embeddings.presets);
    its entries are distinct from those of the default recipe.

    With an MM-DINOv2 model, --sequence or --fusion, all inputs are one multi-sequence MR
    study and become one entry. Exit status: 0 when everything was embedded or cached,
    1 when any input failed (the rest is still stored), 2 when nothing could run (model,
    store or settings).
    """
    need_server("embed")
    from radcache.embeddings import Pipeline
    from radcache.embeddings.ingest import use_decode_workers
    from radcache.embeddings.presets import recipe_for
    from radcache.embeddings.recipe import load_roi

    try:
        named = recipe_for(recipe, protocol) if protocol else None  # before the model loads
        box = load_roi(roi) if roi else None
        s = settings(
            model=model,
            store=store,
            recipe=recipe,
            patch_tokens=patch_tokens,
            patch_storage=patch_storage,
            device=device,
            precision=precision,
            batch_size=batch_size,
        )
        mapping = dict(_pair(x) for x in sequences)
        refs = s.pseudonymizer().refs(patient=patient, study=study)  # before the model loads
        pipe = Pipeline.from_settings(s, lazy=True)  # weights only once a cache miss needs them
        use_decode_workers(s.decode_workers)  # started with the first compressed file
        if named is not None or box is not None:
            pipe = pipe.variant(recipe=(named or pipe.recipe).with_roi(box))
        pipe.check_refs(inputs, refs)
        encoder = pipe.encoder
        settle()
    except RadcacheError as exc:
        fail(exc, as_json)
        return
    run: Callable[..., Any] = functools.partial(pipe.embed, inputs, modality=modality, refs=refs)
    if mapping or fusion or encoder.cfg.multi_sequence:
        run = functools.partial(
            pipe.embed_study,
            inputs,
            mapping=mapping,
            fusion=fusion,  # type: ignore[arg-type]
            refs=refs,
        )
    if not as_json and encoder.cfg.random_weights:
        err.print(
            f"[yellow]warning[/] {encoder.cfg.label}: embeddings are meaningless, for tests only."
        )
    show_bar = not as_json and err.is_terminal
    try:
        if show_bar:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

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
    except RadcacheError as exc:  # the model, loaded for the first cache miss
        fail(exc, as_json)
        return
    if as_json:
        shown = report.to_dict()
        if profile:
            shown["profile"] = pipe.profile.to_dict()
        click.echo(json.dumps(shown))
    else:
        _print_report(report, encoder.cfg.label, encoder.precision, s.store)
        if profile:
            _print_profile(pipe.profile.to_dict())
    sys.exit(0 if report.ok else 1)


def _print_report(report: Any, model: str, precision: str, store: str) -> None:
    table = Table(title=f"{model} · {precision} · {store}", title_justify="left")
    for col in ("study", "series", "part", "modality", "slices", "cache", "seconds"):
        table.add_column(col, justify="right" if col in ("slices", "seconds") else "left")
    w_study = id_width(r.study for r in report.series)
    w_series = id_width(r.series for r in report.series)
    for r in report.series:
        table.add_row(
            r.study[:w_study],
            r.series[:w_series],
            r.part or "-",
            r.modality or "-",
            str(r.slices),
            "[green]hit[/]" if r.cache == "hit" else "miss",
            f"{r.seconds:.2f}",
        )
    out.print(table)
    series_warnings(report.series)
    for path, reason in report.skipped:
        err.print(f"[dim]skipped[/] {escape(path)}: {escape(reason)}", highlight=False)
    for e in report.errors:
        err.print(
            f"[bold red]error[/] {escape(f'[{e.code}] {e}')}", highlight=False, soft_wrap=True
        )
    hits = sum(r.cache == "hit" for r in report.series)
    out.print(f"{len(report.series)} series ({hits} cached), {len(report.errors)} error(s)")


def _print_profile(prof: dict[str, Any]) -> None:
    """The stage clock of this run, on stderr."""
    wall = prof["wall_s"]
    table = Table(
        title=f"profile: {prof['slices']} slices embedded in {wall:.2f} s, encoder busy "
        f"{100 * prof['encoder_busy_fraction']:.0f} %",
        title_justify="left",
    )
    for col in ("stage", "seconds", "% of wall"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, seconds in prof["seconds"].items():
        share = f"{100 * seconds / wall:.0f}" if wall > 0 else "-"
        table.add_row(stage, f"{seconds:.3f}", share)
    err.print(table)


def _pair(text: str) -> tuple[str, str]:
    name, sep, kind = text.partition("=")
    if not sep or not name or not kind:
        raise ConfigError(f"--sequence {text!r}: expected NAME=TYPE, e.g. t1.nii.gz=t1.")
    return name, kind.lower()


# Columns left out, in this order, where the console is too narrow for the names in full.
_MODELS_LESSER = ("note", "registers", "input", "patch", "dim")
_SHOW_LESSER = ("created", "precision", "part", "slices", "modality")


@click.command()
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
    out.print(fit_table(table, ids=("name", "weights"), lesser=_MODELS_LESSER))


@click.command()
@click.argument("store", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--spaces", "by_space", is_flag=True, help="List its spaces (model, modality, recipe)."
)
def show(store: str | None, as_json: bool, by_space: bool) -> None:
    """List what a store holds (default: RADCACHE_STORE)."""
    need_server("show")
    from radcache.embeddings import open_store

    if by_space:
        from .index import print_spaces

        print_spaces(store, as_json)
        return
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
    w_key, w_series = id_width(e.key for e in entries), id_width(e.series for e in entries)
    for e in entries:
        table.add_row(
            e.key[:w_key],
            e.series[:w_series],
            e.part or "-",
            e.modality or "-",
            str(e.n_slices),
            e.model,
            e.recipe_hash[:8],
            e.precision,
            e.created,
        )
    out.print(fit_table(table, ids=("entry", "series", "model", "recipe"), lesser=_SHOW_LESSER))
