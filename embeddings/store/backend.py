"""Backends: where a store's bytes live, and what that place supports.

:class:`Backend` declares capabilities (after zarr-python's ``supports_writes`` /
``supports_deletes`` / ``supports_listing``) that :class:`~.embedding_store.EmbeddingStore`
checks instead of asking whether it has a local path:

* :class:`LocalBackend` — a directory. Each writer fills a private ``staging/`` group that
  one rename makes visible (``supports_staging``); commits are serialised across processes
  with an ``flock`` on ``<store>/.radcache.lock``; metadata documents are plain files
  (``supports_direct_reads``). Opening it for writing sweeps the staging debris of dead
  writers, and holds a shared ``flock`` on ``<store>/.radcache.writers`` for as long as
  the backend lives, so that :meth:`Backend.sole_writer` can tell whether another process
  has the store open for writing (``radcache check --repair`` refuses to run beside one).
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
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, cast

import zarr
import zarr.storage

from ..errors import NotFoundError
from ._common import _group
from .locks import Locks

__all__ = ["Backend", "LocalBackend", "ObjectBackend", "open_backend"]

_STALE_STAGING_S = 24 * 3600
_WRITERS = ".radcache.writers"  # held shared by every process that opened the store to write


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


def _orphan_staging(staging: Path) -> list[Path]:
    """Unfinished writes of processes of this host that have died, and of any process
    more than a day ago (a live writer's folder is never among them)."""
    if not staging.is_dir():
        return []
    cutoff = time.time() - _STALE_STAGING_S
    found = []
    for d in sorted(staging.iterdir()):
        parts = d.name.split(".")
        with contextlib.suppress(OSError):
            if d.is_dir() and ((len(parts) == 3 and _dead(parts[1])) or d.stat().st_mtime < cutoff):
                found.append(d)
    return found


def _sweep_staging(staging: Path) -> int:
    """Remove the unfinished writes of dead writers (:func:`_orphan_staging`); returns how
    many went."""
    gone = 0
    for d in _orphan_staging(staging):
        with contextlib.suppress(OSError):
            shutil.rmtree(d)
            gone += 1
    return gone


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
    #: Staged writes of dead writers swept when the store was opened (not yet reported).
    swept: int = 0
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

    def remove(self, root: zarr.Group, path: str) -> None:
        """Delete the group ``path`` (``entries/<key>``, ``volumes/<content>``), if any."""
        parent, _, name = path.rpartition("/")
        with contextlib.suppress(KeyError, FileNotFoundError):
            del _group(root[parent])[name]

    def read_document(self, path: str) -> dict[str, Any] | None:
        """A JSON document of the store read as a plain file, None if unreadable (if
        :attr:`supports_direct_reads`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot read documents directly")

    def child_groups(self, path: str) -> list[str] | None:
        """Names of the groups directly under ``path`` listed without zarr (if
        :attr:`supports_direct_reads`), else None."""
        return None

    def orphan_staging(self) -> list[str]:
        """Names of the staged writes whose writer died (if :attr:`supports_staging`): on
        this host and no longer running, or more than a day old. Their first part is the
        entry key."""
        return []

    def sweep_staging(self) -> int:
        """Remove :meth:`orphan_staging`; returns how many went."""
        return 0

    def sole_writer(self) -> contextlib.AbstractContextManager[bool | None]:
        """Whether this process is the only one that has the store open for writing,
        held so while the block runs (no other process can open it for writing
        meanwhile: it waits). None where the backend cannot tell (object storage)."""
        return contextlib.nullcontext(None)

    def close(self) -> None:
        """Stop counting as a process that has the store open for writing (see
        :meth:`sole_writer`); the store stays usable."""


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
        self._writer: int | None = None  # the descriptor holding _WRITERS shared
        if not read_only:
            self.swept = _sweep_staging(path / "staging")
            self.local_path.mkdir(parents=True, exist_ok=True)  # so the lock file has a home
            fd = os.open(path / _WRITERS, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a `radcache check --repair` runs
            self._writer = fd
            self._release = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        if self._writer is not None:
            self._release()
            self._writer = None

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

    def remove(self, root: zarr.Group, path: str) -> None:
        """Renamed into ``staging/`` first, as the unfinished write of this process, so
        that it vanishes at once: a crash while its files are deleted leaves no half of
        it, only debris the next opening sweeps."""
        where = self.local_path / path
        trash = (
            self.local_path / "staging" / f"{path.rpartition('/')[2]}.{_owner()}.{uuid.uuid4().hex}"
        )
        trash.parent.mkdir(exist_ok=True)
        try:
            os.rename(where, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def read_document(self, path: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], json.loads((self.local_path / path).read_bytes()))
        except (OSError, ValueError):
            return None

    def orphan_staging(self) -> list[str]:
        return [d.name for d in _orphan_staging(self.local_path / "staging")]

    def sweep_staging(self) -> int:
        return _sweep_staging(self.local_path / "staging")

    @contextlib.contextmanager
    def sole_writer(self) -> Iterator[bool | None]:
        """An exclusive ``flock`` on ``<store>/.radcache.writers``, tried without waiting:
        True while held, False if another process has the store open for writing."""
        fd = self._writer
        borrowed = fd is None  # a descriptor of its own, for a store open read-only
        if fd is None:
            try:
                fd = os.open(self.local_path / _WRITERS, os.O_RDONLY)
            except FileNotFoundError:  # never opened for writing
                yield True
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sole = False
        else:
            sole = True
        try:
            yield sole
        finally:
            # back to what this backend held (a failed conversion may have dropped it)
            fcntl.flock(fd, fcntl.LOCK_UN if borrowed else fcntl.LOCK_SH)
            if borrowed:
                os.close(fd)

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
