"""Baharoon et al. 2023's evaluations, as their code runs them, on any labelled folder of images.

Baharoon et al. 2023 ("Towards General Purpose Vision Foundation Models for Medical Image
Analysis: An Experimental Study of DINOv2 on Radiology Benchmarks", code:
github.com/MohammedSB/DINOv2ForRadiology) scored frozen DINOv2 features with kNN, linear,
few-shot and linear-segmentation probes. Each is a radcache preset
(``radcache.embeddings.presets``): the preset's recipe is the preprocessing of the paper's
evaluation transform, and its probe runs with ``method="baharoon2023"``, the procedure of
the paper's code (docs/PROBES.md says where each differs and why).

    python examples/reproduce_baharoon2023.py --protocol baharoon2023-linear \\
        DATA_DIR LABELS.csv --model dinov2-base --out OUT

``LABELS.csv`` has one row per item: ``path`` (a file or folder under ``DATA_DIR`` holding
one series or volume: DICOM, NIfTI, NRRD or MetaImage), ``split`` (``train``, ``val`` or
``test``: the dataset's official split), ``label`` (classification; ``--label-column``
names another column; ``|``-separated class sets with ``--multilabel``) or ``mask``
(segmentation: a label map on the image's grid, under ``DATA_DIR``), and optionally
``patient`` (names the patient of a non-DICOM file; DICOM names its own).

Each item is embedded once with the preset's recipe into ``OUT/store.zarr`` (a rerun is
answered from that cache), the probe runs on the CSV's splits (every setting chosen on
``val``, ``test`` scored once), and ``OUT/report/`` gets ``result.json``, ``report.md`` and
plots: accuracy and AUROC (classification) or Dice (segmentation), each with a bootstrap
95 % interval, and a table laid out as the paper's. A model with random weights
(``dinov2-small-random``, ``dinov2-tiny-random``) runs the same steps, and the report says
RANDOM-WEIGHT at its top: its figures show the pipeline working, not what DINOv2 features
achieve. docs/REPRODUCE.md names the paper's datasets and how to lay them out.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from radcache.embeddings import (
    EmbeddingStore,
    EmbedReport,
    InputRefs,
    Pipeline,
    get_preset,
    get_settings,
)
from radcache.embeddings.encode import Encoder, load_encoder
from radcache.embeddings.errors import InputError
from radcache.embeddings.ingest import dicom_among
from radcache.embeddings.presets import PRESETS, Preset
from radcache.embeddings.probes import (
    REFERENCE_KINDS,
    Features,
    Kind,
    Method,
    ci_cell,
    column_split,
    features,
    fewshot,
    knn,
    linear,
    md_table,
    overlays,
    pm_cell,
    seg,
    seg_data,
    write_report,
)

PROTOCOLS = tuple(name for name in PRESETS if name.startswith("baharoon2023-"))
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    """One row of the labels CSV: what to embed and what it is labelled."""

    path: Path  # a file or folder holding one series (a study folder for multi-sequence MR)
    split: str
    label: str | None = None
    mask: Path | None = None
    patient: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)  # the row's other columns


def read_items(
    data_dir: Path, table: Path, *, need: Literal["label", "mask"], label_column: str = "label"
) -> list[Item]:
    """The rows of ``table``: paths under ``data_dir``, each with a split and a label (or
    a mask); an :class:`InputError` naming the first row that lacks one."""
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    column = label_column if need == "label" else "mask"
    missing = {"path", "split", column} - set(rows[0] if rows else ())
    if missing:
        raise InputError(
            f"expected the columns path, split and {column}; {', '.join(sorted(missing))} "
            "missing (or the file has no rows).",
            path=str(table),
        )
    items = []
    for n, row in enumerate(rows, start=2):  # line numbers, after the header
        value = row.get(column) or None
        if value is None:
            raise InputError(f"line {n}: no {column}; every row needs one.", path=str(table))
        for name in (row["path"], value) if need == "mask" else (row["path"],):
            if not (data_dir / name).exists():
                raise InputError(f"line {n}: {name} is not under {data_dir}.", path=str(table))
        if row["split"] not in SPLITS:
            raise InputError(
                f"line {n}: split {row['split']!r}; expected train, val or test.", path=str(table)
            )
        known = {"path", "split", "patient", column}
        items.append(
            Item(
                path=data_dir / row["path"],
                split=row["split"],
                label=value if need == "label" else None,
                mask=data_dir / value if need == "mask" else None,
                patient=row.get("patient") or None,
                extra={k: v for k, v in row.items() if k not in known and v},
            )
        )
    return items


def paper_precision() -> str:
    """The papers' encoder precision, fp16 (autocast on a GPU); elsewhere radcache's
    automatic choice, since fp16 on a CPU is slow."""
    import torch

    return "fp16" if torch.cuda.is_available() else "auto"


def open_pipeline(
    model: str, store: Path, preset: Preset, *, precision: str, patch_tokens: bool
) -> Pipeline:
    """A pipeline embedding with ``preset``'s recipe into ``store``, with the model, device
    and pseudonym key of the environment's radcache settings."""
    settings = get_settings()
    encoder = load_encoder(
        model,
        device=settings.device,
        precision=precision,
        cache_dir=settings.hf_cache_dir,
        offline=settings.offline,
    )
    return Pipeline(
        encoder,
        EmbeddingStore(store),
        settings.pseudonymizer(),
        recipe=preset.recipe,
        patch_tokens=patch_tokens,
        batch_size=settings.batch_size,
    )


