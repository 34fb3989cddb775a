"""Every error leaves the service as RFC 9457 ``application/problem+json`` with a ``code``.

One place maps exceptions to problems: radcache's own errors keep their code and get the
status :data:`STATUS` gives it (the library's errors know no HTTP), request validation
becomes ``invalid-request``, HTTP errors keep their status, and anything unexpected
becomes a bare ``internal-error`` — no stack trace leaves the server.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from radcache.embeddings.errors import RadcacheError

__all__ = ["PROBLEM", "STATUS", "document", "install", "problem", "status_of"]

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"
_BASE = "https://radcache.dev/problems/"
# The HTTP status of each radcache error code (a code not listed takes its parent's).
STATUS: dict[str, int] = {
    "invalid-input": 422,
    "not-dicom": 415,
    "truncated-file": 422,
    "invalid-header": 422,
    "no-pixel-data": 422,
    "decode-failed": 422,
    "invalid-nifti": 422,
    "unreadable-volume": 422,
    "inconsistent-series": 422,
    "unsupported-transfer-syntax": 415,
    "unsupported-input": 415,
    "unsupported-media-type": 415,
    "empty-upload": 400,
    "invalid-request": 422,
    "insufficient-data": 422,
    "volume-too-large": 413,
    "decompressed-too-large": 413,
    "unsafe-reference": 422,
    "payload-too-large": 413,
    "json-too-large": 413,
    "invalid-recipe": 422,
    "model-error": 500,
    "unknown-model": 404,
    "model-unavailable": 503,
    "model-not-loaded": 409,
    "store-error": 500,
    "not-found": 404,
    "ambiguous-reference": 409,
    "store-mismatch": 409,
    "store-busy": 409,
    "index-error": 422,
    "job-queue-error": 503,
    "queue-full": 503,
    "queue-unavailable": 503,
    "invalid-config": 500,
    "uid-vault-off": 409,
    "kos-destination-unset": 409,
    "kos-send-failed": 502,
    "access-denied": 403,
    "unauthenticated": 401,
    "forbidden": 403,
    "bad-multipart": 400,
}
_HTTP_CODES = {
    400: "bad-request",
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
}


def problem(
    status: int, code: str, title: str, detail: str, instance: str | None = None
) -> JSONResponse:
    body = {
        "type": _BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "instance": instance,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def status_of(exc: RadcacheError) -> int:
    """The HTTP status of ``exc``: its code's, else the nearest parent class's, else 500."""
    for cls in type(exc).__mro__:
        code = getattr(cls, "code", None)
        if isinstance(code, str) and code in STATUS:
            return STATUS[code]
    return 500


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(RadcacheError)
    async def _radcache(request: Request, exc: RadcacheError) -> JSONResponse:
        status = status_of(exc)
        headers = {"Retry-After": "5"} if status == 503 else None
        if status == 401:
            headers = {"WWW-Authenticate": 'Bearer realm="radcache"'}
        if exc.code in ("payload-too-large", "bad-multipart"):  # refused mid-body: not read on
            headers = {"Connection": "close"}
        resp = problem(status, exc.code, exc.title, str(exc), request.url.path)
        if headers:
            resp.headers.update(headers)
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return problem(
            422,
            "invalid-request",
            "Invalid request",
            f"{where}: {first.get('msg', 'invalid value')}",
            request.url.path,
        )

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http-{exc.status_code}")
        resp = problem(exc.status_code, code, str(exc.detail), str(exc.detail), request.url.path)
        resp.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the first route's methods: name all
            resp.headers["Allow"] = ", ".join(_allowed(request))
        return resp

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem(
            500,
            "internal-error",
            "Internal error",
            "the server failed on this request; the error is logged.",
            request.url.path,
        )


def _allowed(request: Request) -> list[str]:
    """The methods some route answers at the request's path."""
    routes = request.app.router.routes
    return [
        m
        for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)
    ]


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Make an OpenAPI document (FastAPI's, changed in place) declare the problems
    :func:`install` answers: every 4xx/5xx is ``application/problem+json`` with the
    ``Problem`` schema (FastAPI's own validation-error model is never sent); an operation
    behind an API key declares 401 and 403, one with parameters or a body 422, and one
    with a body 408 (the body stalled)."""
    content = {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for operations in schema.get("paths", {}).values():
        for op in operations.values():
            responses: dict[str, Any] = op.setdefault("responses", {})
            needed: set[int] = set()
            if op.get("security"):
                needed |= {401, 403}
            if op.get("parameters") or op.get("requestBody"):
                needed.add(422)
            if op.get("requestBody"):
                needed.add(408)
            for code in sorted(needed):
                responses.setdefault(str(code), {"description": HTTPStatus(code).phrase})
            for status, answer in responses.items():
                if status[0] in "45":  # problem+json, and what else the route declared
                    declared = answer.get("content", {}).items()
                    answer["content"] = {
                        t: c for t, c in declared if c.get("schema") and t != "application/json"
                    } | content
    # FastAPI's validation-error models, now named by no operation
    if '/HTTPValidationError"' not in json.dumps(schema.get("paths", {})):
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
    return schema
