"""Backends: where a store's bytes live, and what that place supports.

:class:`Backend` declares capabilities (after zarr-python's ``supports_writes`` /
``supports_deletes`` / ``supports_listing``) that :class:`~.embedding_store.EmbeddingStore`
checks instead of asking whether it has a local path:

* :class:`LocalBackend` — a directory. Each writer fills a private ``staging/`` group that
  one rename makes visible (``supports_staging``); commits are serialised across processes
  with an ``flock`` on ``<store>/.radcache.lock``; metadata documents are plain files
  (``supports_direct_reads``). Opening it for writing sweeps the staging debris of dead
  writers.
* :class:`ObjectBackend` — any fsspec URL (S3 and the like): no renames and no file
  locks, so writers fill entries in place and agree through :class:`~.locks.Locks`
  (``commit`` and ``entry:<key>``) when given them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, cast

import zarr
import zarr.storage

from ..errors import NotFoundError
from .locks import Locks

__all__ = ["Backend", "LocalBackend", "ObjectBackend", "open_backend"]

_STALE_STAGING_S = 24 * 3600


def _owner() -> str:
    """Who writes a staging folder: ``host-pid``, so that a sweeper on the same host can
    tell whether the writer still runs."""
    return f"{socket.gethostname().replace('.', '_').replace('-', '_')}-{os.getpid()}"


def _dead(owner: str) -> bool:
    """True if ``owner`` (``host-pid``) is a process of this host that no longer runs."""
    host, _, pid = owner.rpartition("-")
    if host != _owner().rpartition("-")[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _sweep_staging(staging: Path) -> None:
    """Remove unfinished writes of processes of this host that have died, and of any
    process more than a day ago."""
    if not staging.is_dir():
        return
    cutoff = time.time() - _STALE_STAGING_S
    for d in staging.iterdir():
        parts = d.name.split(".")
        with contextlib.suppress(OSError):
            if d.is_dir() and ((len(parts) == 3 and _dead(parts[1])) or d.stat().st_mtime < cutoff):
                shutil.rmtree(d)


class Backend:
    """Where a store lives: its Zarr store, its locks, and its declared capabilities."""

    #: Writers fill a private ``staging/`` group that :meth:`publish` renames into place
    #: (otherwise they write the entry in place and its metadata is the commit point).
    supports_staging: ClassVar[bool] = False
    #: Metadata documents can be read as plain files with :meth:`read_document`, which is
    #: faster than opening each group through zarr.
    supports_direct_reads: ClassVar[bool] = False

    #: The directory of a local store, else None.
    local_path: Path | None = None
    zarr_store: zarr.storage.LocalStore | zarr.storage.FsspecStore

    def write_path(self, key: str) -> str:
        """The group an :class:`~.entries.EntryWriter` of entry ``key`` fills."""
        return f"entries/{key}"

    def commit_lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive right to commit, across the processes this backend can see."""
        return contextlib.nullcontext()

    def claim(self, key: str) -> contextlib.AbstractContextManager[None]:
        """The right to write entry ``key`` (see :meth:`EmbeddingStore.claim`)."""
        return contextlib.nullcontext()

    def publish(self, root: zarr.Group, path: str, key: str) -> None:
        """Make the staged group ``path`` the entry ``key`` (if :attr:`supports_staging`)."""
        raise NotImplementedError(f"{type(self).__name__} does not stage writes")

    def discard(self, path: str) -> None:
        """Remove an unneeded staged group (if :attr:`supports_staging`)."""
        raise NotImplementedError(f"{type(self).__name__} does not stage writes")

    def read_document(self, path: str) -> dict[str, Any] | None:
        """A JSON document of the store read as a plain file, None if unreadable (if
        :attr:`supports_direct_reads`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot read documents directly")

    def child_groups(self, path: str) -> list[str] | None:
        """Names of the groups directly under ``path`` listed without zarr (if
        :attr:`supports_direct_reads`), else None."""
        return None


class LocalBackend(Backend):
    """A directory: staged writes made visible by a rename, commits under an ``flock``."""

    supports_staging = True
    supports_direct_reads = True
    local_path: Path

    def __init__(self, path: Path, *, read_only: bool) -> None:
        if read_only and not (path / "zarr.json").exists():
            raise NotFoundError(
                f"no radcache store at {path}; expected a directory made by "
                "`radcache embed --store`."
            )
        self.zarr_store = zarr.storage.LocalStore(path, read_only=read_only)
        self.local_path = path
        if not read_only:
            _sweep_staging(path / "staging")
            self.local_path.mkdir(parents=True, exist_ok=True)  # so the lock file has a home

    def write_path(self, key: str) -> str:
        # A private staging group that publish() renames into place, so concurrent writers
        # of one key never see each other's arrays.
        return f"staging/{key}.{_owner()}.{uuid.uuid4().hex}"

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        """An flock on ``<store>/.radcache.lock``."""
        with open(self.local_path / ".radcache.lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def publish(self, root: zarr.Group, path: str, key: str) -> None:
        root.require_group("entries")
        final = self.local_path / "entries" / key
        if final.exists():  # debris of an interrupted direct write
            shutil.rmtree(final)
        os.replace(self.local_path / path, final)  # the commit point

    def discard(self, path: str) -> None:
        if path.startswith("staging/"):
            shutil.rmtree(self.local_path / path, ignore_errors=True)

    def read_document(self, path: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], json.loads((self.local_path / path).read_bytes()))
        except (OSError, ValueError):
            return None

    def child_groups(self, path: str) -> list[str] | None:
        # zarr's own listing warns about the temporary files of other writers' atomic
        # writes (``zarr.<hex>.partial``, made whenever a node is created below): skip them.
        try:
            return [
                d.name for d in (self.local_path / path).iterdir() if (d / "zarr.json").is_file()
            ]
        except FileNotFoundError:
            return []


class ObjectBackend(Backend):
    """Any fsspec URL: entries written in place, writers coordinated by ``locks`` if given."""

    def __init__(
        self,
        url: str,
        *,
        read_only: bool,
        storage_options: dict[str, Any] | None = None,
        locks: Locks | None = None,
    ) -> None:
        self.zarr_store = zarr.storage.FsspecStore.from_url(
            url, storage_options=storage_options, read_only=read_only
        )
        self.locks = locks

    def commit_lock(self) -> contextlib.AbstractContextManager[None]:
        """The ``commit`` lock of :attr:`locks`; none without locks."""
        if self.locks is not None:
            return self.locks.hold("commit")
        return contextlib.nullcontext()

    def claim(self, key: str) -> contextlib.AbstractContextManager[None]:
        """The ``entry:<key>`` lock of :attr:`locks`, so no two writers fill the same chunks."""
        if self.locks is not None:
            return self.locks.hold(f"entry:{key}")
        return contextlib.nullcontext()


def open_backend(
    url: str,
    *,
    read_only: bool,
    storage_options: dict[str, Any] | None = None,
    locks: Locks | None = None,
) -> Backend:
    """The backend of ``url``: a directory (a path or ``file://``) or an fsspec URL.
    Local stores lock with ``flock`` and ignore ``locks``."""
    if "://" in url and not url.startswith("file://"):
        return ObjectBackend(url, read_only=read_only, storage_options=storage_options, locks=locks)
    return LocalBackend(Path(url.removeprefix("file://")).expanduser(), read_only=read_only)
