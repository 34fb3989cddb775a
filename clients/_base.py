"""What the sync and async clients share: each endpoint once, as a :class:`Call` (method,
path, arguments, decoder) that either client sends; the retry policy; problem → error;
when to stop waiting for a job; the base class both clients build on."""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import httpx
import numpy as np
from pydantic import BaseModel

from radcache.embeddings.errors import ConfigError, RadcacheError

from .schemas import (
    ClassifyOut,
    ClassifyRequest,
    EntryOut,
    IndexOut,
    JobOut,
    ModelOut,
    SearchOut,
    SearchQuery,
    SearchRequest,
    StudyOut,
    StudyPage,
    SubmitOptions,
)

__all__ = [
    "RETRY_STATUSES",
    "BaseClient",
    "BearerKey",
    "Call",
    "Endpoints",
    "JobWait",
    "RadcacheAPIError",
    "backoff",
    "check",
    "classify_body",
    "finished",
    "iter_files",
    "npy",
    "parts",
    "retry_delay",
    "search_request",
    "study_page",
    "upload",
]

RETRY_STATUSES = {429, 502, 503, 504}
Input = str | os.PathLike[str] | bytes | tuple[str, bytes]
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
H = TypeVar("H", httpx.Client, httpx.AsyncClient)


class RadcacheAPIError(RadcacheError):
    """An error answer from the service: its RFC 9457 problem ``code``, ``title`` and
    ``detail``, with the HTTP ``status`` it came with."""

    def __init__(self, status: int, code: str, title: str, detail: str) -> None:
        super().__init__(f"[{code}] {detail} (HTTP {status})")
        self.status, self.code, self.title, self.detail = status, code, title, detail


