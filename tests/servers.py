"""A real `radcache serve` on a loopback port, for tests that talk HTTP to it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import TEST_SECRET
from tests.test_cli import RADCACHE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(root: Path, **env: str) -> Iterator[tuple[str, Path]]:
    """Start `radcache serve` (random tiny model, store and jobs under ``root``); wait for
    /readyz. Yields the base URL and the server's log file."""
    port = free_port()
    full_env = {**os.environ, "RADCACHE_PSEUDONYM_KEY": TEST_SECRET, "HF_HUB_OFFLINE": "1", **env}
    cmd = [
        *RADCACHE,
        "serve",
        "--port",
        str(port),
        "--model",
        "dinov2-tiny-random",
        "--store",
        str(root / "s.zarr"),
        "--db",
        f"sqlite:///{root / 'j.db'}",
    ]
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError("radcache serve did not become ready")
        yield url, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)
