"""Which study an upload is recorded under: files with the same pixels as a stored study but
their own StudyInstanceUID (POST and STOW-RS, sent once and again), and the patient and
study references of NIfTI uploads (POST form fields, the clients' submit, `radcache embed`),
through the in-process service."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from radcache.clients import RadcacheClient
from radcache.embeddings import Pseudonymizer, open_store
from radcache.embeddings.encode import Encoder
from radcache.service.app import build_resources, create_app
from radcache.service.jobs import JobStore
from tests.conftest import TEST_SECRET
from tests.dicomgen import GeneratedSeries, phantom, write_nifti, write_series
from tests.test_service import _settings

Service = tuple[TestClient, Path]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_fp32: Encoder) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("resend")
    settings = _settings(
        tmp,
        patch_tokens=False,
        pseudonym_key=TEST_SECRET,  # set before the per-test settings are
        erase_after_s=0.05,  # a deletion's erasure pass at once
    )
    with TestClient(create_app(resources=build_resources(settings, encoder=tiny_fp32))) as c:
        yield c, tmp


def _files(paths: list[Path], kind: str = "application/dicom") -> list[tuple[str, Any]]:
    return [("files", (p.name, p.read_bytes(), kind)) for p in sorted(paths)]


def _done(c: TestClient, r: Any) -> dict[str, Any]:
    """The finished job of a submission: answered at once (200) or queued (202)."""
    assert r.status_code in (200, 202), r.text
    location = r.headers.get("location")
    end = time.monotonic() + 60
    job = r.json() if r.status_code == 200 and "state" in r.json() else {"state": "queued"}
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < end, job
        time.sleep(0.05)
        job = c.get(location).json()
    assert job["state"] == "done", job
    return job


def _delete(c: TestClient, study: str) -> None:
    """DELETE a study, waiting for its erasure job where the answer is one."""
    r = c.delete(f"/v1/studies/{study}")
    assert r.status_code in (202, 204), r.text
    if r.status_code == 202:
        _done(c, r)


def _stow(c: TestClient, paths: list[Path], query: str = "") -> Any:
    boundary = "resend-boundary"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
        + p.read_bytes() + b"\r\n"
        for p in sorted(paths)
    ) + f"--{boundary}--\r\n".encode()  # fmt: skip
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return c.post(f"/dicom-web/studies{query}", content=body, headers={"content-type": ctype})


def _restudied(gen: GeneratedSeries, directory: Path) -> list[Path]:
    """``gen``'s files, byte for byte but for a StudyInstanceUID of their own."""
    directory.mkdir()
    study = generate_uid()
    for p in gen.files:
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.save_as(directory / p.name)
    return sorted(directory.iterdir())


def _arrays_and_search(
    c: TestClient, store: Path, entry: str, study: str, found_as: str | None = None
) -> None:
    """Entry ``entry`` is whole, listed under ``study``, readable and found by search (named
    ``found_as``, its own study where another study names it too, else ``study``)."""
    listed = c.get(f"/v1/studies/{study}")
    assert listed.status_code == 200 and [s["entry"] for s in listed.json()["series"]] == [entry]
    npy = c.get(f"/v1/series/{entry}/embeddings", params={"kind": "cls", "format": "npy"})
    assert npy.status_code == 200 and np.load(io.BytesIO(npy.content)).shape[0] == 3
    pooled = c.get(f"/v1/series/{entry}/embeddings").json()["data"]
    info = open_store(store).get(entry)
    assert info is not None
    body = {"query": {"vector": pooled}, "space": info.space, "k": 1}
    (hit,) = c.post("/v1/search", json=body).json()["results"][0]["hits"]
    assert (hit["entry"], hit["study"]) == (entry, found_as or study)


