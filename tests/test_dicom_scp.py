"""The DICOM receiver of a real `radcache serve`, driven by dcmtk's storescu and echoscu
(and by pynetdicom as a sender for what dcmtk will not send: a garbled data set, an abort).

One server serves the module, with API keys: the calling AEs MODALITY and PACS1-4 act as a
key of tenant ``modality-a`` (submit, read), VIEWER as a read-only key of that tenant;
HTTP uploads for comparison go to tenant ``web``, so they are embedded again, not answered
from the receiver's entries. Each test sends studies of its own. Without dcmtk the tests
skip (fail under CI=true).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless, generate_uid

from radcache.embeddings import Encoder, Pseudonymizer
from radcache.service.auth import OPEN
from radcache.service.dicom.access import AeAccess
from radcache.service.jobs import JobStore
from radcache.service.keys import KeyStore
from radcache.service.settings import ServiceSettings
from tests.conftest import TEST_SECRET
from tests.dicomgen import FAKE_IDENTITY, GeneratedSeries, encoder_available, phantom, write_series
from tests.servers import embeddings, finished, free_port, running_server

pytestmark = pytest.mark.timeout(300)

TENANT, WEB = "modality-a", "web"
NAMES = Pseudonymizer(TEST_SECRET.encode()).for_tenant(TENANT)
MAX_INSTANCE = 4 << 20  # the receiver's instance limit: every test series is far below


@functools.cache
def _dcmtk(tool: str) -> str:
    """dcmtk's ``tool`` (pynetdicom installs Python tools of the same names)."""
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        exe = shutil.which(tool, path=folder)
        if exe is None:
            continue
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return exe
    if os.environ.get("CI") == "true":
        pytest.fail(f"dcmtk's {tool} is needed under CI (.ci/run installs dcmtk)")
    pytest.skip(f"dcmtk's {tool} is not installed (apt-get install dcmtk)")


@dataclass
class Site:
    url: str
    port: int  # the DICOM receiver's
    log: Path
    scp_key: str  # tenant modality-a: read (and what its AEs send)
    web_key: str  # tenant web
    admin_key: str  # tenant modality-a: admin
    hold: Path  # the receiver's hold folder

    def http(self, key: str | None = None) -> httpx.Client:
        token = key or self.scp_key
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    def storescu(self, *args: str, ae: str = "MODALITY") -> subprocess.CompletedProcess[str]:
        cmd = [_dcmtk("storescu"), "-aet", ae, "-aec", "RADCACHE", "127.0.0.1", str(self.port)]
        return subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=120, check=False
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    _dcmtk("storescu")  # skip before paying for the server start
    root = tmp_path_factory.mktemp("dicom-scp")
    db = f"sqlite:///{root / 'j.db'}"
    jobs = JobStore(db)
    keys = KeyStore(jobs)
    scp_key, sender = keys.create(TENANT, ["submit", "read"])
    viewer = keys.create(TENANT, ["read"])[1]
    web_key = keys.create(WEB, ["submit", "read"])[0]
    admin_key = keys.create(TENANT, ["admin"])[0]
    jobs.close()
    calling = {"MODALITY": sender.prefix, "VIEWER": viewer.prefix}
    calling |= {f"PACS{i}": sender.prefix for i in range(1, 5)}
    port = free_port()
    env = {
        "RADCACHE_DICOM_CALLING_AES": json.dumps(calling),
        "RADCACHE_DICOM_IDLE_S": "0.5",
        "RADCACHE_DICOM_MAX_INSTANCE_BYTES": str(MAX_INSTANCE),
    }
    args = ("--dicom-port", str(port), "--ae-title", "RADCACHE")
    with running_server(root, *args, db=db, **env) as (url, log):
        hold = root / "radcache-uploads" / "dicom-hold"
        yield Site(url, port, log, scp_key, web_key, admin_key, hold)


def _job_ids(http: httpx.Client) -> set[str]:
    r = http.get("/v1/jobs", params={"limit": 500})
    assert r.status_code == 200, r.text
    return {j["id"] for j in r.json()}


def _new_jobs(http: httpx.Client, before: set[str], n: int, timeout: float = 60) -> list[dict]:
    """The ``n`` jobs made since ``before`` (exactly: more is a failure), once finished."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        new = _job_ids(http) - before
        assert len(new) <= n, f"{len(new)} new jobs, expected {n}"
        if len(new) == n:
            return [finished(http, f"/v1/jobs/{j}", timeout) for j in sorted(new)]
        time.sleep(0.1)
    raise AssertionError(f"{len(_job_ids(http) - before)} new jobs after {timeout} s, not {n}")


def _posted(site: Site, gen: GeneratedSeries) -> dict[str, Any]:
    """The series POSTed over HTTP (tenant web): its job's only series."""
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in gen.files]
    with site.http(site.web_key) as http:
        r = http.post("/v1/studies", files=files)
        assert r.status_code == 202, r.text
        job = finished(http, r.headers["location"])
    assert job["state"] == "done", job
    ((series,),) = [job["series"]]
    return dict(series)


