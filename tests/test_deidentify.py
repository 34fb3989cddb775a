"""Header free text at rest and header values in errors.

Series descriptions are not stored unless a deployment keeps them, and then without the
file's names, IDs, dates and institution; Body Part Examined is kept only as a defined
term; a malformed header value is named by its attribute in errors, job reports and logs,
never quoted; sequence naming says which rule matched, not what the header said.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer, Settings
from radcache.embeddings.encode import Encoder
from radcache.embeddings.errors import InputError
from radcache.embeddings.index import Filters, open_index
from radcache.embeddings.ingest import load_volumes
from radcache.embeddings.ingest._body_parts import BODY_PART_TERMS
from radcache.embeddings.ingest._deidentify import body_part, clean_description
from radcache.embeddings.search import Query, Searcher
from radcache.embeddings.sequences import assemble_study
from tests.dicomgen import phantom, write_series

SECRET = b"radcache-test-secret-0123456789"
IDENTITY = {
    "PatientName": "DOE^JOHN",
    "PatientID": "12345",
    "StudyDate": "20240301",
    "InstitutionName": "St Elsewhere",
}
DESCRIPTION = "CT chest for DOE^JOHN 12345 2024-03-01"
#: Every token of the identifying values, as a description might spell them.
IDENTIFYING = ("doe", "john", "12345", "20240301", "2024-03-01", "st", "elsewhere")
SECRET_VALUE = "ZZSECRETNAME"


def _write(directory: Path, *, seed: int, **extra: object):
    header = {**IDENTITY, "SeriesDescription": DESCRIPTION, "BodyPartExamined": "CHEST"}
    return write_series(directory, phantom(3, 16, 16, seed=seed), extra={**header, **extra})


def _tokens(text: str) -> set[str]:
    return {t for t in re.split(r"[\s^,]+", text.lower()) if t}


# -- what a stored entry, the index and a search keep ------------------------------------
@dataclass
class Stored:
    pipe: Pipeline
    path: Path  # the store's directory
    entries: list[str]
    series: list[str]


def _embed(tiny: Encoder, root: Path, pseudo: Pseudonymizer) -> Stored:
    """Two series of two studies, embedded into a store of their own."""
    path = root / "store.zarr"
    pipe = Pipeline(tiny, EmbeddingStore(path), pseudo, batch_size=4)
    report = pipe.embed([_write(root / f"s{i}", seed=i).directory for i in range(2)])
    assert report.ok, [e.to_dict() for e in report.errors]
    return Stored(pipe, path, [r.entry for r in report.series], [r.series for r in report.series])


@pytest.fixture(scope="module")
def default_store(tiny: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Stored:
    return _embed(tiny, tmp_path_factory.mktemp("default"), Pseudonymizer(SECRET))


@pytest.fixture(scope="module")
def kept_store(tiny: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Stored:
    keep = Pseudonymizer(SECRET, keep_descriptions=True)
    return _embed(tiny, tmp_path_factory.mktemp("kept"), keep)


def _described(stored: Stored) -> tuple[list, list, list[dict], list[dict]]:
    """(entry attrs' descriptions, index records, search hits, hits of the description
    filter "chest") for the stored entries."""
    store = stored.pipe.store
    attrs = [store.get(key).attrs["volume"] for key in stored.entries]  # type: ignore[union-attr]
    idx = open_index(store)
    records = []
    for key in stored.entries:
        si, ordinal = idx.find(key)
        records.append(si.catalog.record(ordinal))
    searcher = Searcher(idx)
    (res,) = searcher.search(Query(series=stored.series[0]), k=5)
    (filtered,) = searcher.search(
        Query(series=stored.series[0]), k=5, filters=Filters.make(description="chest")
    )
    return attrs, records, [h.to_dict() for h in res.hits], [h.to_dict() for h in filtered.hits]


def test_descriptions_are_not_stored_by_default(default_store: Stored) -> None:
    attrs, records, hits, filtered = _described(default_store)
    assert [a["series_description"] for a in attrs] == [None, None]
    assert [a["body_part"] for a in attrs] == ["CHEST", "CHEST"]
    assert [r.description for r in records] == [None, None]
    assert hits and all(h["series_description"] is None for h in hits)
    assert hits[0]["series"] == default_store.series[1] and hits[0]["body_part"] == "CHEST"
    assert filtered == []  # nothing to match: no description is kept
    blob = b"".join(p.read_bytes() for p in default_store.path.rglob("*") if p.is_file())
    for value in ("DOE", "Elsewhere", "2024-03-01", "CT chest"):
        assert value.encode() not in blob, value


def test_kept_descriptions_lose_every_identifying_token(kept_store: Stored) -> None:
    attrs, records, hits, filtered = _described(kept_store)
    assert [a["series_description"] for a in attrs] == ["CT chest", "CT chest"]
    assert [r.description for r in records] == ["CT chest", "CT chest"]
    assert hits and all(h["series_description"] == "CT chest" for h in hits)
    assert [h["series"] for h in filtered] == [kept_store.series[1]]
    for text in [
        *(a["series_description"] for a in attrs),
        *(h["series_description"] for h in hits),
    ]:
        assert _tokens(text).isdisjoint(IDENTIFYING), text


def test_the_setting_reaches_ingest_through_the_pipeline(
    tiny: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(store=str(tmp_path / "s.zarr"))
    assert not Pipeline.from_settings(settings, encoder=tiny).pseudonymizer.keep_descriptions
    monkeypatch.setenv("RADCACHE_KEEP_DESCRIPTIONS", "true")
    pipe = Pipeline.from_settings(Settings(store=str(tmp_path / "s.zarr")), encoder=tiny)
    assert pipe.pseudonymizer.keep_descriptions
    assert pipe.variant(tenant="other").pseudonymizer.keep_descriptions
    (vol,) = load_volumes([_write(tmp_path / "a", seed=3).directory], pipe.pseudonymizer)[0]
    assert vol.meta.series_description == "CT chest"


# -- body part ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("CHEST", "CHEST"),
        (" lspine ", "LSPINE"),
        ("MY SECRET PART", "OTHER"),
        ("Chest-Doe", "OTHER"),
    ],
)
def test_body_part_is_a_defined_term_or_other(tmp_path: Path, written: str, kept: str) -> None:
    gen = _write(tmp_path, seed=0, BodyPartExamined=written)
    vols, errors = load_volumes([gen.directory], Pseudonymizer(SECRET))
    assert not errors and [v.meta.body_part for v in vols] == [kept]
    assert vols[0].meta.manufacturer_model == "dicomgen"  # the scanner model is kept


def test_body_part_terms_are_the_standards() -> None:
    common = {"ABDOMEN", "CHEST", "HEAD", "BRAIN", "KNEE", "PELVIS", "SPINE", "CSPINE"}
    assert common | {"TSPINE", "LSPINE", "WHOLEBODY", "HEADNECK"} <= BODY_PART_TERMS
    assert all(t == t.upper().strip() and 0 < len(t) <= 16 for t in BODY_PART_TERMS)
    assert body_part(None) is None and body_part("  ") is None
    assert body_part("abdomenpelvis") == "ABDOMENPELVIS" and body_part("ABD") == "OTHER"


# -- cleaning ------------------------------------------------------------------------------
def _header() -> Dataset:
    ds = Dataset()
    for kw, value in IDENTITY.items():
        setattr(ds, kw, value)
    ds.AccessionNumber = "ACC-998"
    ds.PatientBirthDate = "19700101"
    ds.SeriesDate = "20240302"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.PerformingPhysicianName = ["WILSON^JAMES", "CUDDY^LISA"]
    ds.OperatorsName = "CHASE^ROBERT"
    ds.OtherPatientIDs = ["X-777"]
    other = Dataset()
    other.PatientID = "MRN4242"
    ds.OtherPatientIDsSequence = [other]
    return ds


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        (DESCRIPTION, "CT chest"),
        ("Doe, John - CT head 01.03.2024", "CT head"),
        ("for patient DOE JOHN dob 1970-01-01 ACC998 at St Elsewhere", None),
        ("chest 03/01/2024 Dr. House ref Wilson", "chest ref"),
        ("CT 1 Mar 2024 thorax", "CT thorax"),
        ("thorax March 2, 2024 Cuddy", "thorax"),
        ("PID12345 abd X-777 MRN4242", "abd"),
        ("T2 tse 20230101 sag 2024/03/02 chase", "T2 tse sag"),
        ("head 2.5mm 1.25 Series 2", "head 2.5mm 1.25 Series 2"),
        ("T1 MPRAGE post Gd", "T1 MPRAGE post Gd"),
        ("DOE^JOHN", None),
        ("", None),
    ],
)
def test_clean_description_removes_the_files_identifying_values(
    text: str, cleaned: str | None
) -> None:
    assert clean_description(text, _header()) == cleaned


# -- header values in errors ----------------------------------------------------------------
def _corrupt(gen, keyword: str) -> None:
    """Put ``ZZSECRETNAME`` into ``keyword`` of every file: into the bytes of a same-length
    valid value (DS, IS, CS keep their VR), or as LO text where the VR is binary (US)."""
    placeholder = {
        "SliceThickness": "2.5000000000",
        "ImagePositionPatient": "9.9999999999",
        "AcquisitionNumber": "000000000001",
        "RescaleIntercept": "-1024.000000",
    }.get(keyword)
    for path in gen.files:
        ds = pydicom.dcmread(path)
        if placeholder is None:
            ds[keyword] = DataElement(ds[keyword].tag, "LO", SECRET_VALUE)
        elif keyword == "ImagePositionPatient":
            ds.ImagePositionPatient = [placeholder, *ds.ImagePositionPatient[1:]]
        else:
            setattr(ds, keyword, placeholder)
        ds.save_as(path)
        if placeholder is not None:
            data = path.read_bytes()
            assert placeholder.encode() in data
            path.write_bytes(data.replace(placeholder.encode(), SECRET_VALUE.encode()))


def _assert_unquoted(err: InputError, tag: str, keyword: str) -> None:
    text = "".join(traceback.format_exception(err))
    assert SECRET_VALUE not in text and SECRET_VALUE not in json.dumps(err.to_dict())
    assert err.code == "invalid-header" and f"{tag} {keyword}" in err.message, err.message
    assert "expected" in err.message


@pytest.mark.parametrize(
    ("keyword", "tag"),
    [
        ("Rows", "(0028,0010)"),
        ("ImagePositionPatient", "(0020,0032)"),
        ("SliceThickness", "(0018,0050)"),
        ("AcquisitionNumber", "(0020,0012)"),
        ("RescaleIntercept", "(0028,1052)"),
    ],
)
def test_malformed_numbers_are_named_not_quoted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keyword: str, tag: str
) -> None:
    gen = _write(tmp_path, seed=0)
    _corrupt(gen, keyword)
    with caplog.at_level(logging.DEBUG):
        vols, errors = load_volumes([gen.directory], Pseudonymizer(SECRET))
    assert not vols and len(errors) == len(gen.files)
    for err in errors:
        _assert_unquoted(err, tag, keyword)
    assert SECRET_VALUE not in caplog.text


@pytest.mark.parametrize(
    ("options", "keyword", "tag"),
    [
        ({"photometric": SECRET_VALUE}, "PhotometricInterpretation", "(0028,0004)"),
        (
            {"modality": "DX", "window": (40.0, 400.0), "extra": {"VOILUTFunction": SECRET_VALUE}},
            "VOILUTFunction",
            "(0028,1056)",
        ),
    ],
)
def test_values_read_when_a_series_is_loaded_are_named_not_quoted(
    tmp_path: Path, options: dict, keyword: str, tag: str
) -> None:
    gen = write_series(tmp_path, phantom(2, 8, 8), **options)
    vols, errors = load_volumes([gen.directory], Pseudonymizer(SECRET))
    assert not vols and len(errors) == 1
    _assert_unquoted(errors[0], tag, keyword)


def test_a_job_report_names_the_attribute_only(tiny: Encoder, tmp_path: Path) -> None:
    gen = _write(tmp_path / "in", seed=0)
    _corrupt(gen, "Rows")
    pipe = Pipeline(tiny, EmbeddingStore(tmp_path / "s.zarr"), Pseudonymizer(SECRET))
    report = json.dumps(pipe.embed([gen.directory]).to_dict())
    assert "(0028,0010) Rows" in report and SECRET_VALUE not in report


# -- sequence naming ------------------------------------------------------------------------
def test_sequence_reasons_name_the_rule_not_the_description(tmp_path: Path) -> None:
    common = {"modality": "MR", "intercept": 0.0, "study_uid": "1.2.826.0.1.3680043.8.498.61",
              "frame_of_reference_uid": "1.2.826.0.1.3680043.8.498.62"}  # fmt: skip
    texts = {"t1": "T1 MPRAGE for DOE^JOHN", "flair": "AX FLAIR St Elsewhere 12345"}
    for seed, (name, text) in enumerate(texts.items()):
        header = {**IDENTITY, "SeriesDescription": text}
        write_series(tmp_path / name, phantom(3, 16, 16, seed=seed), **common, extra=header)
    vols, errors = load_volumes([tmp_path / "t1", tmp_path / "flair"], Pseudonymizer(SECRET))
    assert not errors
    assert sorted(v.meta.sequence_hint for v in vols) == ["flair", "t1"]  # type: ignore[type-var]
    assert all(v.meta.series_description is None for v in vols)
    study = assemble_study(vols)
    assert study.present == ["t1", "flair"]
    words = set().union(*(_tokens(t) for t in texts.values()))
    for decision in study.decisions:
        assert "SeriesDescription matched the" in decision.reason
        assert _tokens(decision.reason).isdisjoint(words - {"t1", "flair", "for"}), decision
