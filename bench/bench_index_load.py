"""Index start-up benchmark: a saved 1M-slice-vector index loaded in format 1 vs format 2.

Run: ``python bench/bench_index_load.py [--series 100000] [--slices 10] [--repeats 3]``

Data: ``--series`` entries in one space, dim 384, each with ``--slices`` slice vectors (CLS)
around one of ``--clusters`` Gaussian cluster centres and their mean as the series vector;
catalog records shaped like real ones (DICOM-length UIDs, a patient pseudonym, modality,
body part, description, labels on a third). A store in the real format holds the same
rows as its table (no entry folders: writing 100k entries is not what is measured), so a
loaded index matches the store and ``open_index`` has nothing to catch up.

One index is built (``auto`` types: IVF at these sizes, nprobe tuned to recall@10 ≥ 0.95)
and saved twice: by the index code of ``--old-rev`` (format 1: a JSON document per catalog
record, FAISS files read into memory), loaded from ``git show`` into a temporary package,
and by the current code (format 2: columnar catalog, labels parsed lazily, FAISS files
memory-mapped). Then each way of starting is timed in a fresh process (the page cache is
warm: the files were just written), ``--repeats`` times: ``IndexSet.load()`` and
``open_index()`` (what ``radcache serve`` runs at start-up) of each code on its own
format, the current code on a format-1 folder, and the current code without ``mmap``.
Each child also reports its peak RSS and the latency of its first 20 slice-level searches.

Target: start-up ≤ 5 s at 1M slice vectors. Writes ``bench/results/index_load.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OLD_REV = "699ac6bd3951"  # the index package before format 2 (JSON-lines catalog)
OLD_FILES = ("__init__.py", "_vectors.py", "catalog.py", "level.py", "space.py", "indexset.py")
SPACE = "bench.00000000.00000000"
DIM = 384

CHILD = r"""
import json, sys, time
from pathlib import Path

def peak_rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

variant, pkgdir, store_dir, index_dir, space = sys.argv[1:6]
sys.path.insert(0, pkgdir)
t0 = time.perf_counter()
import numpy as np
from radcache.embeddings import open_store
if variant.startswith("v1"):
    import radcache_index_v1 as ix
else:
    import radcache.embeddings.index as ix
store = open_store(store_dir)
imported = time.perf_counter() - t0
t = time.perf_counter()
if variant.endswith("open_index"):
    si = ix.open_index(store, Path(index_dir)).spaces[space]
elif variant.endswith("no-mmap"):
    si = ix.SpaceIndex.load(ix.IndexSet(store, Path(index_dir)).path(space), mmap=False)
else:
    idx = ix.IndexSet(store, Path(index_dir))
    idx.load()
    si = idx.spaces[space]
load = time.perf_counter() - t
q = np.random.default_rng(5).normal(size=(20, si.dim)).astype(np.float32)
lat = []
for i in range(20):
    t = time.perf_counter()
    si.search("slice", q[i : i + 1], 10, ix.Filters())
    lat.append(time.perf_counter() - t)
