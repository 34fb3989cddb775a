"""``/v1/search``, ``/v1/classify``, ``/v1/indexes``: similar cases, few-shot classification
and the index catalogue.

Handlers turn wire models into :mod:`radcache.embeddings.search` calls. Searching, embedding
an uploaded query and the upload's files run in worker threads (FAISS and the model release
the GIL), so the event loop stays free.
"""

from __future__ import annotations

import shutil
import uuid
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from radcache.clients.schemas import (
    ClassifyOut,
    ClassifyRequest,
    IndexOut,
    Prediction,
    SearchFilters,
    SearchOut,
    SearchQuery,
    SearchRequest,
)
from radcache.embeddings import Filters, Query
from radcache.embeddings.errors import (
    DestinationUnsetError,
    ForbiddenError,
    InputError,
    NotFoundError,
    VaultOffError,
)
from radcache.embeddings.search import QueryHits

from ..auth import Read, Search
from ..deps import Resources, ResourcesDep
from ..dicom.send import deliver
from ..entry_catalog import EntryCatalog
from ..keys import Principal
from ..uploads import save_upload
from ._common import ERRORS, catalog

__all__ = ["router"]

router = APIRouter()
SENT_TO = "Radcache-Sent-To"  # a KOS answer sent on (`send`): how and where
_SEARCH_BODY: dict[str, Any] = {
    "responses": {
        "200": {
            "content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}},
            "headers": {
                SENT_TO: {
                    "description": "with as=kos and send: how and where the document was "
                    "sent (C-STORE AE@HOST:PORT, or STOW-RS URL)",
                    "schema": {"type": "string"},
                }
            },
        }
    },
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "request": {
                            "type": "string",
                            "description": "a SearchRequest as JSON, without `query`",
                        },
                    },
                }
            },
        },
    },
}


def _query(q: SearchQuery, cat: EntryCatalog, tenant: str) -> Query:
    """The query, its entry key, series and study whole where given by a unique prefix."""
    series = None
    if q.series is not None:
        name, sep, part = q.series.partition("#")
        series = cat.expand("series", name, tenant) + sep + part
    return Query(
        entry=q.entry and cat.expand("key", q.entry, tenant),
        series=series,
        study=q.study and cat.expand("study", q.study, tenant),
        slice=q.slice,
        vector=tuple(q.vector) if q.vector is not None else None,
    )


def _filters(f: SearchFilters) -> Filters:
    return Filters.make(
        modality=f.modality,
        body_part=f.body_part,
        description=f.description,
        collection=f.collection,
        labels=f.labels,
        exclude_studies=f.exclude_studies,
        exclude_patients=f.exclude_patients,
    )


def _out(req: SearchRequest, level: str, results: list[QueryHits]) -> Response:
    """The answer, validated once and serialised by pydantic (not again by FastAPI); many
    hits are milliseconds of work, so callers run it in a worker thread."""
    out = SearchOut.model_validate(
        {"level": level, "k": req.k, "results": [r.to_dict() for r in results]}
    )
    return Response(out.model_dump_json(), media_type="application/json")


def _parse(model: type[SearchRequest], raw: str | bytes) -> SearchRequest:
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def _search_upload(request: Request, res: Resources, who: Principal) -> Response:
    dest = res.settings.upload_dir / f"search-{uuid.uuid4().hex}"
    await run_in_threadpool(dest.mkdir, parents=True)
    try:
        form = await save_upload(request, dest, res.settings.max_upload_bytes, ("request",))
        req = _parse(SearchRequest, form.get("request", "{}"))
        if req.query is not None:
            raise InputError("an upload is the query: leave `query` out of the request field.")
        level = req.level or "series"
        common: dict[str, Any] = {
            "k": req.k,
            "level": level,
            "group_by_series": req.group_by == "series",
            "filters": _filters(req.filters),
            "exclude_same_study": req.exclude_same_study,
            "exclude_same_patient": req.exclude_same_patient,
            "tenant": who.tenant,
        }
        if req.store:  # embed into the cache, then search by what was stored
            if not who.allows("submit"):
                raise ForbiddenError(
                    f"key {who.key} lacks the 'submit' scope that `store` needs; search "
                    "without `store`, or use a key with --scopes submit,search."
                )
            pipe = res.pipeline.variant(tenant=who.tenant)
            report = await run_in_threadpool(pipe.embed, [dest], modality=req.modality)
            if not report.series:
                raise report.errors[0] if report.errors else InputError("no volume in upload")
            await run_in_threadpool(res.keeper.refresh)
            await run_in_threadpool(res.keeper.touch, [s.entry for s in report.series])
            results = []
            for s in report.series:
                results += await run_in_threadpool(
                    res.searcher.search, Query(entry=s.entry), **common
                )
        else:
            results = await run_in_threadpool(
                res.searcher.search_upload, [dest], modality=req.modality, **common
            )
        return await run_in_threadpool(_out, req, level, results)
    finally:
        with anyio.CancelScope(shield=True):  # removed even when the request is cancelled
            await run_in_threadpool(shutil.rmtree, dest, ignore_errors=True)


