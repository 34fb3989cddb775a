"""Scale benchmark: a real ``radcache serve`` over stores of 1k, 10k and 100k series.

Run: ``python bench/bench_scale.py [--sizes 1000 10000 100000] [--requests 200]``
(smoke run: ``--sizes 200 1000 --requests 50``).

Data, per size N: a store in the real format written through the store API
(``EmbeddingStore.write`` of each entry by ``--writers`` processes under the store's file
lock; the table rows then written once, in order, into the table ``append_row`` makes, or
with ``--no-bulk-table`` appended by each write), N series of 10
slices each (so 1M slice vectors at 100k), 3 series per study, 2 studies per patient,
pseudonym-like hex names. Vectors (unit, dim 384) are synthetic but have neighbourhoods:
each series is a case around one of 1000 shared centres (an anatomy and protocol: cosine
≈ 0.86 to it) and its slices lie around their case (cosine ≈ 0.94: neighbouring slices
alike), so the nearest neighbours of a series are cases of the same kind; ``pooled`` is
the mean of its slices, ``mean_patch`` another draw around the case; ``positions`` and
``slice_index`` as a real entry has them. No ``patch``
tokens and no ``cls_last`` (optional arrays the listing and search never read). The entry
metadata is what ``entry_attrs`` makes for ``dinov2-small-random`` (the served model, dim
384) on a tiny volume, with each entry's study, series, patient and content hash
replaced. Studies alternate CT and MR: two spaces.

Served by ``python -m radcache.service.cli serve --model dinov2-small-random`` on loopback
with a fresh SQLite job database, ``RADCACHE_PSEUDONYM_KEY`` set and ``HF_HUB_OFFLINE=1``:

* start-up, process start to ``/readyz`` 200: the first start (entry catalog rebuilt from
  the store, index built and saved) and ``--restarts`` restarts (catalog and index loaded;
  the median is reported, all are kept); then, before requests are timed, until
  ``/readyz`` says the model's weights (loaded in the background) are in, and until no
  erasure job an earlier run's deletions left is pending;
* then, on one keep-alive ``http.client`` connection, p50/p99 over ``--requests`` requests
  each of ``GET /v1/studies?limit=50`` (the cursor pages followed from the first page on),
  ``GET /v1/studies/{id}``, ``GET /v1/series/{id}``, ``POST /v1/search`` by series
  (k = 10) and ``DELETE /v1/studies/{id}`` (distinct studies, each deleted once, last);
* the server's peak RSS (``VmHWM``) before it is stopped.

Targets: restart ≤ 5 s at 100k; p50 at the largest size within 1.5× of p50 at the smallest
and ≤ 20 ms for every read. Writes ``bench/results/scale.json``; the stores are deleted
unless ``--keep``. ``--reuse N=DIR`` measures size N again on a kept folder (no write, no
first start; reads skip the studies an earlier run deleted, and ``--seed`` picks others).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import http.client
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

DIM = 384
SLICES = 10
PER_STUDY = 3
MODEL = "dinov2-small-random"
KEY = "radcache-bench-pseudonym-key-0123456789"
READ_TARGET_MS = 20.0
RATIO_TARGET = 1.5
RESTART_TARGET_S = 5.0
ENDPOINTS = ("list_studies", "get_study", "get_series", "search", "delete_study")


def _hex(rng: np.random.Generator, n: int = 32) -> str:
    return rng.bytes(n // 2).hex()


def templates() -> dict[str, dict[str, Any]]:
    """Entry metadata for CT and MR as ``entry_attrs`` makes it for the served model."""
    from radcache.embeddings.encode import load_encoder
    from radcache.embeddings.recipe import Recipe
    from radcache.embeddings.results import entry_attrs
    from radcache.embeddings.volume import Volume, VolumeMeta

    enc = load_encoder(MODEL, device="cpu", precision="fp32", offline=True)
    out = {}
    for mod, part, desc in (("CT", "CHEST", "Axial 1.25mm STD"), ("MR", "HEAD", "T2 FLAIR AX")):
        meta = VolumeMeta(
            source_format="dicom",
            study="s",
            series="s",
            modality=mod,
            body_part=part,
            series_description=desc,
            manufacturer_model="SCANNER",
        )
        vol = Volume.from_array(
            np.zeros((SLICES, 16, 16), np.float32),
            np.eye(3),
            np.array([2.0, 0.7, 0.7]),
            np.zeros(3),
            meta,
        )
        recipe = Recipe().resolve(mod, enc.cfg)
        out[mod] = entry_attrs(enc, vol, vol, recipe, (16, 16), SLICES, 0, tenant="default")
    return out


BLOCK = 500  # series generated together; the vectors of block b depend on b only


CENTRES, CASE_SPREAD, SLICE_SPREAD = 1000, 0.03, 0.02  # per-dimension noise


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), np.float32)


@functools.lru_cache(maxsize=1)
def _centres() -> np.ndarray:
    return _unit(np.random.default_rng(7).standard_normal((CENTRES, DIM), dtype=np.float32))


def _block(b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Slice CLS and mean-patch vectors ``(m, SLICES, DIM)`` of series ``b:b+BLOCK``: cases
    around shared centres, slices around their case (the module docstring)."""
    m = min(n, b + BLOCK) - b
    rng = np.random.default_rng(b + 7)
    case = _centres()[rng.integers(0, CENTRES, m)]
    case = _unit(case + rng.standard_normal((m, DIM), dtype=np.float32) * CASE_SPREAD)

    def around(r: np.random.Generator) -> np.ndarray:
        noise = r.standard_normal((m, SLICES, DIM), dtype=np.float32) * SLICE_SPREAD
        return _unit(case[:, None, :] + noise)

    return around(rng), around(np.random.default_rng(b + 10**9))


