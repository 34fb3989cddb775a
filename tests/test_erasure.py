"""Nothing identifying at rest, and a consent deletion that really deletes.

One real `radcache serve` receives two patients' studies whose files carry distinctive
values in every identifying attribute, the descriptions, a private tag and the file
names, plus uploads that fail (a cut file, a malformed header value) and a copy of B's
pixels sent as another study (stored as a second name of B's entry). Study A and the copy
are then deleted, their erasure jobs waited for, and the server stopped. Every byte under
the server's folder (store — each Zarr array decoded —, job database, index files,
uploads, temporary files, its log) is scanned: no identifying value anywhere, nothing
that names study A or the copy or holds A's vectors, while study B's names and vectors do
show up where they belong (the scan can find what it looks for).
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import zarr
from click.testing import CliRunner
from sqlalchemy import select

from radcache.embeddings import open_store
from radcache.embeddings.index._vectors import normalise
from radcache.service.cli import main
from radcache.service.jobs import JobStore
from radcache.service.uid_vault import VaultRow
from tests.dicomgen import GeneratedSeries, dciodvfy, phantom, write_series
from tests.servers import embeddings, finished, running_server
from tests.test_deidentify import _corrupt

#: Each patient's identifying values, one per identifying attribute (and two free texts).
PATIENTS = {
    "a": {
        "PatientName": "ZZAFAMILY^ZZAGIVEN",
        "PatientID": "ZZAPID4711",
        "OtherPatientIDs": "ZZAOTHER0815",
        "AccessionNumber": "ZZAACC1234",
        "PatientBirthDate": "19230417",
        "StudyDate": "19990503",
        "SeriesDate": "19990503",
        "StudyID": "ZZASTUDYID",
        "InstitutionName": "ZZAINSTITUTION",
        "ReferringPhysicianName": "ZZAREFERRER^DOC",
        "OperatorsName": "ZZAOPERATOR",
        "StudyDescription": "ZZASTUDYDESC for ZZAFAMILY",
        "SeriesDescription": "ZZASERIESDESC ZZAPID4711",
    },
    "b": {
        "PatientName": "ZZBFAMILY^ZZBGIVEN",
        "PatientID": "ZZBPID0042",
        "OtherPatientIDs": "ZZBOTHER0007",
        "AccessionNumber": "ZZBACC5678",
        "PatientBirthDate": "19310911",
        "StudyDate": "20010622",
        "SeriesDate": "20010622",
        "StudyID": "ZZBSTUDYID",
        "InstitutionName": "ZZBINSTITUTION",
        "ReferringPhysicianName": "ZZBREFERRER^DOC",
        "OperatorsName": "ZZBOPERATOR",
        "StudyDescription": "ZZBSTUDYDESC for ZZBFAMILY",
        "SeriesDescription": "ZZBSERIESDESC ZZBPID0042",
    },
}
PRIVATE = "ZZPRIVATEVALUE"
CREATOR = "ZZPRIVCREATOR"


def _dates(yyyymmdd: str) -> set[str]:
    d = dt.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:]))
    return {yyyymmdd, d.isoformat(), d.strftime("%d.%m.%Y"), d.strftime("%m/%d/%Y")}


def _needles(gen: GeneratedSeries, who: str) -> set[str]:
    """What may never be found: every token of the values, every date spelling, the
    original UIDs and the file names."""
    out = {PRIVATE, CREATOR}
    for keyword, value in PATIENTS[who].items():
        if keyword.endswith("Date"):
            out |= _dates(value)
        else:
            out |= {t for t in value.replace("^", " ").split() if t.startswith("ZZ")}
    out |= {gen.study_uid, gen.series_uid, gen.frame_of_reference_uid}
    for f in gen.files:
        out.add(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
        out.add(f.name)
    return out


def _identified(root: Path, who: str, seed: int) -> GeneratedSeries:
    """A 4-slice CT series of patient ``who``: identifying values everywhere, a private
    tag, and file names made of the patient's name and ID."""
    gen = write_series(root, phantom(4, 16, 16, seed=seed), extra=PATIENTS[who])
    renamed = []
    for i, path in enumerate(gen.files):
        ds = pydicom.dcmread(path)
        ds.private_block(0x0011, CREATOR, create=True).add_new(0x01, "LO", PRIVATE)
        name = path.with_name(f"{PATIENTS[who]['PatientName'].split('^')[0]}_{i}.dcm")
        ds.save_as(name)
        path.unlink()
        renamed.append(name)
    gen.files = renamed
    return gen


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/dicom")) for p in paths]


@dataclass
class Erased:
    hay: list[tuple[str, bytes]]  # every file of the server's folder, every array decoded
    needles: set[str]  # identifying values of both patients
    a_names: set[str]  # the deleted studies' pseudonyms (A's and the copy's), A's entry key
    b_names: set[str]  # study B's
    a_vectors: list[np.ndarray]  # study A's CLS rows and pooled vector, as stored
    b_vectors: list[np.ndarray]
    survivor: dict  # B as listed after the deletion
    erasure: dict  # the erasure job, finished
    kos: pydicom.Dataset  # a KOS answer for study A's series, read back
    vaulted: set[str]  # the studies the UID vault holds after the deletions
    originals: dict[str, str]  # original StudyInstanceUID of a and b


