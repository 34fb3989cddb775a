"""A real Orthanc pushes studies to a real `radcache serve` over DICOMweb STOW-RS and over
DICOM C-STORE, with API keys on, and files the Key Object Selection documents radcache
sends back (by C-STORE from the CLI, by STOW-RS from the service to its configured KOS
destination) in the studies they reference.

Orthanc (tests/orthanc.py) knows radcache three times: ``radcache`` with the key as the
HTTP Basic password (the setup docs/ORTHANC.md shows), ``radcache-bad`` with a wrong
password, and ``radcache-bearer`` with the key in an ``Authorization: Bearer`` header.
As a DICOM modality, Orthanc (AE title ORTHANC) knows radcache's receiver as
``radcache-dicom`` (AE RADCACHE), and radcache maps the calling AE ORTHANC to the pushing
key; radcache's UID vault is on. One radcache and one Orthanc serve the module; each test
pushes a study of its own, so the order does not matter. Without Orthanc installed the
tests skip (fail under CI=true).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from pydicom import dcmread

from radcache.embeddings import Pseudonymizer
from radcache.service.cli import main
from radcache.service.jobs import JobStore
from radcache.service.keys import KeyStore
from tests.conftest import TEST_SECRET
from tests.dicomgen import GeneratedSeries, phantom, write_series
from tests.orthanc import dicom_modality, dicomweb_server, require_orthanc, running_orthanc
from tests.servers import finished, free_port, running_server

pytestmark = pytest.mark.timeout(300)

TENANT = "hospital-a"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage


@dataclass
class Sites:
    radcache: str
    orthanc: str
    admin: str  # an admin key of TENANT, for the checks on the radcache side
    orthanc_dicom: int  # Orthanc's DICOM port (AE ORTHANC)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    require_orthanc()  # skip before paying for the radcache start
    root = tmp_path_factory.mktemp("orthanc-push")
    db = f"sqlite:///{root / 'j.db'}"
    jobs = JobStore(db)
    keys = KeyStore(jobs)
    pusher, pushing = keys.create(TENANT, ["submit", "read"])
    admin = keys.create(TENANT, ["read", "admin"])[0]
    jobs.close()
    # the right key prefix with a wrong secret: a key radcache knows, a password it refuses
    wrong = pusher[:-4] + ("BBBB" if pusher.endswith("AAAA") else "AAAA")
    scp, orthanc_dicom, orthanc_http = free_port(), free_port(), free_port()
    receiver = ("--dicom-port", str(scp), "--ae-title", "RADCACHE")
    with running_server(
        root,
        *receiver,
        db=db,
        RADCACHE_DICOM_CALLING_AES=json.dumps({"ORTHANC": pushing.prefix}),
        RADCACHE_DICOM_IDLE_S="0.5",
        RADCACHE_UID_VAULT_KEY="uid-vault-key-of-the-orthanc-tests",
        RADCACHE_KOS_DESTINATION=f"http://127.0.0.1:{orthanc_http}/dicom-web",
    ) as (url, _):
        servers = {
            "radcache": dicomweb_server(url, username="orthanc", password=pusher),
            "radcache-bad": dicomweb_server(url, username="orthanc", password=wrong),
            "radcache-bearer": {
                **dicomweb_server(url),
                "HttpHeaders": {"Authorization": f"Bearer {pusher}"},
            },
        }
        modalities = {"radcache-dicom": dicom_modality("RADCACHE", scp)}
        with running_orthanc(
            root / "orthanc", servers, modalities, orthanc_dicom, orthanc_http
        ) as orthanc:
            yield Sites(url, orthanc, admin, orthanc_dicom)


def _upload(orthanc: str, gen: GeneratedSeries) -> str:
    """Store the series in Orthanc through its REST API; its Orthanc study id."""
    parents = set()
    for path in gen.files:
        r = httpx.post(f"{orthanc}/instances", content=path.read_bytes(), timeout=30)
        assert r.status_code == 200, r.text
        parents.add(r.json()["ParentStudy"])
    (study,) = parents
    return str(study)


def _push(orthanc: str, server: str, *studies: str, dicom: bool = False) -> dict[str, Any]:
    """Have Orthanc send ``studies`` to the DICOMweb ``server`` (STOW-RS), or with
    ``dicom`` to the DICOM modality ``server`` (C-STORE), as an Orthanc job; the job once
    it has ended."""
    path = f"modalities/{server}/store" if dicom else f"dicom-web/servers/{server}/stow"
    r = httpx.post(
        f"{orthanc}/{path}", json={"Resources": list(studies), "Synchronous": False}, timeout=30
    )
    assert r.status_code == 200, r.text
    job_id = r.json()["ID"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{orthanc}/jobs/{job_id}", timeout=10).json()
        if job["State"] in ("Success", "Failure"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"the Orthanc {path} job did not end: {job}")


def _admin(sites: Sites) -> httpx.Client:
    return httpx.Client(
        base_url=sites.radcache, headers={"Authorization": f"Bearer {sites.admin}"}, timeout=30
    )


def _seen(http: httpx.Client) -> tuple[set[str], dict[str, list[dict[str, Any]]]]:
    """The tenant's job ids and studies (name → series entries) as radcache lists them."""
    jobs = http.get("/v1/jobs", params={"limit": 500})
    studies = http.get("/v1/studies", params={"limit": 1000})
    assert jobs.status_code == studies.status_code == 200, (jobs.text, studies.text)
    return {j["id"] for j in jobs.json()}, {s["study"]: s["series"] for s in studies.json()}


