"""``RadcacheClient`` and ``AsyncRadcacheClient``: the HTTP API from Python, without torch.

from radcache.clients import RadcacheClient
with RadcacheClient("http://127.0.0.1:8000") as rc:
    job = rc.submit(["study.zip"], wait=True)
    vec = rc.embeddings(job.series[0].series)            # pooled vector
    cls = rc.embeddings(job.series[0].entry, kind="cls")  # (n_slices, D)
    similar = rc.search(series=job.series[0].series, k=10)   # nearest cached series
    by_file = rc.search(files=["query.nii.gz"], k=10)       # embedded on the fly

Each method sends the request that ``_base.Endpoints`` builds for it and decodes the answer
with the decoder that comes with it; :class:`AsyncRadcacheClient` has the same methods, awaitable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import numpy as np

from ._base import (
    BaseClient,
    Call,
    Endpoints,
    Input,
    JobWait,
    RadcacheAPIError,
    check,
    finished,
)
from .schemas import (
    ClassifyOut,
    EntryOut,
    IndexOut,
    JobOut,
    ModelOut,
    SearchOut,
    StudyOut,
    StudyPage,
    SubmitOptions,
)

__all__ = ["AsyncRadcacheClient", "RadcacheAPIError", "RadcacheClient"]

T = TypeVar("T")


class RadcacheClient(BaseClient[httpx.Client]):
    """Synchronous client. ``api_key`` goes with every request as ``Authorization: Bearer``
    (default ``RADCACHE_API_KEY``); ``http`` lets tests pass an ``httpx.Client`` of their own."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 120.0,
        retries: int = 4,
        http: httpx.Client | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(http or httpx.Client(base_url=url, timeout=timeout), retries, api_key)

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
                r = self.http.request(method, path, **kw, **self._auth)
            except httpx.TransportError:
                if (delay := self._retry_delay(attempt, None)) is None:
                    raise
            else:
                if (delay := self._retry_delay(attempt, r.status_code)) is None:
                    return check(r)
            time.sleep(delay)
            attempt += 1

    def _send(self, call: Call[T]) -> T:
        with call.arguments() as kw:
            r = self._call(call.method, call.path, **kw)
        return call.decode(r)

    def submit(
        self,
        inputs: Iterable[Input],
        *,
        wait: bool = True,
        modality: str | None = None,
        patient: str | None = None,
        study: str | None = None,
        options: SubmitOptions | None = None,
        poll: float = 0.5,
        timeout: float | None = None,
    ) -> JobOut:
        """Upload files/directories/zips/NIfTI (one multipart request); optionally wait.
        ``options`` (labels, collection, recipe, …) travel as query parameters. ``patient``
        and ``study`` name the patient and study of NIfTI/NRRD/MHA inputs (a PatientID and
        a StudyInstanceUID, stored as keyed pseudonyms; refused with DICOM files); they
        travel as form fields."""
        refs = {"patient": patient, "study": study}
        job = self._send(Endpoints.submit(inputs, modality, options, refs))
        return self.wait(job.id, poll=poll, timeout=timeout) if wait and not finished(job) else job

    def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None) -> JobOut:
        until = JobWait(job_id, timeout)
        while not until.done(job := self.job(job_id)):
            time.sleep(poll)
        return job

    def job(self, job_id: str) -> JobOut:
        return self._send(Endpoints.job(job_id))

    def jobs(self, limit: int = 50) -> list[JobOut]:
        return self._send(Endpoints.jobs(limit))

    def series(self, series: str) -> EntryOut:
        return self._send(Endpoints.series(series))

    def embeddings(
        self, series: str, kind: str = "pooled", *, slices: str | None = None
    ) -> np.ndarray:
        """An array of a cached series (``.npy`` on the wire)."""
        return self._send(Endpoints.embeddings(series, kind, slices))

    def studies(self, limit: int = 100, offset: int = 0) -> list[StudyOut]:
        return self._send(Endpoints.studies(limit, offset))

    def studies_page(self, limit: int = 100, cursor: str | None = None) -> StudyPage:
        """A page of cached studies in name order; pass its ``next`` as ``cursor`` for the
        following one (None: that was the last)."""
        return self._send(Endpoints.studies_page(limit, cursor))

    def delete(self, study: str, *, wait: bool = False) -> JobOut | None:
        """Delete a study (consent withdrawal). It leaves every answer and search at once;
        the returned erasure job is done once nothing on disk names it (``wait``: wait for
        that). None: nothing named the study."""
        job = self._send(Endpoints.delete(study))
        return self.wait(job.id) if job is not None and wait else job

    def models(self) -> list[ModelOut]:
        return self._send(Endpoints.models())

    def search(self, files: Iterable[Input] | None = None, **fields: Any) -> SearchOut:
        """Similar cases. Name the query (``series=``, ``study=``, ``entry=``, ``slice=``,
        ``vector=``) or upload ``files``; other keywords are :class:`SearchRequest` fields
        (``k``, ``level``, ``group_by``, ``filters``, ``exclude_same_patient``…)."""
        return self._send(Endpoints.search(files, fields))

    def search_kos(self, **fields: Any) -> bytes:
        """The hits of a search by a cached series (``series=``, ``study=``, ``entry=``) as a
        DICOM Key Object Selection document (the bytes of a ``.dcm`` file) that references
        their original series; needs the service's UID vault."""
        return self._send(Endpoints.search_kos(fields))

    def classify(
        self,
        queries: Iterable[dict[str, Any] | str],
        *,
        support: Iterable[tuple[dict[str, Any] | str, Any]] | None = None,
        **fields: Any,
    ) -> ClassifyOut:
        """Few-shot labels for ``queries`` (series names, or query dicts) from ``support``
        pairs or ``label_field=…``; other keywords are :class:`ClassifyRequest` fields."""
        return self._send(Endpoints.classify(queries, support, fields))

    def indexes(self) -> list[IndexOut]:
        return self._send(Endpoints.indexes())


