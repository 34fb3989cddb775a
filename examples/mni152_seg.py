"""Segmentation probe on real anatomy: the MNI152 T1 template that ships with nilearn.

The template (ICBM 2009a nonlinear symmetric, 1 mm, 197×233×189) is embedded slice by slice
along the axial axis; reference labels — background / grey matter / white matter — come
from the grey- and white-matter probability maps that ship beside it (each voxel takes the
most probable of background = 1 − GM − WM, GM, WM). A linear head on the frozen patch
tokens is trained on some axial slices and scored on others: the volume is cut into 8 runs
of adjacent slices, alternately train and test.

    pip install -e '.[test]'            # nilearn comes with the test extra
    python examples/mni152_seg.py --model dinov2-small --out mni152-seg

writes ``mni152-seg/report/`` (report.md, result.json, Dice and loss plots, overlays).
With no network and no local weights, ``--model dinov2-small-random`` runs the same steps on
a RANDOM-WEIGHT ViT-S/14 (the report says so); its figures say what the pipeline does, not
what DINOv2 features are worth. The same with the CLI, after this script has written the
NIfTI files and ``masks.csv``::

    radcache embed mni152-seg/t1.nii.gz --store mni152-seg/store.zarr \\
        --model dinov2-small --recipe mni152-seg/recipe.json
    radcache probe seg --store mni152-seg/store.zarr --masks mni152-seg/masks.csv \\
        --classes background,grey-matter,white-matter --split blocks -o mni152-seg/report
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer, Recipe
from radcache.embeddings.encode import load_encoder
from radcache.embeddings.probes import overlays, seg, seg_data, split_slices, write_report
from radcache.embeddings.recipe import Resize

CLASSES = ["background", "grey-matter", "white-matter"]


def write_inputs(out: Path) -> tuple[Path, Path]:
    """The T1 template and its three-class label map as NIfTI files on the same grid."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
    probs = np.stack([np.clip(1 - gm - wm, 0, 1), gm, wm])
    labels = probs.argmax(axis=0).astype(np.int16)
    t1_path, mask_path = out / "t1.nii.gz", out / "tissue.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(t1.get_fdata(), np.float32), t1.affine), t1_path)
    nib.save(nib.Nifti1Image(labels, t1.affine), mask_path)
    return t1_path, mask_path


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dinov2-small", help="registry name or local checkpoint")
    ap.add_argument("--size", type=int, default=448, help="input side (a multiple of 14)")
    ap.add_argument("--stride", type=int, default=1, help="embed every n-th axial slice")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("mni152-seg"))
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t1_path, mask_path = write_inputs(out)
    recipe = Recipe.model_validate(
        {
            "slice_axis": "axial",
            "slices": {"mode": "stride", "step": args.stride},
            "resize": Resize(mode="pad", size=args.size).model_dump(),
        }
    )
    (out / "recipe.json").write_text(recipe.model_dump_json(indent=1))
    encoder = load_encoder(args.model)
    store = EmbeddingStore(out / "store.zarr")
    secret = os.environ.get("RADCACHE_PSEUDONYM_KEY", "mni152-example-secret").encode()
    pipe = Pipeline(encoder, store, Pseudonymizer(secret), recipe=recipe, patch_tokens=True)
    t0 = time.perf_counter()
    report = pipe.embed([t1_path])
    embed_s = time.perf_counter() - t0
    (entry,) = [r.entry for r in report.series]
    (out / "masks.csv").write_text(f"entry,mask,image\n{entry},tissue.nii.gz,t1.nii.gz\n")

    data = seg_data(store, {entry: mask_path}, classes=CLASSES, images={entry: t1_path})
    split = split_slices(data, "blocks", blocks=8)
    t0 = time.perf_counter()
    result, head = seg(data, split, epochs=args.epochs)
    train_s = time.perf_counter() - t0
    cfg = encoder.cfg
    result = {
        **result,
        "model": cfg.name,
        "input_size": args.size,
        "embed_seconds": round(embed_s, 1),
        "train_seconds": round(train_s, 1),
    }
    if cfg.random_weights:
        result["note"] = (
            f"RANDOM-WEIGHT MODEL ({cfg.name}): these figures show the pipeline working, "
            "not what trained DINOv2 features achieve."
        )
    path = write_report(result, out / "report", overlays(data, head, split))
    print(json.dumps({k: result[k] for k in ("dice_2d", "dice_3d")}, indent=1))
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
