"""What several routes share: error responses for the OpenAPI, the submission options
every way in takes as query parameters, the entry catalog, and the wire forms of jobs,
entries and studies."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query

from radcache.clients.schemas import EntryOut, JobOut, Problem, StudyOut, SubmitOptions
from radcache.embeddings import EntryInfo

from ..deps import Resources
from ..entry_catalog import EntryCatalog
from ..jobs import JobRow, kind_of
from ..problems import PROBLEM

__all__ = [
    "ERRORS",
    "SubmitQuery",
    "catalog",
    "entry_out",
    "job_out",
    "study_out",
]

ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": Problem, "content": {PROBLEM: {}}} for s in (400, 404, 413, 415, 422, 503)
}


def _about(name: str) -> str:
    return SubmitOptions.model_fields[name].description or name


def _submit_query(
    modality: Annotated[str | None, Query(description=_about("modality"), examples=["CT"])] = None,
    model: Annotated[str | None, Query(description=_about("model"))] = None,
    patch_storage: Annotated[str | None, Query(description=_about("patch_storage"))] = None,
    patch_tokens: Annotated[bool | None, Query(description=_about("patch_tokens"))] = None,
    recipe: Annotated[str | None, Query(description=_about("recipe"))] = None,
    protocol: Annotated[str | None, Query(description=_about("protocol"))] = None,
    roi: Annotated[str | None, Query(description=_about("roi"))] = None,
    labels: Annotated[str | None, Query(description=_about("labels"))] = None,
    collection: Annotated[str | None, Query(description=_about("collection"))] = None,
    sequences: Annotated[str | None, Query(description=_about("sequences"))] = None,
    fusion: Annotated[str | None, Query(description=_about("fusion"))] = None,
) -> dict[str, Any]:
    given = {
        "modality": modality,
        "model": model,
        "patch_storage": patch_storage,
        "patch_tokens": patch_tokens,
        "recipe": recipe,
        "protocol": protocol,
        "roi": roi,
        "labels": labels,
        "collection": collection,
        "sequences": sequences,
        "fusion": fusion,
    }
    return {k: v for k, v in given.items() if v is not None}


# The options of a submission given as query parameters (JSON text for objects).
SubmitQuery = Annotated[dict[str, Any], Depends(_submit_query)]


def job_out(row: JobRow) -> JobOut:
    report = row.report or {}
    return JobOut.model_validate(
        {
            "id": row.id,
            "kind": kind_of(row),
            "state": row.state,
            "created": row.created,  # aware UTC (UtcDateTime): RFC 3339 with its offset
            "started": row.started,
            "finished": row.finished,
            "failure": row.failure,
            "progress": {"done": row.slices_done, "total": row.slices_total},
            "series": report.get("series", []),
            "errors": report.get("errors", []),
            "skipped": report.get("skipped", []),
        }
    )


def entry_out(e: EntryInfo) -> EntryOut:
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


def catalog(res: Resources) -> EntryCatalog:
    """The entry catalog the index keeper keeps in step with the store."""
    return res.keeper.catalog or EntryCatalog(res.jobs)


def study_out(study: str, entries: list[EntryInfo]) -> StudyOut:
    return StudyOut(
        study=study,
        modalities=sorted({e.modality for e in entries if e.modality}),
        series=[entry_out(e) for e in entries],
    )