def check(response: httpx.Response) -> httpx.Response:
    """Raise :class:`RadcacheAPIError` for an error answer, else return it."""
    if response.status_code < 400:
        return response
    try:
        body = response.json()
    except ValueError:
        body = {}
    raise RadcacheAPIError(
        response.status_code,
        str(body.get("code", f"http-{response.status_code}")),
        str(body.get("title", response.reason_phrase)),
        str(body.get("detail", response.text[:500])),
    )


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): 0.5, 1, 2, 4 … capped at 10."""
    return float(min(10.0, 0.5 * 2**attempt))


def retry_delay(attempt: int, retries: int, status: int | None) -> float | None:
    """Seconds to wait before trying again, or None to stop here.

    ``status`` is the answer's HTTP status, or None for a transport error.
    """
    if attempt >= retries or (status is not None and status not in RETRY_STATUSES):
        return None
    return backoff(attempt)


@contextlib.contextmanager
def upload(inputs: Iterable[Input]) -> Iterator[list[tuple[str, Any]]]:
    """Multipart parts for ``inputs``, with file handles closed afterwards."""
    files, handles = parts(list(iter_files(inputs)))
    try:
        yield files
    finally:
        for h in handles:
            h.close()


def iter_files(inputs: Iterable[Input]) -> Iterator[tuple[str, bytes | Path]]:
    """(name, bytes or path) for every file in ``inputs``; directories are walked."""
    for i, item in enumerate(inputs):
        if isinstance(item, bytes):
            yield f"upload-{i}", item
        elif isinstance(item, tuple):
            yield item
        else:
            p = Path(item)
            if p.is_dir():
                for f in sorted(q for q in p.rglob("*") if q.is_file()):
                    yield str(f.relative_to(p)), f
            else:
                yield p.name, p


def parts(files: list[tuple[str, bytes | Path]]) -> tuple[list[tuple[str, Any]], list[IO[bytes]]]:
    """Multipart parts for ``files`` (paths opened lazily as streams) and the handles to close."""
    handles: list[IO[bytes]] = []
    out: list[tuple[str, Any]] = []
    for name, data in files:
        if isinstance(data, Path):
            fh = data.open("rb")
            handles.append(fh)
            out.append(("files", (name, fh, "application/octet-stream")))
        else:
            out.append(("files", (name, data, "application/octet-stream")))
    return out, handles


_QUERY_FIELDS = ("entry", "series", "study", "slice", "vector")


def search_request(upload: bool, fields: dict[str, Any]) -> dict[str, Any]:
    """The request arguments of a search: ``series=…``/``study=…``/``entry=…``/``slice=…``/
    ``vector=…`` name the query (none when files are uploaded); the rest are
    :class:`SearchRequest` fields (``k``, ``level``, ``group_by``, ``filters``, …)."""
    named = {k: fields.pop(k, None) for k in _QUERY_FIELDS}
    query = {k: v for k, v in named.items() if v is not None}
    if "vector" in query:
        query["vector"] = [float(x) for x in np.asarray(query["vector"]).ravel()]
    req = SearchRequest.model_validate(
        {**fields, "query": None if upload else SearchQuery.model_validate(query)}
    )
    if upload:
        return {"data": {"request": req.model_dump_json(exclude_none=True)}}
    return {"json": req.model_dump(mode="json", exclude_none=True)}


def classify_body(
    queries: Iterable[dict[str, Any] | str],
    support: Iterable[tuple[dict[str, Any] | str, Any]] | None,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """The JSON of a classify request; a bare string names a series."""

    def q(x: dict[str, Any] | str) -> dict[str, Any]:
        return {"series": x} if isinstance(x, str) else x

    body = {
        **fields,
        "queries": [q(x) for x in queries],
        "support": [{"query": q(x), "label": lab} for x, lab in support] if support else None,
    }
    return ClassifyRequest.model_validate(body).model_dump(mode="json", exclude_none=True)


def npy(response: httpx.Response) -> np.ndarray:
    return np.asarray(np.load(io.BytesIO(response.content), allow_pickle=False))


def study_page(response: httpx.Response) -> StudyPage:
    """A page of studies, with the next page's cursor from the ``Link: <…>; rel="next"``
    header."""
    nxt = response.links.get("next", {}).get("url")
    cursor = httpx.URL(nxt).params.get("cursor") if nxt else None
    return StudyPage(studies=[StudyOut.model_validate(x) for x in response.json()], next=cursor)


def finished(job: JobOut) -> bool:
    return job.state not in ("queued", "running")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request to the service and how to read its answer; ``files`` are uploaded as
    multipart parts, opened only while the request is sent."""

    method: str
    path: str
    decode: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    files: Iterable[Input] | None = None

    @contextlib.contextmanager
    def arguments(self) -> Iterator[dict[str, Any]]:
        """The keyword arguments of ``httpx`` ``request()``, with the files open meanwhile."""
        kw = {"params": self.params, "json": self.json, "data": self.data, "headers": self.headers}
        kw = {k: v for k, v in kw.items() if v is not None}
        if self.files is None:
            yield kw
        else:
            with upload(self.files) as files:
                yield {**kw, "files": files}


