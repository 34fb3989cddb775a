"""Locks that let several processes write one store.

A local store needs none of this: it serialises commits with an ``flock`` on a file in
the store, and each writer fills a private staging folder that a rename makes visible.
An object store (S3 and the like) has neither locks nor renames, so writers there agree
through Redis (:class:`RedisLocks`):

* ``commit`` — one writer at a time makes an entry visible and appends to the tables;
* ``entry:<key>`` — one writer at a time fills an entry's arrays; a second writer of
  the same content waits, then finds the entry stored (a cache hit), so no two writers
  ever write the same chunk.

A held lock expires ``ttl`` seconds after its holder stops renewing it (a thread renews
it every ``ttl / 3``), so a killed writer blocks the others for at most ``ttl``.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ["Locks", "RedisLocks"]


class Locks(Protocol):
    def hold(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Hold the lock ``name`` for the ``with`` block (blocking until it is free)."""
        ...


class RedisLocks:
    """Named locks in Redis, shared by every process given the same URL and prefix."""

    def __init__(self, url: str, prefix: str, ttl: float = 30.0) -> None:
        import redis

        self.client: Any = redis.Redis.from_url(url)
        self.prefix = prefix
        self.ttl = ttl

    def __repr__(self) -> str:
        return f"RedisLocks(prefix={self.prefix!r}, ttl={self.ttl})"

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        lock = self.client.lock(
            f"{self.prefix}:lock:{name}", timeout=self.ttl, thread_local=False, sleep=0.05
        )
        lock.acquire(blocking=True, token=uuid.uuid4().hex.encode())
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.ttl / 3):
                with contextlib.suppress(Exception):  # lost: the next renewal says so
                    lock.reacquire()

        keeper = threading.Thread(target=renew, name=f"radcache-lock-{name}", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join()
            with contextlib.suppress(Exception):  # expired meanwhile: nothing to release
                lock.release()
