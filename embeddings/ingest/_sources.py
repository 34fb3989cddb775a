"""Expand what a user hands in (paths, directories, zips, uploaded bytes) into sources.

A :class:`Source` is one file-like thing with a display name used in error messages.
Its kind (DICOM, NIfTI, other volume, zip) is sniffed from the name and the first bytes,
never trusted from the extension alone.

Nothing is held in memory that the caller did not hand in: a file on disk is a path,
read when needed; a zip member is a reference into its archive, decompressed (streamed)
each time it is read. A zip on disk is opened where it lies, never read whole; a zip
inside a zip is streamed to a temporary file, removed once nothing refers to it. A reader
that needs a seekable file (a DICOM parser) gets one from :meth:`Source.spooled`: a zip
member over :data:`SPOOL_BYTES` goes through a temporary file, never whole into memory.

One input shares one :class:`~._limits.Budget`: a zip's declared sizes are charged before
any member is inflated, and each member charges it again as it streams. A source can name
the files beside it (:meth:`Source.sibling`): in its directory, its zip folder, or among
the uploaded bytes of the same call, never anywhere else.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import threading
import weakref
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from ..errors import InputError, NotDicomError, UnsupportedInputError
from ._limits import Budget, Limits, counted

__all__ = ["SPOOL_BYTES", "Source", "SourceKind", "expand", "expand_within", "sniff"]

SourceKind = Literal["dicom", "nifti", "itk", "zip"]
InputItem = str | os.PathLike[str] | tuple[str, bytes]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_SKIP_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
_MAX_ZIP_DEPTH = 2
#: Largest inflation ratio of a zip (zip-bomb guard; the total is the budget's).
MAX_ZIP_RATIO = 200
_CHUNK = 1 << 20
SPOOL_BYTES = 16 << 20  #: most of a zip member (or inflated dataset) held in memory
# What reading bad bytes raises: zipfile adds ValueError (a header offset before the start),
# NotImplementedError (an unknown compression method) and RuntimeError (encryption).
_UNREADABLE = (
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    ValueError,
    NotImplementedError,
    RuntimeError,
)


@dataclass(frozen=True)
class Source:
    """One input file: a display ``name`` and a way to read it.

    The content lives in exactly one place: ``path`` (a file on disk), ``stream`` (a zip
    member, decompressed as it is read; ``opener`` reads it whole) or the in-memory bytes
    behind ``opener``. ``budget`` is what its input may still inflate to; ``siblings``
    finds the files beside it that are not on disk (zip members, uploaded bytes).
    """

    name: str
    opener: Callable[[], bytes] | None = None
    path: Path | None = None
    stream: Callable[[], IO[bytes]] | None = None
    nbytes: int | None = None  # the size, where known without reading (zip members)
    budget: Budget | None = field(default=None, repr=False, compare=False)
    siblings: Callable[[str], Source | None] | None = field(default=None, repr=False, compare=False)

    @property
    def limits(self) -> Limits:
        return self.budget.limits if self.budget is not None else Limits()

    def sibling(self, base: str) -> Source | None:
        """The file called ``base`` (a bare file name) beside this one in the same input,
        or None: in the same directory (not through a link that leads out of it), the
        same zip folder, or among the same call's uploaded bytes."""
        if self.path is None:
            return self.siblings(base) if self.siblings is not None else None
        p = self.path.parent / base
        here = os.path.realpath(self.path.parent)
        if not p.is_file() or os.path.dirname(os.path.realpath(p)) != here:
            return None
        return _file_source(p, self.budget)

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> Source:
        return cls(name=name, opener=_const(data), nbytes=len(data))

    def read(self) -> bytes:
        """The whole content (a transient copy for files and zip members); raises
        :class:`UnsupportedInputError` naming the file when it cannot be read."""
        try:
            if self.path is not None:
                return self.path.read_bytes()
            assert self.opener is not None, "a Source needs a path or an opener"
            return self.opener()
        except _UNREADABLE as exc:
            why = getattr(exc, "strerror", None) or exc
            raise UnsupportedInputError(f"could not be read ({why}).", path=self.name) from exc

    def head(self, n: int = 512) -> bytes:
        if self.path is not None or self.stream is not None:
            with self.fileobj() as f:
                return f.read(n)
        return self.read()[:n]

    def fileobj(self) -> IO[bytes]:
        """A readable, seekable file object over the content (close it after use)."""
        if self.path is not None:
            return self.path.open("rb")
        if self.stream is not None:
            return self.stream()
        return io.BytesIO(self.read())

    def size(self) -> int:
        if self.path is not None:
            return self.path.stat().st_size
        if self.nbytes is not None:
            return self.nbytes
        return len(self.read())

    @contextlib.contextmanager
    def spooled(self) -> Iterator[IO[bytes]]:
        """A seekable file object over the content holding at most :data:`SPOOL_BYTES` of
        it in memory: the file, the caller's bytes, a zip member read whole up to that size
        or else streamed (charging the budget) to a temporary file removed on exit; raises
        :class:`UnsupportedInputError` naming the file when it cannot be read."""
        with contextlib.ExitStack() as stack:
            try:
                if self.path is not None:
                    f: IO[bytes] = stack.enter_context(self.path.open("rb"))
                elif self.stream is None or (self.nbytes or 0) <= SPOOL_BYTES:
                    f = io.BytesIO(self.read())
                else:
                    f = stack.enter_context(stack.enter_context(self.local_path()).open("rb"))
            except _UNREADABLE as exc:
                why = getattr(exc, "strerror", None) or exc
                raise UnsupportedInputError(f"could not be read ({why}).", path=self.name) from exc
            yield f

    @contextlib.contextmanager
    def local_path(self, suffix: str = "") -> Iterator[Path]:
        """A path on disk holding the content: the file itself, or a temporary copy
        (streamed, never whole in memory) removed on exit."""
        if self.path is not None:
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="radcache-") as tmp:
            p = Path(tmp) / f"input{suffix}"
            with self.fileobj() as src, p.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            yield p