def test_same_pixels_under_another_study_are_named_by_it_through_post(
    service: Service, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    c, tmp = service
    store = tmp / "store.zarr"
    raw = phantom(3, 16, 16, seed=301)
    a = write_series(tmp_path / "a", raw)
    b = write_series(tmp_path / "b", raw)  # the same pixels, UIDs of its own
    sa, sb = pseudo.name("study", a.study_uid), pseudo.name("study", b.study_uid)
    (first,) = _done(c, c.post("/v1/studies", files=_files(a.files)))["series"]
    assert (first["study"], first["cache"]) == (sa, "miss")
    for attempt in ("sent", "re-sent"):  # the second time from its files' digests alone
        r = c.post("/v1/studies", files=_files(b.files))
        assert r.status_code == (202 if attempt == "sent" else 200), attempt
        (got,) = _done(c, r)["series"]
        assert (got["study"], got["entry"], got["cache"]) == (sb, first["entry"], "hit"), attempt
    again = c.post("/v1/studies", files=_files(a.files))  # the same files, the same study
    assert again.status_code == 200
    (hit,) = again.json()["series"]
    assert (hit["study"], hit["series"], hit["cache"]) == (sa, first["series"], "hit")
    st = open_store(store)
    aliases = st.get(first["entry"]).attrs["aliases"]
    assert [x["study"] for x in aliases] == [sb]  # one alias, none added by the re-sends
    _arrays_and_search(c, store, first["entry"], sb, found_as=sa)
    _delete(c, sb)
    assert c.get(f"/v1/studies/{sb}").status_code == 404
    _arrays_and_search(c, store, first["entry"], sa)  # A is whole
    record = st.volume_record(st.get(first["entry"]).attrs["content_hash"])
    assert record is not None and sb not in {g["study"] for g in record["groups"].values()}
    # B sent again after its deletion: decoded and named by its own study again
    (back,) = _done(c, c.post("/v1/studies", files=_files(b.files)))["series"]
    assert (back["study"], back["entry"]) == (sb, first["entry"])
    _delete(c, sa)
    assert c.get(f"/v1/studies/{sa}").status_code == 404
    _arrays_and_search(c, store, first["entry"], sb)  # B is whole, named by B alone
    info = open_store(store).get(first["entry"])
    assert info is not None and info.study == sb and not info.attrs.get("aliases")
    record = st.volume_record(info.attrs["content_hash"])
    assert record is not None and record["study"] == sb
    assert {g["study"] for g in record["groups"].values()} == {sb}
    (plain,) = c.post("/v1/studies", files=_files(b.files)).json()["series"]
    assert (plain["study"], plain["cache"]) == (sb, "hit")


def test_same_pixels_under_another_study_are_named_by_it_through_stow(
    service: Service, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    c, tmp = service
    store = tmp / "store.zarr"
    a = write_series(tmp_path / "a", phantom(3, 16, 16, seed=302))
    b = _restudied(a, tmp_path / "b")  # only the StudyInstanceUID differs
    sa = pseudo.name("study", a.study_uid)
    sb = pseudo.name("study", pydicom.dcmread(b[0]).StudyInstanceUID)
    (first,) = _done(c, _stow(c, a.files))["series"]
    assert first["study"] == sa
    for attempt in ("sent", "re-sent"):
        (got,) = _done(c, _stow(c, b))["series"]
        assert (got["study"], got["entry"], got["series"]) == (
            sb,
            first["entry"],
            first["series"],
        ), attempt
    assert [s["entry"] for s in c.get(f"/v1/studies/{sb}").json()["series"]] == [first["entry"]]
    _delete(c, sa)
    _arrays_and_search(c, store, first["entry"], sb)
    (again,) = _done(c, _stow(c, a.files))["series"]  # A's files back: named A again
    assert (again["study"], again["entry"]) == (sa, first["entry"])
    _delete(c, sb)
    _arrays_and_search(c, store, first["entry"], sa)


def _nifti(tmp: Path, name: str, seed: int) -> Path:
    return write_nifti(tmp / name, phantom(3, 16, 16, seed=seed).astype(np.float32))


def test_nifti_references_name_patient_and_study_and_exclude_the_same_patient(
    service: Service, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    c, tmp = service
    sent = {
        "one": (_nifti(tmp_path, "one.nii.gz", 311), {"patient": "PAT-311", "study": "ST-1"}),
        "two": (_nifti(tmp_path, "two.nii.gz", 312), {"patient": "PAT-311", "study": "ST-2"}),
        "other": (_nifti(tmp_path, "other.nii", 313), {"patient": "PAT-313"}),
    }
    jobs_done = {
        name: _done(c, c.post("/v1/studies", files=_files([p], "application/gzip"), data=form))
        for name, (p, form) in sent.items()
    }
    entry = {name: job["series"][0]["entry"] for name, job in jobs_done.items()}
    assert jobs_done["one"]["series"][0]["study"] == pseudo.name("study", "ST-1")
    other = jobs_done["other"]["series"][0]
    assert other["study"] == other["series"]
    st = open_store(tmp / "store.zarr")
    assert st.get(entry["two"]).patient == pseudo.name("patient", "PAT-311")
    assert [s["entry"] for s in c.get(f"/v1/studies/{pseudo.name('study', 'ST-2')}").json()[
        "series"
    ]] == [entry["two"]]  # fmt: skip
    # the job database never holds the references, and a job's names only while it runs
    jobs = JobStore(f"sqlite:///{tmp / 'jobs.db'}")
    end = time.monotonic() + 10
    while time.monotonic() < end:  # a job reads done just before it forgets the names
        kept = json.dumps([jobs.get(job["id"]).options for job in jobs_done.values()])
        if pseudo.name("patient", "PAT-311") not in kept:
            break
        time.sleep(0.05)
    assert "PAT-311" not in kept and pseudo.name("patient", "PAT-311") not in kept
    assert "PAT-311" not in json.dumps([r.options for r in jobs.recent(50)])

    def hits(**body: Any) -> set[str]:
        r = c.post("/v1/search", json={"query": {"entry": entry["one"]}, "k": 50, **body})
        assert r.status_code == 200, r.text
        return {h["entry"] for h in r.json()["results"][0]["hits"]}

    assert {entry["two"], entry["other"]} <= hits()
    same_patient_left_out = hits(exclude_same_patient=True)
    assert entry["two"] not in same_patient_left_out and entry["other"] in same_patient_left_out
    # the same file under another study: an alias, named by that study
    p, _ = sent["one"]
    (moved,) = _done(
        c, c.post("/v1/studies", files=_files([p]), data={"patient": "PAT-9", "study": "ST-9"})
    )["series"]
    assert (moved["entry"], moved["study"]) == (entry["one"], pseudo.name("study", "ST-9"))


def test_references_with_dicom_or_in_the_query_are_refused(
    service: Service, tmp_path: Path
) -> None:
    c, _ = service
    gen = write_series(tmp_path / "d", phantom(2, 16, 16, seed=321))
    nii = _nifti(tmp_path, "n.nii.gz", 322)
    r = c.post(
        "/v1/studies",
        files=_files([*gen.files, nii]),
        data={"patient": "PAT-321"},
    )
    assert (r.status_code, r.json()["code"]) == (422, "invalid-request"), r.text
    detail = r.json()["detail"]
    assert "is DICOM" in detail and "IM000" in detail and "PAT-321" not in detail
    assert "uploads" not in detail  # the uploaded name, not the server's path
    for query in ("?patient=PAT-321", "?study=1.2.3"):
        for refused in (
            c.post(f"/v1/studies{query}", files=_files([nii])),
            _stow(c, gen.files, query),
        ):
            assert (refused.status_code, refused.json()["code"]) == (422, "invalid-request")
            assert "form fields" in refused.json()["detail"]
    bad = c.post("/v1/studies", files=_files([nii]), data={"patient": "PAT\x01321"})
    assert bad.status_code == 422 and "PAT" not in bad.json()["detail"]


def test_the_client_sends_references_as_form_fields(
    service: Service, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    c, _ = service
    nii = _nifti(tmp_path, "c.nii.gz", 331)
    client = RadcacheClient(http=c)
    job = client.submit([nii], patient="PAT-331", study="ST-331")
    assert job.state == "done" and job.series[0].study == pseudo.name("study", "ST-331")
    with pytest.raises(Exception, match="invalid-request"):
        client.submit([write_series(tmp_path / "d", phantom(2, 16, 16, seed=332)).directory],
                      patient="PAT-332")  # fmt: skip


def test_embed_command_takes_references_for_nifti_only(
    tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    from radcache.service.cli import main

    store = str(tmp_path / "s.zarr")
    nii = _nifti(tmp_path, "e.nii.gz", 341)
    args = ["embed", "--model", "dinov2-tiny-random", "--store", store, "--json"]
    r = CliRunner().invoke(main, [*args, str(nii), "--patient", "PAT-341", "--study", "ST-341"])
    assert r.exit_code == 0, r.output
    (series,) = json.loads(r.stdout)["series"]
    assert series["study"] == pseudo.name("study", "ST-341")
    assert open_store(store).get(series["entry"]).patient == pseudo.name("patient", "PAT-341")
    dicom = write_series(tmp_path / "d", phantom(2, 16, 16, seed=342))
    refused = CliRunner().invoke(main, [*args, str(dicom.directory), "--patient", "PAT-342"])
    assert refused.exit_code == 2 and "invalid-request" in refused.output
    assert "PAT-342" not in refused.output