def _write_part(args: tuple[str, int, list[int], bool, dict[str, dict[str, Any]]]) -> int:
    """Write the entries of blocks ``blocks`` of a size-``n`` store through
    ``EmbeddingStore.write``; with ``bulk`` their table rows are left for :func:`_bulk_table`."""
    path, n, blocks, bulk, tmpl = args
    from radcache.embeddings import EmbeddingStore

    class EntriesOnly(EmbeddingStore):
        def _append(self, info: Any, pooled: np.ndarray, cls: np.ndarray) -> None:
            pass  # the table is written once, in order, after every entry

    st = (EntriesOnly if bulk else EmbeddingStore)(path)
    done = 0
    pos = np.zeros((SLICES, 3))
    pos[:, 2] = np.arange(SLICES) * 2.0
    for b in blocks:
        cls, mean_patch = _block(b, n)
        for j in range(len(cls)):
            i = b + j
            ent, study, series, patient = names(i)
            a = json.loads(json.dumps(tmpl[modality(i)]))
            a["volume"].update(study=study, series=series, patient=patient)
            a["content_hash"] = ent
            arrays = {
                "cls": cls[j],
                "mean_patch": mean_patch[j],
                "pooled": cls[j].mean(axis=0),
                "positions": pos,
                "slice_index": np.arange(SLICES, dtype=np.int32),
            }
            st.write(ent, a, arrays)
            done += 1
    return done