def _received(site: Site, gen: GeneratedSeries, *args: str) -> dict[str, Any]:
    """Send the series with storescu; its job's only series, named as tenant modality-a."""
    with site.http() as http:
        before = _job_ids(http)
        sent = site.storescu(*args, *map(str, gen.files))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        (job,) = _new_jobs(http, before, 1)
    assert job["state"] == "done", job
    ((series,),) = [job["series"]]
    assert series["study"] == NAMES.name("study", gen.study_uid)
    assert series["series"] == NAMES.name("series", gen.series_uid)
    assert series["slices"] == len(gen.files)
    return dict(series)


def _same_as_http(site: Site, gen: GeneratedSeries, received: dict[str, Any]) -> None:
    """The same files POSTed over HTTP (another tenant: embedded again) give the same
    per-slice CLS and pooled embeddings."""
    posted = _posted(site, gen)
    assert posted["slices"] == received["slices"] and posted["entry"] != received["entry"]
    with site.http() as scp, site.http(site.web_key) as web:
        cls = embeddings(scp, received["entry"], "cls")
        assert len(cls) == received["slices"]
        np.testing.assert_array_equal(cls, embeddings(web, posted["entry"], "cls"))
        pooled = embeddings(scp, received["entry"], "pooled")
        np.testing.assert_array_equal(pooled, embeddings(web, posted["entry"], "pooled"))