@pytest.fixture(scope="module")
def erased(tmp_path_factory: pytest.TempPathFactory) -> Erased:
    base = tmp_path_factory.mktemp("erasure")
    inputs, root = base / "in", base / "srv"
    root.mkdir()
    (root / "tmp").mkdir()
    a = _identified(inputs / "a", "a", seed=1)
    b = _identified(inputs / "b", "b", seed=2)
    broken = _identified(inputs / "broken", "b", seed=3)  # patient B again, failing
    broken.files[0].write_bytes(broken.files[0].read_bytes()[:600])  # cut short
    copy = _identified(inputs / "copy", "a", seed=2)  # B's pixels, sent as a study of A's
    malformed = _identified(inputs / "malformed", "b", seed=4)
    _corrupt(malformed, "SliceThickness")  # a header value that is not a number
    # every index change saved at once: a saved version holds study A before its deletion
    env = {
        "RADCACHE_ERASE_AFTER_S": "0.2",
        "RADCACHE_INDEX_SAVE_S": "0",
        "TMPDIR": str(root / "tmp"),
        "RADCACHE_UID_VAULT_KEY": "kos-vault-key-for-the-erasure-tests",
    }
    with running_server(root, **env) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        done = {}
        sent = (("a", a), ("b", b), ("copy", copy), ("broken", broken), ("malformed", malformed))
        for name, gen in sent:
            r = c.post("/v1/studies", files=_files(gen.files))
            assert r.status_code == 202, r.text
            done[name] = finished(c, r.headers["location"])
        assert done["a"]["state"] == done["b"]["state"] == "done"
        assert done["broken"]["state"] == "partially_failed" and done["broken"]["errors"]
        assert done["malformed"]["state"] == "failed"
        sa, sb, sc = (done[k]["series"][0] for k in ("a", "b", "copy"))
        assert sc["entry"] == sb["entry"] and sc["study"] != sb["study"]  # one entry, two names
        vectors = {
            who: [*embeddings(c, s["series"], "cls"), embeddings(c, s["series"], "pooled")]
            for who, s in (("a", sa), ("b", sb))
        }
        entry = open_store(root / "s.zarr").get(sa["entry"])
        assert entry is not None and entry.attrs["volume"]["patient"]
        a_patient = str(entry.attrs["volume"]["patient"])
        query = {"query": {"entry": sa["entry"]}, "k": 1, "as": "kos"}
        kos = c.post("/v1/search", json=query)
        assert kos.status_code == 200, kos.text
        assert kos.headers["content-type"] == "application/dicom"
        # the same through the CLI (written outside the scanned folder)
        out = root.parent / f"{root.name}-kos.dcm"
        cli = CliRunner().invoke(
            main, ["search", "--entry", sa["entry"], "-k", "1", "--kos", str(out), "--url", url]
        )
        assert cli.exit_code == 0, cli.output
        by_cli, by_api = pydicom.dcmread(out), pydicom.dcmread(io.BytesIO(kos.content))
        assert by_cli.StudyInstanceUID == by_api.StudyInstanceUID == a.study_uid
        assert [e.StudyInstanceUID for e in by_cli.CurrentRequestedProcedureEvidenceSequence] == [
            e.StudyInstanceUID for e in by_api.CurrentRequestedProcedureEvidenceSequence
        ]
        r = c.delete(f"/v1/studies/{sa['study']}")
        assert r.status_code == 202, r.text
        r2 = c.delete(f"/v1/studies/{sc['study']}")  # the copy goes, B's entry stays
        assert r2.status_code == 202, r2.text
        erasure = finished(c, r.headers["location"])
        assert finished(c, r2.headers["location"])["state"] == "done"
        survivor = c.get(f"/v1/studies/{sb['study']}").json()
        assert c.get(f"/v1/studies/{sa['study']}").status_code == 404
    # The client's file names stay in its job reports until their retention ends: end it.
    jobs = JobStore(f"sqlite:///{root / 'j.db'}")
    try:
        jobs.purge(dt.timedelta(0))
        with jobs._session() as sess:
            vaulted = {r.study for r in sess.scalars(select(VaultRow))}
    finally:
        jobs.close()
    return Erased(
        list(_haystacks(root)),
        set().union(
            *(_needles(g, w) for g, w in ((a, "a"), (b, "b"), (copy, "a"), (broken, "b"))),
            _needles(malformed, "b"),
        ),
        {sa["study"], sa["series"], sa["entry"], a_patient, sc["study"], sc["series"]},
        {sb["study"], sb["series"], sb["entry"]},
        vectors["a"],
        vectors["b"],
        survivor,
        erasure,
        pydicom.dcmread(io.BytesIO(kos.content)),
        vaulted,
        {"a": a.study_uid, "b_study": sb["study"]},
    )


