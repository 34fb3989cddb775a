"""DICOMweb: STOW-RS (store instances, then embed them) and a QIDO-RS subset (list studies).

``POST /dicom-web/studies[/{study}]`` takes ``multipart/related; type="application/dicom"``
(boundary quoted or not, chunked or not, parts with or without the DICM preamble). The body
is parsed as a stream: each part goes straight to its own file, never held whole. Every
part is checked (readable DICOM, right study); the good ones become one embedding job.
The good ones go through the same intake as ``POST /v1/studies``
(:mod:`radcache.service.intake`), with the same options as query parameters. The answer
is a PS3.18 Store Instances Response in ``application/dicom+json``.

A body that holds no instance is refused (400 ``empty-upload``), and so is one that breaks
its framing or holds an instance cut short in transfer (400 ``bad-multipart``, problem
JSON): nothing of it is stored, and the sender is told to send it again.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from radcache.embeddings.errors import EmptyUploadError, MalformedBodyError, NotDicomError
from radcache.embeddings.ingest import cut_short, instance_ids

from ..auth import Read, Submit
from ..deps import ResourcesDep
from ..intake import Accepted, accept, receiving
from ..options import job_options, parse_submit_options, refuse_query_refs
from ..problems import PROBLEM
from ..uploads import related_boundary, save_related
from ._common import SubmitQuery, catalog

__all__ = ["router"]

router = APIRouter()
DICOM_JSON = "application/dicom+json"
# PS3.4 Annex GG / PS3.18 failure reasons
_CANNOT_UNDERSTAND = 0xC000
_STUDY_MISMATCH = 0xA900  # the instance does not belong to the study in the URL


class DicomJSONResponse(JSONResponse):
    media_type = DICOM_JSON


# A PS3.18 DICOM JSON data set: attributes by tag (``0020000D``), each a VR and values.
_DATASET: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"pattern": "^[0-9A-F]{8}$"},
    "additionalProperties": {
        "type": "object",
        "properties": {
            "vr": {"type": "string", "pattern": "^[A-Z]{2}$"},
            "Value": {"type": "array"},
        },
        "required": ["vr"],
    },
}
_STORE_ANSWER = {"content": {DICOM_JSON: {"schema": _DATASET}}}
_STOW: dict[str, Any] = {
    "response_class": DicomJSONResponse,
    "responses": {
        200: {"description": "every instance stored", **_STORE_ANSWER},
        202: {
            "description": "some instances stored (an embedding job), some failed",
            **_STORE_ANSWER,
        },
        400: {
            "description": "nothing stored: no part is a readable instance (a Store "
            "Instances Response), or the body is empty or breaks its framing (a problem)",
            "content": {DICOM_JSON: {"schema": _DATASET}, PROBLEM: {}},
        },
        409: {
            "description": "nothing stored: no instance is of the study in the URL",
            **_STORE_ANSWER,
        },
        **{s: {"content": {PROBLEM: {}}} for s in (404, 413, 415, 503)},
    },
    # The route reads its body itself, a part at a time: what it takes, for the OpenAPI.
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                'multipart/related; type="application/dicom"': {
                    "schema": {"type": "string", "format": "binary"}
                }
            },
        }
    },
}


def _ds_json(values: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    return {tag: {"vr": vr, "Value": v} if v else {"vr": vr} for tag, (vr, v) in values.items()}


def _check_part(path: Path, study: str | None) -> tuple[str, str, int | None]:
    """(SOP class, SOP instance, failure reason or None) for one stored part; raises
    :class:`MalformedBodyError` for an instance cut short (the body is sent again whole)."""
    try:
        ids = instance_ids(path)
    except NotDicomError:
        return "", "", _CANNOT_UNDERSTAND
    why = cut_short(path)
    if why is not None:
        raise MalformedBodyError(
            f"part {int(path.stem.split('-')[-1]) + 1} is a DICOM instance cut short ({why}); "
            "the body was cut in transfer or its parts altered. Nothing was stored: send it "
            "again."
        )
    if study is not None and ids.study != study:
        return ids.sop_class, ids.sop_instance, _STUDY_MISMATCH
    return ids.sop_class, ids.sop_instance, None


def _check_parts(paths: list[Path], study: str | None) -> tuple[list[Any], list[Any]]:
    """The Referenced (stored) and Failed SOP sequences; failed parts are deleted."""
    if not paths:
        raise EmptyUploadError(
            "the multipart body holds no part; send one application/dicom part per instance."
        )
    stored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for path in paths:
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
    return stored, failed


@router.post(
    "/dicom-web/studies",
    operation_id="stow_studies",
    summary="STOW-RS: store instances (and embed them)",
    **_STOW,
)
@router.post(
    "/dicom-web/studies/{study}",
    operation_id="stow_study",
    summary="STOW-RS: store instances of one study",
    **_STOW,
)
async def stow(
    request: Request,
    res: ResourcesDep,
    query: SubmitQuery,
    who: Submit,
    study: str | None = None,
) -> Response:
    """The instances become one embedding job, with the same options as
    ``POST /v1/studies`` (query parameters; not ``patient`` or ``study``: instances are
    named by their own headers). The job names the study its instances were sent under,
    also when their pixels are stored already under another study."""
    refuse_query_refs(request.query_params)
    boundary = related_boundary(request.headers.get("content-type", ""))
    options = job_options(parse_submit_options(query), res.encoder.cfg, who.tenant)
    async with receiving(res, prefix="stow-") as dest:
        paths = await save_related(request, dest, res.settings.max_upload_bytes, boundary)
        stored, failed = await run_in_threadpool(_check_parts, paths, study)
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    headers: dict[str, str] = {}
    if stored:
        taken: Accepted = await run_in_threadpool(accept, res, dest, options)
        headers["Location"] = f"/v1/jobs/{taken.job.id}"
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


@router.get(
    "/dicom-web/studies",
    response_class=DicomJSONResponse,
    responses={200: {"content": {DICOM_JSON: {"schema": {"type": "array", "items": _DATASET}}}}},
    summary="QIDO-RS (subset): cached studies",
)
def qido_studies(
    res: ResourcesDep,
    who: Read,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    study_uid: Annotated[str | None, Query(alias="StudyInstanceUID")] = None,
) -> Response:
    """StudyInstanceUID (the stored name: a pseudonym unless UIDs are kept) and
    ModalitiesInStudy of cached studies, in name order, from the entry catalog."""
    cat = catalog(res)
    if study_uid:
        found = cat.study(study_uid, who.tenant)
        studies = [(study_uid, found)][offset : offset + limit] if found else []
    else:
        studies = cat.page(limit, offset=offset, tenant=who.tenant).studies
    out = [
        _ds_json(
            {
                "0020000D": ("UI", [name]),
                "00080061": ("CS", sorted({e.modality for e in entries if e.modality})),
                "00201206": ("IS", [len(entries)]),
            }
        )
        for name, entries in studies
    ]
    return JSONResponse(out, media_type=DICOM_JSON)
