"""HTTP routes (/v1 and health). Handlers compose radcache.embeddings; they embed nothing.

An upload is written to its own directory, then either answered at once (every file
already seen and cached: 200) or queued for the worker (202 + ``Location``).
"""

from __future__ import annotations

import io
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from radcache.clients.models import EntryOut, Health, JobOut, ModelOut, Problem, StudyOut
from radcache.embeddings import REGISTRY, EmbedReport, EntryInfo
from radcache.embeddings.errors import InputError, NotFoundError, RadcacheError

from .app import Resources, ResourcesDep
from .jobs import JobRow
from .options import FIELDS, job_options, job_pipeline
from .problems import PROBLEM, problem

__all__ = ["ERRORS", "router", "save_upload"]

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": Problem, "content": {PROBLEM: {}}} for s in (400, 404, 413, 415, 422, 503)
}
_BODY_TYPES = {
    "application/zip": "upload.zip",
    "application/x-zip-compressed": "upload.zip",
    "application/dicom": "upload.dcm",
    "application/octet-stream": "upload.bin",
    "application/gzip": "upload.nii.gz",
    "application/x-nifti": "upload.nii",
}


class PayloadTooLargeError(RadcacheError):
    code = "payload-too-large"
    status = 413
    title = "Upload too large"


class EmptyUploadError(InputError):
    code = "empty-upload"
    status = 400
    title = "Nothing uploaded"


class UnsupportedMediaTypeError(InputError):
    code = "unsupported-media-type"
    status = 415
    title = "Unsupported media type"


def _job_out(row: JobRow) -> JobOut:
    report = row.report or {}
    return JobOut.model_validate(
        {
            "id": row.id,
            "state": row.state,
            "created": row.created,
            "started": row.started,
            "finished": row.finished,
            "failure": row.failure,
            "progress": {"done": row.slices_done, "total": row.slices_total},
            "series": report.get("series", []),
            "errors": report.get("errors", []),
        }
    )


def _safe_name(name: str | None, index: int) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "").name).strip("._") or "file"
    return f"{index:05d}-{base}"[:200]


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


async def save_upload(
    request: Request, dest: Path, limit: int, fields: tuple[str, ...] = FIELDS
) -> dict[str, Any]:
    """Stream the request into ``dest`` (one file per part); returns the form ``fields``."""
    declared = int(request.headers.get("content-length") or 0)
    budget = Budget(limit)
    budget.spend(declared)  # refuse early when the client says how big it is
    budget.left = limit
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options: dict[str, Any] = {}
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
                    options[key] = str(value)
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
    return options


@router.post(
    "/v1/studies",
    status_code=202,
    response_model=JobOut,
    responses={200: {"model": JobOut, "description": "every series was already cached"}, **ERRORS},
    summary="Submit a study (DICOM files, zips, NIfTI) for embedding",
)
async def submit_study(
    request: Request,
    res: ResourcesDep,
    modality: Annotated[
        str | None, Query(description="modality of NIfTI inputs", examples=["CT"])
    ] = None,
    model: Annotated[str | None, Query(description="must name the loaded model")] = None,
    patch_tokens: Annotated[bool | None, Query(description="keep patch-token grids")] = None,
) -> Response:
    """Upload as ``multipart/form-data`` (any number of files, plus optional fields
    ``modality``, ``model``, ``patch_tokens``, ``recipe`` (JSON) and ``labels`` (a JSON
    object recorded with every series)) or as one body (``application/zip``,
    ``application/dicom``, NIfTI) with the simple options as query parameters."""
    res.worker.check_capacity()
    dest = res.settings.upload_dir / uuid.uuid4().hex
    dest.mkdir(parents=True)
    try:
        fields = await save_upload(request, dest, res.settings.max_upload_bytes)
        query = {"modality": modality, "model": model, "patch_tokens": patch_tokens}
        raw = {**fields, **{k: v for k, v in query.items() if v is not None}}
        cfg = res.encoder.cfg
        options = job_options(raw, loaded_model=cfg.name, multi_sequence=cfg.multi_sequence)
        pipeline = job_pipeline(res.pipeline, options)
        known: EmbedReport | None = (
            None  # a study's entry is keyed by all its sequences: no per-file shortcut
            if options.get("multi_sequence")
            else await run_in_threadpool(pipeline.recognise, [dest])
        )
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if known is not None:
        shutil.rmtree(dest, ignore_errors=True)
        for s in known.series:
            res.store.annotate(
                s.entry, labels=options.get("labels"), collection=options.get("collection")
            )
        res.keeper.touch([s.entry for s in known.series])
        res.metrics.job(0.0, [s.to_dict() for s in known.series])
        row = res.jobs.create(str(dest), state="done", report=known.to_dict(), options=options)
        row.slices_done = row.slices_total = sum(s.slices for s in known.series)
        res.jobs.update(row.id, slices_done=row.slices_done, slices_total=row.slices_total)
        return JSONResponse(_job_out(row).model_dump(mode="json"), status_code=200)
    row = res.jobs.create(str(dest), options=options)
    res.worker.submit(row.id)
    return JSONResponse(
        _job_out(row).model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/jobs/{row.id}"},
    )


@router.get("/v1/jobs/{job_id}", response_model=JobOut, responses=ERRORS, summary="One job")
def get_job(job_id: str, res: ResourcesDep) -> JobOut:
    row = res.jobs.get(job_id)
    if row is None:
        raise NotFoundError(f"no job {job_id!r}; GET /v1/jobs lists recent jobs.")
    return _job_out(row)