def test_echo_succeeds_and_unknown_aes_are_rejected(site: Site) -> None:
    echo = [_dcmtk("echoscu"), "127.0.0.1", str(site.port)]

    def run(calling: str, called: str = "RADCACHE") -> subprocess.CompletedProcess[str]:
        cmd = [*echo, "-aet", calling, "-aec", called]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)

    ok = run("MODALITY")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for calling in ("STRANGER", "VIEWER"):  # not listed; listed with a key lacking submit
        no = run(calling)
        assert no.returncode != 0
        assert "Calling AE Title Not Recognized" in no.stdout + no.stderr, no.stderr
    wrong = run("MODALITY", "ELSEWHERE")
    assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr, wrong.stderr
    ready = httpx.get(f"{site.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["dicom"] == f"listening on 127.0.0.1:{site.port} as RADCACHE"
    log = site.log.read_text()
    assert "AE 'STRANGER' refused: not on the calling-AE allow-list" in log
    assert "AE 'VIEWER' refused: its API key" in log and "lacks the submit scope" in log


def test_a_ct_series_by_storescu_is_embedded_as_over_http(site: Site, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "ct", phantom(100, 64, 64, seed=901))
    received = _received(site, gen)
    _same_as_http(site, gen, received)


def test_a_compressed_series_is_received_unchanged(site: Site, tmp_path: Path) -> None:
    if not encoder_available(JPEGLSLossless):
        if os.environ.get("CI") == "true":  # python-gdcm is a server dependency
            pytest.fail("no JPEG-LS encoder (GDCM or pyjpegls) under CI; install '.[server]'")
        pytest.skip("no JPEG-LS encoder here (GDCM or pyjpegls)")
    gen = write_series(
        tmp_path / "jls", phantom(6, 64, 64, seed=902), transfer_syntax=JPEGLSLossless
    )
    # one presentation context offering JPEG-LS and the uncompressed syntaxes: the
    # receiver picks JPEG-LS, so storescu sends the files as they are
    received = _received(site, gen, "-xt", "+C")
    assert "CT Image Storage x6; JPEG-LS Lossless Image Compression" in site.log.read_text()
    _same_as_http(site, gen, received)


def test_four_senders_at_once_lose_and_duplicate_nothing(site: Site, tmp_path: Path) -> None:
    gens = [write_series(tmp_path / f"s{i}", phantom(5, 32, 32, seed=910 + i)) for i in range(4)]
    storescu = _dcmtk("storescu")
    with site.http() as http:
        before = _job_ids(http)
        procs = [
            subprocess.Popen(
                [storescu, "-aet", f"PACS{i + 1}", "-aec", "RADCACHE", "127.0.0.1", str(site.port)]
                + [str(p) for p in gen.files],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for i, gen in enumerate(gens)
        ]
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out
        jobs = _new_jobs(http, before, 4)
        assert all(j["state"] == "done" for j in jobs), jobs
        got = sorted((s["study"], s["series"], s["slices"]) for j in jobs for s in j["series"])
        want = sorted(
            (NAMES.name("study", g.study_uid), NAMES.name("series", g.series_uid), 5) for g in gens
        )
        assert got == want
        for study, _, _ in want:
            r = http.get(f"/v1/studies/{study}")
            assert r.status_code == 200, r.text
            assert [s["slices"] for s in r.json()["series"]] == [5]


def _failed_job(http: httpx.Client, before: set[str]) -> dict[str, Any]:
    (job,) = _new_jobs(http, before, 1)
    assert job["state"] == "failed", job
    return job


def test_a_broken_instance_is_refused_and_the_receiver_goes_on(site: Site, tmp_path: Path) -> None:
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    gen = write_series(tmp_path / "ct", phantom(3, 32, 32, seed=920))
    no_series = tmp_path / "no-series.dcm"
    ds = dcmread(gen.files[0])
    del ds.SeriesInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(no_series)
    with site.http() as http:
        # dcmtk sends a data set without a Series Instance UID: 0xA900
        before = _job_ids(http)
        sent = site.storescu("-v", str(no_series))
        assert "Error: DataSetDoesNotMatchSOPClass" in sent.stdout + sent.stderr, sent.stderr
        job = _failed_job(http, before)
        (error,) = job["errors"]
        assert error["code"] == "invalid-header" and "0xA900" in error["message"], error
        assert error["path"] == "instance 1 (CT Image Storage)"

        # a data set that is no DICOM at all behind good file meta: 0xC000
        garbled = tmp_path / "garbled.dcm"
        head = gen.files[1].read_bytes()
        meta_end = 132 + 12 + int.from_bytes(head[140:144], "little")  # group length's value
        garbled.write_bytes(head[:meta_end] + b"\xfe\xff\x00\xe0" * 64)
        before = _job_ids(http)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", site.port, ae_title="RADCACHE")
        assert assoc.is_established
        _config.STORE_SEND_CHUNKED_DATASET = True  # the bytes as they are, not re-encoded
        try:
            status = assoc.send_c_store(garbled)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
            assoc.release()
        assert status.Status == 0xC000
        job = _failed_job(http, before)
        (error,) = job["errors"]
        assert error["code"] == "not-dicom" and "0xC000" in error["message"], error

        text = json.dumps(job)  # no patient data, no UID in what GET /v1/jobs shows
        for value in (*FAKE_IDENTITY.values(), gen.study_uid, gen.series_uid):
            assert value not in text

    assert _received(site, gen)["slices"] == 3  # and it goes on


def _server_rss(port: int) -> Callable[[], int]:
    """The resident memory (bytes) of the `radcache serve` whose receiver is on ``port``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in args and b"--dicom-port" in args and str(port).encode() in args:
            status = cmdline.with_name("status")
            return lambda: int(status.read_text().split("VmRSS:")[1].split()[0]) * 1024
    raise AssertionError("the radcache serve process was not found")


def test_an_instance_over_the_limit_is_refused_as_it_streams(site: Site, tmp_path: Path) -> None:
    """A 32 MiB instance against the 4 MiB limit: refused with 0xA700 once sent, its bytes
    past the limit never kept (on disk or in memory), recorded as a failed job; the
    receiver goes on."""
    gen = write_series(tmp_path / "ct", phantom(2, 32, 32, seed=950))
    big = tmp_path / "big.dcm"
    ds = dcmread(gen.files[0])
    ds.Rows = ds.Columns = 4096
    ds.PixelData = bytes(4096 * 4096 * 2)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(big)
    size = big.stat().st_size
    rss = _server_rss(site.port)
    before_rss, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    with site.http() as http:
        before = _job_ids(http)
        sampler.start()
        try:
            sent = site.storescu("-v", str(big))
        finally:
            done.set()
            sampler.join()
        assert "Refused: OutOfResources" in sent.stdout + sent.stderr, sent.stderr
        job = _failed_job(http, before)
    (error,) = job["errors"]
    assert error["code"] == "payload-too-large" and "0xA700" in error["message"], error
    assert f"{MAX_INSTANCE} the receiver takes" in error["message"]
    # pynetdicom alone would hold the whole instance (twice) before the handler saw it
    assert peak[0] - before_rss < size // 4, (peak[0] - before_rss, size)
    assert not list((site.hold / ".incoming").iterdir())
    assert _received(site, gen)["slices"] == 2  # and it goes on


def test_an_aborted_association_loses_nothing_acknowledged(site: Site, tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    gen = write_series(tmp_path / "ct", phantom(5, 32, 32, seed=930))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    with site.http() as http:
        before = _job_ids(http)
        assoc = ae.associate("127.0.0.1", site.port, ae_title="RADCACHE")
        assert assoc.is_established
        for path in gen.files[:3]:
            assert assoc.send_c_store(path).Status == 0x0000
        assoc.abort()
        (job,) = _new_jobs(http, before, 1)
    assert job["state"] == "done", job
    assert [s["slices"] for s in job["series"]] == [3]


def test_a_late_instance_embeds_its_series_again_alone(site: Site, tmp_path: Path) -> None:
    a = write_series(tmp_path / "a", phantom(5, 32, 32, seed=940))
    b = write_series(tmp_path / "b", phantom(3, 32, 32, seed=941), study_uid=a.study_uid)
    with site.http() as http:
        before = _job_ids(http)
        sent = site.storescu(*map(str, a.files[:4] + b.files))
        assert sent.returncode == 0, sent.stderr
        (first,) = _new_jobs(http, before, 1)
        assert sorted(s["slices"] for s in first["series"]) == [3, 4]
        before = _job_ids(http)
        sent = site.storescu(str(a.files[4]))
        assert sent.returncode == 0, sent.stderr
        (late,) = _new_jobs(http, before, 1)
    assert late["state"] == "done", late
    ((series,),) = [late["series"]]  # series A, whole; B is not embedded again
    assert (series["series"], series["slices"]) == (NAMES.name("series", a.series_uid), 5)

    # the study keeps one entry per series: A's partial entry went as a deletion would
    study = NAMES.name("study", a.study_uid)
    (partial,) = [s["entry"] for s in first["series"] if s["slices"] == 4]
    (b_entry,) = [s["entry"] for s in first["series"] if s["slices"] == 3]
    with site.http() as http:
        listed = http.get(f"/v1/studies/{study}").json()["series"]
        assert sorted((s["entry"], s["slices"]) for s in listed) == sorted(
            [(series["entry"], 5), (b_entry, 3)]
        ), listed
        assert http.get(f"/v1/series/{partial}/embeddings").status_code == 404
    with site.http(site.admin_key) as admin:
        query = {"query": {"entry": b_entry}, "k": 10, "exclude_same_study": False}
        r = admin.post("/v1/search", json=query)
        assert r.status_code == 200, r.text
        hits = r.json()["results"][0]["hits"]
        assert series["entry"] in {h["entry"] for h in hits}
        assert partial not in {h["entry"] for h in hits}  # out of the index too
        # no KOS destination on this service: `send` is refused before anything is built
        r = admin.post("/v1/search", json={**query, "as": "kos", "send": True})
        assert (r.status_code, r.json()["code"]) == (409, "kos-destination-unset"), r.text
        assert "RADCACHE_KOS_DESTINATION" in r.json()["detail"]

    # the kept instances leave with the study (a consent deletion)
    kept = site.hold / TENANT / study / "kept"
    assert sorted(len(list(d.iterdir())) for d in kept.iterdir()) == [3, 5]
    with site.http(site.admin_key) as admin:
        assert admin.delete(f"/v1/studies/{study}").status_code == 202
    assert not (site.hold / TENANT / study).exists()


# --- who may send: the allow-list against the API keys (in process) ---


def test_the_allow_list_follows_the_keys(tmp_path: Path) -> None:
    jobs = JobStore(f"sqlite:///{tmp_path / 'j.db'}")
    keys = KeyStore(jobs)

    def access(**kw: Any) -> AeAccess:
        return AeAccess(ServiceSettings(dicom_port=11112, **kw), keys)

    # no key: open where the HTTP side is (loopback); any AE when none is listed
    assert access().principal("ANYONE")[0] == OPEN
    who, _ = access(dicom_calling_aes={"CT1": "ward-3"}).principal("CT1 ")
    assert who is not None and who.tenant == "ward-3"
    assert access(dicom_calling_aes={"CT1": "ward-3"}).principal("CT2")[0] is None
    assert access(dicom_host="0.0.0.0").principal("ANYONE")[0] is None  # not loopback

    _, sender = keys.create("hospital-a", ["submit"])
    _, reader = keys.create("hospital-a", ["read"])
    listed = {"CT1": sender.prefix, "CT2": reader.prefix, "CT3": "ward-3"}
    who, _ = access(dicom_calling_aes=listed).principal("CT1")
    assert who is not None and (who.tenant, who.key) == ("hospital-a", sender.prefix)
    assert "lacks the submit scope" in access(dicom_calling_aes=listed).principal("CT2")[1]
    assert "no API key" in access(dicom_calling_aes=listed).principal("CT3")[1]
    assert access().principal("ANYONE")[0] is None  # keys exist: nothing is open
    keys.revoke(sender.prefix)
    assert "is revoked" in access(dicom_calling_aes=listed).principal("CT1")[1]
    jobs.close()


def test_a_receiver_off_loopback_needs_keys_and_sane_settings(tmp_path: Path) -> None:
    from radcache.embeddings.errors import ConfigError
    from radcache.service.cli.serve import guard_open_service
    from radcache.service.dicom import check_dicom_settings

    db = f"sqlite:///{tmp_path / 'j.db'}"
    exposed = ServiceSettings(db=db, dicom_port=11112, dicom_host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"refusing to serve 0\.0\.0\.0 without API keys"):
        guard_open_service(exposed)
    guard_open_service(ServiceSettings(db=db, dicom_port=11112))  # loopback: open is fine
    for bad in (
        {"ae_title": "A" * 17},
        {"ae_title": "   "},
        {"dicom_calling_aes": {"CT\\1": "ward-3"}},
        {"dicom_calling_aes": {"CT1": "Not A Tenant"}},
    ):
        with pytest.raises(ConfigError):
            check_dicom_settings(ServiceSettings(dicom_port=11112, **bad))


def test_a_receiver_that_cannot_listen_is_not_ready(
    site: Site, tmp_path: Path, tiny: Encoder
) -> None:
    """Its port taken (by the module's receiver): the HTTP side serves, and /readyz answers
    503 naming the address and the reason."""
    from fastapi.testclient import TestClient

    from radcache.service.app import build_resources, create_app

    settings = ServiceSettings(
        model="dinov2-tiny-random",
        store=str(tmp_path / "store.zarr"),
        db=f"sqlite:///{tmp_path / 'jobs.db'}",
        upload_dir=tmp_path / "uploads",
        dicom_port=site.port,
    )
    with TestClient(create_app(resources=build_resources(settings, encoder=tiny))) as c:
        ready = c.get("/readyz")
        assert (ready.status_code, ready.json()["code"]) == (503, "not-ready"), ready.text
        detail = ready.json()["detail"]
        assert f"DICOM receiver is not ready: it cannot listen on 127.0.0.1:{site.port}" in detail
        assert c.get("/healthz").status_code == 200


def test_a_kos_that_cannot_be_sent_is_a_502_naming_the_peer(site: Site) -> None:
    """A peer that refuses the association (this receiver, called by an AE it does not
    know), a STOW-RS URL where nothing listens: kos-send-failed, naming the peer."""
    from radcache.embeddings.errors import ConfigError, SendFailedError
    from radcache.service.dicom.send import deliver
    from radcache.service.problems import status_of
    from radcache.service.uid_vault import OriginalUids, kos_document

    ct = "1.2.840.10008.5.1.4.1.1.2"
    query = OriginalUids(generate_uid(), generate_uid(), [(ct, generate_uid())], "P1")
    similar = OriginalUids(generate_uid(), generate_uid(), [(ct, generate_uid())], "P2")
    document = kos_document(query, [similar], "similar cases (radcache)")
    closed = free_port()
    for destination, why in (
        (f"RADCACHE@127.0.0.1:{site.port}", f"RADCACHE@127.0.0.1:{site.port} refused an"),
        (f"http://127.0.0.1:{closed}/dicom-web", r"did not answer \(ConnectError\)"),
    ):
        with pytest.raises(SendFailedError, match=why) as failed:
            deliver(document, destination, calling_ae="STRANGER")
        assert (failed.value.code, status_of(failed.value)) == ("kos-send-failed", 502)
    with pytest.raises(ConfigError, match="expected AE@HOST:PORT"):
        deliver(document, "PACS@nowhere")


def test_a_kos_destination_is_checked_as_the_sender_parses_it() -> None:
    assert ServiceSettings(kos_destination=" PACS@10.0.0.5:104 ").kos_destination == (
        "PACS@10.0.0.5:104"
    )
    assert ServiceSettings(kos_destination="https://pacs/dicom-web").kos_destination
    for bad in ("PACS@host", "host:104", "PACS@host:99999", "A_TITLE_OF_17_CHR@host:104"):
        with pytest.raises(ValidationError, match="expected AE@HOST:PORT"):
            ServiceSettings(kos_destination=bad)
