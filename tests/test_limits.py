"""Request limits against a real uvicorn on loopback: slow and oversized request heads,
stalled and slow-but-steady bodies, keep-alive."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import anyio
import pytest
import uvicorn
from fastapi import FastAPI, Request

from radcache.embeddings.errors import ConfigError
from radcache.service.limits import (
    BodyIdleTimeout,
    GuardedH11Protocol,
    guarded_protocol,
    uvicorn_limits,
)
from radcache.service.settings import ServiceSettings
from tests.servers import free_port

HEAD_TIMEOUT = 0.5
BODY_IDLE = 0.5
MAX_HEAD = 4096
SLACK = 1.0  # how late past a limit the server may act


def _app() -> BodyIdleTimeout:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await anyio.sleep(HEAD_TIMEOUT + 0.3)  # longer than the head timeout
        return {"ok": True}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"bytes": size}

    return BodyIdleTimeout(app, idle_s=BODY_IDLE)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    settings = ServiceSettings(
        header_timeout_s=HEAD_TIMEOUT,
        body_idle_timeout_s=BODY_IDLE,
        max_header_bytes=MAX_HEAD,
        keep_alive_s=5.0,
        max_connections=50,
    )
    port = free_port()
    config = uvicorn.Config(
        _app(),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        **uvicorn_limits(settings),
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="uvicorn-limits", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield "127.0.0.1", port
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def _connect(server: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(server, timeout=HEAD_TIMEOUT + SLACK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a socket timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _response(sock: socket.socket) -> http.client.HTTPResponse:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp


def _problem_of(raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


# --- request heads -------------------------------------------------------------------------


def test_half_a_head_gets_408_then_close(server: tuple[str, int]) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        raw = _read_all(sock)
        waited = time.monotonic() - t0
    assert HEAD_TIMEOUT - 0.1 <= waited <= HEAD_TIMEOUT + SLACK
    status, headers, problem = _problem_of(raw)
    assert status == 408
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert problem["code"] == "request-timeout"
    assert problem["status"] == 408


def test_a_head_dripped_byte_by_byte_is_still_cut_off(server: tuple[str, int]) -> None:
    """Slowloris: bytes keep arriving, but the head is never done; the deadline holds."""
    head = b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Drip: " + b"a" * 100
    t0 = time.monotonic()
    with _connect(server) as sock:
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass  # closed by the server while still dripping
        raw = _read_all(sock)
    assert time.monotonic() - t0 <= HEAD_TIMEOUT + SLACK
    assert raw == b"" or raw.startswith(b"HTTP/1.1 408 ")


def test_a_silent_connection_is_closed_without_an_answer(server: tuple[str, int]) -> None:
    with _connect(server) as sock:
        t0 = time.monotonic()
        assert _read_all(sock) == b""
        assert HEAD_TIMEOUT - 0.1 <= time.monotonic() - t0 <= HEAD_TIMEOUT + SLACK


def test_a_head_in_pieces_within_the_deadline_and_a_slow_handler_succeed(
    server: tuple[str, int],
) -> None:
    """The timer stops once the head is whole: a handler slower than it still answers."""
    with _connect(server) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\n")
        time.sleep(HEAD_TIMEOUT / 3)
        sock.sendall(b"Host: x\r\n\r\n")
        resp = _response(sock)
        assert resp.status == 200
        assert json.loads(resp.read()) == {"ok": True}


def test_keep_alive_serves_a_prompt_second_request_and_rearms_the_timer(
    server: tuple[str, int],
) -> None:
    with _connect(server) as sock:
        for _ in range(2):
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = _response(sock)
            assert resp.status == 200
            assert json.loads(resp.read()) == {"ok": True}
        # after a response, a new head has the same deadline
        sock.sendall(b"GET /ping HTTP/1.1\r\n")
        t0 = time.monotonic()
        raw = _read_all(sock)
        assert time.monotonic() - t0 <= HEAD_TIMEOUT + SLACK
        assert raw.startswith(b"HTTP/1.1 408 ")


def test_an_oversize_head_is_refused_even_in_one_piece(server: tuple[str, int]) -> None:
    """h11 bounds only incomplete heads; a whole one in a single read is refused too."""
    big = b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(big)
        raw = _read_all(sock)
    status, headers, problem = _problem_of(raw)
    assert status == 431
    assert headers["connection"] == "close"
    assert problem["code"] == "request-header-fields-too-large"


def test_an_oversize_head_in_pieces_is_refused(server: tuple[str, int]) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(MAX_HEAD // 512 + 2):
                sock.sendall(b"X-Pad: " + b"a" * 503 + b"\r\n")
        except OSError:
            pass  # refused mid-head
        raw = _read_all(sock)
    assert raw.startswith(b"HTTP/1.1 431 ")


def test_a_head_just_within_the_limit_is_served(server: tuple[str, int]) -> None:
    start = b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Pad: "
    head = start + b"a" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD
    with _connect(server) as sock:
        sock.sendall(head)
        resp = _response(sock)
        assert resp.status == 200


# --- request bodies ------------------------------------------------------------------------


def test_a_stalled_body_gets_408_problem_json(server: tuple[str, int]) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        t0 = time.monotonic()
        raw = _read_all(sock)
        waited = time.monotonic() - t0
    assert BODY_IDLE - 0.1 <= waited <= BODY_IDLE + SLACK
    status, headers, problem = _problem_of(raw)
    assert status == 408
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert problem == {
        "type": "https://radcache.dev/problems/request-timeout",
        "title": "Request timed out",
        "status": 408,
        "detail": problem["detail"],
        "code": "request-timeout",
        "instance": "/echo",
    }
    assert "0.5 s" in str(problem["detail"])


def test_a_slow_but_steady_body_is_never_cut_off(server: tuple[str, int]) -> None:
    """Chunks every 0.2 s for 2 s: four times the idle limit in all, never idle for it."""
    chunks = 10
    with _connect(server) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (chunks * 1000)
        )
        for _ in range(chunks):
            time.sleep(0.2)
            sock.sendall(b"y" * 1000)
        resp = _response(sock)
        assert resp.status == 200
        assert json.loads(resp.read()) == {"bytes": chunks * 1000}


# --- construction --------------------------------------------------------------------------


def test_limits_map_settings_to_uvicorn() -> None:
    settings = ServiceSettings(
        max_header_bytes=8192, header_timeout_s=3.0, keep_alive_s=7.0, max_connections=None
    )
    limits = uvicorn_limits(settings)
    assert limits["h11_max_incomplete_event_size"] == 8192
    assert limits["timeout_keep_alive"] == 7.0
    assert limits["limit_concurrency"] is None
    assert issubclass(limits["http"], GuardedH11Protocol)
    assert limits["http"].header_timeout_s == 3.0
    assert GuardedH11Protocol.header_timeout_s == 10.0  # the base class is left alone


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan")])
def test_timeouts_must_be_positive(seconds: float) -> None:
    with pytest.raises(ConfigError, match="above 0"):
        guarded_protocol(seconds)
    with pytest.raises(ConfigError, match="above 0"):
        BodyIdleTimeout(FastAPI(), idle_s=seconds)