def _new_jobs(http: httpx.Client, before: set[str], n: int) -> list[dict[str, Any]]:
    """The ``n`` jobs made since ``before`` (the DICOM receiver makes its job once the study
    has been idle a while), once finished."""
    deadline = time.monotonic() + 60
    while len(new := _seen(http)[0] - before) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(new) == n, f"{len(new)} new jobs, expected {n}"
    return [finished(http, f"/v1/jobs/{j}", 60) for j in sorted(new)]


def _assert_received(sites: Sites, gen: GeneratedSeries, before: set[str]) -> None:
    """radcache made one job of the pushed series, it ended done, and the study is listed
    (under the tenant's pseudonyms) with the series' embedding."""
    names = Pseudonymizer(TEST_SECRET.encode()).for_tenant(TENANT)
    study, series = names.name("study", gen.study_uid), names.name("series", gen.series_uid)
    with _admin(sites) as http:
        (job,) = _new_jobs(http, before, 1)
        assert job["state"] == "done", job
        ((done,),) = [job["series"]]
        assert (done["study"], done["series"], done["slices"]) == (study, series, 4)
        _, studies = _seen(http)
        (entry,) = studies[study]
        assert (entry["series"], entry["entry"], entry["modality"]) == (series, done["entry"], "CT")
        r = http.get(f"/v1/series/{entry['entry']}/embeddings")
        assert r.status_code == 200, r.text
        pooled = np.asarray(r.json()["data"])
        assert pooled.shape == (entry["dim"],)
        assert np.isfinite(pooled).all()
        assert np.abs(pooled).sum() > 0


def test_orthanc_pushes_a_study_with_the_key_as_its_password(sites: Sites, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "ct", phantom(4, 16, 16, seed=301))
    study = _upload(sites.orthanc, gen)
    with _admin(sites) as http:
        before, studies_before = _seen(http)
    job = _push(sites.orthanc, "radcache", study)
    assert job["State"] == "Success", job
    assert job["Content"]["InstancesCount"] == "4", job
    _assert_received(sites, gen, before)
    with _admin(sites) as http:
        _, studies = _seen(http)
    assert len(studies.keys() - studies_before.keys()) == 1


def test_a_wrong_password_is_refused_and_nothing_is_stored(sites: Sites, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "ct", phantom(4, 16, 16, seed=302))
    study = _upload(sites.orthanc, gen)
    with _admin(sites) as http:
        before = _seen(http)
    job = _push(sites.orthanc, "radcache-bad", study)
    assert job["State"] == "Failure", job
    # Orthanc's account of radcache's 401: "Bad credentials were provided to an HTTP request"
    assert "credentials" in job["Content"]["FunctionErrorDescription"].lower(), job
    name = Pseudonymizer(TEST_SECRET.encode()).for_tenant(TENANT).name("study", gen.study_uid)
    with _admin(sites) as http:
        assert _seen(http) == before
        assert http.get(f"/v1/studies/{name}").status_code == 404


