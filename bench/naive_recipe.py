"""The "model-card recipe": what a user writes instead of radcache to embed a CT series.

This is the baseline ``bench_embed.py`` times as a whole process. It does what the
DINOv2 model card plus a DICOM tutorial suggest, with nothing tuned:

* ``pydicom.dcmread`` every file, sort by InstanceNumber;
* rescale to HU, apply a soft-tissue window (centre 40, width 400 — radcache's CT
  default) and make 8-bit RGB PIL images;
* the Hugging Face image processor for DINOv2 (``BitImageProcessor`` with the values of
  ``facebook/dinov2-small``'s ``preprocessor_config.json``: shortest edge 256, bicubic,
  centre crop 224, rescale 1/255, ImageNet mean/std). It cannot be downloaded here, so it
  is built from those values. transformers ≥ 5 serves its torchvision backend
  (``BitImageProcessor``) when torchvision works and its PIL backend
  (``BitImageProcessorPil``) otherwise — exactly what ``AutoImageProcessor`` would pick;
* the model in fp32 under ``torch.no_grad()``, batch 32. ``AutoModel.from_pretrained``
  cannot download either, so the same random-weight ViT-S/14 radcache uses
  (``build_random(get_cfg("dinov2-small-random"))``) stands in: identical weights,
  identical architecture;
* CLS tokens saved with ``np.save``.

With ``--device cuda`` the model runs on the GPU in fp32, its inputs copied there per
batch, as the model card's ``.to("cuda")`` does; ``--model dinov2-base`` (or any plain
DINOv2 registry name) stands in the random weights of that geometry
(bench/bench_gpu.py uses both).

Usage: ``python bench/naive_recipe.py DICOM_DIR OUT.npy [--batch-size 32] [--timings T.json]
[--device cpu|cuda] [--model dinov2-small-random]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image

# DINOv2 preprocessor_config.json (facebook/dinov2-small), written out by hand.
DINOV2_PREPROCESSOR = {
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,  # PIL.Image.BICUBIC
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
WINDOW_CENTER, WINDOW_WIDTH = 40.0, 400.0


def make_processor():
    """``BitImageProcessor`` (torchvision backend) if it works here, else the PIL backend."""
    try:
        from transformers import BitImageProcessor

        return BitImageProcessor(**DINOV2_PREPROCESSOR)
    except ImportError:  # transformers ≥ 5 without a working torchvision
        from transformers import BitImageProcessorPil

        return BitImageProcessorPil(**DINOV2_PREPROCESSOR)


def load_model(name: str = "dinov2-small-random") -> torch.nn.Module:
    """Stands in for ``AutoModel.from_pretrained("facebook/dinov2-small")`` (or the
    geometry ``name`` gives, with random weights)."""
    import dataclasses

    from radcache.embeddings.models import build_random, get_cfg

    cfg = dataclasses.replace(get_cfg(name), random_weights=True, hf_id=None)
    return build_random(cfg).eval()


def to_image(ds: pydicom.Dataset) -> Image.Image:
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo = WINDOW_CENTER - WINDOW_WIDTH / 2
    u8 = (np.clip((hu - lo) / WINDOW_WIDTH, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(u8).convert("RGB")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("dicom_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--timings", type=Path, help="write a JSON breakdown of where the time went")
    ap.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    ap.add_argument("--model", default="dinov2-small-random", help="geometry of the weights")
    args = ap.parse_args()
    # interpreter start-up and imports = the caller's wall time minus "total"
    t0 = time.perf_counter()
    t: dict[str, float] = {}

    s = time.perf_counter()
    processor = make_processor()
    model = load_model(args.model).to(args.device)
    t["model_load"] = time.perf_counter() - s

    s = time.perf_counter()
    files = sorted(p for p in args.dicom_dir.iterdir() if p.is_file())
    datasets = [pydicom.dcmread(p) for p in files]
    datasets.sort(key=lambda ds: int(ds.InstanceNumber))
    t["dcmread"] = time.perf_counter() - s

    s = time.perf_counter()
    images = [to_image(ds) for ds in datasets]
    t["window_to_pil"] = time.perf_counter() - s

    t["processor"] = t["forward"] = 0.0
    cls = []
    for i in range(0, len(images), args.batch_size):
        s = time.perf_counter()
        inputs = processor(images=images[i : i + args.batch_size], return_tensors="pt")
        t["processor"] += time.perf_counter() - s
        s = time.perf_counter()
        with torch.no_grad():
            out = model(**{k: v.to(args.device) for k, v in inputs.items()})
        cls.append(out.last_hidden_state[:, 0].cpu().numpy())
        t["forward"] += time.perf_counter() - s

    s = time.perf_counter()
    emb = np.concatenate(cls)
    np.save(args.out, emb)
    t["save"] = time.perf_counter() - s
    t["total"] = time.perf_counter() - t0
    if args.timings:
        args.timings.write_text(
            json.dumps(
                {
                    "timings": t,
                    "slices": int(emb.shape[0]),
                    "dim": int(emb.shape[1]),
                    "processor": type(processor).__name__,
                    "torch_threads": torch.get_num_threads(),
                }
            )
        )


if __name__ == "__main__":
    main()
