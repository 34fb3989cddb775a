"""Expand what a user hands in (paths, directories, zips, uploaded bytes) into sources.

A :class:`Source` is one file-like thing with a display name used in error messages.
Its kind (DICOM, NIfTI, other volume, zip) is sniffed from the name and the first bytes,
never trusted from the extension alone.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import InputError, NotDicomError, UnsupportedInputError

__all__ = ["Source", "SourceKind", "expand", "sniff"]

SourceKind = Literal["dicom", "nifti", "itk", "zip"]
InputItem = str | os.PathLike[str] | tuple[str, bytes]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_SKIP_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
_MAX_ZIP_DEPTH = 2
#: Largest total a zip may inflate to, and the largest inflation ratio (zip-bomb guard).
MAX_ZIP_BYTES = 16 << 30
MAX_ZIP_RATIO = 200


@dataclass(frozen=True)
class Source:
    """One input file: a display ``name``, a way to read its bytes, and its path if on disk."""

    name: str
    opener: Callable[[], bytes]
    path: Path | None = None

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> Source:
        return cls(name=name, opener=_const(data))

    def read(self) -> bytes:
        return self.opener()

    def head(self, n: int = 512) -> bytes:
        if self.path is not None:
            with self.path.open("rb") as f:
                return f.read(n)
        return self.opener()[:n]

    def fileobj(self) -> io.BufferedIOBase:
        if self.path is not None:
            return self.path.open("rb")
        return io.BytesIO(self.opener())


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


def _file_source(path: Path) -> Source:
    return Source(name=str(path), opener=path.read_bytes, path=path)


def _walk(path: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f in _SKIP_NAMES or f.startswith("._"):
                continue
            yield Path(root) / f


def _zip_members(data: bytes, name: str, depth: int) -> Iterator[Source | InputError]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        yield UnsupportedInputError(f"not a readable zip archive ({exc}).", path=name)
        return
    # Members are read in memory, never extracted, so names like ../../etc cannot escape;
    # the declared sizes are checked before anything is inflated (zip bombs).
    infos = zf.infolist()
    total = sum(i.file_size for i in infos)
    packed = max(1, sum(i.compress_size for i in infos))
    if total > MAX_ZIP_BYTES or total / packed > MAX_ZIP_RATIO:
        yield UnsupportedInputError(
            f"the archive would inflate to {total} bytes from {packed} ({total / packed:.0f}:1); "
            f"expected at most {MAX_ZIP_BYTES} bytes and {MAX_ZIP_RATIO}:1. Send it in parts.",
            path=name,
        )
        return
    for info in infos:
        base = info.filename.rsplit("/", 1)[-1]
        if info.is_dir() or info.filename.startswith("__MACOSX/") or base in _SKIP_NAMES:
            continue
        if base.startswith("._"):
            continue
        member_name = f"{name}!{info.filename}"

        def opener(zf: zipfile.ZipFile = zf, info: zipfile.ZipInfo = info) -> bytes:
            return zf.read(info)

        src = Source(name=member_name, opener=opener)
        yield from _expand_source(src, depth + 1)


def _expand_source(src: Source, depth: int) -> Iterator[Source | InputError]:
    try:
        kind = sniff(src)
    except InputError as exc:
        yield exc
        return
    except OSError as exc:
        yield UnsupportedInputError(f"could not be read ({exc.strerror or exc}).", path=src.name)
        return
    if kind != "zip":
        yield src
        return
    if depth >= _MAX_ZIP_DEPTH:
        yield UnsupportedInputError(
            f"zip archives nested more than {_MAX_ZIP_DEPTH} deep are not opened.", path=src.name
        )
        return
    yield from _zip_members(src.read(), src.name, depth)


def expand(items: Iterable[InputItem]) -> Iterator[Source | InputError]:
    """Yield one :class:`Source` per file found (directories walked, zips opened), or an error."""
    for item in items:
        if isinstance(item, tuple):
            name, data = item
            yield from _expand_source(Source.from_bytes(name, data), 0)
            continue
        path = Path(item)
        if path.is_dir():
            for f in _walk(path):
                yield from _expand_source(_file_source(f), 0)
        elif path.exists():
            yield from _expand_source(_file_source(path), 0)
        else:
            yield UnsupportedInputError("no such file or directory.", path=str(path))
