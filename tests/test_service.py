"""The HTTP service: real files through the app, checked against the store; one real server."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer, open_store
from radcache.embeddings.encode import Encoder, LoadingEncoder, load_encoder
from radcache.embeddings.errors import ModelError
from radcache.service.app import build_resources, create_app
from radcache.service.jobs import JobStore
from radcache.service.settings import ServiceSettings
from tests.conftest import TEST_SECRET
from tests.dicomgen import GeneratedSeries, phantom, write_nifti, write_series, zip_bytes
from tests.servers import free_port, running_server
from tests.test_cli import RADCACHE


def _settings(tmp: Path, **kw: object) -> ServiceSettings:
    return ServiceSettings(
        model="dinov2-tiny-random",
        store=str(tmp / "store.zarr"),
        db=f"sqlite:///{tmp / 'jobs.db'}",
        upload_dir=tmp / "uploads",
        batch_size=4,
        **kw,
    )


@pytest.fixture
def client(tmp_path: Path, tiny: Encoder) -> Iterator[TestClient]:
    app = create_app(resources=build_resources(_settings(tmp_path), encoder=tiny))
    with TestClient(app) as c:
        yield c


def _files(directory: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("files", (p.name, p.read_bytes(), "application/dicom"))
        for p in sorted(directory.iterdir())
    ]


def _wait(c: TestClient | httpx.Client, location: str, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = c.get(location).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {location} did not finish: {job}")


def test_a_new_upload_is_recognised_once(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The intake tries the file-digest shortcut once; the job it queues does not again."""
    calls: list[int] = []
    recognise = Pipeline.recognise

    def counted(self: Pipeline, inputs: Any, modality: str | None = None) -> Any:
        calls.append(1)
        return recognise(self, inputs, modality)

    monkeypatch.setattr(Pipeline, "recognise", counted)
    gen = write_series(tmp_path / "once", phantom(3, 16, 16, seed=7))
    r = client.post("/v1/studies", files=_files(gen.directory))
    assert r.status_code == 202
    assert _wait(client, r.headers["location"])["state"] == "done"
    assert len(calls) == 1


def test_submit_wait_fetch_and_resubmit(client: TestClient, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "ct", phantom(5, 20, 20), shuffle=True)
    r = client.post("/v1/studies", files=_files(gen.directory))
    assert r.status_code == 202, r.text
    job = _wait(client, r.headers["location"])
    assert job["state"] == "done" and job["progress"] == {"done": 5, "total": 5}
    (series,) = job["series"]
    assert series["modality"] == "CT" and series["cache"] == "miss" and series["slices"] == 5
    # arrays as .npy equal what the store holds; the pooled vector as JSON
    npy = client.get(
        f"/v1/series/{series['series']}/embeddings",
        params={"kind": "cls"},
        headers={"accept": "application/x-npy"},
    )
    assert npy.headers["content-type"] == "application/x-npy"
    cls = np.load(io.BytesIO(npy.content))
    st = open_store(tmp_path / "store.zarr")
    np.testing.assert_array_equal(cls, st.read(series["entry"], "cls"))
    pooled = client.get(f"/v1/series/{series['series']}/embeddings").json()
    np.testing.assert_allclose(pooled["data"], st.read(series["entry"], "pooled"), rtol=1e-6)
    part = np.load(
        io.BytesIO(
            client.get(
                f"/v1/series/{series['entry']}/embeddings",
                params={"kind": "patch", "slices": "1:3", "format": "npy"},
            ).content
        )
    )
    np.testing.assert_array_equal(part, st.read(series["entry"], "patch")[1:3])
    meta = client.get(f"/v1/series/{series['series']}").json()
    assert (
        meta["slices"] == 5
        and meta["model"] == "dinov2-tiny-random"
        and "spacing" in meta["geometry"]
    )
    # the same content again: answered at once, nothing queued
    again = client.post("/v1/studies", files=_files(gen.directory))
    assert again.status_code == 200
    assert [s["cache"] for s in again.json()["series"]] == ["hit"]
    metrics = client.get("/metrics").text
    assert 'radcache_series_total{cache="miss"} 1.0' in metrics
    assert 'radcache_series_total{cache="hit"} 1.0' in metrics
    assert 'radcache_slices_total{cache="miss"} 5.0' in metrics
    assert (
        'radcache_http_requests_total{method="POST",route="/v1/studies",status="202"} 1.0'
        in metrics
    )
    assert "radcache_queue_depth 0.0" in metrics and "radcache_job_seconds_count" in metrics
    # the worker's pipeline timed its stages: the forward ran, and for part of the wall time
    stages = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'radcache_stage_seconds_total\{stage="(\w+)"\} (\S+)', metrics)
    }
    assert stages.keys() >= {"decode", "preprocess", "forward", "write", "wait_batch"}
    assert stages["forward"] > 0 and stages["decode"] > 0
    busy = re.search(r"^radcache_encoder_busy_fraction (\S+)$", metrics, re.M)
    assert busy is not None and 0 < float(busy.group(1)) <= 1


