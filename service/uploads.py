"""Request bodies streamed to disk under a size limit, never held whole.

:func:`save_upload` takes ``multipart/form-data`` (one file per part, plus form fields)
or a single body (zip, DICOM, NIfTI); :func:`save_related` takes the
``multipart/related; type="application/dicom"`` body of STOW-RS. Both write each part to
its own file in the upload's directory as bytes arrive, and refuse (413) the moment the
limit is passed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import IO

import python_multipart
from fastapi import Request
from starlette.datastructures import UploadFile

from radcache.embeddings.errors import (
    EmptyUploadError,
    PayloadTooLargeError,
    RadcacheError,
    UnsupportedMediaTypeError,
)

__all__ = ["Budget", "related_boundary", "save_related", "save_upload"]

_BODY_TYPES = {
    "application/zip": "upload.zip",
    "application/x-zip-compressed": "upload.zip",
    "application/dicom": "upload.dcm",
    "application/octet-stream": "upload.bin",
    "application/gzip": "upload.nii.gz",
    "application/x-nifti": "upload.nii",
}


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


def _declared(request: Request, limit: int) -> None:
    """Refuse early when the client says how big the body is."""
    Budget(limit).spend(int(request.headers.get("content-length") or 0))


async def save_upload(
    request: Request, dest: Path, limit: int, fields: tuple[str, ...]
) -> dict[str, str]:
    """Stream the request into ``dest`` (one file per part); returns the form ``fields``."""
    _declared(request, limit)
    budget = Budget(limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form_fields: dict[str, str] = {}
    count = 0
    if ctype == "multipart/form-data":
        async with request.form(max_files=100_000, max_fields=50) as form:  # spooled to disk
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    with (dest / _safe_name(value.filename, count)).open("wb") as out:
                        while chunk := await value.read(1 << 20):
                            budget.spend(len(chunk))
                            out.write(chunk)
                    count += 1
                elif key in fields and value:
                    form_fields[key] = str(value)
    elif ctype in _BODY_TYPES:
        with (dest / _BODY_TYPES[ctype]).open("wb") as out:
            async for chunk in request.stream():
                budget.spend(len(chunk))
                out.write(chunk)
        count = 1 if (dest / _BODY_TYPES[ctype]).stat().st_size else 0
    else:
        raise UnsupportedMediaTypeError(
            f"content type {ctype or 'none'!r}; expected multipart/form-data, application/zip, "
            "application/dicom, application/gzip (NIfTI) or application/octet-stream."
        )
    if count == 0:
        raise EmptyUploadError("the request holds no file; attach DICOM, zip or NIfTI files.")
    return form_fields


class _PartWriter:
    """multipart callbacks that write each part to its own file as bytes arrive."""

    def __init__(self, dest: Path, budget: Budget) -> None:
        self.dest, self.budget = dest, budget
        self.paths: list[Path] = []
        self._fh: IO[bytes] | None = None

    def on_part_begin(self) -> None:
        path = self.dest / f"part-{len(self.paths):06d}.dcm"
        self.paths.append(path)
        self._fh = path.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._fh is not None
        self.budget.spend(end - start)
        self._fh.write(data[start:end])

    def on_part_end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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
    writer = _PartWriter(dest, Budget(limit))
    callbacks = {
        "on_part_begin": writer.on_part_begin,
        "on_part_data": writer.on_part_data,
        "on_part_end": writer.on_part_end,
    }
    try:
        parser = python_multipart.MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except RadcacheError:
        raise
    except Exception as exc:
        raise UnsupportedMediaTypeError(f"the multipart body could not be parsed ({exc}).") from exc
    finally:
        writer.on_part_end()
    return writer.paths
