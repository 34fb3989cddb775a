"""Scholz et al. 2025's MM-DINOv2 evaluation on any folder of multi-sequence MR studies.

Scholz et al. 2025 ("MM-DINOv2: Adapting Foundation Models for Multi-Modal Medical Image
Analysis", code: github.com/daniel-scholz/mm-dinov2) classify glioma subtypes from one
axial slice per study, cut 96×96 around the tumour, with every sequence (T1, T1c, T2,
FLAIR) in one forward pass and a linear probe on the CLS token. The ``scholz2025`` preset
(``radcache.embeddings.presets``) is its preprocessing; the probe runs with the preset's
method.

    python examples/reproduce_scholz2025.py DATA_DIR LABELS.csv \\
        --model /weights/mm-dinov2-converted --out OUT

``LABELS.csv`` has one row per study: ``path`` (a study folder under ``DATA_DIR``),
``label``, ``split`` (``train``, ``val`` or ``test``) and optionally ``patient`` and
``roi``. A study folder holds one NIfTI file (or DICOM series folder) per sequence. A
file's sequence is the last ``_``/``-``-separated word of its name: ``t1`` (``t1n``,
``t1w``), ``t1c`` (``t1ce``, ``t1gd``), ``t2`` (``t2w``), ``flair`` (``t2f``), so
``sub-001_ses-preop_space-sri_t1c.nii.gz`` (the reference's BIDS layout) and BraTS'
``BraTS2021_00000_t1ce.nii.gz`` are named; DICOM series are named by their headers
(``radcache.embeddings.sequences``). A file whose last word is ``seg`` or
``segmentation`` is the tumour's label map.

The region each study is embedded from: the row's ``roi`` (JSON, as ``radcache embed
--roi`` takes it: ``{"voxels": [z0, z1, y0, y1, x0, x1]}`` or ``{"mm": [...]}``); else,
where the study has a tumour map, the reference's box (``--roi-size`` 96; 0 turns it off):
the axial slice (the map's third array axis) with the largest sum of labels, and the
``--roi-size`` square around the tumour's centre of mass on it, shifted inside the image
(``LoadTumorSliced`` and ``calculate_crop_slices`` in dinov2/data/monai_transforms/io.py);
else every axial slice, averaged.

The rest is shared with ``reproduce_baharoon2023.py``: a store under ``OUT`` (reruns are
answered from it), the CSV's splits (settings chosen on ``val`` only), and ``OUT/report/``
with accuracy, balanced accuracy, AUROC, MCC and F1 (the paper's metrics), each with a
bootstrap 95 % interval. A model with random weights (``mm-dinov2-tiny-random``) or
untrained sequence embeddings (``mm-dinov2-*-untrained``) makes the report say so at its
top.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_baharoon2023 import (
    Embed,
    Item,
    classify,
    embed_items,
    finish,
    open_pipeline,
    paper_precision,
    paper_table,
    patient_refs,
    read_items,
    split_features,
)

from radcache.embeddings import EmbedReport, Pipeline, get_preset
from radcache.embeddings.errors import InputError
from radcache.embeddings.recipe import Roi, load_roi

PRESET = "scholz2025"
#: A file's last name word → its sequence (the BIDS suffixes of the reference, BraTS' and
#: UPenn-GBM's spellings).
SEQUENCE_WORDS = {
    "t1": "t1",
    "t1n": "t1",
    "t1w": "t1",
    "t1c": "t1c",
    "t1ce": "t1c",
    "t1gd": "t1c",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "t2f": "flair",
}
TUMOUR_WORDS = ("seg", "segmentation")
#: The paper's metrics (the evaluation config's mcc, mean_per_class_accuracy,
#: multiclass_auc, f1), and accuracy.
METRICS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_auroc", "AUROC"),
    ("mcc", "MCC"),
    ("macro_f1", "F1"),
)


def _last_word(path: Path) -> str:
    stem = path.name.lower().removesuffix(".gz").removesuffix(".nii")
    return re.split(r"[_\-.\s]", stem)[-1]


def study_files(folder: Path) -> tuple[list[Path], dict[str, str], Path | None]:
    """A study folder's sequence inputs, the sequence of each one its name gives (file
    name → sequence), and its tumour map (or None)."""
    inputs, mapping, tumour = [], {}, None
    for path in sorted(folder.iterdir()):
        word = _last_word(path)
        if word in TUMOUR_WORDS:
            if tumour is not None:
                raise InputError(
                    f"two tumour maps: {tumour.name} and {path.name}.", path=str(folder)
                )
            tumour = path
            continue
        inputs.append(path)
        if word in SEQUENCE_WORDS:
            mapping[path.name] = SEQUENCE_WORDS[word]
    return inputs, mapping, tumour


def tumour_box(tumour: Path, size: int) -> Roi:
    """The reference's evaluation crop as a box in patient millimetres: the slice of the
    map's third array axis with the largest sum of labels, and the ``size`` × ``size``
    square around the tumour's centre of mass on it (the centre truncated to whole voxels,
    the square shifted to lie inside the slice)."""
    import nibabel as nib

    img = nib.nifti1.load(str(tumour))
    labels = np.asarray(img.get_fdata())
    if labels.ndim != 3 or not (labels > 0).any():
        raise InputError("expected a 3D tumour label map with some tumour.", path=str(tumour))
    k = int(np.argmax(labels.sum(axis=(0, 1))))
    centre = np.argwhere(labels[:, :, k] > 0).mean(axis=0).astype(int)
    shape = np.asarray(labels.shape[:2])
    start = np.maximum(centre - size // 2, 0)
    end = np.minimum(start + size, shape)
    start = np.maximum(end - size, 0)
    # voxel centres are whole indices: the box runs half a voxel beyond the outer ones
    lo, hi = [*(start - 0.5), k - 0.5], [*(end - 0.5), k + 0.5]
    corners = np.asarray([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                          for c in (lo[2], hi[2])])  # fmt: skip
    ras = (np.asarray(img.affine) @ corners.T)[:3].T
    lps = ras * [-1.0, -1.0, 1.0]
    low, high = lps.min(axis=0), lps.max(axis=0)
    return Roi(mm=(low[0], high[0], low[1], high[1], low[2], high[2]))


def embed_study(roi_size: int) -> Embed:
    """Embed one study folder as one MM-DINOv2 entry, cut to its region of interest."""

    def embed(pipe: Pipeline, item: Item) -> EmbedReport:
        inputs, mapping, tumour = study_files(item.path)
        roi = None
        if item.extra.get("roi"):
            roi = load_roi(item.extra["roi"])
        elif tumour is not None and roi_size > 0:
            roi = tumour_box(tumour, roi_size)
        boxed = pipe.variant(recipe=pipe.recipe.with_roi(roi))
        return boxed.embed_study(inputs, mapping=mapping, refs=patient_refs(pipe, item, inputs))

    return embed


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("data_dir", type=Path, help="folder the CSV's study folders are under")
    ap.add_argument("labels", type=Path, help="CSV: path, label, split, [patient], [roi]")
    ap.add_argument("--model", required=True, help="an MM-DINOv2 registry name or checkpoint")
    ap.add_argument("--out", type=Path, required=True, help="store and report go here")
    ap.add_argument("--dataset", help="name in the report's table [default: DATA_DIR's name]")
    ap.add_argument("--roi-size", type=int, default=96, help="the tumour box's side; 0: none")
    ap.add_argument("--precision", default=None, help="[default: fp16 on a GPU, else auto]")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    preset = get_preset(PRESET)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset or args.data_dir.resolve().name
    items = read_items(args.data_dir, args.labels, need="label", label_column=args.label_column)
    precision = args.precision or paper_precision()
    pipe = open_pipeline(
        args.model, out / "store.zarr", preset, precision=precision, patch_tokens=False
    )
    if not pipe.encoder.cfg.multi_sequence:
        raise InputError(f"{args.model} is not an MM-DINOv2 model; expected mm-dinov2-….")
    t0 = time.perf_counter()
    entries, cache = embed_items(pipe, items, embed_study(args.roi_size))
    embed_s = round(time.perf_counter() - t0, 1)
    parts = split_features(pipe.store, entries, "cls")
    result = classify(preset, parts, bootstrap=args.bootstrap, seed=args.seed)
    result |= {"dataset": dataset, "embed_seconds": embed_s, "cache": cache}
    result["roi_size"] = args.roi_size
    path: Path = finish(
        result, pipe, preset, out, lambda res, model: paper_table(res, model, dataset, METRICS)
    )
    print(json.dumps({"report": str(path)}))
    return path


if __name__ == "__main__":
    main()
