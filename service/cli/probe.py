"""``radcache probe knn|fewshot|linear|seg`` and ``radcache export``: offline work on a
store's cached features (no service, no encoder). Each probe writes a report directory
(result.json, report.md, PNG plots)."""

from __future__ import annotations

import json
from typing import Any

import click

from radcache.embeddings.errors import RadcacheError

from ._common import STORE, err, fail, need_server, out, settings

__all__ = ["export", "probe"]

_SPACE = click.option("--space", help="Which (model, recipe) space, if the store holds several.")
_TENANT = click.option("--tenant", help="Only this tenant's entries. [default: every entry]")
_LEVEL = click.option(
    "--level", type=click.Choice(["series", "slice"]), default="series", show_default=True
)
_KIND = click.option(
    "--kind",
    type=click.Choice(["pooled", "cls", "cls_last4", "cls+meanpatch"]),
    default="pooled",
    show_default=True,
)
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
    )


@click.group()
def probe() -> None:
    """Train and score probes on cached features (the DINOv2-on-radiology protocols)."""


def _probe_options(fn: Any) -> Any:
    """The options of `probe knn|fewshot|linear`: features, labels, split, report."""
    for opt in reversed(
        [
            STORE,
            _SPACE,
            _TENANT,
            _LEVEL,
            _KIND,
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


def _run(protocol: str, opts: dict[str, Any], extra: dict[str, Any]) -> None:
    need_server("probe")
    import numpy as np

    from radcache.embeddings import probes

    try:
        f = _features(
            opts["store"],
            opts["level"],
            opts["kind"],
            opts["space"],
            opts["labels"],
            opts["tenant"],
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
        part = {s: f.take(np.flatnonzero(split == s)) for s in ("train", "val", "test")}
        label = opts["label"]
        if protocol == "knn":
            train = probes.Features.concat([part["train"], part["val"]])
            res = probes.knn(train, part["test"], label, bootstrap=opts["bootstrap"], **extra)
        elif protocol == "fewshot":
            train = probes.Features.concat([part["train"], part["val"]])
            res = probes.fewshot(train, part["test"], label, seed=opts["seed"], **extra)
        else:
            res = probes.linear(
                part["train"],
                part["val"],
                part["test"],
                label,
                seed=opts["seed"],
                bootstrap=opts["bootstrap"],
                **extra,
            )
    except RadcacheError as exc:
        fail(exc, False)
        return
    res = {**res, "space": f.space, "level": f.level, "kind": f.kind, "split_seed": opts["seed"]}
    _finish(protocol, {**res, "warnings": [warning]} if warning else res, opts)


def _finish(protocol: str, res: dict[str, Any], opts: dict[str, Any], pictures: Any = ()) -> None:
    from radcache.embeddings.probes import write_report

    path = write_report(res, opts["output"] or f"probe-{protocol}", pictures)
    if opts["as_json"]:
        click.echo(json.dumps(res, indent=1, default=str))
    (err if opts["as_json"] else out).print(f"{protocol}: report in {path}")


@probe.command("knn")
@_probe_options
@click.option("-k", "ks", multiple=True, type=int, help="k values (default 5 20 50 100 200).")
@_MULTILABEL
def probe_knn(ks: tuple[int, ...], multilabel: bool, **opts: Any) -> None:
    """Weighted kNN (cosine, T = 0.07; multi-label: ML-kNN), k swept; patients split
    70/10/20, train+val vote."""
    _run("knn", opts, {"multilabel": multilabel, **({"ks": ks} if ks else {})})


@probe.command("fewshot")
@_probe_options
@click.option("--shots", multiple=True, type=int, help="Examples per class (default 1 2 4 8 16).")
@click.option("--draws", type=int, default=5, show_default=True)
def probe_fewshot(shots: tuple[int, ...], draws: int, **opts: Any) -> None:
    """n examples per class, several draws, kNN and logistic-regression heads."""
    _run("fewshot", opts, {"draws": draws, **({"shots": shots} if shots else {})})


@probe.command("linear")
@_probe_options
@_MULTILABEL
def probe_linear(multilabel: bool, **opts: Any) -> None:
    """Logistic regression (multi-label: one per class), C chosen on val, refit on
    train+val, scored once on test."""
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
@click.option(
    "--split",
    type=click.Choice(["patient", "blocks"]),
    default="patient",
    show_default=True,
    help="patient: whole patients to test (30 %); blocks: runs of adjacent slices, "
    "alternately train and test (one volume).",
)
@click.option("--blocks", type=click.IntRange(2), default=8, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=100, show_default=True)
@click.option("--lr", type=float, default=3e-2, show_default=True)
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
    split: str,
    blocks: int,
    epochs: int,
    lr: float,
    seed: int,
    bootstrap: int,
    pictures: int,
    **opts: Any,
) -> None:
    """Linear (1×1) head on frozen patch tokens, upsampled to the slice, Dice loss;
    per-class 2D and 3D Dice on test slices."""
    need_server("probe")
    from radcache.embeddings import open_store
    from radcache.embeddings.probes import (
        overlays,
        read_masks,
        seg,
        seg_data,
        split_slices,
        unknown_patients,
    )

    try:
        st = open_store(settings(store=store).store)
        mask_files, images = read_masks(masks)
        names = [c.strip() for c in classes.split(",")] if classes else None
        data = seg_data(st, mask_files, classes=names, images=images, sequence=sequence)
        parts = split_slices(data, split, blocks=blocks, seed=seed)  # type: ignore[arg-type]
        res, head = seg(data, parts, epochs=epochs, lr=lr, seed=seed, bootstrap=bootstrap)
    except RadcacheError as exc:
        fail(exc, False)
        return
    res = {**res, "split": split, "split_seed": seed}
    known = [v.patient_known for v in data.volumes]
    warning = unknown_patients(known, "volumes") if split == "patient" else None
    if warning is not None:
        res["warnings"] = [warning]
    _finish("seg", res, opts, overlays(data, head, parts, pictures))


@click.command()
@STORE
@_SPACE
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
        f = _features(store, level, kind, space, None, tenant)
        path = export_features(f, output, fmt)  # type: ignore[arg-type]
    except RadcacheError as exc:
        fail(exc, False)
        return
    out.print(f"{path}: {f.x.shape[0]} × {f.x.shape[1]} {f.kind} ({f.level}, {f.space})")
