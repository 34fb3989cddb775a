"""DICOMweb STOW-RS with a real DICOMweb client (dicomweb-client) against a real server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from requests import HTTPError

from tests.dicomgen import phantom, write_series
from tests.servers import running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("dicomweb"), RADCACHE_KEEP_UIDS="true") as (url, _):
        yield url


def _wait(url: str, location: str) -> dict:
    for _ in range(600):
        job = httpx.get(url + location).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(job)


def test_stow_a_whole_series_with_dicomweb_client(server: str, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "ct", phantom(5, 16, 16, seed=80), shuffle=True)
    datasets = [pydicom.dcmread(f) for f in gen.files]
    client = DICOMwebClient(url=f"{server}/dicom-web")
    response = client.store_instances(datasets=datasets)
    refs = response.ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in refs} == {d.SOPInstanceUID for d in datasets}
    assert "FailedSOPSequence" not in response
    # the instances were queued for embedding: the study shows up, by its UID (kept here)
    for _ in range(600):
        found = client.search_for_studies(search_filters={"StudyInstanceUID": gen.study_uid})
        if found:
            break
        time.sleep(0.05)
    (study,) = found
    assert study["0020000D"]["Value"] == [gen.study_uid]
    assert study["00080061"]["Value"] == ["CT"]


def test_stow_mixed_good_and_bad_parts(server: str, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "mr", phantom(3, 16, 16, seed=81), modality="MR", intercept=0.0)
    boundary = "radcache-test-boundary"
    parts = [f.read_bytes() for f in gen.files] + [b"not a dicom file at all"]
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
            for p in parts
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )

    def chunks() -> Iterator[bytes]:  # chunked transfer, unquoted boundary
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = httpx.post(
        f"{server}/dicom-web/studies",
        content=chunks(),
        headers={"content-type": f"multipart/related; type=application/dicom; boundary={boundary}"},
    )
    assert r.status_code == 202
    assert r.headers["content-type"] == "application/dicom+json"
    ds = pydicom.Dataset.from_json(r.json())
    assert len(ds.ReferencedSOPSequence) == 3 and len(ds.FailedSOPSequence) == 1
    assert ds.FailedSOPSequence[0].FailureReason == 0xC000
    job = _wait(server, r.headers["location"])
    assert job["state"] == "done" and job["series"][0]["slices"] == 3


def test_stow_to_the_wrong_study_is_a_conflict(server: str, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "x", phantom(2, 16, 16, seed=82))
    client = DICOMwebClient(url=f"{server}/dicom-web")
    with pytest.raises(HTTPError) as exc:
        client.store_instances(
            datasets=[pydicom.dcmread(f) for f in gen.files], study_instance_uid="1.2.3.4"
        )
    assert exc.value.response.status_code == 409
    bad = httpx.post(
        f"{server}/dicom-web/studies", content=b"x", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 415 and bad.json()["code"] == "unsupported-media-type"


def test_stow_parts_without_the_dicm_preamble(server: str, tmp_path: Path) -> None:
    gen = write_series(tmp_path / "np", phantom(2, 16, 16, seed=83))
    boundary = "b0"
    bare = [f.read_bytes()[132:] for f in gen.files]  # no 128-byte preamble, no "DICM"
    body = (
        b"".join(b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in bare)
        + b"--b0--\r\n"
    )
    r = httpx.post(
        f"{server}/dicom-web/studies/{gen.study_uid}",
        content=body,
        headers={
            "content-type": f'multipart/related; type="application/dicom"; boundary="{boundary}"'
        },
    )
    assert r.status_code == 200, r.text
    job = _wait(server, r.headers["location"])
    assert job["state"] == "done" and job["series"][0]["slices"] == 2


def _related(files: list[Path], boundary: str = "opts") -> tuple[bytes, str]:
    body = (
        b"".join(
            b"--"
            + boundary.encode()
            + b"\r\nContent-Type: application/dicom\r\n\r\n"
            + f.read_bytes()
            + b"\r\n"
            for f in files
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_takes_the_submission_options_and_shares_the_cache_answer(
    server: str, tmp_path: Path
) -> None:
    """STOW-RS goes through the same intake as POST /v1/studies: the same options (as query
    parameters), and a study sent again is answered from the cache at once."""
    gen = write_series(tmp_path / "o", phantom(3, 16, 16, seed=84))
    body, ctype = _related(gen.files)
    params = {"collection": "stowed", "labels": '{"dx": "normal"}', "patch_tokens": "false"}
    r = httpx.post(
        f"{server}/dicom-web/studies", content=body, params=params, headers={"content-type": ctype}
    )
    assert r.status_code == 200, r.text
    job = _wait(server, r.headers["location"])
    assert job["state"] == "done" and job["series"][0]["cache"] == "miss"
    entry = httpx.get(f"{server}/v1/series/{job['series'][0]['entry']}").json()
    assert entry["labels"] == {"dx": "normal"} and "patch" not in entry["kinds"]
    again = httpx.post(
        f"{server}/dicom-web/studies", content=body, params=params, headers={"content-type": ctype}
    )
    assert again.status_code == 200
    cached = httpx.get(server + again.headers["location"]).json()  # done before the answer
    assert cached["state"] == "done" and [s["cache"] for s in cached["series"]] == ["hit"]
    bad = httpx.post(
        f"{server}/dicom-web/studies",
        content=body,
        params={"labels": "[1, 2]"},
        headers={"content-type": ctype},
    )
    assert bad.status_code == 422 and bad.json()["code"] == "invalid-request"
