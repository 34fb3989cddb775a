"""Schemathesis against a real `radcache serve` on loopback: every operation of the live
``/openapi.json``, a bounded number of generated requests each.

One server serves the module, with an API key holding every scope and one small study
stored, so authenticated operations get past the key check and the study's names exist.
Every answer must be one the operation declares: no 5xx, a declared status and content
type, a body and headers that match the declared schema (timestamps carry their offset),
requests without the key refused, schema-invalid requests refused, undeclared methods
answered 405 with ``Allow``.

Not checked: that every schema-valid request is accepted (``positive_data_acceptance``):
an upload schema is "any bytes", and a search query's "exactly one of entry, series, study
or vector" is checked by the service, not said by the schema. The stateful checks
(``use_after_free``, ``ensure_resource_availability``) need the stateful phase, which is
not run; ``object_level_authorization`` is `tests/test_auth.py`'s subject.

``RADCACHE_FUZZ_EXAMPLES`` sets the examples per operation (default 15: the module takes
about 20 s on two cores); generation is derandomised, so a failure reproduces.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import checks as st_checks

from radcache.service.jobs import JobStore
from radcache.service.keys import SCOPES, KeyStore
from tests.dicomgen import phantom, write_series, zip_bytes
from tests.servers import finished, running_server

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("RADCACHE_FUZZ_EXAMPLES") or 15)
CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
    st_checks.missing_required_header,
    st_checks.unsupported_method,
    st_checks.ignored_auth,
]


BOUNDARY = "radcache-fuzz-boundary"
RELATED = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@schemathesis.serializer("multipart/related")
def _related(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """A STOW-RS body of one part holding the generated value (schemathesis has no
    multipart/related encoder; the test sends the boundary in its Content-Type)."""
    part = value if isinstance(value, bytes) else str(value).encode()
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return head + part + f"\r\n--{BOUNDARY}--\r\n".encode()


@dataclass
class Live:
    url: str
    log: Path
    token: str
    study: str
    series: str
    entry: str
    job: str


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("fuzz-api")
    db = f"sqlite:///{root / 'j.db'}"
    jobs = JobStore(db)
    token = KeyStore(jobs).create("fuzz", sorted(SCOPES))[0]
    jobs.close()
    gen = write_series(root / "ct", phantom(4, 16, 16, seed=11))
    with running_server(root, db=db) as (url, log):
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=auth, timeout=60) as http:
            r = http.post(
                "/v1/studies",
                content=zip_bytes(gen.directory),
                headers={"content-type": "application/zip"},
            )
            assert r.status_code == 202, r.text
            job = finished(http, f"/v1/jobs/{r.json()['id']}")
        assert job["state"] == "done", job
        s = job["series"][0]
        yield Live(url, log, token, s["study"], s["series"], s["entry"], job["id"])


@pytest.fixture(scope="module")
def api(live: Live) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {live.token}"},
            "generation": {"max-examples": EXAMPLES, "deterministic": True},
            "phases": {"stateful": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
def test_every_operation_answers_as_declared(case: schemathesis.Case) -> None:
    media = case.media_type or ""
    headers = {"Content-Type": RELATED} if media.startswith("multipart/related") else None
    checks = CHECKS
    if media.startswith("multipart/form-data"):
        # Every form field is text on the wire: a "wrong type" may arrive as a valid value.
        checks = [c for c in CHECKS if c is not st_checks.negative_data_rejection]
    case.call_and_validate(headers=headers, checks=checks, timeout=30)


def test_the_stored_study_answers_as_declared(api: schemathesis.BaseSchema, live: Live) -> None:
    """The answers random names never reach: each read of the stored study, job and series,
    searches and a classification by it, checked against the declared schemas; bad raw
    vectors are refused, and a 405 names every method of its path."""
    q = {"series": live.series}
    calls: list[tuple[str, str, dict[str, Any], int]] = [
        ("GET", "/v1/studies/{study}", {"path_parameters": {"study": live.study}}, 200),
        ("GET", "/v1/series/{series}", {"path_parameters": {"series": live.series}}, 200),
        ("GET", "/v1/jobs/{job_id}", {"path_parameters": {"job_id": live.job}}, 200),
        ("GET", "/dicom-web/studies", {"query": {"StudyInstanceUID": live.study}}, 200),
        ("POST", "/v1/search", {"body": {"query": q, "k": 3}}, 200),
        ("POST", "/v1/search", {"body": {"query": q, "level": "slice", "k": 3}}, 200),
        ("POST", "/v1/search", {"body": {"query": {"vector": [1.0, 2.0]}}}, 422),
        ("POST", "/v1/search", {"body": {"query": {"vector": []}}}, 422),
        (
            "POST",
            "/v1/classify",
            {
                "body": {
                    "queries": [q],
                    "support": [{"query": {"entry": live.entry}, "label": "a"}],
                    "exclude_same_study": False,
                }
            },
            200,
        ),
    ]
    for kind in ("pooled", "cls"):
        params = {"path_parameters": {"series": live.entry}, "query": {"kind": kind}}
        calls.append(("GET", "/v1/series/{series}/embeddings", params, 200))
    for method, path, kw, status in calls:
        media = {"media_type": "application/json"} if "body" in kw else {}
        case = api[path][method].Case(**kw, **media)
        response = case.call_and_validate(headers=_auth(live), checks=CHECKS, timeout=30)
        assert response.status_code == status, (method, path, kw, response.text)
    job = httpx.get(f"{live.url}/v1/jobs/{live.job}", headers=_auth(live)).json()
    assert all(job[t].endswith("Z") for t in ("created", "started", "finished")), job
    refused = httpx.request("TRACE", f"{live.url}/v1/studies/{live.study}", headers=_auth(live))
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, DELETE"


def _auth(live: Live) -> dict[str, str]:
    return {"Authorization": f"Bearer {live.token}"}
