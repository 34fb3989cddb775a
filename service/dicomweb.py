"""DICOMweb: STOW-RS (store instances, then embed them) and a QIDO-RS subset (list studies).

``POST /dicom-web/studies[/{study}]`` takes ``multipart/related; type="application/dicom"``
(boundary quoted or not, chunked or not, parts with or without the DICM preamble). The body
is parsed as a stream: each part goes straight to its own file, never held whole. Every
part is checked (readable DICOM, right study); the good ones become one embedding job.
The answer is a PS3.18 Store Instances Response in ``application/dicom+json``.
"""

from __future__ import annotations

import shutil
import uuid
import warnings
from pathlib import Path
from typing import IO, Annotated, Any

import pydicom
import python_multipart
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from radcache.embeddings.errors import RadcacheError

from .api import Budget, UnsupportedMediaTypeError, cached_studies
from .app import ResourcesDep

__all__ = ["router"]

router = APIRouter()
DICOM_JSON = "application/dicom+json"
# PS3.4 Annex GG / PS3.18 failure reasons
_CANNOT_UNDERSTAND = 0xC000
_STUDY_MISMATCH = 0xA900  # the instance does not belong to the study in the URL


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

    def close(self) -> None:
        self.on_part_end()


def _boundary(content_type: str) -> str:
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


def _ds_json(values: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    return {tag: {"vr": vr, "Value": v} if v else {"vr": vr} for tag, (vr, v) in values.items()}


def _check_part(path: Path, study: str | None) -> tuple[str, str, int | None]:
    """(SOP class, SOP instance, failure reason or None) for one stored part."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        sop_class, sop = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    except Exception:
        return "", "", _CANNOT_UNDERSTAND
    if study is not None and str(ds.get("StudyInstanceUID", "")) != study:
        return sop_class, sop, _STUDY_MISMATCH
    return sop_class, sop, None


@router.post(
    "/dicom-web/studies",
    operation_id="stow_studies",
    summary="STOW-RS: store instances (and embed them)",
)
@router.post(
    "/dicom-web/studies/{study}",
    operation_id="stow_study",
    summary="STOW-RS: store instances of one study",
)
async def stow(request: Request, res: ResourcesDep, study: str | None = None) -> Response:
    boundary = _boundary(request.headers.get("content-type", ""))
    res.worker.check_capacity()
    dest = res.settings.upload_dir / f"stow-{uuid.uuid4().hex}"
    dest.mkdir(parents=True)
    writer = _PartWriter(dest, Budget(res.settings.max_upload_bytes))
    try:
        callbacks = {
            "on_part_begin": writer.on_part_begin,
            "on_part_data": writer.on_part_data,
            "on_part_end": writer.on_part_end,
        }
        parser = python_multipart.MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except RadcacheError:
        writer.close()
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except Exception as exc:
        writer.close()
        shutil.rmtree(dest, ignore_errors=True)
        raise UnsupportedMediaTypeError(f"the multipart body could not be parsed ({exc}).") from exc
    stored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for path in writer.paths:
        sop_class, sop, reason = _check_part(path, study)
        item = {
            "00081150": ("UI", [sop_class] if sop_class else []),
            "00081155": ("UI", [sop] if sop else []),
        }
        if reason is None:
            stored.append(_ds_json(item))
        else:
            failed.append(_ds_json({**item, "00081197": ("US", [reason])}))
            path.unlink(missing_ok=True)
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    headers: dict[str, str] = {}
    if stored:
        row = res.jobs.create(str(dest))
        res.worker.submit(row.id)
        headers["Location"] = f"/v1/jobs/{row.id}"
    else:
        shutil.rmtree(dest, ignore_errors=True)
    if not failed:
        status = 200
    elif stored:
        status = 202
    elif all(f["00081197"]["Value"] == [_STUDY_MISMATCH] for f in failed):
        status = 409
    else:
        status = 400
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


@router.get("/dicom-web/studies", summary="QIDO-RS (subset): cached studies")
def qido_studies(
    res: ResourcesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    study_uid: Annotated[str | None, Query(alias="StudyInstanceUID")] = None,
) -> Response:
    """StudyInstanceUID (the stored name: a pseudonym unless UIDs are kept) and
    ModalitiesInStudy of every cached study."""
    studies = sorted(cached_studies(res).items())
    if study_uid:
        studies = [s for s in studies if s[0] == study_uid]
    out = [
        _ds_json(
            {
                "0020000D": ("UI", [name]),
                "00080061": ("CS", sorted({e.modality for e in entries if e.modality})),
                "00201206": ("IS", [len(entries)]),
            }
        )
        for name, entries in studies[offset : offset + limit]
    ]
    return JSONResponse(out, media_type=DICOM_JSON)