def test_the_key_also_works_as_a_bearer_header(sites: Sites, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "ct", phantom(4, 16, 16, seed=303))
    study = _upload(sites.orthanc, gen)
    with _admin(sites) as http:
        before, _ = _seen(http)
    job = _push(sites.orthanc, "radcache-bearer", study)
    assert job["State"] == "Success", job
    _assert_received(sites, gen, before)


def test_orthanc_sends_a_study_by_c_store(sites: Sites, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "ct", phantom(4, 16, 16, seed=304))
    study = _upload(sites.orthanc, gen)
    with _admin(sites) as http:
        before, _ = _seen(http)
    job = _push(sites.orthanc, "radcache-dicom", study, dicom=True)
    assert job["State"] == "Success", job
    content = job["Content"]  # a C-STORE job counts in numbers (STOW-RS: in strings)
    assert (content["InstancesCount"], content["FailedInstancesCount"]) == (4, 0), job
    _assert_received(sites, gen, before)


def test_a_kos_sent_back_is_filed_in_the_study_it_references(sites: Sites, tmp_path: Path) -> None:
    """Two studies go to radcache by C-STORE; `radcache search --kos … --send-to` sends the
    KOS of the first one's similar cases to Orthanc by C-STORE, and the service itself (a
    search with `send`) the second one's by STOW-RS; Orthanc lists each in its study (same
    patient: the vault keeps the Patient ID, sealed, beside the UIDs)."""
    gens = [write_series(tmp_path / f"s{i}", phantom(4, 16, 16, seed=305 + i)) for i in (0, 1)]
    studies = [_upload(sites.orthanc, gen) for gen in gens]
    names = Pseudonymizer(TEST_SECRET.encode()).for_tenant(TENANT)
    with _admin(sites) as http:
        before, _ = _seen(http)
        assert _push(sites.orthanc, "radcache-dicom", *studies, dicom=True)["State"] == "Success"
        jobs = _new_jobs(http, before, 2)
        assert [j["state"] for j in jobs] == ["done", "done"], jobs
        query = names.name("series", gens[0].series_uid)
    out = tmp_path / "similar.dcm"
    to = f"ORTHANC@127.0.0.1:{sites.orthanc_dicom}"
    args = ["search", "--series", query, "-k", "1", "--kos", str(out), "--send-to", to]
    cli = CliRunner().invoke(main, [*args, "--url", sites.radcache, "--api-key", sites.admin])
    assert cli.exit_code == 0, cli.output
    kos = dcmread(io.BytesIO(out.read_bytes()))
    assert (kos.SOPClassUID, kos.StudyInstanceUID) == (KOS, gens[0].study_uid)
    series = httpx.get(f"{sites.orthanc}/studies/{studies[0]}/series", timeout=10).json()
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CT", "KO"], series
    (ko,) = [s for s in series if s["MainDicomTags"]["Modality"] == "KO"]
    assert ko["MainDicomTags"]["SeriesInstanceUID"] == kos.SeriesInstanceUID
    (inst,) = httpx.get(f"{sites.orthanc}/series/{ko['ID']}/instances", timeout=10).json()
    assert inst["MainDicomTags"]["SOPInstanceUID"] == kos.SOPInstanceUID

    # the service sends the second study's KOS itself, by STOW-RS to its configured
    # destination (Orthanc's DICOMweb), and says so
    second = names.name("series", gens[1].series_uid)
    body = {"query": {"series": second}, "k": 1, "as": "kos", "send": True}
    with _admin(sites) as http:
        r = http.post("/v1/search", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["radcache-sent-to"] == f"STOW-RS {sites.orthanc}/dicom-web"
    sent = dcmread(io.BytesIO(r.content))
    assert sent.StudyInstanceUID == gens[1].study_uid
    series = httpx.get(f"{sites.orthanc}/studies/{studies[1]}/series", timeout=10).json()
    kos_series = [s for s in series if s["MainDicomTags"]["Modality"] == "KO"]
    assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in kos_series] == [sent.SeriesInstanceUID]

    # a STOW-RS destination that does not answer: the CLI says so, and fails
    nowhere = f"http://127.0.0.1:{free_port()}/dicom-web"
    args = ["search", "--series", second, "--kos", str(out), "--send-to", nowhere]
    cli = CliRunner().invoke(main, [*args, "--url", sites.radcache, "--api-key", sites.admin])
    assert cli.exit_code == 1 and f"STOW-RS to {nowhere}/studies did not answer" in cli.output
