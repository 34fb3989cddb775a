"""Patch storage: bytes per slice and fidelity of each ``patch_storage`` form.

The MNI152 T1 template that ships with nilearn (1 mm, 197×233×189) is embedded along the
axial axis, every ``--stride``-th slice, once per form (fp16, int8, pooled:N, none) into a
fresh store each, through the pipeline's own write path. For each form it measures

* bytes per slice of the patch arrays on disk (``patch`` and, for int8, ``patch_scale``)
  and of the whole entry;
* cosine of each stored (decoded) token to the fp16 token (a pooled cell is compared with
  every fp16 token it covers): mean and minimum;
* the segmentation probe's 3D Dice of grey and white matter (labels background / grey /
  white matter; the split of ``examples/mni152_seg.py``: 8 blocks of adjacent slices,
  alternately train and test).

The model is the built-in RANDOM-WEIGHT ``dinov2-small-random`` (ViT-S/14 geometry): its
Dice figures check the plumbing of each form, they say nothing of trained DINOv2 features.
The cosines are measured on real anatomy through the real geometry (dim 384, 16×16 grid at
224 px). Writes ``bench/results/patch_storage.json`` (or ``--out``) and prints a table.

    python bench/bench_patch_storage.py                  # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer, Recipe
from radcache.embeddings.encode import load_encoder
from radcache.embeddings.probes import seg, seg_data, split_slices
from radcache.embeddings.recipe import Resize

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "grey-matter", "white-matter"]


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _expand(tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    """A pooled ``(n, ph, pw, D)`` grid back on the full ``(n, h, w, D)`` grid: each token
    takes the cell that covers its centre."""
    ph, pw = tokens.shape[1:3]
    rows = (np.arange(h) * ph) // h
    cols = (np.arange(w) * pw) // w
    return tokens[:, rows][:, :, cols]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    out: np.ndarray = num / np.maximum(den, 1e-12)
    return out


def run(forms: list[str], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    example = runpy.run_path(str(ROOT / "examples" / "mni152_seg.py"))
    t1, mask = example["write_inputs"](work)
    recipe = Recipe.model_validate(
        {
            "slice_axis": "axial",
            "slices": {"mode": "stride", "step": args.stride},
            "resize": Resize(mode="pad", size=args.size).model_dump(),
        }
    )
    encoder = load_encoder(args.model, device="cpu", precision="fp32")
    pseudo = Pseudonymizer(b"patch-storage-bench-secret")
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    for form in forms:
        path = work / f"store-{form.replace(':', '-')}.zarr"
        store = EmbeddingStore(path)
        pipe = Pipeline(encoder, store, pseudo, recipe=recipe, patch_storage=form)
        t0 = time.perf_counter()
        (result,) = pipe.embed([t1]).series
        embed_s = time.perf_counter() - t0
        info = store.get(result.entry)
        assert info is not None and info.attrs["patch_storage"] == form
        entry = path / "entries" / info.key
        patch_bytes = sum(
            _bytes(entry / k) for k in ("patch", "patch_scale") if (entry / k).exists()
        )
        row: dict[str, Any] = {
            "form": form,
            "n_slices": info.n_slices,
            "patch_bytes_per_slice": round(patch_bytes / info.n_slices),
            "entry_bytes_per_slice": round(_bytes(entry) / info.n_slices),
            "embed_seconds": round(embed_s, 2),
        }
        if form != "none":
            tokens = store.read(info.key, "patch")
            row["stored_grid"] = list(tokens.shape[1:3])
            if reference is None:
                reference = tokens.astype(np.float32)  # fp16 comes first
            h, w = reference.shape[1:3]
            cos = _cosine(_expand(tokens, h, w), reference)
            row["cosine_to_fp16"] = {"mean": float(cos.mean()), "min": float(cos.min())}
            data = seg_data(store, {info.key: mask}, classes=CLASSES, images={info.key: t1})
            split = split_slices(data, "blocks", blocks=8)
            torch.manual_seed(0)
            res, _ = seg(data, split, epochs=args.epochs, bootstrap=200)
            row["dice_3d"] = {c: round(v["value"], 4) for c, v in res["dice_3d"].items()}
            row["dice_3d_mean"] = round(float(np.mean(list(row["dice_3d"].values()))), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    fp16 = next(r for r in rows if r["form"] == "fp16")["patch_bytes_per_slice"]
    out = [
        "| form | grid | patch bytes/slice | vs fp16 | entry bytes/slice | cosine mean | "
        "cosine min | Dice 3D GM / WM (mean) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cos = r.get("cosine_to_fp16")
        d = r.get("dice_3d")
        grid = "×".join(map(str, r.get("stored_grid", []))) or "-"
        mean = f"{cos['mean']:.5f}" if cos else "-"
        low = f"{cos['min']:.5f}" if cos else "-"
        dice = "-"
        if d:
            dice = " / ".join(f"{v:.3f}" for v in d.values()) + f" ({r['dice_3d_mean']:.3f})"
        b = r["patch_bytes_per_slice"]
        out.append(
            f"| {r['form']} | {grid} | {b:,} | {b / fp16:.3f} "
            f"| {r['entry_bytes_per_slice']:,} | {mean} | {low} | {dice} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dinov2-small-random")
    ap.add_argument("--size", type=int, default=224, help="input side (a multiple of 14)")
    ap.add_argument("--stride", type=int, default=3, help="embed every n-th axial slice")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument(
        "--forms", default="fp16,int8,pooled:2,pooled:4,pooled:8,none", help="fp16 first"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "patch_storage.json")
    args = ap.parse_args(argv)
    forms = args.forms.split(",")
    if forms[0] != "fp16":
        ap.error("--forms must start with fp16, the reference the others are compared with")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(forms, args, Path(tmp))
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "model": args.model,
        "random_weights": args.model.endswith("-random"),
        "input_size": args.size,
        "stride": args.stride,
        "epochs": args.epochs,
        "data": "nilearn MNI152 T1 template 1 mm, axial; GM/WM/background labels",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