Embed = Callable[[Pipeline, Item], EmbedReport]


def patient_refs(pipe: Pipeline, item: Item, inputs: Sequence[Path]) -> InputRefs | None:
    """The item's patient, as a reference for its inputs unless they are DICOM (which
    name their own)."""
    if not item.patient or dicom_among(inputs, pipe.limits) is not None:
        return None
    return pipe.pseudonymizer.refs(patient=item.patient)


def embed_series(modality: str | None) -> Embed:
    """Embed one item as one series."""

    def embed(pipe: Pipeline, item: Item) -> EmbedReport:
        refs = patient_refs(pipe, item, [item.path])
        return pipe.embed([item.path], modality=modality, refs=refs)

    return embed


def embed_items(
    pipe: Pipeline, items: Sequence[Item], embed: Embed
) -> tuple[dict[str, Item], dict[str, int]]:
    """Each item embedded (or found in the store) as exactly one entry: entry key → item,
    and how many were cache hits and misses."""
    out: dict[str, Item] = {}
    cache = {"hit": 0, "miss": 0}
    for item in items:
        report = embed(pipe, item)
        if report.errors:
            raise report.errors[0]
        if len(report.series) != 1:
            raise InputError(
                f"{len(report.series)} series found; expected one per CSV row (a file, or a "
                "folder of one series).",
                path=str(item.path),
            )
        entry = report.series[0].entry
        cache[report.series[0].cache] += 1
        if entry in out and out[entry] != item:
            raise InputError(
                f"the same pixels as {out[entry].path} but another row; expected each image once.",
                path=str(item.path),
            )
        out[entry] = item
    return out, cache


def space_of(store: EmbeddingStore, entries: Sequence[str]) -> str:
    """The one space (model and recipe) the entries were embedded in."""
    spaces = {str(store.resolve(e).attrs["space"]) for e in entries}
    if len(spaces) != 1:
        raise InputError(
            f"the items were embedded in {len(spaces)} spaces (the preset's recipe resolves "
            "per modality); put one modality in a CSV, or pass --modality."
        )
    return spaces.pop()


def split_features(
    store: EmbeddingStore, items: Mapping[str, Item], kind: Kind
) -> tuple[Features, Features, Features]:
    """Series-level features of the items (3D volumes: the mean over slices, as the paper
    pools them), with their labels, cut by the CSV's splits."""
    labels = {e: {"label": it.label, "split": it.split} for e, it in items.items()}
    f = features(store, kind=kind, space=space_of(store, list(items)), labels=labels)
    f = f.take([i for i, r in enumerate(f.rows) if r["entry"] in items])
    split = column_split(f, "split")
    train, val, test = (f.take(np.flatnonzero(split == s)) for s in SPLITS)
    return train, val, test