def _lower_name(name: str) -> str:
    return name.rsplit("!", 1)[-1].lower()


def _looks_like_dicom_without_preamble(head: bytes) -> bool:
    """A file that starts directly with a group 0x0002 or 0x0008 element (either byte order)."""
    if len(head) < 8:
        return False
    le = int.from_bytes(head[0:2], "little")
    be = int.from_bytes(head[0:2], "big")
    return le in (0x0002, 0x0008) or be in (0x0002, 0x0008)


def _nifti_magic(head: bytes) -> bool:
    """NIfTI-1 (``n+1``/``ni1`` at byte 344) or NIfTI-2 (``n+2`` at byte 4)."""
    return (len(head) >= 348 and head[344:348] in (b"n+1\0", b"ni1\0")) or head[4:8] == b"n+2\0"


def _gunzip_head(source: Source, n: int = 540) -> bytes:
    import zlib

    try:
        return zlib.decompressobj(wbits=31).decompress(source.head(4096), n)
    except zlib.error:
        return b""


def sniff(source: Source) -> SourceKind:
    """Decide what a source is from its name and first bytes; raise if none of ours."""
    head = source.head(512)
    name = _lower_name(source.name)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if name.endswith(NIFTI_SUFFIXES) or _nifti_magic(head):
        return "nifti"
    if head[:2] == b"\x1f\x8b" and _nifti_magic(_gunzip_head(source)):
        return "nifti"  # a gzipped NIfTI under another name
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if _looks_like_dicom_without_preamble(head):
        return "dicom"
    if not head:
        raise NotDicomError(
            "the file is empty; expected a DICOM, NIfTI or zip file.", path=source.name
        )
    raise NotDicomError(
        "not a DICOM file (no 'DICM' marker at byte 128 and no DICOM header at the start), "
        "nor NIfTI (.nii/.nii.gz), NRRD/MHA or zip; check that the right file was sent.",
        path=source.name,
    )


def _const(data: bytes) -> Callable[[], bytes]:
    def opener() -> bytes:
        return data

    return opener


def _file_source(path: Path, budget: Budget | None) -> Source:
    return Source(name=str(path), path=path, budget=budget)