def test_bodies_zip_and_nifti(client: TestClient, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "mr", phantom(4, 16, 16, seed=2), modality="MR", intercept=0.0)
    r = client.post(
        "/v1/studies", content=zip_bytes(gen.directory), headers={"content-type": "application/zip"}
    )
    assert r.status_code == 202 and _wait(client, r.headers["location"])["state"] == "done"
    nii = write_nifti(tmp_path / "v.nii.gz", phantom(3, 16, 16, seed=3).astype(np.float32))
    r = client.post(
        "/v1/studies?modality=ct",
        content=nii.read_bytes(),
        headers={"content-type": "application/gzip"},
    )
    job = _wait(client, r.headers["location"])
    assert job["state"] == "done" and job["series"][0]["modality"] == "CT"


def _times(value: Any) -> Iterator[str]:
    """Every string in a JSON answer that starts like a date and time."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _times(v)
    elif isinstance(value, list):
        for v in value:
            yield from _times(v)
    elif isinstance(value, str) and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d", value):
        yield value


def test_a_volume_without_modality_warns_and_answers_carry_offsets(
    client: TestClient, tmp_path: Path
) -> None:
    """A NIfTI without a modality: the job's series says so (and which intensity the
    recipe gave it); every time in the answers is RFC 3339 with its offset; embeddings are
    JSON unless .npy is asked for (?format=npy, or Accept: application/x-npy)."""
    nii = write_nifti(tmp_path / "v.nii.gz", phantom(3, 16, 16, seed=5).astype(np.float32))
    posted = client.post(
        "/v1/studies", content=nii.read_bytes(), headers={"content-type": "application/gzip"}
    )
    assert posted.status_code == 202, posted.text
    job = _wait(client, posted.headers["location"])
    (series,) = job["series"]
    assert job["state"] == "done" and series["modality"] is None
    (warning,) = series["warnings"]
    assert warning.startswith("no modality given (NIfTI files carry none)")
    assert "percentile low=0.5 high=99.5" in warning and "a CT gets ct-windows" in warning
    again = client.post(  # recognised by its digest, its warning kept
        "/v1/studies", content=nii.read_bytes(), headers={"content-type": "application/gzip"}
    )
    assert again.status_code == 200 and again.json()["series"][0]["warnings"] == [warning]
    answers = [
        posted.json(),
        job,
        client.get("/v1/jobs").json(),
        client.get(f"/v1/series/{series['series']}").json(),
        client.get(f"/v1/studies/{series['study']}").json(),
    ]
    times = [t for a in answers for t in _times(a)]
    assert len(times) >= 7  # the job's created, started, finished (twice), the entry's
    for t in times:
        assert re.search(r"(Z|[+-]\d\d:\d\d)$", t), t
        assert dt.datetime.fromisoformat(t).utcoffset() == dt.timedelta(0), t

    url = f"/v1/series/{series['series']}/embeddings"
    st = open_store(tmp_path / "store.zarr")
    cls = st.read(series["entry"], "cls")
    for accept in (None, "*/*", "application/json", "application/json, application/x-npy"):
        r = client.get(url, params={"kind": "cls"}, headers={"accept": accept} if accept else {})
        assert r.headers["content-type"] == "application/json", accept
        np.testing.assert_allclose(r.json()["data"], cls, rtol=1e-6)
    for params, accept in (
        ({"kind": "cls", "format": "npy"}, "*/*"),
        ({"kind": "cls"}, "application/x-npy"),
        ({"kind": "cls"}, "application/json;q=0.5, application/x-npy"),
    ):
        r = client.get(url, params=params, headers={"accept": accept})
        assert r.headers["content-type"] == "application/x-npy", (params, accept)
        np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), cls)
    r = client.get(url, params={"format": "json"}, headers={"accept": "application/x-npy"})
    assert r.json()["kind"] == "pooled"  # the query over the header


def test_bad_files_fail_alone(client: TestClient, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "ok", phantom(3, 16, 16, seed=4))
    files = [
        *_files(gen.directory),
        ("files", ("notes.txt", b"hello", "text/plain")),
        (
            "files",
            (
                "cut.dcm",
                Path(get_testdata_file("MR_truncated.dcm")).read_bytes(),
                "application/dicom",
            ),
        ),
    ]
    job = _wait(client, client.post("/v1/studies", files=files).headers["location"])
    assert job["state"] == "partially_failed" and len(job["series"]) == 1
    codes = {e["path"]: e["code"] for e in job["errors"]}
    assert codes == {"notes.txt": "not-dicom", "cut.dcm": "truncated-file"}
    assert all("/uploads/" not in e["path"] for e in job["errors"])  # no server paths
    bad = _wait(
        client,
        client.post("/v1/studies", files=[("files", ("x.txt", b"x", "text/plain"))]).headers[
            "location"
        ],
    )
    assert bad["state"] == "failed"


_FORM = "multipart/form-data; boundary=b0"
_PART = b'--b0\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n\r\n'


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"", "headers": {"content-type": "application/zip"}}, 400, "empty-upload"),
        (
            {"content": b"{}", "headers": {"content-type": "application/json"}},
            415,
            "unsupported-media-type",
        ),
        ({"content": b"x", "headers": {"content-type": _FORM}}, 400, "bad-multipart"),
        (  # cut short: no closing boundary
            {"content": _PART + b"\x00" * 300, "headers": {"content-type": _FORM}},
            400,
            "bad-multipart",
        ),
        (
            {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
            415,
            "unsupported-media-type",
        ),
        (
            {"data": {f"f{i}": "1" for i in range(51)}, "files": [("files", ("a", b"x"))]},
            422,
            "invalid-request",
        ),
    ],
)
def test_upload_problems(
    client: TestClient, tmp_path: Path, kwargs: dict, status: int, code: str
) -> None:
    r = client.post("/v1/studies", **kwargs)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == code and body["status"] == status and "Traceback" not in r.text
    assert not any((tmp_path / "uploads").iterdir())  # nothing half-written stays


def test_other_problems_and_openapi(client: TestClient) -> None:
    for path, status, code in [
        ("/v1/jobs/nope", 404, "not-found"),
        ("/v1/series/nope", 404, "not-found"),
        ("/v1/series/x/embeddings?kind=bogus", 422, "invalid-request"),
        ("/v1/nowhere", 404, "not-found"),
    ]:
        r = client.get(path)
        assert (r.status_code, r.json()["code"]) == (status, code), path
        assert r.headers["content-type"] == "application/problem+json"
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert "RANDOM" in ready["model"]
    ops = {
        op["operationId"]
        for p in client.get("/openapi.json").json()["paths"].values()
        for op in p.values()
    }
    assert {
        "submit_study",
        "get_job",
        "list_jobs",
        "get_series",
        "get_embeddings",
        "list_models",
        "healthz",
        "readyz",
    } <= ops
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    ours = {n: s for n, s in schemas.items() if n not in ("HTTPValidationError", "ValidationError")}
    assert all(
        "examples" in s or all("examples" in p for p in s["properties"].values())
        for s in ours.values()
    ), [n for n, s in ours.items() if "examples" not in s]
    models = client.get("/v1/models").json()
    assert [m["name"] for m in models if m["loaded"]] == ["dinov2-tiny-random"]


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", {"swagger-ui-bundle.js": "javascript", "swagger-ui.css": "text/css"}),
        ("/redoc", {"redoc.standalone.js": "javascript"}),
    ],
)
def test_docs_pages_use_only_local_assets(
    client: TestClient, page: str, assets: dict[str, str]
) -> None:
    """/docs and /redoc work offline: every script, style and icon comes from this server."""
    r = client.get(page)
    assert r.status_code == 200
    html = r.text
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
    assert urls, html
    assert not [u for u in urls if "//" in u], urls  # no CDN, no absolute URL at all
    assert "cdn" not in html.lower() and "https://" not in html
    wanted = {**assets, "favicon.png": "image/png"}
    for name, kind in wanted.items():
        url = next(u for u in urls if u.endswith(f"/{name}"))
        got = client.get(url)
        assert got.status_code == 200, url
        assert kind in got.headers["content-type"], (url, got.headers["content-type"])
        assert len(got.content) > 1000, url
    assert "/openapi.json" in urls


def test_upload_limit(tmp_path: Path, tiny: Encoder) -> None:
    app = create_app(
        resources=build_resources(_settings(tmp_path, max_upload_bytes=1000), encoder=tiny)
    )
    gen = write_series(tmp_path / "big", phantom(3, 32, 32))
    with TestClient(app) as c:
        r = c.post("/v1/studies", files=_files(gen.directory))
    assert r.status_code == 413 and r.json()["code"] == "payload-too-large"
    assert not any((tmp_path / "uploads").iterdir())  # nothing half-written stays


def test_accepted_jobs_survive_a_restart(tmp_path: Path, tiny: Encoder) -> None:
    settings = _settings(tmp_path)
    gen = write_series(tmp_path / "in", phantom(3, 16, 16, seed=6))
    upload = settings.upload_dir / "pending"
    shutil.copytree(gen.directory, upload)
    row = JobStore(settings.db).create(str(upload))  # accepted, then the server died
    with TestClient(create_app(resources=build_resources(settings, encoder=tiny))) as c:
        job = _wait(c, f"/v1/jobs/{row.id}")
    assert job["state"] == "done" and job["series"][0]["slices"] == 3


def test_real_server(tmp_path: Path) -> None:
    with running_server(tmp_path) as (base, log):
        with httpx.Client(base_url=base, timeout=30) as http:
            gen = write_series(tmp_path / "ct", phantom(4, 16, 16, seed=7))
            r = http.post(
                "/v1/studies",
                content=zip_bytes(gen.directory),
                headers={"content-type": "application/zip"},
            )
            assert r.status_code == 202
            job = _wait(http, r.headers["location"])
            assert job["state"] == "done"
            entry = job["series"][0]["entry"]
            arr = np.load(
                io.BytesIO(
                    http.get(f"/v1/series/{entry}/embeddings?kind=cls_last4&format=npy").content
                )
            )
            assert arr.shape == (4, 2, 64)
            # 20 different studies uploaded at once all complete, with the library's results
            studies = [
                write_series(tmp_path / f"c{i}", phantom(3, 16, 16, seed=100 + i))
                for i in range(20)
            ]

            def post(g: GeneratedSeries) -> str:
                body = zip_bytes(g.directory)
                r = http.post(
                    "/v1/studies", content=body, headers={"content-type": "application/zip"}
                )
                assert r.status_code == 202, r.text
                return str(r.headers["location"])

            with ThreadPoolExecutor(20) as pool:
                locations = list(pool.map(post, studies))
            jobs = [_wait(http, loc, timeout=120) for loc in locations]
        assert all(j["state"] == "done" for j in jobs)
        entries = [j["series"][0]["entry"] for j in jobs]
        assert len(set(entries)) == 20
        served = open_store(tmp_path / "s.zarr")
        local = Pipeline(
            load_encoder("dinov2-tiny-random", device="cpu"),
            EmbeddingStore(tmp_path / "l.zarr"),
            Pseudonymizer(TEST_SECRET.encode()),
            batch_size=32,
        )
        for g, e in zip(studies, entries, strict=True):
            (mine,) = local.embed([g.directory]).series
            assert mine.entry == e  # same key: same pixels, weights, recipe, precision
            np.testing.assert_array_equal(served.read(e, "cls"), local.store.read(e, "cls"))
    out = log.read_text()
    assert "Traceback" not in out, out


def test_serve_without_weights_says_so_once(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "RADCACHE_PSEUDONYM_KEY": TEST_SECRET,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    p = subprocess.run(
        [*RADCACHE, "serve", "--port", str(free_port()), "--store", str(tmp_path / "s.zarr")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 2
    assert "[model-unavailable]" in p.stderr and "dinov2-tiny-random" in p.stderr
    assert "Traceback" not in p.stderr


def test_studies_listing_and_consent_withdrawal(client: TestClient, tmp_path: Path) -> None:
    a = write_series(tmp_path / "a", phantom(3, 16, 16, seed=11))
    b = write_series(tmp_path / "b", phantom(4, 16, 16, seed=12), modality="MR", intercept=0.0)
    ja = _wait(client, client.post("/v1/studies", files=_files(a.directory)).headers["location"])
    jb = _wait(client, client.post("/v1/studies", files=_files(b.directory)).headers["location"])
    sa, sb = ja["series"][0], jb["series"][0]
    studies = {s["study"]: s for s in client.get("/v1/studies").json()}
    assert set(studies) == {sa["study"], sb["study"]}
    assert studies[sb["study"]]["modalities"] == ["MR"]
    assert client.get(f"/v1/studies/{sa['study']}").json()["series"][0]["slices"] == 3
    gone = client.delete(f"/v1/studies/{sa['study']}")
    assert gone.status_code == 202 and gone.json()["kind"] == "erase"
    assert gone.headers["location"] == f"/v1/jobs/{gone.json()['id']}"
    assert client.delete(f"/v1/studies/{sa['study']}").status_code == 204  # idempotent
    assert client.get(f"/v1/studies/{sa['study']}").status_code == 404
    assert client.get(f"/v1/series/{sa['series']}").status_code == 404
    st = open_store(tmp_path / "store.zarr")
    (space,) = {e.space for e in st.series()}
    assert st.table(space).keys == [sb["entry"]]  # gone from the bulk table too
    # nothing of it is left to recognise: sending it again embeds it again
    again = client.post("/v1/studies", files=_files(a.directory))
    assert again.status_code == 202
    assert _wait(client, again.headers["location"])["series"][0]["cache"] == "miss"


def test_submission_options(client: TestClient, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "o", phantom(3, 16, 16, seed=90))
    lung = json.dumps({"intensity": {"kind": "ct-windows", "windows": [[-600, 1500]]}})
    fields = {
        "recipe": lung,
        "labels": json.dumps({"finding": "nodule"}),
        "patch_tokens": "false",
        "model": "dinov2-tiny-random",
    }
    job = _wait(
        client,
        client.post("/v1/studies", files=_files(gen.directory), data=fields).headers["location"],
    )
    assert job["state"] == "done"
    meta = client.get(f"/v1/series/{job['series'][0]['entry']}").json()
    assert meta["recipe"]["intensity"]["windows"] == [[-600.0, 1500.0]]
    assert meta["labels"] == {"finding": "nodule"} and "patch" not in meta["kinds"]
    default = _wait(
        client, client.post("/v1/studies", files=_files(gen.directory)).headers["location"]
    )
    assert (
        default["series"][0]["entry"] != job["series"][0]["entry"]
    )  # another recipe: another entry
    for data, status, code in [
        ({"model": "dinov2-giant"}, 409, "model-not-loaded"),
        ({"model": "no-such-model"}, 404, "unknown-model"),
        ({"labels": "[1, 2]"}, 422, "invalid-request"),
        (
            {
                "recipe": json.dumps(
                    {"intensity": {"kind": "ct-windows", "windows": [[0, 1], [0, 1]]}}
                )
            },
            422,
            "invalid-recipe",
        ),
    ]:
        r = client.post("/v1/studies", files=_files(gen.directory), data=data)
        assert (r.status_code, r.json()["code"]) == (status, code), data


def test_queue_full_and_not_ready(tmp_path: Path, tiny: Encoder) -> None:
    res = build_resources(_settings(tmp_path, queue_size=1), encoder=tiny)
    res.worker._stop.set()  # a worker that has stopped: jobs wait, the server is not ready
    gen = write_series(tmp_path / "q", phantom(2, 16, 16, seed=91))
    with TestClient(create_app(resources=res)) as c:
        assert c.post("/v1/studies", files=_files(gen.directory)).status_code == 202
        full = c.post("/v1/studies", files=_files(gen.directory))
        assert (full.status_code, full.json()["code"]) == (503, "queue-full")
        assert full.headers["retry-after"] == "5"
        ready = c.get("/readyz")
        assert (ready.status_code, ready.json()["code"]) == (503, "not-ready")


def test_readiness_with_weights_loading_in_the_background(tmp_path: Path, tiny: Encoder) -> None:
    """Ready while the weights load (reads need none; a submission waits for them), not
    ready once their load has failed, saying why; the job fails with the same reason."""
    gate = threading.Event()

    def slow() -> Encoder:
        gate.wait(30)
        return tiny

    loading = cast(Encoder, LoadingEncoder(tiny.cfg, slow))
    gen = write_series(tmp_path / "w", phantom(2, 16, 16, seed=93))
    with TestClient(create_app(resources=build_resources(_settings(tmp_path), loading))) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model_loaded"] is False
        job = c.post("/v1/studies", files=_files(gen.directory))
        assert job.status_code == 202 and c.get(job.headers["location"]).json()["state"] in (
            "queued",
            "running",
        )
        gate.set()
        assert _wait(c, job.headers["location"])["state"] == "done"
        assert c.get("/readyz").json()["model_loaded"] is True

    def broken() -> Encoder:
        raise ModelError("model.safetensors is truncated; download it again.")

    failed = cast(Encoder, LoadingEncoder(tiny.cfg, broken))
    res = build_resources(_settings(tmp_path / "f"), failed)
    with TestClient(create_app(resources=res)) as c:
        ready = c.get("/readyz")
        assert (ready.status_code, ready.json()["code"]) == (503, "not-ready")
        assert "truncated" in ready.json()["detail"]
        job = _wait(c, c.post("/v1/studies", files=_files(gen.directory)).headers["location"])
        assert job["state"] == "failed" and "truncated" in (job["failure"] or "")


def _study_pages(c: TestClient, url: str) -> tuple[list[list[str]], list[str]]:
    """Every page from ``url`` on, following the Link headers; and the links followed."""
    pages, links = [], []
    while True:
        r = c.get(url)
        assert r.status_code == 200, r.text
        pages.append([s["study"] for s in r.json()])
        if "next" not in r.links:
            return pages, links
        url = r.links["next"]["url"]
        links.append(url)


def test_studies_come_in_pages_from_the_catalog(client: TestClient, store_path: Path) -> None:
    from tests.test_entry_catalog import _put

    res = client.app.state.resources  # type: ignore[attr-defined]
    other = EmbeddingStore(res.store.url)  # another process writes into the store
    for i in range(14):  # study0 … study6, two series each
        _put(other, i)
    res.keeper.refresh()  # the keeper's periodic refresh finds them
    pages, links = _study_pages(client, "/v1/studies?limit=3")
    assert pages == [["study0", "study1", "study2"], ["study3", "study4", "study5"], ["study6"]]
    assert all(link.startswith("/v1/studies?limit=3&cursor=") for link in links)
    study = client.get("/v1/studies?limit=3").json()[0]
    assert [s["series"] for s in study["series"]] == ["series0", "series1"]
    assert study["series"][0]["slices"] == 2 and study["modalities"] == ["CT", "MR"]
    # a study stored between two pages comes once, on a later page
    first = client.get("/v1/studies?limit=3")
    _put(other, 30, study="study4b")
    res.keeper.refresh()
    rest, _ = _study_pages(client, first.links["next"]["url"])
    assert [s for p in rest for s in p] == ["study3", "study4", "study4b", "study5", "study6"]
    # offset still pages (older clients); not together with a cursor; cursors are checked
    assert [s["study"] for s in client.get("/v1/studies?limit=2&offset=3").json()] == [
        "study3",
        "study4",
    ]
    cursor = first.links["next"]["url"].rpartition("cursor=")[2]
    for bad in (f"/v1/studies?cursor={cursor}&offset=2", "/v1/studies?cursor=nope"):
        r = client.get(bad)
        assert (r.status_code, r.json()["code"]) == (422, "invalid-request"), bad
    assert client.get("/v1/series/series5").json()["entry"] == f"{6:032x}"
    assert client.get("/dicom-web/studies?StudyInstanceUID=study2").json()[0]["00201206"] == {
        "vr": "IS",
        "Value": [2],
    }


def test_deleting_while_the_index_refreshes_drops_nothing_else(client: TestClient) -> None:
    """DELETE beside a refresh loop: every entry not deleted stays indexed and listed."""
    import threading

    from tests.test_entry_catalog import _put

    res = client.app.state.resources  # type: ignore[attr-defined]
    keys = [_put(res.store, i) for i in range(24)]  # study0 … study11
    res.keeper.refresh()
    space = res.store.get(keys[0]).space
    stop, seen, failures = threading.Event(), [], []

    def refresh() -> None:
        try:
            while not stop.is_set():
                res.keeper.refresh()
                seen.append(set(res.indexes.spaces[space].catalog.by_key))
        except BaseException as exc:  # reported below
            failures.append(exc)

    t = threading.Thread(target=refresh)
    t.start()
    try:
        for s in range(0, 12, 3):
            assert client.delete(f"/v1/studies/study{s}").status_code == 202
            assert f"study{s}" not in _study_pages(client, "/v1/studies?limit=5")[0][0]
    finally:
        stop.set()
        t.join(60)
    assert not failures and seen
    gone = {keys[2 * s + j] for s in range(0, 12, 3) for j in (0, 1)}
    assert all(set(keys) - gone <= indexed for indexed in seen)
    assert set(res.indexes.spaces[space].catalog.by_key) == set(keys) - gone
    listed = [s for p in _study_pages(client, "/v1/studies?limit=5")[0] for s in p]
    assert listed == sorted(f"study{i}" for i in range(12) if i % 3)


def test_the_catalog_is_built_at_start_up_and_follows_the_store_after(
    tmp_path: Path, tiny: Encoder
) -> None:
    from tests.test_entry_catalog import _put

    settings = _settings(tmp_path)
    st = EmbeddingStore(settings.store)  # filled before the service (or its catalog) existed
    for i in range(6):
        _put(st, i)
    with TestClient(create_app(resources=build_resources(settings, encoder=tiny))) as c:
        assert [s["study"] for s in c.get("/v1/studies").json()] == ["study0", "study1", "study2"]
    _put(st, 6)  # while the service is down: stored, and a study deleted
    st.delete_study("study0")
    with TestClient(create_app(resources=build_resources(settings, encoder=tiny))) as c:
        assert [s["study"] for s in c.get("/v1/studies").json()] == ["study1", "study2", "study3"]
        assert c.get("/v1/series/series0").status_code == 404


def test_job_reports_name_skipped_objects_and_the_client_s_paths(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An RT plan is a done job with a skipped item and its reason; an error names the
    file as the client sent it; a failed job leaves one structured line in the log."""
    plan = Path(get_testdata_file("rtplan.dcm")).read_bytes()
    r = client.post(
        "/v1/studies", files=[("files", ("plan/rtplan.dcm", plan, "application/dicom"))]
    )
    job = _wait(client, r.headers["location"])
    assert job["state"] == "done" and job["series"] == []
    assert job["skipped"] == [{"path": "plan/rtplan.dcm", "reason": "RT plan object, no image"}]
    cut = Path(get_testdata_file("MR_truncated.dcm")).read_bytes()
    name = "mr_folder/MR_truncated.dcm"
    with caplog.at_level(logging.WARNING, logger="radcache.service"):
        r = client.post("/v1/studies", files=[("files", (name, cut, "application/dicom"))])
        job = _wait(client, r.headers["location"])
    assert job["state"] == "failed"
    assert [(e["path"], e["code"]) for e in job["errors"]] == [(name, "truncated-file")]
    lines = [m for m in caplog.messages if "job_event=" in m]
    assert lines == [
        f"job_event=failed job={job['id']} kind=embed code=truncated-file "
        "series=0 errors=1 skipped=0"
    ]