def modality(i: int) -> str:
    """Studies alternate CT and MR (two spaces: the recipe differs by modality)."""
    return "CT" if (i // PER_STUDY) % 2 == 0 else "MR"


def _bulk_table(path: Path, n: int) -> None:
    """Each space's table with its entries' rows, in series order: what ``append_row`` makes
    one row at a time (the same table group and columns), written in blocks."""
    from radcache.embeddings import EmbeddingStore
    from radcache.embeddings.store._common import _array, _key_words, _meta
    from radcache.embeddings.store.tables import _table_group

    st = EmbeddingStore(path)
    mods = np.asarray([modality(i) == "CT" for i in range(n)])
    for is_ct in (True, False):
        rows = np.flatnonzero(mods == is_ct)
        if not len(rows):
            continue
        first = st.get(names(int(rows[0]))[0])
        assert first is not None
        g = _table_group(st.root, first, DIM)
        cols = {k: _array(g[k]) for k in ("keys", "pooled", "cls", "offsets")}
        m_all = len(rows)
        cols["keys"].resize((m_all, 2))
        cols["pooled"].resize((m_all, DIM))
        cols["cls"].resize((m_all * SLICES, DIM))
        cols["offsets"].resize((m_all + 1,))
        cols["offsets"][:] = np.arange(0, m_all * SLICES + 1, SLICES, dtype=np.int64)
        at = 0
        for b in range(0, n, BLOCK):
            cls, _ = _block(b, n)
            pick = [j for j in range(len(cls)) if mods[b + j] == is_ct]
            m = len(pick)
            if not m:
                continue
            cols["keys"][at : at + m] = np.asarray(
                [_key_words(names(b + j)[0]) for j in pick], dtype=np.uint64
            )
            cols["pooled"][at : at + m] = cls[pick].mean(axis=1)
            cols["cls"][at * SLICES : (at + m) * SLICES] = cls[pick].reshape(-1, DIM)
            at += m
        assert at == m_all
        meta = _meta(g)
        meta.update(count=m_all, slices=m_all * SLICES)
        g.attrs["radcache"] = meta  # the commit point, as append_row's


def names(i: int) -> tuple[str, str, str, str]:
    """Entry key, study, series and patient pseudonyms of series ``i`` (deterministic)."""
    rng = np.random.default_rng(i)
    srng = np.random.default_rng(10**9 + i // PER_STUDY)
    prng = np.random.default_rng(2 * 10**9 + i // (PER_STUDY * 2))
    return _hex(rng), _hex(srng, 40), _hex(rng, 40), _hex(prng, 16)


def write_store(
    path: Path, n: int, writers: int, bulk: bool, tmpl: dict[str, dict[str, Any]]
) -> dict[str, float]:
    """Write the store; returns the seconds of the entries and of the bulk table."""
    from radcache.embeddings import EmbeddingStore

    EmbeddingStore(path)  # created once, before the writers race
    t = time.perf_counter()
    blocks = list(range(0, n, BLOCK))
    parts = [(str(path), n, blocks[w::writers], bulk, tmpl) for w in range(writers)]
    parts = [p for p in parts if p[2]]
    if len(parts) == 1:
        _write_part(parts[0])
    else:
        with mp.get_context("fork").Pool(len(parts)) as pool:
            assert sum(pool.map(_write_part, parts)) == n
    out = {"entries_s": time.perf_counter() - t, "table_s": 0.0}
    if bulk:
        t = time.perf_counter()
        _bulk_table(path, n)
        out["table_s"] = time.perf_counter() - t
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """A ``radcache serve`` subprocess on loopback, timed from spawn to ``/readyz`` 200."""

    def __init__(self, store: Path, work: Path, tag: str) -> None:
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADCACHE_")}
        env.update(RADCACHE_PSEUDONYM_KEY=KEY, HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "radcache.service.cli", "serve", "--port", str(self.port)]
        cmd += ["--model", MODEL, "--store", str(store), "--db", f"sqlite:///{work / 'jobs.db'}"]
        self.log = work / f"server-{tag}.log"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT
        )
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - t0 > 1800:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.ready_s = time.perf_counter() - t0
        # `radcache serve` is ready while the model's weights still load; requests are
        # timed once they are in (reads served meanwhile compete with the load for the CPU)
        while not self._model_loaded():
            time.sleep(0.05)
        self.model_loaded_s = time.perf_counter() - t0
        # an earlier run's deletions leave erasure jobs that a start resumes (compacting
        # the tables, rewriting the indexes): requests are timed once they are done
        while self._erasing() and time.perf_counter() - t0 < 1800:
            time.sleep(0.5)
        self.settled_s = time.perf_counter() - t0

    def _erasing(self) -> bool:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("GET", "/v1/jobs?limit=500")
        jobs = json.loads(c.getresponse().read())
        return any(j.get("kind") == "erase" and j["state"] in ("queued", "running") for j in jobs)

    def _model_loaded(self) -> bool:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        c.request("GET", "/readyz")
        resp = c.getresponse()
        body = json.loads(resp.read() or b"{}")
        return resp.status == 200 and body.get("model_loaded") is not False

    def stop(self) -> float:
        """Stop the server; returns its peak RSS in MB."""
        rss = _peak_rss_mb(self.proc.pid) if self.proc.poll() is None else float("nan")
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return rss


def _stats(lat: list[float]) -> dict[str, float]:
    ms = np.asarray(lat) * 1e3
    return {
        "n": len(lat),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def measure(
    port: int, n: int, requests: int, seed: int = 11, reused: bool = False
) -> dict[str, Any]:
    """p50/p99 of each endpoint over ``requests`` requests on one keep-alive connection.
    On a ``reused`` store (an earlier run deleted some studies) the reads skip the series
    and studies that answer 404."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[float, Any]:
        data = json.dumps(body) if body is not None else None
        hdr = {"content-type": "application/json"} if body is not None else {}
        t = time.perf_counter()
        conn.request(method, path, data, hdr)
        resp = conn.getresponse()
        raw = resp.read()
        dt_ = time.perf_counter() - t
        if resp.status >= 300 and not (method == "DELETE" and resp.status == 204):
            raise RuntimeError(f"{method} {path}: {resp.status} {raw[:500]!r}")
        return dt_, (resp, raw)

    rng = np.random.default_rng(seed)
    studies = n // PER_STUDY
    warm = 10
    out: dict[str, Any] = {}
    # listing: follow the cursor from the first page; restart at the top at the end
    lat: list[float] = []
    path, pages = "/v1/studies?limit=50", 0
    while len(lat) < requests + warm:
        d, (resp, raw) = call("GET", path)
        lat.append(d)
        pages += 1
        assert len(json.loads(raw)["studies"] if raw.startswith(b"{") else json.loads(raw)) > 0
        link = resp.getheader("Link")
        path = link.split(";")[0].strip("<>") if link else "/v1/studies?limit=50"
    out["list_studies"] = {**_stats(lat[warm:]), "pages_walked": pages}
    picks = rng.integers(0, n, requests + warm)
    if reused:  # leave out what an earlier run deleted (not timed)
        picks = np.asarray([i for i in picks if _present(conn, names(int(i))[1])])
    lat = [call("GET", f"/v1/studies/{names(int(i))[1]}")[0] for i in picks]
    out["get_study"] = _stats(lat[warm:])
    lat = [call("GET", f"/v1/series/{names(int(i))[2]}")[0] for i in picks]
    out["get_series"] = _stats(lat[warm:])
    lat = []
    for i in picks:
        d, (_, raw) = call("POST", "/v1/search", {"query": {"series": names(int(i))[2]}, "k": 10})
        hits = json.loads(raw)["results"][0]["hits"]
        assert len(hits) == 10, raw[:300]
        lat.append(d)
    out["search"] = _stats(lat[warm:])
    dele = rng.choice(studies, size=min(studies, 3 * (requests + warm)), replace=False)
    if reused:
        dele = np.asarray([s for s in dele if _present(conn, names(int(s) * PER_STUDY)[1])])
    dele = dele[: requests + warm]
    lat = [call("DELETE", f"/v1/studies/{names(int(s) * PER_STUDY)[1]}")[0] for s in dele]
    out["delete_study"] = _stats(lat[warm:])
    gone = names(int(dele[0]) * PER_STUDY)[1]
    conn.request("GET", f"/v1/studies/{gone}")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 404, f"deleted study still answers {resp.status}"
    conn.close()
    return out


def run_size(n: int, args: argparse.Namespace, tmpl: dict[str, dict[str, Any]]) -> dict[str, Any]:
    reuse = dict(args.reuse).get(n)
    work = reuse or Path(tempfile.mkdtemp(prefix=f"rcscale-{n}-", dir=args.workdir))
    try:
        store = work / "store.zarr"
        res: dict[str, Any] = {
            "series": n,
            "studies": -(-n // PER_STUDY),
            "slice_vectors": n * SLICES,
        }
        if reuse is None:
            how = "bulk table" if args.bulk_table else "per-entry table rows"
            print(f"[{n}] writing {n} series × {SLICES} slices, {args.writers} writers, {how} …")
            w = write_store(store, n, args.writers, args.bulk_table, tmpl)
            wsec = w["entries_s"] + w["table_s"]
            size_mb = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
            res["write"] = {**w, "total_s": wsec, "entries_per_s": n / wsec, "how": how}
            res["store_mb"] = size_mb
            print(f"[{n}] written in {wsec:.1f} s ({n / wsec:.0f}/s, {size_mb:.0f} MB)", flush=True)
            first = Server(store, work, "first")
            res["first_start_s"] = first.ready_s
            res["first_start_peak_rss_mb"] = first.stop()
            print(f"[{n}] first start {first.ready_s:.2f} s", flush=True)
        else:
            res["reused"] = str(reuse)
            print(f"[{n}] written in 0 s: reusing {reuse}", flush=True)
        times = []
        for k in range(args.restarts - 1):
            times.append(Server(store, work, f"restart{k}"))
            times[-1].stop()
        srv = Server(store, work, "restart")
        res["restarts_s"] = [t.ready_s for t in times] + [srv.ready_s]
        res["restart_s"] = float(np.median(res["restarts_s"]))
        res["model_loaded_s"] = [t.model_loaded_s for t in (*times, srv)]
        res["settled_s"] = [t.settled_s for t in (*times, srv)]
        loaded = float(np.median(res["model_loaded_s"]))
        print(
            f"[{n}] restart {res['restart_s']:.2f} s (median of {args.restarts}; model loaded "
            f"at {loaded:.2f} s); measuring …",
            flush=True,
        )
        try:
            res["endpoints"] = measure(srv.port, n, args.requests, args.seed, reuse is not None)
        finally:
            res["peak_rss_mb"] = srv.stop()
        for ep in ENDPOINTS:
            e = res["endpoints"][ep]
            print(f"[{n}] {ep:<13} p50 {e['p50_ms']:7.2f} ms  p99 {e['p99_ms']:7.2f} ms")
        print(f"[{n}] peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
        return res
    finally:
        if args.keep or reuse is not None:
            print(f"[{n}] kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def verdict(sizes: dict[int, dict[str, Any]]) -> dict[str, Any]:
    lo, hi = min(sizes), max(sizes)
    v: dict[str, Any] = {"smallest": lo, "largest": hi, "ratio": {}, "ratio_ok": {}, "read_ok": {}}
    for ep in ENDPOINTS:
        r = sizes[hi]["endpoints"][ep]["p50_ms"] / sizes[lo]["endpoints"][ep]["p50_ms"]
        v["ratio"][ep] = r
        v["ratio_ok"][ep] = r <= RATIO_TARGET
        if ep != "delete_study":
            v["read_ok"][ep] = all(
                s["endpoints"][ep]["p50_ms"] <= READ_TARGET_MS for s in sizes.values()
            )
    if 100_000 in sizes:
        v["restart_ok_100k"] = sizes[100_000]["restart_s"] <= RESTART_TARGET_S
    return v


def _size_dir(text: str) -> tuple[int, Path]:
    n, _, where = text.partition("=")
    return int(n), Path(where)


def _present(conn: http.client.HTTPConnection, study: str) -> bool:
    conn.request("GET", f"/v1/studies/{study}")
    resp = conn.getresponse()
    resp.read()
    return resp.status == 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--writers", type=int, default=3, help="processes writing the store")
    ap.add_argument(
        "--bulk-table",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="entries through EmbeddingStore.write, their table rows written once in order "
        "(--no-bulk-table: each write appends its row, ~30 ms an entry here)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="default: the temp folder")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep each size's store and job database (for profiling a server against it)",
    )
    ap.add_argument(
        "--reuse",
        type=_size_dir,
        action="append",
        default=[],
        metavar="N=DIR",
        help="measure size N on a folder an earlier --keep run kept (no write, no first "
        "start; studies it deleted are skipped)",
    )
    ap.add_argument("--restarts", type=int, default=3, help="restarts timed (median reported)")
    ap.add_argument("--seed", type=int, default=11, help="which studies are read and deleted")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    args = ap.parse_args()
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    result: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            cwd=HERE,
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "python": platform.python_version(),
        },
        "params": {k: str(v) for k, v in vars(args).items()},
        "load_average_start": os.getloadavg(),
        "targets": {
            "read_p50_ms": READ_TARGET_MS,
            "p50_ratio_largest_to_smallest": RATIO_TARGET,
            "restart_s_at_100k": RESTART_TARGET_S,
        },
        "not_in_entries": ["patch", "cls_last"],
        "sizes": {},
    }
    tmpl = templates()
    for n in sorted(args.sizes):
        result["sizes"][str(n)] = run_size(n, args, tmpl)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))  # what ran so far survives
    result["load_average_end"] = os.getloadavg()
    result["verdict"] = verdict({int(k): v for k, v in result["sizes"].items()})
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["verdict"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