class AsyncRadcacheClient(BaseClient[httpx.AsyncClient]):
    """The same API for asyncio code: every method of :class:`RadcacheClient`, awaitable."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 120.0,
        retries: int = 4,
        http: httpx.AsyncClient | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(http or httpx.AsyncClient(base_url=url, timeout=timeout), retries, api_key)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                r = await self.http.request(method, path, **kw, **self._auth)
            except httpx.TransportError:
                if (delay := self._retry_delay(attempt, None)) is None:
                    raise
            else:
                if (delay := self._retry_delay(attempt, r.status_code)) is None:
                    return check(r)
            await asyncio.sleep(delay)
            attempt += 1

    async def _send(self, call: Call[T]) -> T:
        with call.arguments() as kw:
            r = await self._call(call.method, call.path, **kw)
        return call.decode(r)

    async def submit(
        self,
        inputs: Iterable[Input],
        *,
        wait: bool = True,
        modality: str | None = None,
        patient: str | None = None,
        study: str | None = None,
        options: SubmitOptions | None = None,
        poll: float = 0.5,
        timeout: float | None = None,
    ) -> JobOut:
        refs = {"patient": patient, "study": study}
        job = await self._send(Endpoints.submit(inputs, modality, options, refs))
        if wait and not finished(job):
            return await self.wait(job.id, poll=poll, timeout=timeout)
        return job

    async def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None) -> JobOut:
        until = JobWait(job_id, timeout)
        while not until.done(job := await self.job(job_id)):
            await asyncio.sleep(poll)
        return job

    async def job(self, job_id: str) -> JobOut:
        return await self._send(Endpoints.job(job_id))

    async def jobs(self, limit: int = 50) -> list[JobOut]:
        return await self._send(Endpoints.jobs(limit))

    async def series(self, series: str) -> EntryOut:
        return await self._send(Endpoints.series(series))

    async def embeddings(
        self, series: str, kind: str = "pooled", *, slices: str | None = None
    ) -> np.ndarray:
        return await self._send(Endpoints.embeddings(series, kind, slices))

    async def studies(self, limit: int = 100, offset: int = 0) -> list[StudyOut]:
        return await self._send(Endpoints.studies(limit, offset))

    async def studies_page(self, limit: int = 100, cursor: str | None = None) -> StudyPage:
        return await self._send(Endpoints.studies_page(limit, cursor))

    async def delete(self, study: str, *, wait: bool = False) -> JobOut | None:
        """As :meth:`RadcacheClient.delete`."""
        job = await self._send(Endpoints.delete(study))
        return await self.wait(job.id) if job is not None and wait else job

    async def models(self) -> list[ModelOut]:
        return await self._send(Endpoints.models())

    async def search(self, files: Iterable[Input] | None = None, **fields: Any) -> SearchOut:
        return await self._send(Endpoints.search(files, fields))

    async def search_kos(self, **fields: Any) -> bytes:
        return await self._send(Endpoints.search_kos(fields))

    async def classify(
        self,
        queries: Iterable[dict[str, Any] | str],
        *,
        support: Iterable[tuple[dict[str, Any] | str, Any]] | None = None,
        **fields: Any,
    ) -> ClassifyOut:
        return await self._send(Endpoints.classify(queries, support, fields))

    async def indexes(self) -> list[IndexOut]:
        return await self._send(Endpoints.indexes())