def _walk(path: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f in _SKIP_NAMES or f.startswith("._"):
                continue
            yield Path(root) / f


class _Opened:
    """What a :class:`_ZipArchive` has open; closed by a finalizer that must not hold the
    archive itself."""

    def __init__(self) -> None:
        self.zf: zipfile.ZipFile | None = None
        self.spilled: Path | None = None

    def close(self) -> None:
        if self.zf is not None:
            self.zf.close()
            self.zf = None
        if self.spilled is not None:
            shutil.rmtree(self.spilled.parent, ignore_errors=True)
            self.spilled = None


class _ZipArchive:
    """A zip, opened where it lies (a path, the caller's bytes, or a spilled temporary
    file), whose members are read one at a time.

    The archive stays open while members are read (reopening parses the whole central
    directory) and is closed once nothing refers to it any more, or by :meth:`close`;
    a later read opens it again.
    """

    def __init__(self, where: Path | bytes, opened: _Opened) -> None:
        self._where = where
        self._opened = opened
        self._lock = threading.Lock()
        weakref.finalize(self, opened.close)

    @classmethod
    def of(cls, src: Source) -> _ZipArchive:
        opened = _Opened()
        if src.path is not None:
            return cls(src.path, opened)
        if src.stream is None:  # the caller's bytes: read in place
            return cls(src.read(), opened)
        tmp = Path(tempfile.mkdtemp(prefix="radcache-zip-")) / "archive.zip"
        opened.spilled = tmp
        try:  # a zip inside a zip: streamed to disk, not held in memory
            with src.fileobj() as f, tmp.open("wb") as out:
                shutil.copyfileobj(f, out, _CHUNK)
        except BaseException:
            opened.close()
            raise
        return cls(tmp, opened)

    def _zip(self) -> zipfile.ZipFile:
        if self._opened.zf is None:
            where = self._where
            fp = io.BytesIO(where) if isinstance(where, bytes) else where
            self._opened.zf = zipfile.ZipFile(fp)
        return self._opened.zf

    def infos(self) -> list[zipfile.ZipInfo]:
        with self._lock:
            return self._zip().infolist()

    def open(self, info: zipfile.ZipInfo) -> IO[bytes]:
        with self._lock:
            return self._zip().open(info)

    def read(self, info: zipfile.ZipInfo) -> bytes:
        with self._lock:
            return self._zip().read(info)

    def close(self) -> None:
        """Close the open archive (members can still be read: it is opened again)."""
        with self._lock:
            if self._opened.zf is not None:
                self._opened.zf.close()
                self._opened.zf = None


def _member(
    archive: _ZipArchive,
    info: zipfile.ZipInfo,
    name: str,
    budget: Budget | None,
    siblings: Callable[[str], Source | None],
) -> Source:
    def stream() -> IO[bytes]:  # charges the budget under the member's own key
        f = archive.open(info)
        return f if budget is None else counted(f, budget.meter(info, name))

    def opener() -> bytes:
        out = io.BytesIO()  # its value is handed over, not copied
        with stream() as f:
            shutil.copyfileobj(f, out, _CHUNK)
        return out.getvalue()

    return Source(
        name=name,
        opener=opener,
        stream=stream,
        nbytes=info.file_size,
        budget=budget,
        siblings=siblings,
    )


def _zip_siblings(
    archive: _ZipArchive, infos: list[zipfile.ZipInfo], zip_name: str, budget: Budget | None
) -> Callable[[str], Callable[[str], Source | None]]:
    """For each folder of the archive, the lookup of a member by its bare name there."""
    by_name = {i.filename: i for i in infos if not i.is_dir()}
    folders: dict[str, Callable[[str], Source | None]] = {}

    def of(folder: str) -> Callable[[str], Source | None]:
        def sibling(base: str) -> Source | None:
            info = by_name.get(folder + base)
            if info is None:
                return None
            return _member(archive, info, f"{zip_name}!{info.filename}", budget, sibling)

        return folders.setdefault(folder, sibling)

    return of


def _zip_members(src: Source, depth: int) -> Iterator[Source | InputError]:
    name = src.name
    try:
        archive = _ZipArchive.of(src)
        infos = archive.infos()
    except _UNREADABLE as exc:
        yield UnsupportedInputError(f"not a readable zip archive ({exc}).", path=name)
        return
    if any(not i.filename for i in infos):  # zipfile cannot even ask a nameless one is_dir()
        yield UnsupportedInputError(
            "a member of the archive has no name; expected named files (the archive is "
            "corrupt: make it again).",
            path=name,
        )
        infos = [i for i in infos if i.filename]
    # Members are read from the archive, never extracted, so names like ../../etc cannot
    # escape; the declared sizes are checked before anything is inflated (zip bombs): the
    # ratio here, the total against the input's budget (zipfile never inflates a member
    # past its declared size, and each member also charges the budget as it streams).
    total = sum(i.file_size for i in infos)
    packed = max(1, sum(i.compress_size for i in infos))
    if total / packed > MAX_ZIP_RATIO:
        archive.close()
        yield UnsupportedInputError(
            f"the archive would inflate to {total} bytes from {packed} ({total / packed:.0f}:1); "
            f"expected at most {MAX_ZIP_RATIO}:1. Send it in parts.",
            path=name,
        )
        return
    if src.budget is not None:
        declared: dict[object, int] = {i: i.file_size for i in infos}
        try:
            src.budget.reserve(declared, name)
        except InputError as exc:
            archive.close()
            yield exc
            return
    siblings = _zip_siblings(archive, infos, name, src.budget)
    try:
        for info in infos:
            base = info.filename.rsplit("/", 1)[-1]
            if info.is_dir() or info.filename.startswith("__MACOSX/") or base in _SKIP_NAMES:
                continue
            if base.startswith("._"):
                continue
            folder = info.filename[: len(info.filename) - len(base)]  # "" or "a/b/"
            member = _member(archive, info, f"{name}!{info.filename}", src.budget, siblings(folder))
            yield from _expand_source(member, depth + 1)
    finally:
        archive.close()  # opened again when a member is loaded


def _expand_source(src: Source, depth: int) -> Iterator[Source | InputError]:
    try:
        kind = sniff(src)
    except InputError as exc:
        yield exc
        return
    except _UNREADABLE as exc:
        why = getattr(exc, "strerror", None) or exc
        yield UnsupportedInputError(f"could not be read ({why}).", path=src.name)
        return
    if kind != "zip":
        yield src
        return
    if depth >= _MAX_ZIP_DEPTH:
        yield UnsupportedInputError(
            f"zip archives nested more than {_MAX_ZIP_DEPTH} deep are not opened.", path=src.name
        )
        return
    yield from _zip_members(src, depth)


def _bytes_siblings(
    uploaded: dict[str, bytes], budget: Budget | None
) -> Callable[[str], Callable[[str], Source | None]]:
    """For each folder of the uploaded names, the lookup of an upload by its bare name."""
    folders: dict[str, Callable[[str], Source | None]] = {}

    def of(folder: str) -> Callable[[str], Source | None]:
        def sibling(base: str) -> Source | None:
            data = uploaded.get(folder + base)
            if data is None:
                return None
            return Source(
                name=folder + base,
                opener=_const(data),
                nbytes=len(data),
                budget=budget,
                siblings=sibling,
            )

        return folders.setdefault(folder, sibling)

    return of


def expand(
    items: Iterable[InputItem], *, limits: Limits | None = None
) -> Iterator[Source | InputError]:
    """Yield one :class:`Source` per file found (directories walked, zips opened), or an
    error; what the items may inflate to together is bounded by ``limits``."""
    return expand_within(items, Budget(limits))


def expand_within(items: Iterable[InputItem], budget: Budget) -> Iterator[Source | InputError]:
    """:func:`expand`, charging ``budget`` (one input's, shared with its later loads)."""
    items = list(items)  # names and references: uploaded bytes are not copied
    uploaded = {item[0]: item[1] for item in items if isinstance(item, tuple)}
    siblings = _bytes_siblings(uploaded, budget)
    for item in items:
        if isinstance(item, tuple):
            name, data = item
            folder = name[: len(name) - len(name.rsplit("/", 1)[-1])]
            src = Source(
                name=name,
                opener=_const(data),
                nbytes=len(data),
                budget=budget,
                siblings=siblings(folder),
            )
            yield from _expand_source(src, 0)
            continue
        path = Path(item)
        if path.is_dir():
            for f in _walk(path):
                yield from _expand_source(_file_source(f, budget), 0)
        elif path.exists():
            yield from _expand_source(_file_source(path, budget), 0)
        else:
            yield UnsupportedInputError("no such file or directory.", path=str(path))
