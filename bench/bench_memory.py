"""Memory benchmark: peak RSS of ``radcache embed ARCHIVE`` against the number of series.

Run: ``python bench/bench_memory.py [--sizes 5 20] [--slices 200] [--tree /tmp/rc-before]``
(see bench/README.md).

One run writes an archive of CT series (512×512 int16 single-frame files, 200 slices each,
the phantom of ``bench_embed.py``; every series has its own UIDs and its own pixel values,
so each is a cache miss) into a temp directory, then, for each code tree, runs
``python -m radcache.service.cli embed ARCHIVE --model dinov2-small-random --store FRESH
--json`` as a subprocess on the first 5 and on all 20 series, and reads the child's peak
resident set size from ``os.wait4`` (``ru_maxrss``). ``dinov2-small-random`` is ViT-S/14
with random weights built in code (no download): the memory of a real ViT-S, meaningless
embeddings. Targets: peak RSS at 20 series ≤ 1.10 × at 5 series, and ≤ 1.5 GB.

``--tree PATH`` adds another checkout (e.g. ``git worktree add /tmp/rc-before HEAD``
made before a change) measured the same way, side by side: its ``embeddings``,
``service`` and ``clients`` folders are linked into a ``radcache`` package on the
subprocess's ``PYTHONPATH``, ahead of the installed one. It also reports what a scan
holds per file (tracemalloc, one series' headers in a subprocess of each tree).
The archive is deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_embed  # noqa: E402  (the CT phantom, the machine and git description)

MODEL = "dinov2-small-random"
PSEUDONYM_KEY = "radcache-bench-pseudonym-key-0123456789"
TARGET_GROWTH = 1.10
TARGET_PEAK_BYTES = 1.5e9  # 1.5 GB
ROWS = COLS = 512


# ----------------------------------------------------------------------------------------
# The archive


def base_slices(n: int) -> np.ndarray:
    """``n`` stored int16 slices (HU + 1024) of the CT phantom, computed once."""
    rng = np.random.default_rng(7)
    out = np.empty((n, ROWS, COLS), np.int16)
    for i in range(n):
        hu = bench_embed.ct_slice(i, n, rng)
        out[i] = np.clip(np.round(hu + 1024.0), -32768, 32767).astype(np.int16)
    return out


def write_series(directory: Path, stored: np.ndarray, k: int) -> None:
    """Series ``k``: its own UIDs, pixel values ``stored + k`` (its own content)."""
    directory.mkdir(parents=True)
    bench_embed.write_series(directory, len(stored), stored=stored, offset=k)


def make_archives(root: Path, sizes: list[int], slices: int) -> dict[int, Path]:
    """One archive folder per size; the smaller ones are hard links into the largest."""
    t0 = time.perf_counter()
    stored = base_slices(slices)
    largest = root / f"archive-{max(sizes)}"
    for k in range(max(sizes)):
        write_series(largest / f"series-{k:03d}", stored, k)
    out = {max(sizes): largest}
    for size in sorted(set(sizes) - {max(sizes)}):
        folder = root / f"archive-{size}"
        for k in range(size):
            src = largest / f"series-{k:03d}"
            (folder / src.name).mkdir(parents=True)
            for f in src.iterdir():
                os.link(f, folder / src.name / f.name)
        out[size] = folder
    print(f"archive written in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


# ----------------------------------------------------------------------------------------
# Code trees and runs


def package_layout(tree: Path, where: Path) -> Path:
    """A folder holding ``radcache/{embeddings,service,clients}`` linked to ``tree``;
    checks that a process with it on ``PYTHONPATH`` imports that code."""
    pkg = where / "radcache"
    pkg.mkdir(parents=True)
    for name in ("embeddings", "service", "clients"):
        (pkg / name).symlink_to(tree / name, target_is_directory=True)
    probe = "import radcache.embeddings.ingest as m, radcache.service.cli as c; "
    probe += "print(m.__file__); print(c.__file__)"
    got = subprocess.run(
        [sys.executable, "-c", probe], env=_env(where), capture_output=True, text=True, check=True
    ).stdout.split()
    if not all(f.startswith(str(pkg)) for f in got):
        raise RuntimeError(f"PYTHONPATH={where} imported {got}, not the code in {tree}")
    return where


def _env(pythonpath: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADCACHE_")}
    env["RADCACHE_PSEUDONYM_KEY"] = PSEUDONYM_KEY
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    return env


def run_embed(
    pythonpath: Path, archive: Path, store: Path, size: int, slices: int, batch: int | None
) -> dict[str, Any]:
    """``radcache embed`` in a child process; its peak RSS from ``wait4``."""
    cmd = [sys.executable, "-m", "radcache.service.cli", "embed", str(archive)]
    cmd += ["--model", MODEL, "--store", str(store), "--json"]
    if batch is not None:
        cmd += ["--batch-size", str(batch)]
    out, err = store.with_suffix(".out"), store.with_suffix(".err")
    with bench_embed.Background() as bg, out.open("w") as fo, err.open("w") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=_env(pythonpath), stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err.read_text()[-4000:]}")
    report = json.loads(out.read_text())
    got = [(s["cache"], s["slices"]) for s in report["series"]]
    if report.get("errors") or got != [("miss", slices)] * size:
        raise RuntimeError(f"unexpected report for {size} series: {out.read_text()[:2000]}")
    return {
        "series": size,
        "slices": size * slices,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "wall_s": wall,
        "background_cores": bg.cores,
    }


_HELD_PROBE = """
import gc, json, sys, tracemalloc
from radcache.embeddings.ingest import scan
from radcache.embeddings.pseudonyms import Pseudonymizer
p = Pseudonymizer(b"radcache-bench-pseudonym-key-0123456789")
scan([sys.argv[1]], p)
gc.collect()
tracemalloc.start()
before = tracemalloc.get_traced_memory()[0]
result = scan([sys.argv[1]], p)
gc.collect()
held = tracemalloc.get_traced_memory()[0] - before
print(json.dumps({"files": sum(c.n_slices for c in result.candidates), "held_bytes": held}))
"""


def held_per_file(pythonpath: Path, series_dir: Path) -> dict[str, Any]:
    """What a scan of one series keeps (tracemalloc), per file."""
    proc = subprocess.run(
        [sys.executable, "-c", _HELD_PROBE, str(series_dir)],
        env=_env(pythonpath),
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**got, "held_bytes_per_file": got["held_bytes"] / got["files"]}


def tree_commit(tree: Path) -> str | None:
    p = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True, check=False
    )
    return p.stdout.strip() or None


# ----------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[5, 20], metavar=("SMALL", "LARGE"))
    ap.add_argument("--slices", type=int, default=200, help="slices per series (spec: 200)")
    ap.add_argument("--batch-size", type=int, default=None, help="radcache embed --batch-size")
    ap.add_argument(
        "--tree",
        action="append",
        default=[],
        type=Path,
        help="another checkout to measure beside this one (e.g. the code before a change)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    args = ap.parse_args()
    sizes = sorted(args.sizes)
    trees = {"this": HERE.parent, **{f"tree:{t}": t.resolve() for t in args.tree}}
    started = time.perf_counter()
    res: dict[str, Any] = {
        "benchmark": "peak RSS of radcache embed ARCHIVE, 5 vs 20 series",
        "model": f"{MODEL} (ViT-S/14, random weights built in code)",
        "data": {
            "series": sizes,
            "slices_per_series": args.slices,
            "matrix": [ROWS, COLS],
            "dtype": "int16",
        },
        "targets": {"growth": TARGET_GROWTH, "peak_bytes": TARGET_PEAK_BYTES},
        "machine": bench_embed.machine_info(),
        "trees": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="radcache-bench-memory-"))
    try:
        archives = make_archives(tmp / "data", sizes, args.slices)
        for t, (label, tree) in enumerate(trees.items()):
            layout = package_layout(tree, tmp / "layout" / f"tree-{t}")
            runs = []
            for size in sizes:
                store = tmp / "stores" / f"tree-{t}-{size}.zarr"
                store.parent.mkdir(parents=True, exist_ok=True)
                r = run_embed(layout, archives[size], store, size, args.slices, args.batch_size)
                runs.append(r)
                others = bench_embed._cores(r["background_cores"])
                print(
                    f"{label:<30} {size:>3} series: peak RSS {_mib(r['peak_rss_bytes']):>10}"
                    f"  ({r['wall_s']:.0f} s, others used {others})",
                    flush=True,
                )
                shutil.rmtree(store, ignore_errors=True)
            held = held_per_file(layout, archives[sizes[0]] / "series-000")
            small, large = runs[0]["peak_rss_bytes"], runs[-1]["peak_rss_bytes"]
            res["trees"][label] = {
                "path": str(tree),
                "commit": tree_commit(tree),
                "runs": runs,
                "growth": large / small,
                "peak_bytes": large,
                "held_per_file": held,
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["benchmark_wall_s"] = time.perf_counter() - started
    res["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    print()
    print(f"{'tree':<30} {sizes[0]:>3} series   {sizes[1]:>3} series   growth   held/file")
    for label, t in res["trees"].items():
        growth_ok = "ok" if t["growth"] <= TARGET_GROWTH else "MISSED"
        peak_ok = "ok" if t["peak_bytes"] <= TARGET_PEAK_BYTES else "MISSED"
        print(
            f"{label:<30} {_mib(t['runs'][0]['peak_rss_bytes']):>10} {_mib(t['peak_bytes']):>10}"
            f" ({peak_ok})  {t['growth']:.3f} ({growth_ok})"
            f"  {t['held_per_file']['held_bytes_per_file']:,.0f} B"
        )
    print(f"targets: growth ≤ {TARGET_GROWTH}, peak ≤ {TARGET_PEAK_BYTES / 1e9} GB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out} ({res['benchmark_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
