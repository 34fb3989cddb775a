"""Access control against a real `radcache serve` on loopback: keys, scopes, tenants.

One server (with keys made before it starts) serves the whole module; each test uses its
own studies, so the order does not matter.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from radcache.service.jobs import JobStore
from radcache.service.keys import KeyStore
from tests.conftest import TEST_SECRET
from tests.dicomgen import phantom, write_series
from tests.servers import running_server
from tests.test_cli import RADCACHE
from tests.test_service import zip_bytes

pytestmark = pytest.mark.timeout(300)

# Every route but the probes, with the scope it needs and a request that reaches the check.
GUARDED: list[tuple[str, str, str]] = [
    ("POST", "/v1/studies", "submit"),
    ("POST", "/dicom-web/studies", "submit"),
    ("GET", "/v1/studies", "read"),
    ("GET", "/v1/studies/x", "read"),
    ("GET", "/v1/series/x", "read"),
    ("GET", "/v1/series/x/embeddings", "read"),
    ("GET", "/v1/jobs", "read"),
    ("GET", "/v1/jobs/x", "read"),
    ("GET", "/v1/models", "read"),
    ("GET", "/v1/indexes", "read"),
    ("GET", "/dicom-web/studies", "read"),
    ("POST", "/v1/search", "search"),
    ("POST", "/v1/classify", "search"),
    ("DELETE", "/v1/studies/x", "admin"),
    ("GET", "/metrics", "metrics"),
]


@dataclass
class Service:
    url: str
    log: Path
    db: Path
    keys: dict[str, str]  # name → token
    root: Path

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("auth")
    db = root / "j.db"
    jobs = JobStore(f"sqlite:///{db}")
    store = KeyStore(jobs)
    made = {
        "a": ("hospital-a", "submit,read,search,admin"),
        "a_read": ("hospital-a", "read"),
        "a_submit": ("hospital-a", "submit"),
        "a_search": ("hospital-a", "search,read"),
        "scraper": ("hospital-a", "metrics"),
        "b": ("hospital-b", "submit,read,search,admin"),
        "doomed": ("hospital-a", "read"),
    }
    keys = {name: store.create(t, s.split(","))[0] for name, (t, s) in made.items()}
    jobs.close()
    cors = '["https://viewer.example"]'
    with running_server(root, db=f"sqlite:///{db}", RADCACHE_CORS_ORIGINS=cors) as (url, log):
        yield Service(url, log, db, keys, root)


def _wait(http: httpx.Client, location: str, timeout: float = 120) -> dict[str, Any]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job: dict[str, Any] = http.get(location).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {location} did not finish")


def _submit(http: httpx.Client, directory: Path) -> dict[str, Any]:
    r = http.post(
        "/v1/studies", content=zip_bytes(directory), headers={"content-type": "application/zip"}
    )
    assert r.status_code in (200, 202), r.text
    return _wait(http, f"/v1/jobs/{r.json()['id']}")


def test_anonymous_requests_are_refused_but_the_probes_answer(service: Service) -> None:
    with service.client(None) as http:
        for method, path, _ in GUARDED:
            r = http.request(method, path)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "unauthenticated"
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        bad = http.get("/v1/studies", headers={"Authorization": "Bearer rc_00000000_" + "x" * 43})
        assert bad.status_code == 401
        assert "x" * 43 not in bad.text


def test_each_scope_opens_its_routes_and_no_other(service: Service) -> None:
    only = {
        "a_read": {"read"},
        "a_submit": {"submit"},
        "a_search": {"search", "read"},
        "scraper": {"metrics"},
    }
    for key, scopes in only.items():
        with service.client(key) as http:
            for method, path, scope in GUARDED:
                r = http.request(method, path)
                if scope in scopes:
                    assert r.status_code not in (401, 403), (key, method, path, r.text)
                else:
                    assert r.status_code == 403, (key, method, path, r.status_code)
                    assert r.json()["code"] == "forbidden"
                    assert service.keys[key] not in r.text


def test_dicomweb_takes_the_key_as_basic_password(service: Service) -> None:
    basic = base64.b64encode(f"orthanc:{service.keys['a_read']}".encode()).decode()
    with httpx.Client(base_url=service.url, timeout=30) as http:
        r = http.get("/dicom-web/studies", headers={"Authorization": f"Basic {basic}"})
        assert r.status_code == 200, r.text
        wrong = base64.b64encode(b"orthanc:rc_00000000_" + b"y" * 43).decode()
        r = http.get("/dicom-web/studies", headers={"Authorization": f"Basic {wrong}"})
        assert r.status_code == 401


def test_revocation_takes_effect_within_two_seconds(service: Service) -> None:
    with service.client("doomed") as http:
        assert http.get("/v1/studies").status_code == 200
        jobs = JobStore(f"sqlite:///{service.db}")
        KeyStore(jobs).revoke(service.keys["doomed"].split("_")[1])
        jobs.close()
        t0 = time.monotonic()
        while http.get("/v1/studies").status_code == 200:
            assert time.monotonic() - t0 < 2.0, "a revoked key still works"
            time.sleep(0.05)
        assert http.get("/v1/studies").status_code == 401


def _search(http: httpx.Client, series: str, k: int = 10) -> list[dict[str, Any]]:
    r = http.post(
        "/v1/search",
        json={"query": {"series": series}, "k": k, "exclude_same_study": False},
    )
    assert r.status_code == 200, r.text
    return list(r.json()["results"][0]["hits"])


def _indexes(http: httpx.Client) -> list[tuple[str, int, dict[str, int]]]:
    out = http.get("/v1/indexes").json()
    return [
        (i["space"], i["entries"], {lv: d["vectors"] for lv, d in i["levels"].items()}) for i in out
    ]


def test_tenants_cannot_see_each_other(service: Service, tmp_path: Path) -> None:
    shared = write_series(tmp_path / "shared", phantom(4, 16, 16, seed=41))
    own_a = write_series(tmp_path / "own-a", phantom(4, 16, 16, seed=42))
    own_b = [write_series(tmp_path / f"own-b{i}", phantom(4, 16, 16, seed=50 + i)) for i in (0, 1)]
    with service.client("a") as a, service.client("b") as b:
        ja = [_submit(a, shared.directory), _submit(a, own_a.directory)]
        sa = {j["series"][0]["study"] for j in ja}
        entries_a = {j["series"][0]["entry"] for j in ja}
        studies_a = {s["study"] for s in a.get("/v1/studies", params={"limit": 1000}).json()}
        assert sa <= studies_a
        series_a = ja[0]["series"][0]["series"]
        before = _search(a, series_a)
        index_before = _indexes(a)
        count_before = len(studies_a)

        # B sends the same pixels (and more): its own entries, names and jobs
        jb = [_submit(b, shared.directory)] + [_submit(b, g.directory) for g in own_b]
        assert all(j["state"] == "done" for j in ja + jb)
        sb = {j["series"][0]["study"] for j in jb}
        entries_b = {j["series"][0]["entry"] for j in jb}
        assert not sa & sb and not entries_a & entries_b
        assert jb[0]["series"][0]["cache"] == "miss"  # A's cache never answers B

        # another tenant's ids (and their prefixes) are 404, never 403
        for path in (
            f"/v1/studies/{next(iter(sb))}",
            f"/v1/studies/{next(iter(sb))[:12]}",
            f"/v1/series/{jb[0]['series'][0]['series']}",
            f"/v1/series/{jb[0]['series'][0]['entry']}",
            f"/v1/series/{jb[0]['series'][0]['entry'][:12]}",
            f"/v1/series/{jb[0]['series'][0]['entry']}/embeddings",
            f"/v1/jobs/{jb[0]['id']}",
        ):
            assert a.get(path).status_code == 404, path
        assert a.delete(f"/v1/studies/{next(iter(sb))}").status_code in (204, 404)
        assert {j["id"] for j in a.get("/v1/jobs").json()}.isdisjoint({j["id"] for j in jb})
        qido = a.get("/dicom-web/studies", params={"limit": 1000}).json()
        assert {q["0020000D"]["Value"][0] for q in qido}.isdisjoint(sb)
        r = a.post("/v1/search", json={"query": {"series": jb[0]["series"][0]["series"]}})
        assert r.status_code == 404

        # what A sees did not change: listing, index sizes, search hits and scores
        after = _search(a, series_a)
        assert [(h["entry"], h["score"]) for h in after] == [
            (h["entry"], h["score"]) for h in before
        ]
        assert {h["entry"] for h in after} <= entries_a | _all_entries(a)
        assert not {h["entry"] for h in after} & entries_b
        assert _indexes(a) == index_before
        assert len(a.get("/v1/studies", params={"limit": 1000}).json()) == count_before
        classified = a.post(
            "/v1/classify",
            json={
                "queries": [{"series": series_a}],
                "support": [{"query": {"entry": e}, "label": "x"} for e in entries_a],
                "exclude_same_study": False,
            },
        )
        assert classified.status_code == 200, classified.text
        assert classified.json()["predictions"][0]["support"] == len(entries_a)

        # B deletes its copy of the shared study: A's stays, searchable, unchanged
        shared_b = jb[0]["series"][0]["study"]
        assert b.delete(f"/v1/studies/{shared_b}").status_code == 202
        assert b.get(f"/v1/studies/{shared_b}").status_code == 404
        assert a.get(f"/v1/studies/{ja[0]['series'][0]['study']}").status_code == 200
        assert [(h["entry"], h["score"]) for h in _search(a, series_a)] == [
            (h["entry"], h["score"]) for h in before
        ]
        assert _indexes(a) == index_before
        arr = a.get(f"/v1/series/{ja[0]['series'][0]['entry']}/embeddings")
        assert arr.status_code == 200


def _all_entries(http: httpx.Client) -> set[str]:
    return {
        s["entry"]
        for st in http.get("/v1/studies", params={"limit": 1000}).json()
        for s in st["series"]
    }


def test_the_key_is_never_kept_or_logged(service: Service) -> None:
    with service.client("a") as http:
        http.get("/v1/jobs")
        http.get("/v1/studies/nope")
    raw = service.db.read_bytes()
    text = service.log.read_text()
    for token in service.keys.values():
        secret = token.split("_", 2)[2]
        assert secret.encode() not in raw
        assert secret not in text


def test_openapi_declares_the_scheme_and_each_operation_scope(service: Service) -> None:
    with service.client(None) as http:
        spec = http.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["apiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    declared: dict[tuple[str, str], list[str]] = {}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for req in op.get("security", []):
                declared[(method.upper(), path)] = req.get("apiKey", [])
    for method, path, scope in GUARDED:
        templ = path.replace("/x/", "/{series}/").replace("/studies/x", "/studies/{study}")
        templ = templ.replace("/series/x", "/series/{series}").replace("/jobs/x", "/jobs/{job_id}")
        assert declared.get((method, templ)) == [scope], (
            method,
            templ,
            declared.get((method, templ)),
        )
    assert ("GET", "/healthz") not in declared and ("GET", "/readyz") not in declared


def test_cors_answers_only_the_configured_origins(service: Service) -> None:
    with service.client(None) as http:
        ask = {
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        }
        ok = http.options("/v1/studies", headers={"Origin": "https://viewer.example", **ask})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://viewer.example"
        other = http.options("/v1/studies", headers={"Origin": "https://evil.example", **ask})
        assert "access-control-allow-origin" not in other.headers
        plain = http.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in plain.headers


def test_a_public_address_without_keys_is_refused(tmp_path: Path) -> None:
    env = {"RADCACHE_PSEUDONYM_KEY": TEST_SECRET, "HF_HUB_OFFLINE": "1"}
    cmd = [*RADCACHE, "serve", "--host", "0.0.0.0", "--db", f"sqlite:///{tmp_path / 'j.db'}"]
    cmd += ["--model", "dinov2-tiny-random", "--store", str(tmp_path / "s.zarr")]
    done = subprocess.run(
        cmd, check=False, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "refusing to serve 0.0.0.0 without API keys" in done.stderr
    assert "radcache keys create" in done.stderr


def test_the_client_commands_send_the_key(service: Service, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from radcache.service.cli import main

    gen = write_series(tmp_path / "cli", phantom(3, 16, 16, seed=61))
    run = CliRunner().invoke
    url = ["--url", service.url]
    refused = run(main, ["jobs", *url, "--json"])
    assert refused.exit_code == 2 and "unauthenticated" in refused.output
    done = run(
        main,
        ["submit", str(gen.directory), *url, "--json"],
        env={"RADCACHE_API_KEY": service.keys["a"]},
    )
    assert done.exit_code == 0, done.output
    entry = json.loads(done.output)["series"][0]["entry"]
    listed = run(main, ["jobs", *url, "--api-key", service.keys["a_read"], "--json"])
    assert listed.exit_code == 0 and entry in listed.output
    got = run(
        main,
        ["get", entry, *url, "--api-key", service.keys["a_read"], "-o", str(tmp_path / "e.npy")],
    )
    assert got.exit_code == 0, got.output
    other = run(
        main, ["get", entry, *url, "--api-key", service.keys["b"], "-o", str(tmp_path / "f.npy")]
    )
    assert other.exit_code == 2 and "not-found" in other.output
    for result in (refused, done, listed, got, other):
        assert service.keys["a"].split("_", 2)[2] not in result.output