def _one(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: model.model_validate(r.json())


def _many(model: type[M]) -> Callable[[httpx.Response], list[M]]:
    return lambda r: [model.model_validate(x) for x in r.json()]


def _content(response: httpx.Response) -> bytes:
    return response.content


def _nothing(response: httpx.Response) -> None:
    return None


def _job_or_nothing(response: httpx.Response) -> JobOut | None:
    return None if response.status_code == 204 else JobOut.model_validate(response.json())


class Endpoints:
    """Each endpoint of the HTTP API, once: the :class:`Call` a client method sends."""

    @staticmethod
    def submit(
        inputs: Iterable[Input],
        modality: str | None,
        options: SubmitOptions | None,
        refs: Mapping[str, str | None] | None = None,
    ) -> Call[JobOut]:
        """Options as query parameters, but the patient and study references (``refs``
        override ``options``') as multipart form fields: a URL's query string is logged."""
        opts = options or SubmitOptions()
        if modality:
            opts = opts.model_copy(update={"modality": modality.upper()})
        given = {k: v for k, v in (refs or {}).items() if v is not None}
        if given:
            opts = SubmitOptions.model_validate({**opts.model_dump(), **given})
        fields = opts.fields()
        data = {k: fields.pop(k) for k in opts.refs} or None
        return Call(
            "POST", "/v1/studies", _one(JobOut), params=fields or None, data=data, files=inputs
        )

    @staticmethod
    def job(job_id: str) -> Call[JobOut]:
        return Call("GET", f"/v1/jobs/{job_id}", _one(JobOut))

    @staticmethod
    def jobs(limit: int) -> Call[list[JobOut]]:
        return Call("GET", "/v1/jobs", _many(JobOut), params={"limit": limit})

    @staticmethod
    def series(series: str) -> Call[EntryOut]:
        return Call("GET", f"/v1/series/{series}", _one(EntryOut))

    @staticmethod
    def embeddings(series: str, kind: str, slices: str | None) -> Call[np.ndarray]:
        params = {"kind": kind, **({"slices": slices} if slices else {})}
        headers = {"accept": "application/x-npy"}
        return Call("GET", f"/v1/series/{series}/embeddings", npy, params=params, headers=headers)

    @staticmethod
    def studies(limit: int, offset: int) -> Call[list[StudyOut]]:
        params = {"limit": limit, "offset": offset}
        return Call("GET", "/v1/studies", _many(StudyOut), params=params)

    @staticmethod
    def studies_page(limit: int, cursor: str | None) -> Call[StudyPage]:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return Call("GET", "/v1/studies", study_page, params=params)

    @staticmethod
    def delete(study: str) -> Call[JobOut | None]:
        return Call("DELETE", f"/v1/studies/{study}", _job_or_nothing)

    @staticmethod
    def models() -> Call[list[ModelOut]]:
        return Call("GET", "/v1/models", _many(ModelOut))

    @staticmethod
    def search(files: Iterable[Input] | None, fields: dict[str, Any]) -> Call[SearchOut]:
        kw = search_request(files is not None, fields)
        return Call("POST", "/v1/search", _one(SearchOut), files=files, **kw)

    @staticmethod
    def search_kos(fields: dict[str, Any]) -> Call[bytes]:
        kw = search_request(False, {**fields, "as_": "kos"})
        return Call("POST", "/v1/search", _content, **kw)

    @staticmethod
    def classify(
        queries: Iterable[dict[str, Any] | str],
        support: Iterable[tuple[dict[str, Any] | str, Any]] | None,
        fields: dict[str, Any],
    ) -> Call[ClassifyOut]:
        body = classify_body(queries, support, fields)
        return Call("POST", "/v1/classify", _one(ClassifyOut), json=body)

    @staticmethod
    def indexes() -> Call[list[IndexOut]]:
        return Call("GET", "/v1/indexes", _many(IndexOut))


@dataclass
class JobWait:
    """When to stop polling job ``job_id``: once it finished, or (raising TimeoutError) once
    ``timeout`` seconds have passed since this was made."""

    job_id: str
    timeout: float | None
    end: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.end = None if self.timeout is None else time.monotonic() + self.timeout

    def done(self, job: JobOut) -> bool:
        if finished(job):
            return True
        if self.end is not None and time.monotonic() > self.end:
            raise TimeoutError(f"job {self.job_id} still {job.state} after {self.timeout} s")
        return False


class BearerKey(httpx.Auth):
    """Sends an API key as ``Authorization: Bearer <key>``; its repr does not show the key."""

    def __init__(self, key: str) -> None:
        if not all("!" <= c <= "~" for c in key):
            raise ConfigError(
                "the API key has spaces, control or non-ASCII characters, which a header "
                "cannot carry: expected the key exactly as `radcache keys create` printed it"
            )
        self._header = f"Bearer {key}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request

    def __repr__(self) -> str:
        return "BearerKey(<hidden>)"


class BaseClient(Generic[H]):
    """What both clients hold: the httpx client (``http``), the retry budget and the API
    key sent with every request (``api_key``; None: ``RADCACHE_API_KEY`` if set; ``""``:
    none)."""

    def __init__(self, http: H, retries: int, api_key: str | None = None) -> None:
        self.http: H = http
        self.retries = retries
        key = (os.environ.get("RADCACHE_API_KEY", "") if api_key is None else api_key).strip()
        #: keyword arguments every request gets: the key, when there is one
        self._auth: dict[str, Any] = {"auth": BearerKey(key)} if key else {}

    def __repr__(self) -> str:
        url = re.sub(r"//[^/@]*@", "//", str(self.http.base_url))  # no credentials either
        return f"{type(self).__name__}(url={url!r}, api_key={'<set>' if self._auth else None})"

    def _retry_delay(self, attempt: int, status: int | None) -> float | None:
        return retry_delay(attempt, self.retries, status)
