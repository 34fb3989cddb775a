"""Search and few-shot classification through the HTTP service, on real embedded images."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from radcache.embeddings.encode import Encoder
from radcache.service.app import build_resources, create_app
from radcache.service.settings import ServiceSettings
from tests.dicomgen import write_nifti, write_series


def anatomy(seed: int, n: int = 4, size: int = 112) -> np.ndarray:
    """Blob 'anatomy' in stored values (HU + 1024, int16). The test model has random
    weights, whose CLS token follows global intensity more than shape: so each volume has
    its own background level, each slice its own offset and bright blobs, and a noisy,
    shifted copy stays closest to its original slice."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    vol = np.empty((n, size, size), np.float32)
    for z in range(n):
        vol[z] = -950.0 + 110.0 * seed + 30.0 * z
        for _ in range(3):
            cy, cx = rng.uniform(16, size - 16, size=2)
            r = rng.uniform(8, 20)
            vol[z] += rng.uniform(800, 2000) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r**2))
    return (vol + 1024).astype(np.int16)


def _wait(c: TestClient, location: str) -> dict:
    for _ in range(1200):
        job = c.get(location).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(job)


def _submit(c: TestClient, directory: Path, **form: str) -> dict:
    files = [
        ("files", (p.name, p.read_bytes(), "application/dicom"))
        for p in sorted(directory.iterdir())
    ]
    r = c.post("/v1/studies", files=files, data=form)
    assert r.status_code in (200, 202), r.text
    job = r.json() if r.status_code == 200 else _wait(c, r.headers["location"])
    assert job["state"] == "done", job
    return job["series"][0]


@pytest.fixture(scope="module")
def cached(
    tmp_path_factory: pytest.TempPathFactory, tiny_fp32: Encoder
) -> Iterator[tuple[TestClient, list[dict], Path]]:
    """A service with 8 series in 6 studies: CT and MR, labelled, one collection."""
    tmp = tmp_path_factory.mktemp("search")
    settings = ServiceSettings(
        model="dinov2-tiny-random",
        store=str(tmp / "store.zarr"),
        db=f"sqlite:///{tmp / 'jobs.db'}",
        upload_dir=tmp / "uploads",
        batch_size=4,
        patch_tokens=False,
        keep_descriptions=True,  # the description filter needs descriptions
    )
    app = create_app(resources=build_resources(settings, encoder=tiny_fp32))
    with TestClient(app) as c:
        series = []
        for i in range(8):
            study = f"1.2.826.0.1.3680043.8.498.{100 + min(i, 5)}"  # series 5, 6, 7 share a study
            gen = write_series(
                tmp / f"s{i}",
                anatomy(i),
                modality="MR" if i % 4 == 3 else "CT",
                study_uid=study,
                intercept=-1024.0 if i % 4 != 3 else 0.0,
                extra={
                    "BodyPartExamined": "CHEST" if i % 2 else "HEAD",
                    "SeriesDescription": f"Series {i} axial",
                },
            )
            form = {"labels": json.dumps({"finding": "nodule" if i % 2 else "normal"})}
            if i < 3:
                form["collection"] = "teaching"
            series.append(_submit(c, gen.directory, **form))
        yield c, series, tmp


