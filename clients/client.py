"""``RadcacheClient`` and ``AsyncRadcacheClient``: the HTTP API from Python, without torch.

from radcache.clients import RadcacheClient
with RadcacheClient("http://127.0.0.1:8000") as rc:
    job = rc.submit(["study.zip"], wait=True)
    vec = rc.embeddings(job.series[0].series)            # pooled vector
    cls = rc.embeddings(job.series[0].entry, kind="cls")  # (n_slices, D)
    similar = rc.search(series=job.series[0].series, k=10)   # nearest cached series
    by_file = rc.search(files=["query.nii.gz"], k=10)       # embedded on the fly
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

import httpx
import numpy as np

from ._core import (
    Input,
    RadcacheAPIError,
    check,
    classify_body,
    finished,
    npy,
    retry_delay,
    search_request,
    upload,
)
from .models import ClassifyOut, EntryOut, IndexOut, JobOut, ModelOut, SearchOut, StudyOut

__all__ = ["AsyncRadcacheClient", "RadcacheAPIError", "RadcacheClient"]


def _params(kind: str, slices: str | None) -> dict[str, str]:
    return {"kind": kind, **({"slices": slices} if slices else {})}


class RadcacheClient:
    """Synchronous client. ``http`` lets tests pass an ``httpx.Client`` of their own."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 120.0,
        retries: int = 4,
        http: httpx.Client | None = None,
    ) -> None:
        self.http = http or httpx.Client(base_url=url, timeout=timeout)
        self.retries = retries

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TransportError:
                if (delay := retry_delay(attempt, self.retries, None)) is None:
                    raise
            else:
                if (delay := retry_delay(attempt, self.retries, r.status_code)) is None:
                    return check(r)
            time.sleep(delay)
            attempt += 1

    def submit(
        self,
        inputs: Iterable[Input],
        *,
        wait: bool = True,
        modality: str | None = None,
        poll: float = 0.5,
        timeout: float | None = None,
    ) -> JobOut:
        """Upload files/directories/zips/NIfTI (one multipart request); optionally wait."""
        params = {"modality": modality} if modality else None
        with upload(inputs) as files:
            job = JobOut.model_validate(
                self._call("POST", "/v1/studies", files=files, params=params).json()
            )
        return self.wait(job.id, poll=poll, timeout=timeout) if wait and not finished(job) else job

    def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None) -> JobOut:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if finished(job):
                return job
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
            time.sleep(poll)

    def job(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._call("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self, limit: int = 50) -> list[JobOut]:
        return [
            JobOut.model_validate(j)
            for j in self._call("GET", "/v1/jobs", params={"limit": limit}).json()
        ]

    def series(self, series: str) -> EntryOut:
        return EntryOut.model_validate(self._call("GET", f"/v1/series/{series}").json())

    def embeddings(
        self, series: str, kind: str = "pooled", *, slices: str | None = None
    ) -> np.ndarray:
        """An array of a cached series (``.npy`` on the wire)."""
        r = self._call(
            "GET",
            f"/v1/series/{series}/embeddings",
            params=_params(kind, slices),
            headers={"accept": "application/x-npy"},
        )
        return npy(r)

    def studies(self, limit: int = 100, offset: int = 0) -> list[StudyOut]:
        r = self._call("GET", "/v1/studies", params={"limit": limit, "offset": offset})
        return [StudyOut.model_validate(s) for s in r.json()]

    def delete(self, study: str) -> None:
        self._call("DELETE", f"/v1/studies/{study}")

    def models(self) -> list[ModelOut]:
        return [ModelOut.model_validate(m) for m in self._call("GET", "/v1/models").json()]

    def search(self, files: Iterable[Input] | None = None, **fields: Any) -> SearchOut:
        """Similar cases. Name the query (``series=``, ``study=``, ``entry=``, ``slice=``,
        ``vector=``) or upload ``files``; other keywords are :class:`SearchRequest` fields
        (``k``, ``level``, ``group_by``, ``filters``, ``exclude_same_patient``…)."""
        kw = search_request(files is not None, fields)
        if files is None:
            return SearchOut.model_validate(self._call("POST", "/v1/search", **kw).json())
        with upload(files) as parts:
            r = self._call("POST", "/v1/search", files=parts, **kw)
        return SearchOut.model_validate(r.json())

    def classify(
        self,
        queries: Iterable[dict[str, Any] | str],
        *,
        support: Iterable[tuple[dict[str, Any] | str, Any]] | None = None,
        **fields: Any,
    ) -> ClassifyOut:
        """Few-shot labels for ``queries`` (series names, or query dicts) from ``support``
        pairs or ``label_field=…``; other keywords are :class:`ClassifyRequest` fields."""
        body = classify_body(queries, support, fields)
        return ClassifyOut.model_validate(self._call("POST", "/v1/classify", json=body).json())

    def indexes(self) -> list[IndexOut]:
        return [IndexOut.model_validate(i) for i in self._call("GET", "/v1/indexes").json()]


class AsyncRadcacheClient:
    """The same API for asyncio code."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 120.0,
        retries: int = 4,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.http = http or httpx.AsyncClient(base_url=url, timeout=timeout)
        self.retries = retries

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                r = await self.http.request(method, path, **kw)
            except httpx.TransportError:
                if (delay := retry_delay(attempt, self.retries, None)) is None:
                    raise
            else:
                if (delay := retry_delay(attempt, self.retries, r.status_code)) is None:
                    return check(r)
            await asyncio.sleep(delay)
            attempt += 1

    async def submit(
        self,
        inputs: Iterable[Input],
        *,
        wait: bool = True,
        modality: str | None = None,
        poll: float = 0.5,
        timeout: float | None = None,
    ) -> JobOut:
        params = {"modality": modality} if modality else None
        with upload(inputs) as files:
            job = JobOut.model_validate(
                (await self._call("POST", "/v1/studies", files=files, params=params)).json()
            )
        return (
            await self.wait(job.id, poll=poll, timeout=timeout)
            if wait and not finished(job)
            else job
        )

    async def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None) -> JobOut:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if finished(job):
                return job
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
            await asyncio.sleep(poll)

    async def job(self, job_id: str) -> JobOut:
        return JobOut.model_validate((await self._call("GET", f"/v1/jobs/{job_id}")).json())

    async def embeddings(
        self, series: str, kind: str = "pooled", *, slices: str | None = None
    ) -> np.ndarray:
        r = await self._call(
            "GET",
            f"/v1/series/{series}/embeddings",
            params=_params(kind, slices),
            headers={"accept": "application/x-npy"},
        )
        return npy(r)

    async def studies(self, limit: int = 100, offset: int = 0) -> list[StudyOut]:
        r = await self._call("GET", "/v1/studies", params={"limit": limit, "offset": offset})
        return [StudyOut.model_validate(s) for s in r.json()]

    async def delete(self, study: str) -> None:
        await self._call("DELETE", f"/v1/studies/{study}")

    async def search(self, files: Iterable[Input] | None = None, **fields: Any) -> SearchOut:
        kw = search_request(files is not None, fields)
        if files is None:
            return SearchOut.model_validate((await self._call("POST", "/v1/search", **kw)).json())
        with upload(files) as parts:
            r = await self._call("POST", "/v1/search", files=parts, **kw)
        return SearchOut.model_validate(r.json())

    async def classify(
        self,
        queries: Iterable[dict[str, Any] | str],
        *,
        support: Iterable[tuple[dict[str, Any] | str, Any]] | None = None,
        **fields: Any,
    ) -> ClassifyOut:
        body = classify_body(queries, support, fields)
        r = await self._call("POST", "/v1/classify", json=body)
        return ClassifyOut.model_validate(r.json())
