"""What the sync and async clients share: request building, parsing, errors, retries."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np

from .models import ClassifyRequest, JobOut, SearchQuery, SearchRequest

__all__ = [
    "RETRY_STATUSES",
    "RadcacheAPIError",
    "backoff",
    "check",
    "classify_body",
    "iter_files",
    "npy",
    "parts",
    "retry_delay",
    "search_request",
    "upload",
]

RETRY_STATUSES = {429, 502, 503, 504}
Input = str | os.PathLike[str] | bytes | tuple[str, bytes]


class RadcacheAPIError(Exception):
    """An error answer from the service, carrying its RFC 9457 problem ``code``."""

    def __init__(self, status: int, code: str, title: str, detail: str) -> None:
        self.status, self.code, self.title, self.detail = status, code, title, detail
        super().__init__(f"[{code}] {detail} (HTTP {status})")


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


def finished(job: JobOut) -> bool:
    return job.state not in ("queued", "running")
