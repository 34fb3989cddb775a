"""Request bodies streamed to disk under a size limit, never held whole, parsed off the
event loop.

:func:`save_upload` takes ``multipart/form-data`` (one file per part, plus form fields)
or a single body (zip, DICOM, NIfTI); :func:`save_related` takes the
``multipart/related; type="application/dicom"`` body of STOW-RS. Both write each part to
its own file in the upload's directory, and refuse (413) as soon as the body passes the
limit (the declared length first, then each chunk received, so a chunked body without a
Content-Length is held to it too). A body that breaks its own framing (cut short before its
closing boundary, a part longer or shorter than its Content-Length, headers without end)
is refused with 400 ``bad-multipart``; one with nothing in it with 400 ``empty-upload``.

A form part is saved under a safe name of its own (``00001-MR_truncated.dcm``); the name the
client gave it (``mr_folder/MR_truncated.dcm``) is kept beside the files, in
:data:`NAMES_FILE` (a hidden directory, never read as input), for the job's report
(:func:`client_names`): it lives and leaves with the upload.

The event loop only receives the body. Parsing and file writes run in a worker thread,
:data:`BATCH` bytes at a time: a part is a file opened, written and closed, so a body of
many small instances (a STOW-RS of 189 slices) is real work per chunk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio
import python_multipart
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.multipart import MultipartState, parse_options_header
from starlette.requests import ClientDisconnect

from radcache.embeddings.errors import (
    EmptyUploadError,
    InvalidFieldError,
    MalformedBodyError,
    PayloadTooLargeError,
    RadcacheError,
    UnsupportedMediaTypeError,
)

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = [
    "BATCH",
    "BODY_TYPES",
    "MAX_FILES",
    "NAMES_FILE",
    "Budget",
    "client_names",
    "related_boundary",
    "save_related",
    "save_upload",
]

#: Body bytes handed to the parsing thread at a time (at most this much is held).
BATCH = 1 << 20
#: Files one upload may hold (one a part; the DICOM receiver: instances of one study).
MAX_FILES = 100_000
_MAX_FIELDS = 50
_MAX_FIELD_BYTES = 1 << 20
_MAX_HEAD_BYTES = 16384  # the headers of one part
#: Where an upload keeps the names its client gave its files, by the names they were saved
#: under (a hidden directory: input walks skip it).
NAMES_FILE = Path(".radcache") / "names.json"

_BODY_TYPES = {
    "application/zip": "upload.zip",
    "application/x-zip-compressed": "upload.zip",
    "application/dicom": "upload.dcm",
    "application/octet-stream": "upload.bin",
    "application/gzip": "upload.nii.gz",
    "application/x-nifti": "upload.nii",
}
#: The content types :func:`save_upload` takes as one body (besides multipart/form-data).
BODY_TYPES: tuple[str, ...] = tuple(_BODY_TYPES)


class Budget:
    """Bytes an upload may still use; raises payload-too-large (413) past the limit."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.limit = limit

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise PayloadTooLargeError(
                f"the upload is larger than the {self.limit}-byte limit; split the study or "
                "raise RADCACHE_MAX_UPLOAD_BYTES."
            )


def _safe_name(name: str | None, index: int) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "").name).strip("._") or "file"
    return f"{index:05d}-{base}"[:200]