def random_note(encoder: Encoder) -> str | None:
    """The warning a report of untrained weights carries, or None."""
    cfg = encoder.cfg
    if cfg.random_weights:
        return (
            f"RANDOM-WEIGHT MODEL ({cfg.name}): these figures show the pipeline working, "
            "not what trained features achieve."
        )
    if cfg.untrained_sequences:
        return (
            f"RANDOM-WEIGHT sequence embeddings ({cfg.name}): the MM-DINOv2 sequence "
            "embeddings are untrained; load a converted MM-DINOv2 checkpoint for the paper's."
        )
    return None


CLASSIFY_METRICS = (("accuracy", "accuracy"), ("macro_auroc", "AUROC"))
MULTILABEL_METRICS = (("macro_auroc", "macro AUROC"), ("mean_ap", "mAP"))


def paper_table(
    result: Mapping[str, Any],
    model: str,
    dataset: str,
    metrics: Sequence[tuple[str, str]] = CLASSIFY_METRICS,
) -> str:
    """The headline figures as the paper's tables lay them out: one row per model, one
    column per dataset and metric (test split, 95 % bootstrap intervals)."""
    protocol = result["protocol"]
    if protocol == "seg":
        fg = [str(c) for c in result["classes"][1:]]
        per = result.get("dice_per_class") or {}
        header = ["Model", f"{dataset} Dice", *(f"{c} Dice" for c in fg)]
        row = [model, ci_cell(result.get("dice")), *(ci_cell(per.get(c)) for c in fg)]
        note = f"learning rate {result.get('lr')} chosen on the validation slices"
        return f"{md_table(header, [row])}\n\nDice pooled over the test pixels; {note}."
    if protocol == "fewshot":
        by = result["by_shots"]
        heads = {"kNN (k = n)": "knn k={n}", "linear": "linear"}
        names = [f"{dataset} {h} {name}" for h in heads for _, name in metrics]
        rows = [
            [model, n, *(pm_cell(by[n].get(h.format(n=n), {}).get(m)) for h in heads.values()
                         for m, _ in metrics)]
            for n in by
        ]  # fmt: skip
        return (
            f"{md_table(['Model', 'shots', *names], rows)}\n\nn rows per class for kNN, mean ± "
            "std over the draws; n rows in total for the linear head, one draw (std 0). "
            "kNN at other k ≤ n: the report above and result.json."
        )
    header = ["Model", *(f"{dataset} {name}" for _, name in metrics)]
    row = [model, *(ci_cell(result["test"].get(m)) for m, _ in metrics)]
    return (
        f"{md_table(header, [row])}\n\nTest split, 95 % bootstrap intervals; "
        f"{chosen_setting(result)}, chosen by "
        f"{result.get('selected_by', 'the validation split')}."
    )


def chosen_setting(result: Mapping[str, Any]) -> str:
    """What a classification probe chose (never on the test split), in words."""
    if "k" in result and result["protocol"] == "knn":
        return f"k = {result['k']}"
    if "setting" in result:
        s = result["setting"]
        pooled = " with the mean patch token" if s["avgpool"] else ""
        return f"the CLS of the last {s['blocks']} block(s){pooled}, learning rate {s['lr']:g}"
    return f"C = {result['c']:.4g}" if "c" in result else "nothing"


