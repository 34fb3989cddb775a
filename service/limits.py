"""Request limits of the HTTP service: slow or oversized request heads, stalled bodies.

Two layers, one per place a request can be held up:

- :class:`GuardedH11Protocol` (uvicorn's h11 protocol) closes a connection whose request
  line and headers do not arrive within ``header_timeout_s`` of the connection opening or
  of the previous response completing (slowloris), and refuses a head larger than
  uvicorn's ``h11_max_incomplete_event_size`` with 431 — h11 bounds only a head still
  incomplete, not one that arrives whole in one read.
- :class:`BodyIdleTimeout` (ASGI middleware) answers 408 when the next chunk of a request
  body is awaited longer than ``idle_s``; an upload that keeps sending is never cut off.
- :class:`JsonBodyLimit` (ASGI middleware) holds every request body that is not an upload
  (the JSON of search, classify, …) to ``max_json_bytes``: 413 ``json-too-large`` from the
  declared length, or as soon as the body streams past it, before the app reads it.
  Uploads are held to ``max_upload_bytes`` while they stream to disk (:mod:`.uploads`).

:func:`uvicorn_limits` turns :class:`~radcache.service.settings.ServiceSettings` into the
``uvicorn.Config`` keyword arguments for all of this but the middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from radcache.embeddings.errors import ConfigError, JsonTooLargeError
from radcache.service.problems import problem, status_of
from radcache.service.settings import ServiceSettings

__all__ = [
    "BodyIdleTimeout",
    "GuardedH11Protocol",
    "JsonBodyLimit",
    "guarded_protocol",
    "uvicorn_limits",
]

log = logging.getLogger(__name__)
_HEAD_END = re.compile(rb"\n\r?\n")  # h11's end of a request head


def _positive(name: str, seconds: float) -> float:
    if not seconds > 0:  # NaN too
        raise ConfigError(
            f"{name} is {seconds!r}; expected a number of seconds above 0. Set it to how long "
            "a client may keep the server waiting."
        )
    return float(seconds)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and a bound on its size.

    The head timer runs while h11 waits for a request (``their_state`` IDLE): armed when the
    connection is made and when a response completes, cancelled once the head is parsed
    or the connection closes. On expiry a client that sent part of a head gets ``408`` with
    ``Connection: close``; one that sent nothing is closed silently (a request crossing an
    unsolicited 408 would take it for its answer). Use :func:`guarded_protocol` to set
    ``header_timeout_s``.
    """

    header_timeout_s: ClassVar[float] = 10.0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_timer: asyncio.TimerHandle | None = None
        limit = config.h11_max_incomplete_event_size
        self._max_head = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if limit is None else limit

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large():
            log.warning("request head over %d bytes; refused with 431", self._max_head)
            self._refuse(
                431,
                "request-header-fields-too-large",
                "Request header fields too large",
                f"the request line and headers are over {self._max_head} bytes; send fewer "
                "or shorter headers.",
            )
            return
        super().handle_events()
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def _head_too_large(self) -> bool:
        buffered = self.conn.trailing_data[0]
        if len(buffered) < self._max_head:
            return False  # the head, complete or not, is within the limit
        return _HEAD_END.search(buffered, 0, self._max_head) is None

    def _watch_head(self) -> None:
        """Run the head timer exactly while a request head is awaited on an open connection."""
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self._stop_head_timer()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        log.debug("request head not complete within %g s; connection closed", self.header_timeout_s)
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._refuse(
                408,
                "request-timeout",
                "Request timed out",
                f"the request line and headers did not arrive within {self.header_timeout_s:g} "
                "s; send them without pauses.",
            )
        else:
            self._close()

    def _refuse(self, status: int, code: str, title: str, detail: str) -> None:
        """Answer ``status`` as problem+json when nothing has been answered yet; then close."""
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE:
            answer = problem(status, code, title, detail)
            answer.headers["connection"] = "close"
            with contextlib.suppress(h11.LocalProtocolError):
                out = [
                    self.conn.send(h11.Response(status_code=status, headers=answer.raw_headers)),
                    self.conn.send(h11.Data(data=bytes(answer.body))),
                    self.conn.send(h11.EndOfMessage()),
                ]
                self.transport.write(b"".join(part for part in out if part))
        self._close()

    def _close(self) -> None:
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """A :class:`GuardedH11Protocol` bound to ``header_timeout_s``, for ``Config(http=...)``."""
    seconds = _positive("header_timeout_s", header_timeout_s)

    class BoundGuardedH11Protocol(GuardedH11Protocol):
        header_timeout_s = seconds

    return BoundGuardedH11Protocol


