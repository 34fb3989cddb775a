"""``radcache probe knn|fewshot|linear|seg`` and ``radcache export``: offline work on a
store's cached features (no service, no encoder). Each probe writes a report directory
(result.json, report.md, PNG plots)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from radcache.embeddings.errors import RadcacheError

from ._common import STORE, err, fail, need_server, out, settings

__all__ = ["export", "probe"]

_SPACE = click.option("--space", help="Which (model, recipe) space, if the store holds several.")
_MODEL = click.option("--model", help="Without --space: the space of this model, if only one.")
_MODALITY = click.option(
    "--modality", help="Without --space: the space holding this modality (CT, MR), if only one."
)
_TENANT = click.option("--tenant", help="Only this tenant's entries. [default: every entry]")
_LEVEL = click.option(
    "--level", type=click.Choice(["series", "slice"]), default="series", show_default=True
)
_KINDS = ["pooled", "cls", "cls_last4", "cls+meanpatch", "cls_last4+meanpatch"]
_KIND = click.option("--kind", type=click.Choice(_KINDS), default="pooled", show_default=True)
_MULTILABEL = click.option(
    "--multilabel",
    is_flag=True,
    help="Label values are '|'-separated class sets (ChestX-ray14's Finding Labels); "
    "scored by macro AUROC.",
)


_REPORT = [
    click.option(
        "-o",
        "--output",
        type=click.Path(file_okay=False),
        help="Report directory: result.json, report.md, PNG plots. [default: probe-PROTOCOL]",
    ),
    click.option("--json", "as_json", is_flag=True, help="Also print the figures as JSON."),
]


def _features(
    store: str | None,
    level: str,
    kind: str,
    space: str | None,
    labels: str | None,
    tenant: str | None = None,
    model: str | None = None,
    modality: str | None = None,
) -> Any:
    from radcache.embeddings import open_store
    from radcache.embeddings.probes import features, read_labels

    st = open_store(settings(store=store).store)
    given = read_labels(labels) if labels else None
    return features(
        st,
        level=level,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        space=space,
        labels=given,
        tenant=tenant,
        model=model,
        modality=modality,
    )


@click.group()
def probe() -> None:
    """Train and score probes on cached features (the DINOv2-on-radiology protocols)."""


F = TypeVar("F", bound=Callable[..., Any])


def _probe_options(fn: F) -> F:
    """The options of `probe knn|fewshot|linear`: features, labels, split, report."""
    for opt in reversed(
        [
            STORE,
            _SPACE,
            _MODEL,
            _MODALITY,
            _TENANT,
            _LEVEL,
            click.option(
                "--kind",
                type=click.Choice(_KINDS),
                help="Features. [default: pooled, or what the --protocol reads]",
            ),
            click.option(
                "--labels",
                type=click.Path(exists=True),
                help="CSV or Parquet (.parquet): key column, label columns.",
            ),
            click.option("--label", "label", required=True, help="The label to predict."),
            click.option(
                "--pool",
                type=click.Choice(["none", "mean", "max", "mean+max"]),
                default="none",
                help="Slice level: pool slices per volume first (3D classification).",
            ),
            click.option(
                "--split-column",
                help="Label column holding train/val/test (a dataset's official split); "
                "default: 70/10/20 by a hash of the patient pseudonym.",
            ),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option(
                "--bootstrap",
                type=click.IntRange(0),
                default=1000,
                show_default=True,
                help="Resamples for the 95 % intervals (0: none).",
            ),
            *_REPORT,
        ]
    ):
        fn = opt(fn)
    return fn


def _protocol(probe_name: str, *more: tuple[str, str]) -> Callable[[F], F]:
    """The `--protocol` option of `probe PROBE_NAME`: radcache's method, or a paper's
    (``more``: further presets' names and what they run)."""
    presets = [(f"baharoon2023-{probe_name}", "the procedure of Baharoon et al. 2023's code")]
    return click.option(
        "--protocol",
        "preset",
        type=click.Choice(["radcache", *(name for name, _ in [*presets, *more])]),
        default="radcache",
        show_default=True,
        help="; ".join(f"{name}: {what}" for name, what in [*presets, *more])
        + " (docs/PROBES.md).",
    )


def _run(protocol: str, opts: dict[str, Any], extra: dict[str, Any]) -> None:
    need_server("probe")
    import numpy as np

    from radcache.embeddings import probes
    from radcache.embeddings.presets import get_preset

    preset = None if opts["preset"] == "radcache" else get_preset(opts["preset"])
    kind = opts["kind"] or "pooled"
    if preset is not None:  # scholz2025: the CLS token, as log_regression.py fits it
        kind = "cls" if preset.method == "scholz2025" else probes.REFERENCE_KINDS[protocol]
        if opts["kind"] not in (None, kind):
            raise click.UsageError(
                f"--protocol {preset.name} reads {kind} features; leave out --kind."
            )
    try:
        f = _features(
            opts["store"],
            opts["level"],
            kind,
            opts["space"],
            opts["labels"],
            opts["tenant"],
            opts["model"],
            opts["modality"],
        )
        if opts["pool"] != "none":
            f = probes.pool_slices(f, opts["pool"])
        warning = None
        if opts["split_column"]:
            split = probes.column_split(f, opts["split_column"])
        else:
            split = probes.patient_split(f, seed=opts["seed"])
            known = [r.get("patient_known", True) for r in f.rows]
            warning = probes.unknown_patients(known, f"{f.level} rows")
        parts = [f.take(np.flatnonzero(split == s)) for s in ("train", "val", "test")]
        fn = {"knn": probes.knn, "fewshot": probes.fewshot, "linear": probes.linear}[protocol]
        if protocol != "fewshot":
            extra["bootstrap"] = opts["bootstrap"]
        if protocol != "knn":
            extra["seed"] = opts["seed"]
        method = "radcache" if preset is None else preset.method
        res = fn(*parts, opts["label"], method=method, **extra)  # type: ignore[operator]
    except RadcacheError as exc:
        fail(exc, False)
        return
    res = {**res, "space": f.space, "level": f.level, "kind": f.kind, "split_seed": opts["seed"]}
    if preset is not None:
        res |= {"preset": preset.name, "caveats": list(preset.caveats)}
    _finish(protocol, {**res, "warnings": [warning]} if warning else res, opts)


def _finish(protocol: str, res: dict[str, Any], opts: dict[str, Any], pictures: Any = ()) -> None:
    from radcache.embeddings.probes import write_report

    path = write_report(res, opts["output"] or f"probe-{protocol}", pictures)
    if opts["as_json"]:
        click.echo(json.dumps(res, indent=1, default=str))
    (err if opts["as_json"] else out).print(f"{protocol}: report in {path}")


@probe.command("knn")
@_probe_options
@_protocol("knn")
@click.option("-k", "ks", multiple=True, type=int, help="k values (default 5 20 50 100 200).")
@_MULTILABEL
def probe_knn(ks: tuple[int, ...], multilabel: bool, **opts: Any) -> None:
    """Weighted kNN (cosine, T = 0.07; multi-label: ML-kNN): patients split 70/10/20, k
    chosen on val, test scored once at that k."""
    _run("knn", opts, {"multilabel": multilabel, **({"ks": ks} if ks else {})})


@probe.command("fewshot")
@_probe_options
@_protocol("fewshot")
@click.option("--shots", multiple=True, type=int, help="Examples per class (default 1 2 4 8 16).")
@click.option("--draws", type=int, default=5, show_default=True)
@_MULTILABEL
def probe_fewshot(shots: tuple[int, ...], draws: int, multilabel: bool, **opts: Any) -> None:
    """n examples per class, several draws, kNN and logistic-regression heads
    (baharoon2023-fewshot: the study's kNN and SGD heads; multi-label: n patients per
    class)."""
    extra = {"draws": draws, "multilabel": multilabel, **({"shots": shots} if shots else {})}
    _run("fewshot", opts, extra)


@probe.command("linear")
@_probe_options
@_protocol(
    "linear",
    ("scholz2025", "MM-DINOv2's logistic regression (Scholz et al. 2025), C chosen on train"),
)
@_MULTILABEL
def probe_linear(multilabel: bool, **opts: Any) -> None:
    """Logistic regression (multi-label: one per class), C chosen on val, refit on
    train+val, scored once on test (baharoon2023-linear: the study's SGD heads over feature
    sets and learning rates; scholz2025: raw CLS, C chosen by MCC on a tenth of train, refit
    on train)."""
    _run("linear", opts, {"multilabel": multilabel})


@probe.command("seg")
@STORE
@click.option(
    "--masks",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="CSV: key column (entry key or series), 'mask' (label map on the image's grid), "
    "optional 'image' (for pictures); paths relative to the CSV.",
)
@click.option("--classes", help="Names of labels 0, 1, … comma-separated.")
@click.option(
    "--sequence",
    help="MM-DINOv2 entries: train on this sequence's patch grid (default: the mean over "
    "the sequences present).",
)
@_protocol("seg")
@click.option(
    "--split",
    type=click.Choice(["patient", "blocks"]),
    default="patient",
    show_default=True,
    help="patient: whole patients to test (30 %) and val (--val-fraction); blocks: runs of "
    "adjacent slices, alternately train and test, or train, val, train, test (one volume).",
)
@click.option("--blocks", type=click.IntRange(2), default=8, show_default=True)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 0.6),
    help="Patients (or blocks) for validation. [default: 0; baharoon2023-seg: 0.15]",
)
@click.option("--epochs", type=click.IntRange(1), help="[default: 100; baharoon2023-seg: 10]")
@click.option(
    "--val-epochs",
    type=click.IntRange(1),
    help="baharoon2023-seg: epochs of the learning-rate search. [default: --epochs]",
)
@click.option("--batch-size", type=click.IntRange(1), help="[default: 16; baharoon2023-seg: 128]")
@click.option(
    "--lr",
    type=float,
    help="[default: 3e-2; baharoon2023-seg: the study's 7 rates, chosen on val; this one alone]",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bootstrap", type=click.IntRange(0), default=1000, show_default=True)
@click.option("--pictures", type=click.IntRange(0), default=3, show_default=True)
@_REPORT[0]
@_REPORT[1]
def probe_seg(
    store: str | None,
    masks: str,
    classes: str | None,
    sequence: str | None,
    preset: str,
    split: str,
    blocks: int,
    val_fraction: float | None,
    epochs: int | None,
    val_epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    seed: int,
    bootstrap: int,
    pictures: int,
    **opts: Any,
) -> None:
    """Linear (1×1) head on frozen patch tokens, upsampled to the slice, Dice loss;
    per-class 2D and 3D Dice on test slices (baharoon2023-seg: the study's SGD heads over
    learning rates chosen on val, retrained on train+val, pooled Dice on the canvas)."""
    need_server("probe")
    from radcache.embeddings import open_store
    from radcache.embeddings.presets import get_preset
    from radcache.embeddings.probes import (
        overlays,
        read_masks,
        seg,
        seg_data,
        split_slices,
        unknown_patients,
    )

    chosen = None if preset == "radcache" else get_preset(preset)
    method = "radcache" if chosen is None else chosen.method
    if val_fraction is None:
        val_fraction = 0.0 if method == "radcache" else 0.15
    try:
        st = open_store(settings(store=store).store)
        mask_files, images = read_masks(masks)
        names = [c.strip() for c in classes.split(",")] if classes else None
        data = seg_data(st, mask_files, classes=names, images=images, sequence=sequence)
        parts = split_slices(
            data,
            split,  # type: ignore[arg-type]
            val_fraction=val_fraction,
            blocks=blocks,
            seed=seed,
        )
        res, head = seg(
            data,
            parts,
            method=method,  # type: ignore[arg-type]
            epochs=epochs,
            val_epochs=val_epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            bootstrap=bootstrap,
        )
    except RadcacheError as exc:
        fail(exc, False)
        return
    res = {**res, "split": split, "split_seed": seed}
    if chosen is not None:  # the probe's caveats, then the preprocessing's
        res |= {"preset": chosen.name, "caveats": [*res.get("caveats", []), *chosen.caveats]}
    known = [v.patient_known for v in data.volumes]
    warning = unknown_patients(known, "volumes") if split == "patient" else None
    if warning is not None:
        res["warnings"] = [warning, *res.get("warnings", [])]
    _finish("seg", res, opts, overlays(data, head, parts, pictures))


@click.command()
@STORE
@_SPACE
@_MODEL
@_MODALITY
@_TENANT
@_LEVEL
@_KIND
@click.option(
    "--format", "fmt", type=click.Choice(["npz", "parquet"]), default="npz", show_default=True
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
def export(
    store: str | None,
    space: str | None,
    model: str | None,
    modality: str | None,
    tenant: str | None,
    level: str,
    kind: str,
    fmt: str,
    output: str,
) -> None:
    """Write a store's features and their row descriptions for other tools (npz, or Parquet
    with the features as a fixed-size list column); the file is replaced atomically."""
    need_server("export")
    from radcache.embeddings.probes import export_features

    try:
        f = _features(store, level, kind, space, None, tenant, model, modality)
        path = export_features(f, output, fmt)  # type: ignore[arg-type]
    except RadcacheError as exc:
        fail(exc, False)
        return
    out.print(f"{path}: {f.x.shape[0]} × {f.x.shape[1]} {f.kind} ({f.level}, {f.space})")
