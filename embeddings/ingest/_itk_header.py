"""What a NRRD or MetaImage header says about where its voxels are, checked before any
reader opens it.

Both formats let a header keep its voxels in other files (``data file:`` in NRRD,
``ElementDataFile`` in MetaImage; one name, a ``LIST`` of names or a numbered
``name%03d.raw min max step`` pattern), and the readers open whatever path is written
there. From a hostile network that is a way to read any file on the server, so a header
is accepted only when every data file it names is a bare file name (no directory, no
``..``, no drive, no leading ``-``), and the header reads unambiguously: a MetaImage
header must be one ``Key = value`` per line (the MetaIO reader would otherwise take a
value from a later line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..errors import UnreadableVolumeError, UnsafeReferenceError

__all__ = ["MAX_HEADER_BYTES", "ItkHeader", "read_header"]

#: A header (with its list of data files) longer than this is refused.
MAX_HEADER_BYTES = 1 << 20
_MAX_DATA_FILES = 100_000
_MAX_LINE = 500  # MetaIO's longest key and value
_NRRD_COMPRESSED = {"gz", "gzip", "bz2", "bzip2", "zrl"}
_META_LINE = re.compile(r"[ \t\f\v]*([^=:\s][^=:\n]*?)[ \t]*[=:][ \t]*([^\s=:][^\n]*?)\s*")
_PATTERN = re.compile(r"([^%]*)%(0?[0-9]{0,3})d([^%]*)")
_RULE = (
    "a data file must be named without any directory (no '/', '\\', '..' or drive) and "
    "sent beside its header, in the same upload, zip folder or directory"
)


@dataclass(frozen=True)
class ItkHeader:
    """The reader a header is for, the bare names of its detached data files in order
    (none when the voxels follow the header), and whether the voxels are compressed."""

    io: Literal["NrrdImageIO", "MetaImageIO"]
    data_files: tuple[str, ...]
    compressed: bool


def _unsafe(name: str, why: str) -> UnsafeReferenceError:
    return UnsafeReferenceError(f"the header {why}; {_RULE}.", path=name)


def _bare(file: str, name: str) -> str:
    """``file`` when it is a bare file name, else :class:`UnsafeReferenceError`."""
    if (
        not file
        or file in (".", "..")
        or file != file.strip()
        or file.startswith(("-", "~"))
        or any(c in file for c in "/\\:")
        or not file.isprintable()
    ):
        raise _unsafe(name, "names a data file with a path or an unusual name")
    return file


def _numbered(value: str, name: str, *, negative_step: bool) -> tuple[str, ...]:
    """The files of a ``pattern%0Nd.raw min max step [dim]`` specification."""
    words = value.split()
    match = _PATTERN.fullmatch(words[0]) if words else None
    try:
        lo, hi, step = (int(w) for w in words[1:4])
    except ValueError:
        match = None
    if match is None or len(words) not in (4, 5) or step == 0 or (step < 0 and not negative_step):
        raise _unsafe(
            name, "names its data files with a pattern other than 'name%0Nd min max step'"
        )
    if (hi - lo) * step < 0 or (hi - lo) // step + 1 > _MAX_DATA_FILES:
        raise _unsafe(name, f"names no data file, or more than {_MAX_DATA_FILES}")
    end = hi + (1 if step > 0 else -1)
    return tuple(_bare(words[0] % k, name) for k in range(lo, end, step))


def _listed(lines: list[str], complete: bool, name: str) -> tuple[str, ...]:
    """The files of a ``LIST``: every following line, to the end of the header file."""
    if not complete:
        raise _unsafe(name, f"lists its data files past its first {MAX_HEADER_BYTES} bytes")
    files = [line.rstrip("\r") for line in lines]
    while files and not files[-1]:
        files.pop()
    if not files or len(files) > _MAX_DATA_FILES:
        raise _unsafe(name, f"lists no data file, or more than {_MAX_DATA_FILES}")
    return tuple(_bare(f, name) for f in files)


def _nrrd(text: str, complete: bool, name: str) -> ItkHeader:
    lines = text.split("\n")
    files: tuple[str, ...] = ()
    compressed, seen, ended = False, False, False
    for i, raw in enumerate(lines[1:], start=1):
        line = raw.rstrip("\r")
        if not line and (i < len(lines) - 1 or complete):
            ended = True
            break
        if line.startswith("#") or ": " not in line:
            continue
        key, _, value = line.partition(": ")
        key = re.sub(r"[\s_-]", "", key).lower()
        value = value.lstrip(" \t")
        if key == "encoding":
            compressed = value.strip().lower() in _NRRD_COMPRESSED
        elif key == "datafile":
            if seen:
                raise _unsafe(name, "names its data file twice")
            seen = True
            if "%" in value:
                files = _numbered(value, name, negative_step=True)
            elif value.startswith("LIST"):
                return ItkHeader("NrrdImageIO", _listed(lines[i + 1 :], complete, name), compressed)
            else:
                files = (_bare(value, name),)
    if not ended and not complete:
        raise _unsafe(name, f"does not end within its first {MAX_HEADER_BYTES} bytes")
    return ItkHeader("NrrdImageIO", files, compressed)


def _meta(text: str, complete: bool, name: str) -> ItkHeader:
    lines = text.split("\n")
    compressed = False
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        last = i == len(lines) - 1 and not complete  # cut at MAX_HEADER_BYTES
        match = None if last or len(raw) > 2 * _MAX_LINE else _META_LINE.fullmatch(raw)
        if match is None:
            raise UnreadableVolumeError(
                "the MetaImage header has a line that is not 'Key = value' (or is over "
                f"{_MAX_LINE} characters) before its ElementDataFile line; expected one "
                "field per line.",
                path=name,
            )
        key, value = match.groups()
        if key == "CompressedData":
            compressed = value.lower() == "true"
        elif key.lower() == "elementdatafile" and key != "ElementDataFile":
            raise _unsafe(name, "spells ElementDataFile unusually")
        elif key == "ElementDataFile":
            if value in ("LOCAL", "Local", "local"):
                return ItkHeader("MetaImageIO", (), compressed)
            if value.startswith("LIST"):
                return ItkHeader("MetaImageIO", _listed(lines[i + 1 :], complete, name), compressed)
            if "%" in value:
                files = _numbered(value, name, negative_step=False)
                return ItkHeader("MetaImageIO", files, compressed)
            return ItkHeader("MetaImageIO", (_bare(value, name),), compressed)
    raise UnreadableVolumeError(
        f"the MetaImage header has no ElementDataFile line in its first {MAX_HEADER_BYTES} "
        "bytes; expected one naming where the voxels are (LOCAL when they follow it).",
        path=name,
    )


def read_header(head: bytes, name: str) -> ItkHeader:
    """Check the header at the start of a NRRD or MetaImage file (``head``: its first
    :data:`MAX_HEADER_BYTES` + 1 bytes, or all of it); raise
    :class:`UnsafeReferenceError` naming ``name`` for a data file that is not a bare name,
    :class:`UnreadableVolumeError` for a header that cannot be read unambiguously."""
    complete = len(head) <= MAX_HEADER_BYTES
    text = head[:MAX_HEADER_BYTES].decode("latin-1")
    if text.startswith("NRRD"):
        return _nrrd(text, complete, name)
    return _meta(text, complete, name)