class BodyIdleTimeout:
    """ASGI middleware: a request body that stalls for ``idle_s`` gets ``408`` problem+json.

    Each wait for the next ``http.request`` message is bounded, not the whole body, so a
    large upload that keeps sending is never cut off. On expiry the ``408`` (with
    ``Connection: close``) is sent if the response has not started, and the application is
    cancelled: it reads no more. Waits after the body is complete (for a disconnect) and
    other scope types pass through untouched.
    """

    def __init__(self, app: ASGIApp, idle_s: float) -> None:
        self.app = app
        self.idle_s = _positive("idle_s", idle_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = body_done = timed_out = False

        with anyio.CancelScope() as cancel:

            async def idle_receive() -> Message:
                nonlocal body_done, timed_out
                if body_done:
                    return await receive()
                try:
                    with anyio.fail_after(self.idle_s):
                        message = await receive()
                except TimeoutError:
                    timed_out = True
                    if not started:
                        await self._answer_408(scope, receive, send)
                    cancel.cancel()
                    await anyio.lowlevel.checkpoint()  # raises the cancellation
                    return {"type": "http.disconnect"}
                body_done = message["type"] != "http.request" or not message.get("more_body")
                return message

            async def tracking_send(message: Message) -> None:
                nonlocal started
                if timed_out:
                    return  # the 408 has answered, or the response is cut short
                started = started or message["type"] == "http.response.start"
                await send(message)

            await self.app(scope, idle_receive, tracking_send)

    async def _answer_408(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = problem(
            408,
            "request-timeout",
            "Request timed out",
            f"no part of the request body arrived for {self.idle_s:g} s; send it without "
            "pauses that long.",
            scope.get("path"),
        )
        answer.headers["connection"] = "close"
        await answer(scope, receive, send)


#: The routes that stream a body to disk under ``max_upload_bytes`` (:mod:`.uploads`), with
#: the content type that makes it an upload there (None: any).
_UPLOADS: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(r"/v1/studies/?"), None),
    (re.compile(r"/dicom-web/studies(/[^/]+)?/?"), None),
    (re.compile(r"/v1/search/?"), "multipart/form-data"),
)


def _is_upload(scope: Scope) -> bool:
    if scope["method"] != "POST":
        return False
    ctype = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
    for path, kind in _UPLOADS:
        if path.fullmatch(scope["path"]) and (kind is None or ctype == kind.encode()):
            return True
    return False


class JsonBodyLimit:
    """ASGI middleware: a request body that is not an upload is at most ``max_bytes``.

    A Content-Length over the limit is refused before a byte of the body is read; a body
    without one (chunked) is received up to the limit and refused as soon as it passes it.
    The refusal is ``413`` problem+json ``json-too-large`` with ``Connection: close``, and
    the application never sees the request. A body within the limit is handed on as one
    message (the application would read it whole anyway). Requests without a body and
    uploads (:data:`_UPLOADS`, held to their own limit as they stream) pass untouched.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_upload(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0  # h11 refuses a malformed length before this
        if declared > self.max_bytes:
            await self._answer_413(scope, receive, send)
            return
        if not declared and b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)  # no body
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._answer_413(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message | None = {"type": "http.request", "body": b"".join(chunks)}
        del chunks

        async def replay() -> Message:
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _answer_413(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = JsonTooLargeError(
            f"the request body is larger than the {self.max_bytes}-byte limit for requests "
            "that are not uploads; send fewer queries or support items per request, or raise "
            "RADCACHE_MAX_JSON_BYTES."
        )
        answer = problem(status_of(exc), exc.code, exc.title, str(exc), scope.get("path"))
        answer.headers["connection"] = "close"  # the rest of the body is not read
        await answer(scope, receive, send)


def uvicorn_limits(settings: ServiceSettings) -> dict[str, Any]:
    """The ``uvicorn.Config`` keyword arguments that enforce ``settings``' request limits."""
    return {
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "http": guarded_protocol(settings.header_timeout_s),
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
    }
