"""Decoding compressed series: in the loading thread against the decode pool.

A generated CT series (``--slices`` slices of 512², int16) is written once per transfer
syntax (JPEG 2000 lossless, JPEG-LS lossless, RLE, uncompressed), then loaded into a
volume (``Candidate.load``: read, digest check, decode, rescale) with the decode pool
off and with ``--workers`` processes, interleaved, ``--repeats`` times each; medians
reported. The pool is started before the timed runs (its start-up, once per process,
is reported apart).

    python bench/bench_decode.py --out bench/results/decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.dicomgen


def main() -> None:
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

    from radcache.embeddings import Pseudonymizer, scan
    from radcache.embeddings.ingest import _decode_pool, use_decode_workers
    from tests.dicomgen import encoder_available, phantom, write_series

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=_decode_pool.auto_workers())
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pseudo = Pseudonymizer(b"bench-decode-secret-0123456789")
    syntaxes = {
        "JPEG 2000 lossless": JPEG2000Lossless,
        "JPEG-LS lossless": JPEGLSLossless,
        "RLE lossless": RLELossless,
        "uncompressed": ExplicitVRLittleEndian,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = (phantom(args.slices, 512, 512, seed=7) % 3000 - 1000).astype(np.int16)
        dirs = {}
        for name, uid in syntaxes.items():
            if encoder_available(uid):
                dirs[name] = write_series(Path(tmp) / name, raw, transfer_syntax=uid).directory
        use_decode_workers(args.workers)
        pool = _decode_pool.shared_pool()
        assert pool is not None
        t0 = time.perf_counter()
        pool.result(pool._pool().submit(int, 0), "warm-up")  # type: ignore[arg-type]
        started = time.perf_counter() - t0

        def load(directory: Path, workers: int) -> float:
            use_decode_workers(workers)
            t = time.perf_counter()
            (candidate,) = scan([directory], pseudo).candidates
            candidate.load()
            return time.perf_counter() - t

        for name, directory in dirs.items():
            times: dict[int, list[float]] = {0: [], args.workers: []}
            for _ in range(args.repeats):
                for w, runs in times.items():
                    runs.append(load(directory, w))
            thread, pooled = (statistics.median(times[w]) for w in times)
            runs = {str(k): v for k, v in times.items()}
            rows.append({"syntax": name, "thread_s": thread, "pool_s": pooled,
                         "speedup": thread / pooled, "runs": runs})  # fmt: skip
            print(f"{name:20s} thread {thread:6.2f} s  pool of {args.workers} {pooled:6.2f} s  "
                  f"× {thread / pooled:.2f}", flush=True)  # fmt: skip
    use_decode_workers(0)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "slices": args.slices,
        "workers": args.workers,
        "pool_start_s": started,
        "rows": rows,
    }
    print(f"pool start-up {started:.2f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