@router.get("/v1/jobs", response_model=list[JobOut], summary="Recent jobs, newest first")
def list_jobs(res: ResourcesDep, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[JobOut]:
    return [_job_out(r) for r in res.jobs.recent(limit)]


def _entry_out(res: Resources, series: str) -> EntryOut:
    return _entry(res.store.resolve(series))


def _entry(e: EntryInfo) -> EntryOut:
    a = e.attrs
    return EntryOut(
        entry=e.key,
        study=e.study,
        series=e.series,
        part=e.part,
        modality=e.modality,
        slices=e.n_slices,
        dim=e.dim,
        model=e.model,
        recipe_hash=e.recipe_hash,
        precision=e.precision,
        kinds=list(e.kinds),
        created=e.created,
        labels=dict(a.get("labels", {})),
        geometry=dict(a.get("geometry", {})),
        recipe=dict(a.get("recipe", {})),
    )


def cached_studies(res: Resources) -> dict[str, list[EntryInfo]]:
    out: dict[str, list[EntryInfo]] = {}
    for e in res.store.iter_entries():
        for study in {e.study, *(a.get("study") for a in e.attrs.get("aliases", []))}:
            out.setdefault(str(study), []).append(e)
    return out


def _study_out(study: str, entries: list[EntryInfo]) -> StudyOut:
    return StudyOut(
        study=study,
        modalities=sorted({e.modality for e in entries if e.modality}),
        series=[_entry(e) for e in entries],
    )


@router.get("/v1/studies", response_model=list[StudyOut], summary="Cached studies")
def list_studies(
    res: ResourcesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[StudyOut]:
    studies = sorted(cached_studies(res).items())[offset : offset + limit]
    return [_study_out(s, es) for s, es in studies]


@router.get(
    "/v1/studies/{study}", response_model=StudyOut, responses=ERRORS, summary="One cached study"
)
def get_study(study: str, res: ResourcesDep) -> StudyOut:
    entries = cached_studies(res).get(study)
    if not entries:
        raise NotFoundError(f"no cached study {study!r}; GET /v1/studies lists them.")
    return _study_out(study, entries)


@router.delete(
    "/v1/studies/{study}",
    status_code=204,
    responses=ERRORS,
    summary="Delete a study's embeddings and metadata (consent withdrawal); idempotent",
)
def delete_study(study: str, res: ResourcesDep) -> Response:
    named = res.indexes.study_entries(study)
    gone = set(res.store.delete_study(study))
    res.keeper.refresh()  # its vectors leave the index before this answers
    res.keeper.touch(k for k in named if k not in gone)  # kept by another study: renamed
    return Response(status_code=204)


@router.get(
    "/v1/series/{series}", response_model=EntryOut, responses=ERRORS, summary="A cached series"
)
def get_series(series: str, res: ResourcesDep) -> EntryOut:
    """``series`` is a series name, ``series#part``, or an entry key."""
    return _entry_out(res, series)


Kind = Literal["pooled", "cls", "mean_patch", "patch", "cls_last", "cls_last4", "positions"]


def _npy_stream(arr: np.ndarray) -> Iterator[bytes]:
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    yield head.getvalue()
    flat = np.ascontiguousarray(arr).data.cast("B")
    for i in range(0, len(flat), 1 << 20):
        yield bytes(flat[i : i + (1 << 20)])


@router.get(
    "/v1/series/{series}/embeddings",
    responses={200: {"content": {"application/json": {}, "application/x-npy": {}}}, **ERRORS},
    summary="Embeddings of a cached series (JSON or .npy)",
)
def get_embeddings(
    series: str,
    res: ResourcesDep,
    kind: Kind = "pooled",
    slices: Annotated[str | None, Query(pattern=r"^\d*:\d*$", examples=["0:16"])] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """``pooled`` answers JSON by default, arrays answer ``application/x-npy``; ``Accept``
    chooses. ``slices=a:b`` cuts per-slice arrays."""
    info = res.store.resolve(series)
    arr = res.store.read(info.key, "cls_last" if kind == "cls_last4" else kind)
    if slices and arr.ndim > 1:
        a, _, b = slices.partition(":")
        arr = arr[int(a) if a else None : int(b) if b else None]
    wants = (accept or "").lower()
    as_json = "application/json" in wants or (kind == "pooled" and "application/x-npy" not in wants)
    if as_json:
        return JSONResponse(
            {
                "entry": info.key,
                "kind": kind,
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "data": arr.astype(np.float64).tolist(),
            }
        )
    return StreamingResponse(
        _npy_stream(arr),
        media_type="application/x-npy",
        headers={"Content-Disposition": f'attachment; filename="{info.key}-{kind}.npy"'},
    )


@router.get("/v1/models", response_model=list[ModelOut], summary="The model registry")
def list_models(res: ResourcesDep) -> list[ModelOut]:
    loaded = res.encoder.cfg.name
    return [
        ModelOut(
            name=c.name,
            hf_id=c.hf_id,
            dim=c.dim,
            patch_size=c.patch_size,
            image_size=c.image_size,
            num_registers=c.num_registers,
            random_weights=c.random_weights,
            loaded=c.name == loaded,
        )
        for c in REGISTRY.values()
    ]


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain; version=0.0.4": {}}}},
    summary="Prometheus metrics",
)
def metrics(res: ResourcesDep) -> Response:
    return Response(res.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz", response_model=Health, responses=ERRORS, summary="Model loaded, store writable"
)
def readyz(res: ResourcesDep) -> Response:
    ok, why = res.ready()
    if not ok:
        return problem(503, "not-ready", "Not ready", why, "/readyz")
    return JSONResponse(
        Health(model=res.encoder.cfg.label, queue_depth=res.worker.depth).model_dump()
    )
