"""``/v1/jobs``: the state, progress and per-series report of submitted studies."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from radcache.clients.schemas import JobOut
from radcache.embeddings.errors import NotFoundError

from ..auth import Read
from ..deps import ResourcesDep
from ._common import ERRORS, job_out

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/jobs/{job_id}", response_model=JobOut, responses=ERRORS, summary="One job")
def get_job(job_id: str, res: ResourcesDep, who: Read) -> JobOut:
    row = res.jobs.get(job_id, who.tenant)
    if row is None:
        raise NotFoundError(f"no job {job_id!r}; GET /v1/jobs lists recent jobs.")
    return job_out(row)


@router.get("/v1/jobs", response_model=list[JobOut], summary="Recent jobs, newest first")
def list_jobs(
    res: ResourcesDep, who: Read, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> list[JobOut]:
    """The caller's tenant's jobs."""
    return [job_out(r) for r in res.jobs.recent(limit, who.tenant)]
