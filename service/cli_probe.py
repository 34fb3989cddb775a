"""``radcache probe knn|fewshot|linear`` and ``radcache export``: offline work on a store's
cached features (no service, no encoder). Added to the main group by :mod:`.cli`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from radcache.embeddings.errors import RadcacheError

from ._cliutil import fail, need_server, out, settings

__all__ = ["export", "probe"]

_STORE = click.option("--store", help="Zarr store directory or fsspec URL. [env RADCACHE_STORE]")
_SPACE = click.option("--space", help="Which (model, recipe) space, if the store holds several.")
_LEVEL = click.option(
    "--level", type=click.Choice(["series", "slice"]), default="series", show_default=True
)
_KIND = click.option(
    "--kind",
    type=click.Choice(["pooled", "cls", "cls_last4", "cls+meanpatch"]),
    default="pooled",
    show_default=True,
)


def _features(
    store: str | None, level: str, kind: str, space: str | None, labels: str | None
) -> Any:
    from radcache.embeddings import open_store
    from radcache.embeddings.probes import features, read_labels

    st = open_store(settings(store=store).store)
    given = read_labels(labels) if labels else None
    return features(st, level=level, kind=kind, space=space, labels=given)  # type: ignore[arg-type]


@click.group()
def probe() -> None:
    """Train and score probes on cached features (the DINOv2-on-radiology protocols)."""


def _common(fn: Any) -> Any:
    for opt in reversed(
        [
            _STORE,
            _SPACE,
            _LEVEL,
            _KIND,
            click.option("--labels", type=click.Path(exists=True), help="CSV: key column, labels."),
            click.option("--label", "label", required=True, help="The label to predict."),
            click.option(
                "--pool",
                type=click.Choice(["none", "mean", "max", "mean+max"]),
                default="none",
                help="Slice level: pool slices per volume first (3D classification).",
            ),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option(
                "--bootstrap",
                type=click.IntRange(0),
                default=1000,
                show_default=True,
                help="Resamples for the 95 % intervals (0: none).",
            ),
            click.option(
                "-o", "--output", type=click.Path(dir_okay=False), help="Write JSON here."
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def _run(protocol: str, opts: dict[str, Any], extra: dict[str, Any]) -> None:
    need_server("probe")
    import numpy as np

    from radcache.embeddings import probes

    try:
        f = _features(opts["store"], opts["level"], opts["kind"], opts["space"], opts["labels"])
        if opts["pool"] != "none":
            f = probes.pool_slices(f, opts["pool"])
        split = probes.patient_split(f, seed=opts["seed"])
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
            )
    except RadcacheError as exc:
        fail(exc, False)
        return
    res = {**res, "space": f.space, "level": f.level, "kind": f.kind, "split_seed": opts["seed"]}
    if opts["output"]:
        probes.save_json(res, opts["output"])
        out.print(f"{protocol}: figures written to {opts['output']}")
    else:
        click.echo(json.dumps(res, indent=1, default=str))


@probe.command("knn")
@_common
@click.option("-k", "ks", multiple=True, type=int, help="k values (default 5 20 50 100 200).")
def probe_knn(ks: tuple[int, ...], **opts: Any) -> None:
    """Weighted kNN (cosine, T = 0.07), k swept; patients split 70/10/20, train+val vote."""
    _run("knn", opts, {"ks": ks} if ks else {})


@probe.command("fewshot")
@_common
@click.option("--shots", multiple=True, type=int, help="Examples per class (default 1 2 4 8 16).")
@click.option("--draws", type=int, default=5, show_default=True)
def probe_fewshot(shots: tuple[int, ...], draws: int, **opts: Any) -> None:
    """n examples per class, several draws, kNN and logistic-regression heads."""
    _run("fewshot", opts, {"draws": draws, **({"shots": shots} if shots else {})})


@probe.command("linear")
@_common
def probe_linear(**opts: Any) -> None:
    """Logistic regression, C chosen on val, refit on train+val, scored once on test."""
    _run("linear", opts, {})


@click.command()
@_STORE
@_SPACE
@_LEVEL
@_KIND
@click.option("--format", "fmt", type=click.Choice(["npz"]), default="npz", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
def export(
    store: str | None, space: str | None, level: str, kind: str, fmt: str, output: str
) -> None:
    """Write a store's features and their row descriptions for other tools."""
    need_server("export")
    import numpy as np

    try:
        f = _features(store, level, kind, space, None)
    except RadcacheError as exc:
        fail(exc, False)
        return
    cols = ("entry", "study", "series", "part", "patient", "modality")
    arrays: dict[str, Any] = {c: np.asarray([str(r[c] or "") for r in f.rows]) for c in cols}
    arrays["x"] = f.x
    arrays["slice"] = np.asarray([-1 if r["slice"] is None else r["slice"] for r in f.rows])
    arrays["labels"] = np.asarray([json.dumps(r["labels"], sort_keys=True) for r in f.rows])
    np.savez(output, **arrays)
    out.print(f"{Path(output)}: {f.x.shape[0]} × {f.x.shape[1]} {f.kind} ({f.level}, {f.space})")
