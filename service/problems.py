"""Every error leaves the service as RFC 9457 ``application/problem+json`` with a ``code``.

One place maps exceptions to problems: radcache's own errors keep their code and status,
request validation becomes ``invalid-request``, HTTP errors keep their status, and
anything unexpected becomes a bare ``internal-error`` — no stack trace leaves the server.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from radcache.embeddings.errors import RadcacheError

__all__ = ["PROBLEM", "install", "problem"]

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"
_BASE = "https://radcache.dev/problems/"
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


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(RadcacheError)
    async def _radcache(request: Request, exc: RadcacheError) -> JSONResponse:
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        resp = problem(exc.status, exc.code, exc.title, str(exc), request.url.path)
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
        return problem(exc.status_code, code, str(exc.detail), str(exc.detail), request.url.path)

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