print(json.dumps({
    "load_s": load,
    "import_s": imported,
    "entries": len(si.catalog),
    "slice_vectors": int(si.levels["slice"].ntotal),
    "first_search_ms": lat[0] * 1e3,
    "search_p50_ms": sorted(lat[1:])[len(lat[1:]) // 2] * 1e3,
    "peak_rss_mb": peak_rss_mb(),
}))
"""

VARIANTS = {  # name: (index folder, what it measures)
    "v1-load": ("v1", "before: IndexSet.load(), format 1"),
    "v1-open_index": ("v1", "before: open_index(), format 1"),
    "v2-load": ("v2", "now: IndexSet.load(), format 2, mmap"),
    "v2-open_index": ("v2", "now: open_index(), format 2, mmap"),
    "v2-no-mmap": ("v2", "now: SpaceIndex.load(mmap=False), format 2"),
    "v2-reads-v1": ("v1", "now: IndexSet.load() of a format-1 folder"),
}


def old_package(dest: Path, rev: str) -> None:
    """The index package as of ``rev``, importable as ``radcache_index_v1``."""
    pkg = dest / "radcache_index_v1"
    pkg.mkdir()
    for name in OLD_FILES:
        text = subprocess.run(
            ["git", "show", f"{rev}:embeddings/index/{name}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (pkg / name).write_text(text.replace("from ..", "from radcache.embeddings."))


def vectors(
    n: int, per: int, clusters: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice vectors (n·per, DIM), series vectors (n, DIM), each series' cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
    which = rng.integers(0, clusters, n)
    cls = np.empty((n * per, DIM), np.float32)
    step = 10_000
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        noise = rng.standard_normal(((hi - lo) * per, DIM), dtype=np.float32)
        cls[lo * per : hi * per] = np.repeat(centres[which[lo:hi]], per, axis=0) + 0.7 * noise
    pooled = cls.reshape(n, per, DIM).mean(axis=1)
    return cls, pooled, which


def unit(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit rows, in place (what ``normalise`` does, without the copy)."""
    for lo in range(0, len(x), 65536):
        part = x[lo : lo + 65536]
        part /= np.linalg.norm(part, axis=1, keepdims=True)
    return x


def attrs(i: int, per: int, rng: np.random.Generator) -> dict[str, Any]:
    """Entry metadata shaped like a real CT/MR series (synthetic identifiers)."""
    study = f"1.2.826.0.1.3680043.8.498.{10_000_000 + i // 3}.{rng.integers(1e9, 1e10)}"
    return {
        "volume": {
            "study": study,
            "series": f"{study}.{i % 3 + 1}.{rng.integers(1e6, 1e7)}",
            "part": "",
            "patient": f"{rng.integers(0, 2**63):016x}",
            "modality": ("CT", "MR")[i % 2],
            "body_part": ("CHEST", "HEAD", "ABDOMEN")[i % 3],
            "series_description": ("Axial 1.25mm STD", "T2 FLAIR AX", "Venous phase 3mm")[i % 3],
        },
        "n_slices": per,
        "labels": {"dx": ("normal", "nodule")[i % 2], "reader": "r1"} if i % 3 == 0 else {},
        "collections": ["teaching"] if i % 50 == 0 else [],
    }


def write_store(path: Path, keys: list[str], pooled: np.ndarray, cls: np.ndarray, per: int) -> dict:
    """A store whose one table holds these rows; returns the table metadata."""
    from radcache.embeddings import EmbeddingStore
    from radcache.embeddings.store._common import _key_words
    from radcache.embeddings.store.tables import create_columns

    st = EmbeddingStore(path)
    g = st.root.require_group("tables").create_group(SPACE)
    create_columns(g, DIM, len(keys), len(cls))
    g["keys"][:] = np.asarray([_key_words(k) for k in keys], dtype=np.uint64)
    g["pooled"][:] = pooled
    g["cls"][:] = cls
    g["offsets"][:] = np.arange(0, len(cls) + 1, per, dtype=np.int64)
    meta = {
        "count": len(keys),
        "slices": len(cls),
        "deleted": 0,
        "dim": DIM,
        "model": "bench-vectors",
        "weights_hash": "0" * 32,
        "recipe_hash": "0" * 16,
        "recipe": {},
        "level": "series+slice",
        "table_id": uuid.uuid4().hex,
    }
    g.attrs["radcache"] = meta
    return meta


def build_and_save(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the index once, write the store and both index folders; returns timings."""
    sys.path.insert(0, str(work))
    import radcache_index_v1 as v1

    from radcache.embeddings.index import Catalog, IndexSet, LevelIndex, Record, SpaceIndex

    out: dict[str, Any] = {}
    t = time.perf_counter()
    cls, pooled, _ = vectors(args.series, args.slices, args.clusters)
    rng = np.random.default_rng(1)
    keys = [f"{i + 1:032x}" for i in range(args.series)]
    meta_attrs = [attrs(i, args.slices, rng) for i in range(args.series)]
    out["generate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tmeta = write_store(work / "store.zarr", keys, pooled, cls, args.slices)
    out["store_write_s"] = time.perf_counter() - t

    t = time.perf_counter()
    levels = {  # unit vectors made in place: a copy of 1M × 384 floats is 1.5 GB
        "series": LevelIndex.build("series", unit(pooled), np.arange(args.series)),
        "slice": LevelIndex.build("slice", unit(cls), np.arange(len(cls))),
    }
    out["build_s"] = time.perf_counter() - t
    out["factories"] = {lv: li.factory for lv, li in levels.items()}
    out["recall_at_10"] = {lv: li.recall for lv, li in levels.items()}
    del cls, pooled
    gc.collect()
    catalog = Catalog()
    records = [Record.from_attrs(k, a) for k, a in zip(keys, meta_attrs, strict=True)]
    for r in records:
        catalog.add(r)
    meta = {k: tmeta[k] for k in ("model", "weights_hash", "recipe_hash", "recipe", "dim")}
    meta.update(table_id=tmeta["table_id"], generation=0, rows=args.series, deleted=0)
    si = SpaceIndex(SPACE, meta, catalog, levels)  # type: ignore[arg-type]

    from radcache.embeddings import open_store

    store = open_store(work / "store.zarr")
    for fmt in ("v2", "v1"):
        path = IndexSet(store, work / f"index-{fmt}").path(SPACE)
        t = time.perf_counter()
        if fmt == "v2":
            si.save(path)
        else:
            old_cat = v1.Catalog()
            for r in records:
                old_cat.add(v1.Record(**{f: getattr(r, f) for f in r.__dataclass_fields__}))
            old_levels = {
                lv: v1.LevelIndex(
                    level=lv,
                    dim=DIM,
                    index=li.index,
                    factory=li.factory,
                    kind=li.kind,
                    params=li.params,
                    recall=li.recall,
                    trained_size=li.trained_size,
                    build_seconds=li.build_seconds,
                )
                for lv, li in levels.items()
            }
            v1.SpaceIndex(SPACE, meta, old_cat, old_levels).save(path)
        out[f"save_{fmt}_s"] = time.perf_counter() - t
        out[f"size_{fmt}_mb"] = (
            sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        )
    out["build_peak_rss_mb"] = _peak_rss_mb()
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM, which a fork does not inherit)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(variant: str, work: Path) -> dict[str, Any]:
    folder = VARIANTS[variant][0]
    cmd = [sys.executable, "-c", CHILD, variant, str(work), str(work / "store.zarr")]
    cmd += [str(work / f"index-{folder}"), SPACE]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=work)
    if done.returncode:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=100_000)
    ap.add_argument("--slices", type=int, default=10, help="slice vectors per series")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old-rev", default=OLD_REV, help="commit whose index code writes format 1")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/index_load.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        old_package(work, args.old_rev)
        print(f"building {args.series} series × {args.slices} slices (dim {DIM}) …", flush=True)
        built = build_and_save(args, work)
        print(json.dumps(built, indent=1), flush=True)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for rep in range(args.repeats):
            for variant in VARIANTS:  # interleaved, so drift hits every variant alike
                runs[variant].append(measure(variant, work))
                print(f"[{rep + 1}/{args.repeats}] {variant}: {runs[variant][-1]}", flush=True)
    summary = {
        v: {
            "what": VARIANTS[v][1],
            "load_s_median": statistics.median(r["load_s"] for r in rs),
            "load_s_min": min(r["load_s"] for r in rs),
            "first_search_ms_median": statistics.median(r["first_search_ms"] for r in rs),
            "search_p50_ms_median": statistics.median(r["search_p50_ms"] for r in rs),
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in rs),
            "entries": rs[0]["entries"],
            "slice_vectors": rs[0]["slice_vectors"],
        }
        for v, rs in runs.items()
    }
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    result = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
        "commit": commit,
        "old_rev": args.old_rev,
        "params": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
        "build": built,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(
        f"\n{'variant':<16}{'load s (median)':>17}{'first search ms':>17}{'p50 ms':>9}{'RSS MB':>9}"
    )
    for v, s in summary.items():
        print(
            f"{v:<16}{s['load_s_median']:>17.2f}{s['first_search_ms_median']:>17.1f}"
            f"{s['search_p50_ms_median']:>9.2f}{s['peak_rss_mb_median']:>9.0f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