def test_copies_of_one_file_in_a_zip_are_recognised_as_cached(client: TestClient) -> None:
    """Four copies of one instance: embedded once, then answered from the cache (200),
    both answers noting the duplicates; a later upload notes its own duplicates only."""
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(4):
            z.writestr(f"copy{i}/MR_small.dcm", data)
    post = {"content": buf.getvalue(), "headers": {"content-type": "application/zip"}}
    first = client.post("/v1/studies", **post)
    assert first.status_code == 202
    job = _wait(client, first.headers["location"])
    again = client.post("/v1/studies", **post)
    assert again.status_code == 200, again.json()
    for answer in (job, again.json()):
        (series,) = answer["series"]
        assert "3 duplicate instance(s)" in " ".join(series["warnings"])
    assert again.json()["series"][0]["cache"] == "hit"
    one = client.post("/v1/studies", files=[("files", ("a.dcm", data, "application/dicom"))])
    assert one.status_code == 200, one.json()
    assert not any("duplicate" in w for w in one.json()["series"][0]["warnings"])
    two = client.post(
        "/v1/studies", files=[("files", (n, data, "application/dicom")) for n in "ab"]
    )
    assert two.status_code == 200, two.json()
    assert "1 duplicate instance(s)" in " ".join(two.json()["series"][0]["warnings"])


def test_patch_storage_is_a_submission_option_and_reads_decode(
    client: TestClient, tmp_path: Path
) -> None:
    gen = write_series(tmp_path / "p", phantom(3, 16, 16, seed=91))
    bad = client.post("/v1/studies", files=_files(gen.directory), data={"patch_storage": "int4"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid-request"
    r = client.post("/v1/studies", files=_files(gen.directory), data={"patch_storage": "pooled:2"})
    (series,) = _wait(client, r.headers["location"])["series"]
    arr = client.get(f"/v1/series/{series['entry']}/embeddings", params={"kind": "patch"}).json()
    assert arr["shape"][1:3] == [2, 2] and arr["dtype"] == "float16"
    meta = client.get(f"/v1/series/{series['entry']}").json()
    assert "patch_scale" not in meta["kinds"]
