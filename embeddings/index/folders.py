"""A saved space on disk: version folders behind an atomically replaced ``CURRENT`` pointer.

Several processes (API replicas, a worker, the command line) may save and read one space's
folder at once. Each save writes a private folder of its own (:func:`begin`); then
:func:`finish`, holding an exclusive ``flock`` on ``<space>/.lock``, names it
``v<ns>-<pid>-<random>``, points ``CURRENT`` at it (a rename) and clears out old versions.
Readers (:func:`open_current`) hold the same lock shared only while they read the pointer
and open the version's files; what they opened stays readable after it is deleted.

Cleanup never deletes the version ``CURRENT`` names, the ``keep`` versions current most
recently before it, nor one that stopped being current less than ``grace`` seconds ago (for
readers that cannot take the lock: a read-only folder); an unfinished folder is left alone
for :data:`UNFINISHED_GRACE` seconds after its writer last touched it. A version is renamed
away before it is deleted, so nobody sees half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "GRACE_SECONDS",
    "KEEP_VERSIONS",
    "POINTER",
    "UNFINISHED_GRACE",
    "begin",
    "current",
    "finish",
    "open_current",
    "prune",
]

KEEP_VERSIONS = 1
GRACE_SECONDS = 60.0
UNFINISHED_GRACE = 600.0
POINTER = "CURRENT"


def current(path: Path) -> str:
    """The version folder ``path/CURRENT`` names."""
    return (path / POINTER).read_text().strip()


def open_current(path: Path, files: Sequence[str]) -> tuple[Path, dict[str, int]]:
    """The current version folder and a read-only descriptor of each of its ``files``
    (the caller closes them), opened while no writer can remove the folder."""
    with _locked(path, fcntl.LOCK_SH):
        where = path / current(path)
        fds: dict[str, int] = {}
        try:
            for name in files:
                fds[name] = os.open(where / name, os.O_RDONLY)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
    return where, fds


def begin(path: Path) -> Path:
    """A private folder to write a new version in."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    return tmp


def finish(
    path: Path, tmp: Path, *, keep: int = KEEP_VERSIONS, grace: float = GRACE_SECONDS
) -> Path:
    """Make the written folder durable, then (under the lock) a version, the current one,
    and clear out versions nobody needs; returns the version folder."""
    for f in tmp.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    with _locked(path, fcntl.LOCK_EX):
        name = f"v{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(tmp, path / name)
        try:
            before = current(path)
        except FileNotFoundError:
            before = None
        pointer = path / f".{POINTER}.{name}"
        with pointer.open("w") as fh:
            fh.write(name)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(pointer, path / POINTER)  # the commit point
        _fsync_dir(path)
        if before and before != name:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path / before)  # its mtime now says when it stopped being current
        _clean(path, name, keep, grace)
    return path / name


def prune(path: Path) -> None:
    """Delete every version but the current one now, whatever ``keep`` and ``grace``
    would allow (after a consent deletion, no earlier version may hold what it removed).
    Readers that opened an earlier version keep reading what they opened."""
    if not (path / POINTER).exists():
        return
    with _locked(path, fcntl.LOCK_EX):
        _clean(path, current(path), 0, 0.0)


@contextlib.contextmanager
def _locked(path: Path, how: int) -> Iterator[None]:
    try:
        fh = open(path / ".lock", "a+b")  # noqa: SIM115 - held for the with block
    except OSError:  # a read-only folder: nobody writes it, no lock needed
        yield
        return
    with fh:
        fcntl.flock(fh, how)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clean(path: Path, now_current: str, keep: int, grace: float) -> None:
    """Delete what no reader can need (see the module docstring); holds the lock."""
    now = time.time()
    versions: list[tuple[float, Path]] = []
    for entry in path.iterdir():
        name = entry.name
        try:
            if name.startswith("v") and entry.is_dir():
                if name != now_current:
                    versions.append((entry.stat().st_mtime, entry))
            elif name.endswith(".del"):  # an interrupted deletion
                shutil.rmtree(entry, ignore_errors=True)
            elif name.endswith(".tmp") and now - _touched(entry) > UNFINISHED_GRACE:
                shutil.rmtree(entry, ignore_errors=True)  # a writer that died
            elif name.startswith(f".{POINTER}."):  # a pointer never put in place
                entry.unlink()
        except FileNotFoundError:  # removed meanwhile by a writer finishing its own
            continue
    versions.sort(reverse=True)  # most recently current first
    for superseded, entry in versions[keep:]:
        if now - superseded > grace:
            gone = path / f".{entry.name}.{uuid.uuid4().hex[:8]}.del"
            with contextlib.suppress(FileNotFoundError):
                os.rename(entry, gone)
                shutil.rmtree(gone, ignore_errors=True)


def _touched(folder: Path) -> float:
    """When an unfinished folder (or a file in it) last changed."""
    times = [folder.stat().st_mtime]
    for f in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):
            times.append(f.stat().st_mtime)
    return max(times)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
