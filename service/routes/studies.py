"""``/v1/studies``: submit a study, list and read cached studies, delete one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from radcache.clients.schemas import JobOut, StudyOut, SubmitOptions
from radcache.embeddings.errors import InvalidFieldError, NotFoundError

from ..auth import Admin, Read, Submit
from ..deps import ResourcesDep
from ..intake import accept, receiving
from ..options import job_options, parse_submit_options
from ..uploads import save_upload
from ._common import ERRORS, SubmitQuery, catalog, job_out, study_out

__all__ = ["router"]

router = APIRouter()
_FORM_FIELDS = tuple(SubmitOptions.model_fields)


@router.post(
    "/v1/studies",
    status_code=202,
    response_model=JobOut,
    responses={200: {"model": JobOut, "description": "every series was already cached"}, **ERRORS},
    summary="Submit a study (DICOM files, zips, NIfTI) for embedding",
)
async def submit_study(
    request: Request, res: ResourcesDep, query: SubmitQuery, who: Submit
) -> Response:
    """Upload as ``multipart/form-data`` (any number of files, plus optional fields
    ``modality``, ``model``, ``patch_tokens``, ``recipe`` (JSON), ``labels`` (a JSON
    object recorded with every series), ``collection``, ``sequences`` and ``fusion``) or as
    one body (``application/zip``, ``application/dicom``, NIfTI) with the options as query
    parameters (:class:`SubmitOptions`; a query parameter wins over a form field)."""
    async with receiving(res) as dest:
        fields = await save_upload(request, dest, res.settings.max_upload_bytes, _FORM_FIELDS)
        options = job_options(
            parse_submit_options({**fields, **query}), res.encoder.cfg, who.tenant
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
    entries = catalog(res).study(study, who.tenant)
    if not entries:
        raise NotFoundError(f"no cached study {study!r}; GET /v1/studies lists them.")
    return study_out(study, entries)


@router.delete(
    "/v1/studies/{study}",
    status_code=204,
    responses=ERRORS,
    summary="Delete a study's embeddings and metadata (consent withdrawal); idempotent",
)
def delete_study(study: str, res: ResourcesDep, who: Admin) -> Response:
    """The study's entries are found in the catalog (and the index), removed from the
    store (their table rows tombstoned) and from the catalog; its vectors leave the index
    before this answers. Content another study of the tenant also sent stays, named by
    that study; other tenants' entries are never touched (they are entries of their own)."""
    cat = catalog(res)
    named = set(cat.study_keys(study, who.tenant)) | set(
        res.indexes.study_entries(study, who.tenant)
    )
    gone = set(res.store.delete_study(study, keys=named))
    cat.forget(gone)
    kept = sorted(named - gone)
    cat.record(res.store, kept)  # kept by another study: now named by it
    res.keeper.refresh()  # its vectors leave the index before this answers
    res.keeper.touch(kept)
    return Response(status_code=204)
