"""Whole-process re-run benchmark: a fully cached ``radcache embed`` against the first run.

Run: ``python bench/bench_rerun.py [--repeats 3] [--hits 3] [--large] [--out PATH]``.

For each data set, each repeat starts a fresh store and times, as subprocesses,
``radcache embed INPUT --model dinov2-small-random --store STORE --json``: once into the
empty store (a miss: the model loads and runs), then ``--hits`` times again into the
filled store (each must answer ``hit``). It reports the medians of the first runs and of
the re-runs side by side and their ratio (target ≤ 0.05), and, for reference, what a bare
interpreter costs (``python -c pass``, ``python -c "import numpy"``).

Data sets, written to a temp directory with the test suite's generators
(``tests/dicomgen.py``): a CT series of 40 slices 128×128 (one DICOM file per slice), the
same size as a NIfTI volume (``--modality MR``), and with ``--large`` a CT series of 150
slices 512×512 and an MR series of 189 slices 256×256 (the size of the series the target
was set on). The weights-hash file lives in the temp directory too, so every first
run after the very first one finds the weights hash remembered, as a user's would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "dinov2-small-random"
TARGET = 0.05
PSEUDONYM_KEY = "radcache-bench-pseudonym-key-0123456789"


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADCACHE_")}
    env["RADCACHE_PSEUDONYM_KEY"] = PSEUDONYM_KEY
    env["RADCACHE_WEIGHTS_HASH_FILE"] = str(tmp / "weights-hashes.json")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _radcache() -> list[str]:
    exe = Path(sys.executable).parent / "radcache"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "radcache.service.cli"]


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall, proc.stdout


def _embed(data: list[str], store: Path, env: dict[str, str], expect: str) -> float:
    cmd = [*_radcache(), "embed", *data, "--model", MODEL, "--store", str(store), "--json"]
    wall, out = _timed(cmd, env)
    series = json.loads(out)["series"]
    if [s["cache"] for s in series] != [expect]:
        raise RuntimeError(f"wanted one {expect}, got {out[:500]}")
    return wall


def _write_data(tmp: Path, large: bool) -> dict[str, list[str]]:
    from tests.dicomgen import phantom, write_nifti, write_series

    sets = {"dicom 40x128x128": tmp / "ct40", "nifti 40x128x128": tmp / "mr40.nii.gz"}
    write_series(sets["dicom 40x128x128"], phantom(40, 128, 128))
    write_nifti(sets["nifti 40x128x128"], phantom(40, 128, 128, seed=4))
    args = {
        "dicom 40x128x128": [str(sets["dicom 40x128x128"])],
        "nifti 40x128x128": [str(sets["nifti 40x128x128"]), "--modality", "MR"],
    }
    if large:
        write_series(tmp / "ct150", phantom(150, 512, 512), spacing=(2.0, 0.703125, 0.703125))
        args["dicom 150x512x512"] = [str(tmp / "ct150")]
        # the case the target was set on: a 189-file MR series
        write_series(tmp / "mr189", phantom(189, 256, 256, seed=5), modality="MR")
        args["dicom MR 189x256x256"] = [str(tmp / "mr189")]
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="radcache-rerun-"))
    env = _env(tmp)
    try:
        data = _write_data(tmp, args.large)
        floor = {
            "python -c pass": statistics.median(
                _timed([sys.executable, "-c", "pass"], env)[0] for _ in range(5)
            ),
            "python -c 'import numpy'": statistics.median(
                _timed([sys.executable, "-c", "import numpy"], env)[0] for _ in range(5)
            ),
        }
        results: dict[str, Any] = {}
        for name, inputs in data.items():
            firsts, hits = [], []
            for k in range(args.repeats):
                store = tmp / f"store-{k}"
                firsts.append(_embed(inputs, store, env, "miss"))
                hits.append(
                    statistics.median(_embed(inputs, store, env, "hit") for _ in range(args.hits))
                )
                shutil.rmtree(store, ignore_errors=True)
                print(f"  {name}  first {firsts[-1]:7.2f} s  re-run {hits[-1]:6.3f} s", flush=True)
            first, hit = statistics.median(firsts), statistics.median(hits)
            results[name] = {
                "first_runs_s": firsts,
                "rerun_medians_s": hits,
                "first_median_s": first,
                "rerun_median_s": hit,
                "ratio": hit / first,
            }
        return {"floor_s": floor, "results": results}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="fresh stores (first runs) per data set")
    p.add_argument("--hits", type=int, default=3, help="cached re-runs per store (median)")
    p.add_argument(
        "--large",
        action="store_true",
        help="also a 150-slice 512x512 CT series and a 189-slice 256x256 MR series",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rerun.json")
    args = p.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = bench(args)
    print(f"\n{'data':<20} {'first run':>10} {'re-run':>8} {'ratio':>7}  target <= {TARGET}")
    for name, r in out["results"].items():
        verdict = "pass" if r["ratio"] <= TARGET else "FAIL"
        print(
            f"{name:<20} {r['first_median_s']:9.2f}s {r['rerun_median_s']:7.3f}s "
            f"{r['ratio']:7.3f}  {verdict}"
        )
    for what, s in out["floor_s"].items():
        print(f"{what}: {s:.3f} s")
    out["meta"] = {
        "started": started,
        "command": " ".join(sys.argv),
        "repeats": args.repeats,
        "hits": args.hits,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
