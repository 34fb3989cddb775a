"""Hostile and broken requests against a real server: bodies past the upload limit sent
chunked (no Content-Length), JSON bodies past theirs, STOW-RS bodies that are empty, cut
short or lie about their lengths, slice ranges past a series' end, filter values that
would match everything."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.dicomgen import phantom, write_series, zip_bytes
from tests.servers import finished, running_server

LIMIT = 64 * 1024  # RADCACHE_MAX_UPLOAD_BYTES of the server here
JSON_LIMIT = 16 * 1024  # RADCACHE_MAX_JSON_BYTES of the server here
PROBLEM = "application/problem+json"
RELATED = 'multipart/related; type="application/dicom"; boundary=b0'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hostile")
    uploads = root / "uploads"
    env = {
        "RADCACHE_MAX_UPLOAD_BYTES": str(LIMIT),
        "RADCACHE_MAX_JSON_BYTES": str(JSON_LIMIT),
        "RADCACHE_UPLOAD_DIR": str(uploads),
    }
    with (
        running_server(root, **env) as (url, log),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        yield {"url": url, "http": http, "root": root, "uploads": uploads, "log": log}


def _left(uploads: Path) -> list[str]:
    """What stays in the upload directory once the server is done with a request."""
    for _ in range(100):
        left = sorted(p.name for p in uploads.iterdir()) if uploads.exists() else []
        if not left:
            break
        time.sleep(0.02)
    return left


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status, body
    return body


def _part(data: bytes, headers: bytes = b"Content-Type: application/dicom\r\n") -> bytes:
    return b"--b0\r\n" + headers + b"\r\n" + data + b"\r\n"


def _related(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--b0--\r\n"


def _form_part(name: str, filename: str | None, data: bytes) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--b0\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


# --- the upload limit holds for chunked bodies ---------------------------------------------


class _Flood:
    """A body of ``head`` and then zeros, up to 1000 times the limit: a server that counts
    as it reads cuts it off long before its end."""

    def __init__(self, head: bytes) -> None:
        self.head, self.sent = head, 0

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        while self.sent < 1000 * LIMIT:
            self.sent += 8192
            yield b"\x00" * 8192


_WAYS_IN = {
    "studies-form": (
        "/v1/studies",
        "multipart/form-data; boundary=b0",
        b'--b0\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n\r\n',
    ),
    "studies-zip": ("/v1/studies", "application/zip", b"PK\x03\x04"),
    "studies-dicom": ("/v1/studies", "application/dicom", b"\x00" * 128 + b"DICM"),
    "stow": ("/dicom-web/studies", RELATED, b"--b0\r\nContent-Type: application/dicom\r\n\r\n"),
    "search-form": (
        "/v1/search",
        "multipart/form-data; boundary=b0",
        b'--b0\r\nContent-Disposition: form-data; name="files"; filename="q.dcm"\r\n\r\n',
    ),
}


@pytest.mark.parametrize("way", list(_WAYS_IN))
def test_a_chunked_body_past_the_limit_is_refused_while_it_streams(
    server: dict[str, Any], way: str
) -> None:
    """No Content-Length, a body without end: the answer is 413 once the limit is passed,
    and nothing of it stays on disk."""
    path, ctype, head = _WAYS_IN[way]
    flood = _Flood(head)
    r = server["http"].post(path, content=iter(flood), headers={"content-type": ctype})
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    _problem(r, 413, "payload-too-large")
    assert r.headers["connection"] == "close"  # the rest is not read
    assert flood.sent < 100 * LIMIT  # cut off while it streamed
    assert _left(server["uploads"]) == []


_JSON_WAYS = {
    "search": ("/v1/search", "application/json"),
    "classify": ("/v1/classify", "application/json"),
    "search-as-zip": ("/v1/search", "application/zip"),  # not an upload there: JSON's limit
    "search-untyped": ("/v1/search", "text/plain"),
}


@pytest.mark.parametrize("way", list(_JSON_WAYS))
def test_a_json_body_past_its_limit_is_refused_while_it_streams(
    server: dict[str, Any], way: str
) -> None:
    """A request body that is not an upload is held to RADCACHE_MAX_JSON_BYTES: chunked
    and without end, it is cut off (413 json-too-large) long before the upload limit."""
    path, ctype = _JSON_WAYS[way]
    flood = _Flood(b'{"queries": [{"vector": [')
    r = server["http"].post(path, content=iter(flood), headers={"content-type": ctype})
    assert r.request.headers["transfer-encoding"] == "chunked"
    body = _problem(r, 413, "json-too-large")
    assert "RADCACHE_MAX_JSON_BYTES" in body["detail"]
    assert r.headers["connection"] == "close"
    assert flood.sent < 100 * LIMIT


def test_a_json_body_declared_past_its_limit_is_refused_before_it_is_read(
    server: dict[str, Any], entry: str
) -> None:
    http: httpx.Client = server["http"]
    padded = {"query": {"entry": entry}, "exclude_same_study": False, "pad": " " * JSON_LIMIT}
    r = http.post("/v1/search", content=json.dumps(padded).encode())
    assert int(r.request.headers["content-length"]) > JSON_LIMIT
    _problem(r, 413, "json-too-large")
    del padded["pad"]  # the same request within the limit
    ok = http.post("/v1/search", json=padded)
    assert ok.status_code == 200, ok.text


def test_a_chunked_body_within_the_limit_is_taken(server: dict[str, Any], tmp_path: Path) -> None:
    gen = write_series(tmp_path / "ct", phantom(3, 16, 16, seed=301))
    body = zip_bytes(gen.directory)
    assert len(body) < LIMIT

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = server["http"].post(
        "/v1/studies", content=chunks(), headers={"content-type": "application/zip"}
    )
    assert r.status_code == 202, r.text
    assert finished(server["http"], r.headers["location"])["state"] == "done"


# --- STOW-RS bodies that are empty or broken --------------------------------------------------


def _jobs(http: httpx.Client) -> set[str]:
    return {j["id"] for j in http.get("/v1/jobs", params={"limit": 500}).json()}


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    gen = write_series(tmp_path_factory.mktemp("stow") / "s", phantom(3, 16, 16, seed=302))
    return [f.read_bytes() for f in gen.files]


def _stow_cases(instances: list[bytes]) -> dict[str, tuple[bytes, int, str]]:
    whole = _related(*(_part(i) for i in instances))
    cut = instances[1][: len(instances[1]) - 100]  # inside its pixel data
    lying = b"Content-Type: application/dicom\r\nContent-Length: %d\r\n" % (len(instances[0]) + 7)
    return {
        "empty": (b"", 400, "empty-upload"),
        "no-parts": (b"--b0--\r\n", 400, "empty-upload"),
        "cut-short": (whole[: len(whole) // 2], 400, "bad-multipart"),
        "no-closing-boundary": (whole[: -len(b"--b0--\r\n")], 400, "bad-multipart"),
        "garbage": (b"this is not multipart at all", 400, "bad-multipart"),
        "instance-cut-inside": (
            _related(_part(instances[0]), _part(cut), _part(instances[2])),
            400,
            "bad-multipart",
        ),
        "part-length-lies": (
            _related(_part(instances[0], lying), _part(instances[1])),
            400,
            "bad-multipart",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "no-parts",
        "cut-short",
        "no-closing-boundary",
        "garbage",
        "instance-cut-inside",
        "part-length-lies",
    ],
)
@pytest.mark.parametrize("chunked", [False, True])
def test_a_broken_stow_body_is_refused_and_nothing_is_stored(
    server: dict[str, Any], instances: list[bytes], case: str, chunked: bool
) -> None:
    body, status, code = _stow_cases(instances)[case]
    http: httpx.Client = server["http"]
    before = _jobs(http)
    content: bytes | Iterator[bytes] = body
    if chunked:
        content = iter([body[i : i + 700] for i in range(0, len(body), 700)])
    r = http.post("/dicom-web/studies", content=content, headers={"content-type": RELATED})
    _problem(r, status, code)
    assert "location" not in r.headers
    assert _jobs(http) == before  # no job: nothing was taken
    assert _left(server["uploads"]) == []


def test_a_whole_stow_body_is_still_taken(server: dict[str, Any], instances: list[bytes]) -> None:
    """The checks above refuse only what is broken: the same instances, whole, are stored
    (one part with a true Content-Length)."""
    true = b"Content-Type: application/dicom\r\nContent-Length: %d\r\n" % len(instances[0])
    body = _related(_part(instances[0], true), *(_part(i) for i in instances[1:]))
    r = server["http"].post("/dicom-web/studies", content=body, headers={"content-type": RELATED})
    assert r.status_code == 200, r.text
    assert finished(server["http"], r.headers["location"])["state"] == "done"


def _raw(url: str, head: bytes, body: bytes, *, half_close: bool = False) -> bytes:
    """Send ``head`` and ``body`` on a socket of its own; what the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + body)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while b"\r\n\r\n" not in out or len(out.partition(b"\r\n\r\n")[2]) < _length(out):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _head(length: int) -> bytes:
    return (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {RELATED}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_a_content_length_short_of_the_body_is_refused(
    server: dict[str, Any], instances: list[bytes]
) -> None:
    """The server reads what Content-Length says, which ends inside a part: 400, nothing
    stored (what follows is not a request: the connection is closed)."""
    body = _related(*(_part(i) for i in instances))
    before = _jobs(server["http"])
    answer = _raw(server["url"], _head(len(body) - 50), body)
    status = answer.split(b" ", 2)[1]
    assert status == b"400", answer[:300]
    problem = json.loads(answer.partition(b"\r\n\r\n")[2][: _length(answer)])
    assert problem["code"] == "bad-multipart"
    assert _jobs(server["http"]) == before
    assert _left(server["uploads"]) == []


def test_a_content_length_past_the_body_leaves_nothing(
    server: dict[str, Any], instances: list[bytes]
) -> None:
    """The client promises more than it sends and stops: the upload is dropped."""
    body = _related(*(_part(i) for i in instances))
    before = _jobs(server["http"])
    _raw(server["url"], _head(len(body) + 5000), body, half_close=True)
    assert _left(server["uploads"]) == []
    assert _jobs(server["http"]) == before


# --- slice ranges past the end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def entry(server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    gen = write_series(tmp_path_factory.mktemp("ct") / "ct", phantom(3, 16, 16, seed=303))
    r = server["http"].post(
        "/v1/studies",
        content=zip_bytes(gen.directory),
        headers={"content-type": "application/zip"},
    )
    job = finished(server["http"], r.headers["location"])
    assert job["state"] == "done", job
    return str(job["series"][0]["entry"])


@pytest.mark.parametrize(("slices", "n"), [("5:9", 0), ("3:", 0), ("2:1", 0), ("1:9", 2), (":", 3)])
def test_a_slice_range_past_the_end_is_an_empty_array(
    server: dict[str, Any], entry: str, slices: str, n: int
) -> None:
    http: httpx.Client = server["http"]
    url = f"/v1/series/{entry}/embeddings"
    params = {"kind": "cls", "slices": slices}
    npy = http.get(url, params=params, headers={"accept": "application/x-npy"})
    assert npy.status_code == 200, npy.text
    arr = np.load(io.BytesIO(npy.content))
    dim = int(arr.shape[1])
    assert arr.shape == (n, dim) and dim > 0 and arr.dtype.kind == "f"
    js = http.get(url, params=params, headers={"accept": "application/json"}).json()
    assert js["shape"] == [n, dim] and len(js["data"]) == n
    np.testing.assert_allclose(np.asarray(js["data"]).reshape(n, dim), arr, rtol=1e-6)


# --- filter values that would match everything ----------------------------------------------


@pytest.mark.parametrize(
    "filters",
    [
        {"modality": [""]},
        {"modality": ["CT", "C\u0000T"]},
        {"body_part": [""]},
        {"description": ""},
        {"description": "chest\u0000"},
        {"collection": ""},
        {"collection": "\u0000"},
        {"labels": {"": "x"}},
        {"labels": {"dx\u0000": "x"}},
        {"labels": {"dx": ""}},
        {"labels": {"dx": "a\u0000b"}},
    ],
)
def test_filter_values_that_match_everything_are_refused(
    server: dict[str, Any], entry: str, filters: dict[str, Any]
) -> None:
    http: httpx.Client = server["http"]
    r = http.post(
        "/v1/search",
        json={"query": {"entry": entry}, "filters": filters, "exclude_same_study": False},
    )
    body = _problem(r, 422, "invalid-request")
    assert body["detail"].startswith("filters."), body
    form = http.post(  # the same request beside an uploaded query
        "/v1/search",
        files={"files": ("q.dcm", b"x", "application/dicom")},
        data={"request": json.dumps({"filters": filters})},
    )
    _problem(form, 422, "invalid-request")
    assert _left(server["uploads"]) == []


def test_filter_values_that_match_something_still_search(
    server: dict[str, Any], entry: str
) -> None:
    r = server["http"].post(
        "/v1/search",
        json={
            "query": {"entry": entry},
            "filters": {"modality": ["CT"], "labels": {}},
            "exclude_same_study": False,
        },
    )
    assert r.status_code == 200, r.text
    hits = r.json()["results"][0]["hits"]
    assert entry in [h["entry"] for h in hits]


def test_the_openapi_states_the_filter_rules(server: dict[str, Any]) -> None:
    schemas = server["http"].get("/openapi.json").json()["components"]["schemas"]
    props = schemas["SearchFilters"]["properties"]
    assert props["modality"]["items"]["minLength"] == 1
    assert "pattern" in props["modality"]["items"]
    described = props["description"]["anyOf"][0]
    assert described["minLength"] == 1 and "pattern" in described
    assert props["labels"]["propertyNames"]["minLength"] == 1


def test_no_request_here_left_a_traceback(server: dict[str, Any]) -> None:
    log = server["log"].read_text()
    assert "Traceback" not in log and "internal-error" not in log, log[-3000:]
