"""Batch memory: what a forward really takes per slice, against the count that sizes
batches (``radcache.embeddings._budget.slice_bytes``), on this machine's CPU.

Each case runs in a fresh process: random weights of the model's geometry, then for
each batch size one warm-up batch of one slice and one batch through ``Encoder.encode``
(last-4 CLS and fp16 patch grids, as the pipeline asks). The peak resident set size is
reset before the batch (``/proc/self/clear_refs``); what the batch adds to it (the
input tensor excepted), over the slices, is the measured cost of a slice, fixed costs
of a forward included. The count must not be below it: it is the bound that keeps a
batch inside its budget. On CUDA the same bound is checked with
``torch.cuda.max_memory_allocated`` by ``tests/test_gpu.py``.

    python bench/bench_batch_memory.py --out bench/results/batch_memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

CASES = [  # (geometry, input size, precision)
    ("dinov2-small", 224, "bf16"),
    ("dinov2-small", 224, "fp32"),
    ("dinov2-small", 518, "bf16"),
    ("dinov2-base", 224, "bf16"),
    ("dinov2-large", 224, "bf16"),
]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(name: str, size: int, precision: str, batches: list[int]) -> list[dict[str, float]]:
    import torch

    from radcache.embeddings._budget import slice_bytes
    from radcache.embeddings.encode import Encoder
    from radcache.embeddings.models import build_random, get_cfg

    torch.set_num_threads(2)
    cfg = get_cfg(name)
    enc = Encoder(cfg, build_random(cfg), torch.device("cpu"), precision)
    counted = slice_bytes(cfg, (size, size), enc.dtype.itemsize)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        enc.encode([x[:1].clone()], last_n=4)
        Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
        before = _status("VmRSS")
        enc.encode([x], last_n=4)
        measured = (_status("VmHWM") - before) / batch
        rows.append({"batch": batch, "measured": measured, "counted": counted,
                     "ratio": measured / counted})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "SIZE", "PRECISION"))
    args = ap.parse_args()
    if args.child:
        name, size, precision = args.child
        print(json.dumps(child(name, int(size), precision, args.batch)))
        return
    rows = []
    t0 = time.time()
    for name, size, precision in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--batch", *map(str, args.batch), "--child", name,
             str(size), precision],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        for got in json.loads(out.stdout):
            row = {"model": name, "size": size, "precision": precision, **got}
            rows.append(row)
            print(
                f"{name:13s} {size:4d} {precision:5s} batch {row['batch']:3d}  measured "
                f"{row['measured'] / 2**20:7.2f} MiB/slice  counted {row['counted'] / 2**20:7.2f}"
                f" MiB  measured/counted {row['ratio']:.2f}",
                flush=True,
            )
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "python": platform.python_version(),
        "batches": args.batch,
        "seconds": round(time.time() - t0, 1),
        "cases": rows,
        "all_within_count": all(r["ratio"] <= 1 for r in rows),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(f"every case within the count: {result['all_within_count']}")


if __name__ == "__main__":
    main()