def _search(c: TestClient, status: int = 200, **body: object) -> dict:
    r = c.post("/v1/search", json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_search_by_series_excludes_own_study_and_applies_filters(cached) -> None:
    c, series, _ = cached
    out = _search(c, query={"series": series[5]["series"]}, k=10)
    (res,) = out["results"]
    studies = {h["study"] for h in res["hits"]}
    assert series[5]["study"] not in studies  # series 5, 6, 7 share that study: none return
    assert {h["series"] for h in res["hits"]}.isdisjoint(s["series"] for s in series[5:])
    assert [h["rank"] for h in res["hits"]] == list(range(1, len(res["hits"]) + 1))
    scores = [h["score"] for h in res["hits"]]
    assert scores == sorted(scores, reverse=True)
    hit = res["hits"][0]
    assert {"modality", "body_part", "series_description", "labels"} <= set(hit)
    ct_chest = _search(
        c,
        query={"series": series[0]["series"]},
        k=10,
        filters={"modality": ["CT"], "body_part": ["chest"], "labels": {"finding": "nodule"}},
    )["results"][0]["hits"]
    assert ct_chest and all(
        h["modality"] == "CT" and h["body_part"] == "CHEST" and h["labels"]["finding"] == "nodule"
        for h in ct_chest
    )
    teaching = _search(c, query={"series": series[4]["series"]}, filters={"collection": "teaching"})
    assert {h["series"] for h in teaching["results"][0]["hits"]} == {
        s["series"] for s in series[:3]
    }
    described = _search(
        c, query={"series": series[4]["series"]}, filters={"description": "SERIES 2"}
    )
    assert [h["series"] for h in described["results"][0]["hits"]] == [series[2]["series"]]


def test_a_kos_answer_needs_the_uid_vault(cached) -> None:
    c, series, _ = cached  # this service keeps no original UIDs
    out = _search(c, 409, query={"series": series[0]["series"]}, k=3, **{"as": "kos"})
    assert out["code"] == "uid-vault-off" and "RADCACHE_UID_VAULT_KEY" in out["detail"]


def test_slice_level_group_by_and_vector_queries(cached) -> None:
    c, series, _ = cached
    out = _search(c, query={"series": series[1]["series"], "slice": 2}, k=3, group_by="series")
    assert out["level"] == "slice"
    hits = out["results"][0]["hits"]
    assert len(hits) == 3 and len({h["series"] for h in hits}) == 3
    assert all(isinstance(h["slice"], int) for h in hits)
    (space,) = {r["space"] for r in out["results"]}
    own = c.get(f"/v1/series/{series[1]['series']}/embeddings").json()["data"]
    by_vec = _search(c, query={"vector": own}, space=space, k=1)
    assert by_vec["results"][0]["hits"][0]["series"] == series[1]["series"]  # nothing excluded
    bad = _search(c, 422, query={"vector": [1.0, 2.0]}, space=space)
    assert bad["code"] == "index-error"
    assert _search(c, 404, query={"series": "no-such"})["code"] == "not-found"
    assert _search(c, 422, query={"series": "a", "study": "b"})["code"] == "invalid-request"
    indexes = c.get("/v1/indexes").json()
    assert {i["space"] for i in indexes} >= {space}
    info = next(i for i in indexes if i["space"] == space)
    assert info["levels"]["series"]["kind"] == "exact" and info["levels"]["slice"]["vectors"] > 0


def test_near_duplicate_upload_finds_its_original_at_rank_1(cached) -> None:
    c, series, tmp = cached
    rng = np.random.default_rng(7)
    for i in (0, 2, 4):
        near = anatomy(i).astype(np.float32) + rng.normal(0, 8, size=anatomy(i).shape)
        near = np.roll(near, 1, axis=2).astype(np.int16)  # small noise, one-pixel shift
        gen = write_series(tmp / f"near{i}", near, study_uid=f"1.2.826.0.1.3680043.8.498.9{i}")
        files = [
            ("files", (p.name, p.read_bytes(), "application/dicom"))
            for p in sorted(gen.directory.iterdir())
        ]
        r = c.post("/v1/search", files=files, data={"request": json.dumps({"k": 3})})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["hits"][0]["series"] == series[i]["series"]
        r = c.post(
            "/v1/search", files=files, data={"request": json.dumps({"k": 1, "level": "slice"})}
        )
        by_slice = r.json()["results"]
        assert len(by_slice) == 4  # one query per uploaded slice …
        for q in by_slice:  # … each finds the same slice of its original
            (h,) = q["hits"]
            assert (h["series"], h["slice"]) == (series[i]["series"], q["query"]["slice"])
    assert len(c.get("/v1/studies").json()) == 6  # nothing was stored by searching


def test_upload_search_can_store_and_nifti_needs_a_modality(cached) -> None:
    c, _, tmp = cached
    path = write_nifti(tmp / "q.nii.gz", anatomy(11).astype(np.float32) - 1024)
    files = [("files", ("q.nii.gz", path.read_bytes(), "application/gzip"))]
    r = c.post(
        "/v1/search",
        files=files,
        data={"request": json.dumps({"k": 2, "modality": "CT", "store": True})},
    )
    assert r.status_code == 200, r.text
    assert len(c.get("/v1/studies").json()) == 7  # stored, because it was asked
    assert len(r.json()["results"][0]["hits"]) == 2


def test_classify_by_label_field_and_support(cached) -> None:
    c, series, _ = cached
    r = c.post(
        "/v1/classify",
        json={"queries": [{"series": series[2]["series"]}], "label_field": "finding", "k": 5},
    )
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert set(p["probabilities"]) == {"normal", "nodule"}
    # support: the other labelled CT series (MR lives in its own recipe space): 0, 1, 4, 5, 6
    assert abs(sum(p["probabilities"].values()) - 1) < 1e-6 and p["support"] == 5
    support = [
        {"query": {"series": s["series"]}, "label": f"case{i}"} for i, s in enumerate(series[:4])
    ]
    r = c.post(
        "/v1/classify",
        json={
            "queries": [{"series": series[1]["series"]}],
            "support": support,
            "method": "prototype",
            "exclude_same_study": False,
        },
    )
    (p,) = r.json()["predictions"]
    assert p["label"] == "case1"  # its own series is in the support set
    r = c.post("/v1/classify", json={"queries": [{"series": series[1]["series"]}]})
    assert r.status_code == 422 and r.json()["code"] == "invalid-request"


def test_ids_as_shown_are_taken_back_as_prefixes(cached) -> None:
    """The 12 characters a table shows of an entry key, series or study name it on every
    path and in search; fewer than 4 is no prefix (not-found)."""
    c, series, _ = cached
    s = series[1]
    for ref in (s["entry"][:12], s["series"][:12], s["entry"][:4].upper()):
        got = c.get(f"/v1/series/{ref}")
        assert got.status_code == 200 and got.json()["entry"] == s["entry"], got.text
    arr = c.get(f"/v1/series/{s['series'][:12]}/embeddings", params={"kind": "cls"}).json()
    assert arr["entry"] == s["entry"]
    assert c.get(f"/v1/studies/{s['study'][:12]}").json()["study"] == s["study"]
    for query in ({"entry": s["entry"][:12]}, {"series": s["series"][:12]}):
        (res,) = _search(c, query=query, k=1, exclude_same_study=False)["results"]
        assert res["hits"][0]["entry"] == s["entry"], res
    assert c.get(f"/v1/series/{s['entry'][:3]}").json()["code"] == "not-found"


def test_deleted_study_never_comes_back(cached) -> None:
    c, series, _ = cached
    target = series[4]  # a CT series, alone in its study
    before = _search(c, query={"series": series[0]["series"]}, k=20)["results"][0]["hits"]
    assert target["series"] in {h["series"] for h in before}
    assert c.delete(f"/v1/studies/{target['study']}").status_code == 202
    after = _search(c, query={"series": series[0]["series"]}, k=20)["results"][0]["hits"]
    assert target["series"] not in {h["series"] for h in after}
    assert len(after) == len(before) - 1
    slices = _search(c, query={"series": series[0]["series"]}, k=100, level="slice")
    assert target["series"] not in {h["series"] for h in slices["results"][0]["hits"]}
    assert _search(c, 404, query={"series": target["series"]})["code"] == "not-found"