def test_kos_names_originals_and_the_vault_forgets_deleted_studies(erased: Erased) -> None:
    """A KOS answer lies in the query's original study and references its hit's original
    study (B's pixels, stored as B and as the copy); the deleted studies leave the vault,
    B stays; the byte scan above finds no original UID, so the vault holds none in clear."""
    kos = erased.kos
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection
    assert kos.StudyInstanceUID == erased.originals["a"]
    evidence = {e.StudyInstanceUID for e in kos.CurrentRequestedProcedureEvidenceSequence}
    assert len(evidence) == 1 and erased.originals["a"] not in evidence  # k=1: another study
    (study,) = kos.CurrentRequestedProcedureEvidenceSequence
    sops = {
        i.ReferencedSOPInstanceUID
        for s in study.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    refs = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in kos.ContentSequence
        if i.ValueType == "IMAGE"
    }
    assert refs == sops and len(refs) >= 3  # every stored slice of the hit series
    assert erased.originals["b_study"] in erased.vaulted and not erased.vaulted & erased.a_names


def test_the_kos_is_a_valid_key_object_selection_document(erased: Erased, tmp_path: Path) -> None:
    """dicom3tools' dciodvfy finds no error in the KOS. Its only warnings are that Study
    Date, Time and ID (type 2, left empty: the vault keeps no study attribute but the
    UIDs and the Patient ID) would be needed to build a DICOMDIR."""
    path = tmp_path / "kos.dcm"
    erased.kos.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(path)
    assert not errors, errors
    dicomdir = "Missing attribute or value that would be needed to build DICOMDIR"
    assert all(dicomdir in w for w in warnings), warnings


def _zarr_texts(store: Path) -> Iterator[tuple[str, bytes]]:
    """Every Zarr array of the store, decoded, as bytes (strings UTF-8 encoded)."""
    for meta in sorted(store.rglob("zarr.json")):
        if json.loads(meta.read_text()).get("node_type") != "array":
            continue
        data = np.asarray(zarr.open_array(meta.parent, mode="r")[...])
        name = str(meta.parent.relative_to(store))
        if data.dtype.kind in "OUST":
            yield name, "\n".join(str(x) for x in data.ravel()).encode()
        else:
            yield name, np.ascontiguousarray(data).tobytes()


def _haystacks(root: Path) -> Iterator[tuple[str, bytes]]:
    """Every file under ``root`` as it is, and the store's arrays decoded."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield str(path.relative_to(root)), path.read_bytes()
    yield from _zarr_texts(root / "s.zarr")


def _hits(hay: list[tuple[str, bytes]], needles: set[str]) -> list[tuple[str, str]]:
    low = {n.lower().encode() for n in needles}
    return [(where, n.decode()) for where, data in hay for n in low if n in data.lower()]


def _vector_hits(hay: list[tuple[str, bytes]], vectors: list[np.ndarray]) -> list[str]:
    """Where one of ``vectors`` lies, raw or unit-normalised as the index keeps it."""
    forms = []
    for v in vectors:
        v32 = np.asarray(v, np.float32)
        forms += [v32.tobytes(), normalise(v32[None])[0].tobytes()]
    return sorted({where for where, data in hay for f in forms if f in data})


def test_the_erasure_job_finishes(erased: Erased) -> None:
    assert erased.erasure["kind"] == "erase" and erased.erasure["state"] == "done"


def test_the_other_study_stays_whole(erased: Erased) -> None:
    assert erased.survivor["series"][0]["series"] in erased.b_names
    assert _hits(erased.hay, erased.b_names)  # the scan finds names that are there
    assert _vector_hits(erased.hay, erased.b_vectors)  # … and vectors that are there


def test_no_identifying_value_is_anywhere(erased: Erased) -> None:
    assert _hits(erased.hay, erased.needles) == []


def test_nothing_names_the_deleted_study(erased: Erased) -> None:
    assert _hits(erased.hay, erased.a_names) == []


def test_no_file_holds_the_deleted_vectors(erased: Erased) -> None:
    assert _vector_hits(erased.hay, erased.a_vectors) == []


def test_the_job_reports_forgot_the_deleted_study(tmp_path: Path) -> None:
    """Redaction alone (retention not over): the report of the job that stored the
    deleted study loses every item naming it, other items stay."""
    jobs = JobStore(f"sqlite:///{tmp_path / 'j.db'}")
    try:
        report = {
            "series": [
                {"study": "s-gone", "series": "x1", "entry": "e1"},
                {"study": "s-kept", "series": "x2", "entry": "e2"},
            ],
            "errors": [{"path": "f.dcm", "code": "not-dicom", "message": "x"}],
        }
        row = jobs.create("u", state="done", report=report)
        other = jobs.create("u", state="done", report=report, tenant="other")
        assert jobs.redact("default", {"s-gone", "x1", "e1"}) == 1
        got = jobs.get(row.id)
        assert got is not None and got.report is not None
        assert json.dumps(got.report).count("s-gone") == 0
        assert got.report["series"] == [report["series"][1]]
        assert got.report["errors"] == report["errors"]
        theirs = jobs.get(other.id)
        assert theirs is not None and theirs.report == report  # another tenant's: untouched
    finally:
        jobs.close()