def classify(
    preset: Preset,
    parts: tuple[Features, Features, Features],
    *,
    multilabel: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
    shots: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The preset's classification probe on train / val / test features, with its method."""
    method = cast(Method, preset.method)
    if preset.probe == "knn":
        return knn(*parts, "label", method=method, multilabel=multilabel, bootstrap=bootstrap)
    if preset.probe == "fewshot":
        extra: dict[str, Any] = {"shots": shots} if shots else {}
        return fewshot(*parts, "label", method=method, multilabel=multilabel, seed=seed, **extra)
    return linear(
        *parts, "label", method=method, multilabel=multilabel, seed=seed, bootstrap=bootstrap
    )


def finish(
    result: dict[str, Any],
    pipe: Pipeline,
    preset: Preset,
    out: Path,
    table: Callable[[Mapping[str, Any], str], str],
    pictures: Sequence[Any] = (),
) -> Path:
    """Write the report (``out/report``): ``result`` with the model, preset and caveats,
    the random-weight warning where it applies, and the paper-layout table."""
    cfg = pipe.encoder.cfg
    note = random_note(pipe.encoder)
    result = {
        **result,
        "preset": preset.name,
        "paper": preset.paper,
        "reference": preset.reference,
        "model": cfg.name,
        "precision": pipe.encoder.precision,
        "caveats": [*preset.caveats, *result.get("caveats", [])],
    }
    if note:
        result["note"] = " ".join(n for n in (note, result.get("note")) if n)
    path = write_report(result, out / "report", pictures)
    model = cfg.name + (" (RANDOM WEIGHTS)" if note else "")
    text = path.read_text()
    caveats = "\n".join(f"- {c}" for c in result["caveats"] if c not in text)
    with path.open("a") as fh:
        fh.write(f"\n## As the paper's tables lay it out\n\n{table(result, model)}\n")
        if caveats:
            fh.write(f"\n## What cached features do not reproduce\n\n{caveats}\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("data_dir", type=Path, help="folder the CSV's paths are under")
    ap.add_argument("labels", type=Path, help="CSV: path, split, label or mask, [patient]")
    ap.add_argument("--protocol", choices=PROTOCOLS, required=True)
    ap.add_argument("--model", default="dinov2-base", help="registry name or local checkpoint")
    ap.add_argument("--out", type=Path, required=True, help="store and report go here")
    ap.add_argument("--dataset", help="name in the report's table [default: DATA_DIR's name]")
    ap.add_argument("--modality", help="of non-DICOM inputs (CT, MR, DX, …): picks the recipe")
    ap.add_argument("--precision", default=None, help="[default: fp16 on a GPU, else auto]")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--multilabel", action="store_true", help="'|'-separated class sets")
    ap.add_argument("--shots", type=int, nargs="+", help="few-shot sizes [default: 1 2 4 8 16]")
    ap.add_argument("--classes", help="segmentation: names of labels 0, 1, …, comma-separated")
    ap.add_argument("--lrs", type=float, nargs="+", help="segmentation rates [paper's 7]")
    ap.add_argument("--epochs", type=int, help="segmentation epochs [paper's 10]")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    preset = get_preset(args.protocol)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset or args.data_dir.resolve().name
    is_seg = preset.probe == "seg"
    items = read_items(
        args.data_dir,
        args.labels,
        need="mask" if is_seg else "label",
        label_column=args.label_column,
    )
    pipe = open_pipeline(
        args.model,
        out / "store.zarr",
        preset,
        precision=args.precision or paper_precision(),
        patch_tokens=is_seg,
    )
    t0 = time.perf_counter()
    entries, cache = embed_items(pipe, items, embed_series(args.modality))
    timing = {"embed_seconds": round(time.perf_counter() - t0, 1), "cache": cache}
    if is_seg:
        data = seg_data(
            pipe.store,
            {e: cast(Path, it.mask) for e, it in entries.items()},
            classes=args.classes.split(",") if args.classes else None,
            images={e: it.path for e, it in entries.items()},
        )
        split = np.asarray([entries[data.volumes[v].entry].split for v, _ in data.rows()])
        result, head = seg(
            data, split, method="baharoon2023", lrs=args.lrs, epochs=args.epochs,
            seed=args.seed, bootstrap=args.bootstrap,
        )  # fmt: skip
        pictures = overlays(data, head, split)
        metrics: Sequence[tuple[str, str]] = ()
    else:
        parts = split_features(pipe.store, entries, REFERENCE_KINDS[str(preset.probe)])
        result = classify(
            preset, parts, multilabel=args.multilabel, bootstrap=args.bootstrap,
            seed=args.seed, shots=args.shots,
        )  # fmt: skip
        pictures = []
        metrics = MULTILABEL_METRICS if args.multilabel else CLASSIFY_METRICS
    result |= timing | {"dataset": dataset}
    path = finish(
        result,
        pipe,
        preset,
        out,
        lambda res, model: paper_table(res, model, dataset, metrics or CLASSIFY_METRICS),
        pictures,
    )
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
