"""A real `radcache serve` on a loopback port, for tests that talk HTTP to it."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.conftest import TEST_SECRET
from tests.test_cli import RADCACHE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(root: Path, command: str, *args: str, log: str, **env: str) -> subprocess.Popen[bytes]:
    """A `radcache` process (random tiny model, store under ``root``) logging to ``log``."""
    full_env = {
        **os.environ,
        "RADCACHE_PSEUDONYM_KEY": TEST_SECRET,
        "HF_HUB_OFFLINE": "1",
        "RADCACHE_ERASE_AFTER_S": "0.2",  # erasures finish soon after a deletion
        **env,
    }
    cmd = [*RADCACHE, command, "--model", "dinov2-tiny-random", "--store", str(root / "s.zarr")]
    with (root / log).open("a") as out:
        return subprocess.Popen(
            [*cmd, *args], cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            if proc.poll() is not None:
                raise AssertionError(f"radcache serve exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)
    raise AssertionError("radcache serve did not become ready")


@contextlib.contextmanager
def running_server(
    root: Path,
    *args: str,
    db: str | None = None,
    port: int | None = None,
    log: str = "server.log",
    **env: str,
) -> Iterator[tuple[str, Path]]:
    """Start `radcache serve` (random tiny model, store and jobs under ``root``); wait for
    /readyz. Yields the base URL and the server's log file."""
    port = port or free_port()
    db = db or f"sqlite:///{root / 'j.db'}"
    proc = start(root, "serve", "--port", str(port), "--db", db, *args, log=log, **env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, root / log)
        yield url, root / log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def finished(http: httpx.Client, location: str, timeout: float = 120) -> dict[str, Any]:
    """The job at ``location`` (``/v1/jobs/<id>``) once it is no longer queued or running."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job: dict[str, Any] = http.get(location).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {location} did not finish in {timeout} s")


def embeddings(http: httpx.Client, series: str, kind: str) -> np.ndarray:
    """The stored array ``kind`` of ``series`` (a name or entry key), as ``.npy``."""
    r = http.get(
        f"/v1/series/{series}/embeddings",
        params={"kind": kind},
        headers={"accept": "application/x-npy"},
    )
    assert r.status_code == 200, r.text
    arr: np.ndarray = np.load(io.BytesIO(r.content))
    return arr