def client_names(upload: Path) -> dict[str, str]:
    """The names the client gave the upload's files, by their saved names ({} if none)."""
    try:
        names = json.loads((upload / NAMES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}


def _keep_names(upload: Path, names: dict[str, str]) -> None:
    renamed = {saved: name for saved, name in names.items() if saved != name}
    if renamed:
        (upload / NAMES_FILE).parent.mkdir(exist_ok=True)
        (upload / NAMES_FILE).write_text(json.dumps(renamed))


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _declared(request: Request, limit: int) -> None:
    """Refuse early when the client says how big the body is."""
    Budget(limit).spend(int(request.headers.get("content-length") or 0))


def _write_all(write: Callable[[bytes], object], chunks: list[bytes]) -> None:
    for chunk in chunks:
        write(chunk)


async def _close(close: Callable[[], None]) -> None:
    with anyio.CancelScope(shield=True):  # closed even when the request is cancelled
        await run_in_threadpool(close)


async def _feed(request: Request, write: Callable[[bytes], object], budget: Budget) -> int:
    """Receive the body on the loop, refusing it as soon as it passes ``budget`` (as the
    declared length is), before a byte more is held or written; ``write`` it in a worker
    thread, a batch at a time. Returns the bytes received."""
    batch: list[bytes] = []
    size = total = 0
    try:
        async for chunk in request.stream():
            budget.spend(len(chunk))
            total += len(chunk)
            batch.append(chunk)
            size += len(chunk)
            if size >= BATCH:
                await run_in_threadpool(_write_all, write, batch)
                batch, size = [], 0
    except ClientDisconnect:  # answered like any body cut short (to no one, most likely)
        raise MalformedBodyError(
            f"the connection closed after {total} bytes, before the body's end; send it again."
        ) from None
    if batch:
        await run_in_threadpool(_write_all, write, batch)
    return total


class _File:
    """One file, written as bytes arrive."""

    def __init__(self, path: Path) -> None:
        self.size = 0
        self._fh: IO[bytes] | None = path.open("wb")

    def write(self, data: bytes) -> None:
        assert self._fh is not None, "written after close"
        self._fh.write(data)
        self.size += len(data)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _Parts:
    """multipart callbacks that write each part to its own file as bytes arrive
    (``multipart/related``: every part is a file). A part that declares its
    Content-Length must hold exactly that many bytes."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.paths: list[Path] = []
        self._file: _File | None = None
        self._headers: dict[bytes, bytes] = {}
        self._name, self._value = bytearray(), bytearray()
        self._part = 0  # parts begun
        self._head = 0  # bytes of the current part's headers
        self._size = 0  # bytes of the current part's data

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def open(self, path: Path) -> None:
        if len(self.paths) >= MAX_FILES:
            raise PayloadTooLargeError(f"the body holds more than {MAX_FILES} files; split it.")
        self.paths.append(path)
        self._file = _File(path)

    def on_part_begin(self) -> None:
        self._headers, self._head, self._size = {}, 0, 0
        self._part += 1

    def _header_bytes(self, n: int) -> None:
        self._head += n
        if self._head > _MAX_HEAD_BYTES:
            raise MalformedBodyError(
                f"part {self._part} has more than {_MAX_HEAD_BYTES} bytes of headers; "
                "expected a few short headers (Content-Type, Content-Disposition) per part."
            )

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._name).lower()] = bytes(self._value)
        self._name, self._value = bytearray(), bytearray()

    def on_headers_finished(self) -> None:
        self.open(self.dest / f"part-{len(self.paths):06d}.dcm")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._file is not None:
            self._file.write(data[start:end])

    def on_part_end(self) -> None:
        self.close()
        declared = self._headers.get(b"content-length")
        if declared is not None and declared.strip() != str(self._size).encode():
            raise MalformedBodyError(
                f"part {self._part} declares Content-Length {_text(declared.strip())!r} "
                f"but holds {self._size} bytes; the body was altered or cut in transfer: send "
                "it again (or leave Content-Length out of the parts)."
            )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _FormParts(_Parts):
    """``multipart/form-data``: parts with a file name go to files, the ``wanted`` fields
    are kept (as Starlette's form parser does, with its limits)."""

    def __init__(self, dest: Path, wanted: tuple[str, ...]) -> None:
        super().__init__(dest)
        self.wanted = wanted
        self.fields: dict[str, str] = {}
        self.names: dict[str, str] = {}  # saved name -> the client's
        self._field: tuple[str, bytearray] | None = None
        self._n_fields = 0

    def on_headers_finished(self) -> None:
        kind, params = parse_options_header(self._headers.get(b"content-disposition"))
        if kind != b"form-data" or b"name" not in params:
            raise UnsupportedMediaTypeError(
                "a form part has no Content-Disposition: form-data with a name; send the "
                "files as multipart/form-data fields (curl -F files=@…)."
            )
        if b"filename" in params:
            name = _text(params[b"filename"])
            saved = _safe_name(name, len(self.paths))
            self.open(self.dest / saved)
            self.names[saved] = name
            return
        self._n_fields += 1
        if self._n_fields > _MAX_FIELDS:
            raise InvalidFieldError(
                f"the form has more than {_MAX_FIELDS} fields; send files and the "
                "SubmitOptions fields only."
            )
        name = _text(params[b"name"])
        if name in self.wanted:
            self._field = (name, bytearray())

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        super().on_part_data(data, start, end)
        if self._field is not None:
            self._field[1].extend(data[start:end])
            if len(self._field[1]) > _MAX_FIELD_BYTES:
                raise InvalidFieldError(
                    f"form field {self._field[0]}: more than {_MAX_FIELD_BYTES} bytes; "
                    "expected a short value or JSON object."
                )

    def on_part_end(self) -> None:
        super().on_part_end()
        if self._field is not None:
            name, value = self._field
            if value:
                self.fields[name] = _text(bytes(value))
            self._field = None


async def _parse(request: Request, boundary: str, parts: _Parts, limit: int) -> None:
    """Stream a multipart body through ``parts`` in a worker thread."""
    parser = python_multipart.MultipartParser(boundary, parts.callbacks())
    try:
        if not await _feed(request, parser.write, Budget(limit)):
            raise EmptyUploadError("the request body is empty; send the files as a multipart body.")
        parser.finalize()
        if parser.state != MultipartState.END:
            raise MalformedBodyError(
                f"the multipart body ended before its closing boundary --{boundary}--: it was "
                "cut short (or its Content-Length is short of the body); send it again."
            )
    except RadcacheError:
        raise
    except Exception as exc:
        raise MalformedBodyError(
            f"the multipart body could not be parsed ({exc}); expected parts separated by "
            f"--{boundary} lines, ending with --{boundary}--."
        ) from exc
    finally:
        await _close(parts.close)


async def save_upload(
    request: Request, dest: Path, limit: int, fields: tuple[str, ...]
) -> dict[str, str]:
    """Stream the request into ``dest`` (one file per part); returns the form ``fields``."""
    _declared(request, limit)
    content_type = request.headers.get("content-type", "")
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        boundary = parse_options_header(content_type)[1].get(b"boundary")
        if not boundary:
            raise UnsupportedMediaTypeError(
                f"content type {content_type!r} has no boundary; let the HTTP client build "
                "the multipart/form-data body."
            )
        form = _FormParts(dest, fields)
        await _parse(request, boundary.decode("latin-1"), form, limit)
        await run_in_threadpool(_keep_names, dest, form.names)
        count, form_fields = len(form.paths), form.fields
    elif ctype in _BODY_TYPES:
        body = await run_in_threadpool(_File, dest / _BODY_TYPES[ctype])
        try:
            await _feed(request, body.write, Budget(limit))
        finally:
            await _close(body.close)
        count, form_fields = (1 if body.size else 0), {}
    else:
        raise UnsupportedMediaTypeError(
            f"content type {ctype or 'none'!r}; expected multipart/form-data, application/zip, "
            "application/dicom, application/gzip (NIfTI) or application/octet-stream."
        )
    if count == 0:
        raise EmptyUploadError("the request holds no file; attach DICOM, zip or NIfTI files.")
    return form_fields


def related_boundary(content_type: str) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` body (415 else)."""
    kind, _, params = content_type.partition(";")
    values: dict[str, str] = {}
    for p in params.split(";"):
        k, _, v = p.strip().partition("=")
        values[k.strip().lower()] = v.strip().strip('"')
    inner = values.get("type", "application/dicom").lower()
    if (
        kind.strip().lower() != "multipart/related"
        or inner != "application/dicom"
        or not values.get("boundary")
    ):
        raise UnsupportedMediaTypeError(
            f'content type {content_type!r}; expected multipart/related; type="application/dicom" '
            "with a boundary."
        )
    return values["boundary"]


async def save_related(request: Request, dest: Path, limit: int, boundary: str) -> list[Path]:
    """Stream a ``multipart/related`` body into ``dest``, one file per part, in order."""
    _declared(request, limit)
    parts = _Parts(dest)
    await _parse(request, boundary, parts, limit)
    return parts.paths
