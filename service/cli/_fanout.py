"""``radcache worker --gpus 0,1``: one worker process per GPU, supervised by this one.

Each child is ``radcache worker`` with the same options, ``CUDA_VISIBLE_DEVICES`` set to
its one GPU and ``--device cuda:0``: it sees only that GPU, so nothing it does (a CUDA
context, pinned memory) lands on another. Unless ``RADCACHE_DECODE_WORKERS`` is set, the
cores are shared out among the children's decode pools. Indices are those this process
sees (after its own ``CUDA_VISIBLE_DEVICES``). SIGTERM/SIGINT are passed on to every child; a child
that exits with an error stops the others, so the whole set restarts together.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from radcache.embeddings.errors import ConfigError
from radcache.embeddings.ingest._decode_pool import auto_workers

__all__ = ["child_commands", "parse_gpus", "supervise", "visible_gpus"]

log = logging.getLogger(__name__)


def parse_gpus(text: str, visible: int) -> list[int]:
    """``"0,1"`` → ``[0, 1]``: distinct GPU indices below ``visible`` (the GPUs torch sees);
    else :class:`ConfigError`."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(
            f"--gpus {text!r} is not a list of GPU indices; expected e.g. --gpus 0,1."
        )
    gpus = [int(p) for p in parts]
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus {text!r} names a GPU twice; name each GPU once.")
    beyond = [g for g in gpus if g >= visible]
    if beyond:
        seen = f"GPUs 0 to {visible - 1}" if visible else "no GPU"
        fix = "pick among those" if visible else "run without --gpus (--device cpu)"
        raise ConfigError(
            f"--gpus {text!r} names GPU {beyond[0]}, and torch sees {seen} here (after "
            f"CUDA_VISIBLE_DEVICES); {fix}."
        )
    return gpus


def visible_gpus() -> int:
    """How many CUDA devices torch sees in this process (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def child_commands(
    gpus: Sequence[int], options: Sequence[str], env: Mapping[str, str]
) -> list[tuple[list[str], dict[str, str]]]:
    """Each GPU's ``radcache worker`` (argument list, environment): ``options`` (the
    parent's, without ``--gpus``/``--device``) plus ``--device cuda:0``, with
    ``CUDA_VISIBLE_DEVICES`` the one GPU, mapped through the parent's own if it has one."""
    mapped = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    # The cores are shared out among the children's decode pools, unless the setting is given.
    decoders = {"RADCACHE_DECODE_WORKERS": str(max(1, auto_workers() // len(gpus)))}
    out = []
    for gpu in gpus:
        physical = mapped[gpu] if gpu < len(mapped) else str(gpu)
        argv = [sys.executable, "-m", "radcache.service.cli", "worker", *options]
        child_env = {**decoders, **env, "CUDA_VISIBLE_DEVICES": physical}
        out.append(([*argv, "--device", "cuda:0"], child_env))
    return out


def supervise(commands: Sequence[tuple[list[str], dict[str, str]]], poll_s: float = 0.5) -> int:
    """Start every command, pass SIGTERM/SIGINT on, and wait. Returns 0 when all exit
    cleanly, else the first failure's status (128 + N for a child ended by signal N; the
    others are stopped with SIGTERM)."""
    children = [subprocess.Popen(argv, env=env) for argv, env in commands]
    stop = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        stop.set()
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    before = {}
    if threading.current_thread() is threading.main_thread():
        before = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = _wait(children, stop, forward, poll_s)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return status if status >= 0 else 128 - status


def _wait(
    children: list[subprocess.Popen[bytes]],
    stop: threading.Event,
    forward: Callable[[int, object], None],
    poll_s: float,
) -> int:
    status = 0
    while True:
        codes = [c.poll() for c in children]  # every child, each time
        if None not in codes:
            break
        failed = [code for code in codes if code is not None and code != 0]
        if failed and not stop.is_set():
            status = failed[0]
            log.error("a GPU worker exited with status %s: stopping the others", status)
            forward(signal.SIGTERM, None)
        time.sleep(poll_s)
    return status or next((code for code in codes if code), 0)
