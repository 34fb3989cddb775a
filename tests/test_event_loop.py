"""The event loop stays free: a real uvicorn on loopback answers ``/healthz`` within 50 ms
while, in the same process, the search index is rebuilt over and over, 189-file STOW-RS
requests keep arriving and searches wait for the rebuild's lock.

This is the one test that asserts a latency bound: the loop must never run blocking work
(store, index, database, pydicom, parsing or writing a body). A loop blocked by each
STOW-RS or each rebuild delays a sample each time; with a few such requests per window
that is well over 1 % of the samples, in every window. What keeps it robust on a loaded
two-core machine:

* the probe is a separate process (stdlib ``http.client``, one kept-alive connection),
  so the test's own threads do not delay the measurement, and it warms up first;
* garbage collection is frozen during the load, as ``radcache serve`` does once loaded;
* the bound is on the 99th percentile of at least 200 samples, each window spanning at
  least three STOW-RS requests and three rebuilds, not on the maximum: another process
  taking the CPU at the wrong moment delays a sample by itself (an idle server on a busy
  two-core machine showed a single 391 ms sample among 300);
* up to three windows are measured, and one under the bound passes: a busy machine can
  spoil a window, a blocked loop spoils every one.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import pytest
import uvicorn

from radcache.embeddings.encode import Encoder
from radcache.service.app import build_resources, create_app
from radcache.service.deps import Resources
from radcache.service.settings import ServiceSettings
from tests.dicomgen import phantom, write_series
from tests.servers import free_port

BOUND_MS = 50
SAMPLES = 200
WINDOWS = 3

_PROBE = r"""
import http.client, sys, time
host, port = sys.argv[1], int(sys.argv[2])
conn = http.client.HTTPConnection(host, port, timeout=30)

def healthz():
    conn.request("GET", "/healthz")
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status

for _ in range(30):  # warm-up
    healthz()
print("ready", flush=True)
sys.stdin.readline()  # the load runs
while True:
    t = time.perf_counter()
    healthz()
    print(time.perf_counter() - t, flush=True)
    time.sleep(0.01)
"""


def _related(files: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        b"--"
        + boundary.encode()
        + b"\r\nContent-Type: application/dicom\r\n\r\n"
        + p.read_bytes()
        + b"\r\n"
        for p in files
    ]
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


@pytest.fixture
def server(tmp_path: Path, tiny: Encoder) -> Iterator[tuple[str, Resources, Path, str]]:
    """A real uvicorn in a thread of this process (so the test reaches its Resources),
    with a 189-slice series already embedded: its STOW-RS is answered from the cache."""
    settings = ServiceSettings(
        model="dinov2-tiny-random",
        store=str(tmp_path / "store.zarr"),
        db=f"sqlite:///{tmp_path / 'jobs.db'}",
        upload_dir=tmp_path / "uploads",
        batch_size=16,
    )
    res = build_resources(settings, encoder=tiny)
    series = write_series(tmp_path / "ct", phantom(189, 32, 32, seed=13)).directory
    (stored,) = res.pipeline.embed([series]).series
    res.indexes.rebuild()
    port = free_port()
    uv = uvicorn.Server(
        uvicorn.Config(create_app(resources=res), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", res, series, stored.entry
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def _repeat(
    stop: threading.Event,
    counts: dict[str, int],
    name: str,
    work: Callable[[], object],
    pause: float = 0.0,
) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            work()
            counts[name] += 1
            stop.wait(pause)

    return threading.Thread(target=run, name=name, daemon=True)


def _window(lines: IO[str], counts: dict[str, int]) -> tuple[np.ndarray, str]:
    """One measurement: at least SAMPLES latencies (ms), spanning at least 3 STOW-RS
    requests and 3 rebuilds; and its summary."""
    start = dict(counts)
    samples: list[float] = []
    deadline = time.monotonic() + 60
    while len(samples) < SAMPLES or min(counts[k] - start[k] for k in ("stow", "rebuild")) < 3:
        assert time.monotonic() < deadline, (len(samples), counts)
        samples.append(float(lines.readline()) * 1000)
    lat = np.array(samples)
    during = {k: counts[k] - start[k] for k in counts}
    summary = (
        f"{len(lat)} samples: p50 {np.percentile(lat, 50):.1f} ms, p99 "
        f"{np.percentile(lat, 99):.1f} ms, max {lat.max():.1f} ms, "
        f"{int((lat > BOUND_MS).sum())} over {BOUND_MS} ms; during it {during}"
    )
    return lat, summary


def test_healthz_stays_fast_during_a_rebuild_and_stow(
    server: tuple[str, Resources, Path, str],
) -> None:
    url, res, series, entry = server
    body, ctype = _related(sorted(series.iterdir()))
    stower = httpx.Client(base_url=url, timeout=120)
    searcher = httpx.Client(base_url=url, timeout=120)
    errors: list[Any] = []

    def stow() -> None:
        r = stower.post("/dicom-web/studies", content=body, headers={"content-type": ctype})
        if r.status_code != 200 or len(r.json()["00081199"]["Value"]) != 189:
            errors.append(("stow", r.status_code, r.text[:300]))

    def search() -> None:
        r = searcher.post("/v1/search", json={"query": {"entry": entry}, "k": 3})
        if r.status_code != 200:
            errors.append(("search", r.status_code, r.text[:300]))

    stop = threading.Event()
    counts = {"rebuild": 0, "stow": 0, "search": 0}
    load = [
        _repeat(stop, counts, "rebuild", res.indexes.rebuild),
        _repeat(stop, counts, "stow", stow),
        _repeat(stop, counts, "search", search, pause=0.05),  # waits on the rebuild's lock
    ]
    host, port = url.removeprefix("http://").split(":")
    probe = subprocess.Popen(
        [sys.executable, "-c", _PROBE, host, port],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert probe.stdin is not None and probe.stdout is not None
    windows: list[str] = []
    gc.collect()
    gc.freeze()  # as `radcache serve` does once loaded (tuning.settle): no long collections
    try:
        assert probe.stdout.readline().strip() == "ready"
        for t in load:
            t.start()
        probe.stdin.write("go\n")
        probe.stdin.flush()
        for _ in range(WINDOWS):
            lat, summary = _window(probe.stdout, counts)
            windows.append(summary)
            if np.percentile(lat, 99) < BOUND_MS:
                break
    finally:
        gc.unfreeze()
        probe.kill()
        probe.communicate(timeout=30)  # and its pipes closed
        stop.set()
        for t in load:
            if t.is_alive():
                t.join(timeout=60)
        stower.close()
        searcher.close()
    assert not errors, errors[:3]
    print("\n".join(windows))
    assert np.percentile(lat, 99) < BOUND_MS, "\n".join(windows)
