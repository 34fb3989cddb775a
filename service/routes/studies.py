"""``/v1/studies``: submit a study, list and read cached studies, delete one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from radcache.clients.schemas import JobOut, StudyOut, SubmitOptions
from radcache.embeddings.errors import InvalidFieldError, NotFoundError

from ..auth import Admin, Read, Submit
from ..deps import ResourcesDep
from ..erasure import delete_study as erase
from ..intake import accept, receiving
from ..options import job_options, parse_submit_options, refuse_query_refs
from ..uploads import BODY_TYPES, save_upload
from ._common import ERRORS, SubmitQuery, catalog, job_out, study_out

__all__ = ["router"]

router = APIRouter()
_FORM_FIELDS = tuple(SubmitOptions.model_fields)
_BINARY = {"type": "string", "format": "binary"}
# The route reads its body itself (streamed to disk): what it takes, for the OpenAPI.
_SUBMIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": _BINARY},
                        **{
                            name: {"type": "string", "description": field.description or name}
                            for name, field in SubmitOptions.model_fields.items()
                        },
                    },
                    "required": ["files"],
                }
            },
            **{ctype: {"schema": _BINARY} for ctype in BODY_TYPES},
        },
    }
}


@router.post(
    "/v1/studies",
    status_code=202,
    response_model=JobOut,
    responses={200: {"model": JobOut, "description": "every series was already cached"}, **ERRORS},
    openapi_extra=_SUBMIT_BODY,
    summary="Submit a study (DICOM files, zips, NIfTI) for embedding",
)
async def submit_study(
    request: Request, res: ResourcesDep, query: SubmitQuery, who: Submit
) -> Response:
    """Upload as ``multipart/form-data`` (any number of files, plus optional fields
    ``modality``, ``model``, ``patch_storage`` (or the older ``patch_tokens``), ``recipe``
    (JSON) or ``protocol`` (a paper's
    preprocessing by name; not both: 422 ``invalid-recipe``, as for an unknown name),
    ``roi`` (JSON: a box every volume is cut to first), ``labels`` (a JSON object recorded
    with every series), ``collection``, ``sequences`` and ``fusion``) or as one body
    (``application/zip``, ``application/dicom``, NIfTI) with the options as query
    parameters (:class:`SubmitOptions`; a query parameter wins over a form field).

    ``patient`` and ``study`` name the patient and study of NIfTI, NRRD and MetaImage files
    (stored as keyed pseudonyms, as a DICOM file's PatientID and StudyInstanceUID are);
    they are taken as form fields only (a URL's query string ends up in proxy logs), and an
    upload that holds a DICOM file with them is refused (422 ``invalid-request``): DICOM
    files are named by their own headers. The answer names the study each series was
    sent under, also when its pixels are stored already under another study."""
    refuse_query_refs(request.query_params)
    async with receiving(res) as dest:
        fields = await save_upload(request, dest, res.settings.max_upload_bytes, _FORM_FIELDS)
        options = job_options(
            parse_submit_options({**fields, **query}),
            res.encoder.cfg,
            who.tenant,
            res.pipeline.pseudonymizer,
        )
    taken = await run_in_threadpool(accept, res, dest, options)
    body = job_out(taken.job).model_dump(mode="json")
    if taken.cached:
        return JSONResponse(body, status_code=200)
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{taken.job.id}"})


@router.get(
    "/v1/studies",
    response_model=list[StudyOut],
    responses={422: ERRORS[422]},
    summary="Cached studies, a page at a time",
)
def list_studies(
    request: Request,
    response: Response,
    res: ResourcesDep,
    who: Read,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[
        str | None, Query(description="where the previous page ended (its Link header)")
    ] = None,
    offset: Annotated[
        int, Query(ge=0, description="studies to skip (older clients; prefer cursor)")
    ] = 0,
) -> list[StudyOut]:
    """Studies in name order. When more follow, the ``Link`` header names the next page
    (``<…?limit=…&cursor=…>; rel="next"``); a study stored meanwhile is listed once or on a
    later page, never twice. ``offset`` still works, but not together with ``cursor``."""
    if cursor and offset:
        raise InvalidFieldError(
            f"cursor and offset={offset} given together; page with the cursor of the previous "
            "page's Link header alone."
        )
    page = catalog(res).page(limit, cursor, offset, tenant=who.tenant)
    if page.next is not None:
        nxt = request.url.remove_query_params("offset").include_query_params(
            limit=limit, cursor=page.next
        )
        response.headers["Link"] = f'<{nxt.path}?{nxt.query}>; rel="next"'
    return [study_out(s, es) for s, es in page.studies]


@router.get(
    "/v1/studies/{study}", response_model=StudyOut, responses=ERRORS, summary="One cached study"
)
def get_study(study: str, res: ResourcesDep, who: Read) -> StudyOut:
    """``study`` is a study name or a unique prefix of one (4 characters or more)."""
    cat = catalog(res)
    study = cat.expand("study", study, who.tenant)
    entries = cat.study(study, who.tenant)
    if not entries:
        raise NotFoundError(f"no cached study {study!r}; GET /v1/studies lists them.")
    return study_out(study, entries)


@router.delete(
    "/v1/studies/{study}",
    status_code=202,
    response_model=JobOut,
    responses={204: {"description": "nothing names the study (already deleted)"}, **ERRORS},
    summary="Delete a study (consent withdrawal); idempotent",
)
def delete_study(study: str, res: ResourcesDep, who: Admin) -> Response:
    """Before this answers, the study is gone from every answer and from search: its
    entries are removed from the store (their table rows tombstoned), the catalog, the
    tenant's job reports and the index in memory. The answer is an erasure job
    (``Location``); once it is ``done``, no byte of the store, the index files or the job
    database names the study or holds its vectors. Content another study of the tenant
    also sent stays, named by that study only; other tenants' entries are never touched
    (they are entries of their own). 204 when nothing names the study."""
    job = erase(res, catalog(res), study, who.tenant)
    if job is None:
        return Response(status_code=204)
    body = job_out(job).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