@router.post(
    "/v1/search",
    response_model=SearchOut,
    responses=ERRORS,
    openapi_extra=_SEARCH_BODY,
    summary="Similar cases: kNN by study, series, slice, vector or uploaded file",
)
async def search(request: Request, res: ResourcesDep, who: Search) -> Response:
    """A JSON :class:`SearchRequest`, or ``multipart/form-data`` with files (the query,
    embedded with the index's model and recipe, not stored unless ``store``) and a
    ``request`` field holding the rest of the request as JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _search_upload(request, res, who)
    req = _parse(SearchRequest, await request.body())
    if req.query is None:
        raise InputError("a JSON search needs `query` (or upload files as multipart/form-data).")
    if req.send and res.settings.kos_destination is None:
        raise DestinationUnsetError(
            "`send` asks the service to send the KOS to its KOS destination, and none is "
            "configured; expected RADCACHE_KOS_DESTINATION (AE@HOST:PORT or a DICOMweb URL), "
            "or ask without `send` and send the document yourself."
        )
    query = await run_in_threadpool(_query, req.query, catalog(res), who.tenant)
    level = req.level or ("slice" if query.slice is not None else "series")
    results = await run_in_threadpool(
        res.searcher.search,
        query,
        k=req.k,
        level=level,
        group_by_series=req.group_by == "series",
        filters=_filters(req.filters),
        space=req.space,
        model=req.model,
        exclude_same_study=req.exclude_same_study,
        exclude_same_patient=req.exclude_same_patient,
        tenant=who.tenant,
    )
    if req.as_ == "kos":
        return await run_in_threadpool(_kos, res, who.tenant, results, req.send)
    return await run_in_threadpool(_out, req, level, results)


def _kos(res: Resources, tenant: str, results: list[QueryHits], send: bool) -> Response:
    """The hits of the first query as a Key Object Selection document in the query's study;
    with ``send``, sent to the configured KOS destination first."""
    if res.vault is None:
        raise VaultOffError(
            "a KOS answer names the original UIDs, and the UID vault is off; expected "
            "RADCACHE_UID_VAULT_KEY set before the studies were stored, or ask without `as`."
        )
    if not results or not results[0].hits:
        raise NotFoundError("the search found no similar series to reference; expected ≥ 1.")
    entry = str(results[0].query.get("entry", ""))
    study = str((res.store.entry_attrs({entry}).get(entry, {}).get("volume") or {}).get("study"))
    hits = [(str(h.record.study), str(h.record.key)) for h in results[0].hits]
    body = res.vault.kos(tenant, (study, entry), hits)
    headers = {}
    if send:
        s = res.settings
        assert s.kos_destination is not None  # checked before searching
        auth = s.kos_destination_auth.get_secret_value() if s.kos_destination_auth else None
        headers[SENT_TO] = deliver(body, s.kos_destination, auth=auth, calling_ae=s.ae_title)
    return Response(body, media_type="application/dicom", headers=headers)


@router.post(
    "/v1/classify",
    response_model=ClassifyOut,
    responses=ERRORS,
    summary="Few-shot classification: kNN vote (T = 0.07) or class prototypes",
)
def classify(req: ClassifyRequest, res: ResourcesDep, who: Search) -> ClassifyOut:
    cat = catalog(res)
    support = (
        [(_query(s.query, cat, who.tenant), s.label) for s in req.support] if req.support else None
    )
    out = res.searcher.classify(
        [_query(q, cat, who.tenant) for q in req.queries],
        support=support,
        label_field=req.label_field,
        k=req.k,
        temperature=req.temperature,
        method=req.method,
        level=req.level,
        space=req.space,
        model=req.model,
        exclude_same_study=req.exclude_same_study,
        tenant=who.tenant,
    )
    return ClassifyOut(predictions=[Prediction.model_validate(c.to_dict()) for c in out])


@router.get("/v1/indexes", response_model=list[IndexOut], summary="The search indexes")
def list_indexes(res: ResourcesDep, who: Read) -> list[IndexOut]:
    """One per (model, recipe) space holding the caller's entries: their count and vectors
    (with an open service: every space, its index type, measured recall and memory)."""
    tenant = None if who.key is None else who.tenant
    return [IndexOut.model_validate(i) for i in res.indexes.info(tenant)]
