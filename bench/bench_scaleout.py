"""Orchestration overhead: the scale-out path against the embedded one, side by side.

The same 50 generated CT studies go, with the same client (4 submissions in flight), to:

* **embedded**: ``radcache serve`` with its in-process worker (SQLite job database);
* **scale-out**: ``radcache serve --queue redis://…`` (PostgreSQL job database) plus one
  ``radcache worker`` process, jobs passing through Redis.

Each run uses a fresh store. Throughput is studies per second from the first submission
to the last job done. The runs alternate (embedded, scale-out, embedded, …) and the
medians are compared; the target is scale-out ≥ 0.8 × embedded. The model is the
labelled random-weight test model (``dinov2-tiny-random``), so the model forward is cheap
and what is measured is mostly everything around it.

    python bench/bench_scaleout.py                 # 50 studies × 10 slices, 3 repeats
    python bench/bench_scaleout.py --studies 20 --repeats 1 --out /tmp/s.json

Needs Redis (``--redis``, default redis://127.0.0.1:6379/0) and PostgreSQL (``--pg``,
default postgresql+psycopg://postgres@127.0.0.1:5432) running.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_embed import _env, _radcache_exe, machine_info, median, write_series

HERE = Path(__file__).resolve().parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("a") as out:
        return subprocess.Popen(
            [_radcache_exe(), *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"radcache exited before it was ready (code {proc.returncode})")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not become ready")


def _drive(url: str, studies: list[Path], concurrency: int) -> dict[str, Any]:
    """Submit every study (``concurrency`` in flight), wait for all; studies/s."""
    from radcache.clients import RadcacheClient

    def one(d: Path) -> str:
        with RadcacheClient(url, timeout=300) as rc:
            job = rc.submit([d], wait=True, poll=0.05)
            return job.state

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        states = list(pool.map(one, studies))
    seconds = time.perf_counter() - t0
    if any(s != "done" for s in states):
        raise SystemExit(f"not every job finished done: {sorted(set(states))}")
    return {"seconds": seconds, "studies_per_s": len(studies) / seconds}


def run_embedded(studies: list[Path], tmp: Path, concurrency: int) -> dict[str, Any]:
    port, env = _port(), _env()
    run = tmp / f"embedded-{uuid.uuid4().hex[:6]}"
    run.mkdir()
    env["RADCACHE_UPLOAD_DIR"] = str(run / "uploads")
    args = ["serve", "--port", str(port), "--model", "dinov2-tiny-random"]
    args += ["--store", str(run / "s.zarr"), "--db", f"sqlite:///{run / 'jobs.db'}"]
    api = _start(args, env, run / "api.log")
    try:
        _ready(f"http://127.0.0.1:{port}", api)
        return _drive(f"http://127.0.0.1:{port}", studies, concurrency)
    finally:
        api.terminate()
        api.wait(timeout=60)


def run_scaleout(
    studies: list[Path], tmp: Path, concurrency: int, redis: str, pg: str, threads: int
) -> dict[str, Any]:
    import sqlalchemy as sa

    port, env = _port(), _env()
    run = tmp / f"scaleout-{uuid.uuid4().hex[:6]}"
    run.mkdir()
    name = f"radcache_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{pg}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    env |= {
        "RADCACHE_QUEUE": redis,
        "RADCACHE_QUEUE_NAMESPACE": name,
        "RADCACHE_DB": f"{pg}/{name}",
        "RADCACHE_UPLOAD_DIR": str(run / "uploads"),
        "RADCACHE_WORKER_THREADS": str(threads),
    }
    common = ["--model", "dinov2-tiny-random", "--store", str(run / "s.zarr")]
    worker = _start(["worker", *common], env, run / "worker.log")
    api = _start(["serve", "--port", str(port), *common], env, run / "api.log")
    try:
        _ready(f"http://127.0.0.1:{port}", api)
        return _drive(f"http://127.0.0.1:{port}", studies, concurrency)
    finally:
        for p in (api, worker):
            p.terminate()
            p.wait(timeout=120)
        import redis as redis_lib

        client = redis_lib.Redis.from_url(redis)
        keys = list(client.scan_iter(f"{name}*"))
        if keys:
            client.delete(*keys)
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="worker threads (scale-out)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scaleout.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rcbench-scale-") as t:
        tmp = Path(t)
        studies = []
        for i in range(args.studies):
            write_series(tmp / "data" / f"study{i:03d}", args.slices, seed=100 + i)
            studies.append(tmp / "data" / f"study{i:03d}")
        runs: dict[str, list[dict[str, Any]]] = {"embedded": [], "scaleout": []}
        for r in range(args.repeats):
            runs["embedded"].append(run_embedded(studies, tmp, args.concurrency))
            runs["scaleout"].append(
                run_scaleout(studies, tmp, args.concurrency, args.redis, args.pg, args.threads)
            )
            print(
                f"repeat {r + 1}: embedded {runs['embedded'][-1]['studies_per_s']:.2f} "
                f"studies/s, scale-out {runs['scaleout'][-1]['studies_per_s']:.2f} studies/s",
                flush=True,
            )
    emb = median([x["studies_per_s"] for x in runs["embedded"]])
    sco = median([x["studies_per_s"] for x in runs["scaleout"]])
    ratio = sco / emb
    result = {
        "machine": machine_info(),
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "runs": runs,
        "embedded_studies_per_s": emb,
        "scaleout_studies_per_s": sco,
        "ratio": ratio,
        "target": 0.8,
        "pass": ratio >= 0.8,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(
        f"embedded {emb:.2f} studies/s, scale-out {sco:.2f} studies/s: ratio {ratio:.3f} "
        f"(target ≥ 0.8: {'pass' if ratio >= 0.8 else 'FAIL'}); written to {args.out}"
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
