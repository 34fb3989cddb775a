"""The pipeline end to end: cache behaviour, format equivalence, bad input, privacy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer, Recipe, open_store
from radcache.embeddings.encode import Encoder, load_encoder
from radcache.embeddings.recipe import CTWindows
from tests.dicomgen import FAKE_IDENTITY, phantom, rescaled, write_nifti, write_series


def _pipe(encoder: Encoder, store: Path, pseudo: Pseudonymizer, **kw) -> Pipeline:
    return Pipeline(encoder, EmbeddingStore(store), pseudo, batch_size=4, **kw)


@pytest.fixture
def series(tmp_path: Path):
    return write_series(tmp_path / "ct", phantom(6, 24, 20), shuffle=True)


def test_resubmission_runs_no_forward(
    tiny: Encoder, series, store_path: Path, pseudo: Pseudonymizer
) -> None:
    pipe = _pipe(tiny, store_path, pseudo)
    first = pipe.embed([series.directory])
    assert [r.cache for r in first.series] == ["miss"] and first.ok
    before = tiny.forward_count
    again = pipe.embed([series.directory])
    assert tiny.forward_count == before  # not one forward pass
    assert [r.cache for r in again.series] == ["hit"]
    assert again.series[0].entry == first.series[0].entry
    # a new process (new pipeline, reopened store) hits too
    pipe2 = _pipe(tiny, store_path, pseudo)
    assert [r.cache for r in pipe2.embed([series.directory]).series] == ["hit"]
    assert tiny.forward_count == before
    assert len(open_store(store_path).series()) == 1


def test_recipe_model_or_precision_change_is_a_new_entry(
    tiny: Encoder, tiny_fp32: Encoder, series, store_path: Path, pseudo: Pseudonymizer
) -> None:
    base = _pipe(tiny, store_path, pseudo).embed([series.directory]).series[0]
    lung = Recipe(intensity=CTWindows(windows=((-600, 1500),)))
    other_recipe = _pipe(tiny, store_path, pseudo, recipe=lung).embed([series.directory]).series[0]
    # auto is bf16 on CPUs with fast bf16 and fp32 elsewhere: take whichever `tiny` is not
    other = load_encoder("dinov2-tiny-random", device="cpu", precision="bf16")
    other = tiny_fp32 if tiny.precision != "fp32" else other
    other_precision = _pipe(other, store_path, pseudo).embed([series.directory]).series[0]
    small = load_encoder("dinov2-small-random", device="cpu")
    other_model = _pipe(small, store_path, pseudo).embed([series.directory]).series[0]
    for r in (other_recipe, other_precision, other_model):
        assert r.cache == "miss"
    keys = {base.entry, other_recipe.entry, other_precision.entry, other_model.entry}
    assert len(keys) == 4
    st = open_store(store_path)
    assert st.resolve(other_model.entry).dim == 384
    assert len(st.spaces()) == 3  # precision shares a (model, recipe) space; the others don't


def test_dicom_and_nifti_give_the_same_embeddings(
    tiny_fp32: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    raw = phantom(5, 22, 18)
    gen = write_series(tmp_path / "dcm", raw, shuffle=True, reverse_instance_numbers=True)
    nii = write_nifti(tmp_path / "vol.nii.gz", rescaled(raw, 1.0, -1024.0), flip_rows=True)
    a = _pipe(tiny_fp32, tmp_path / "a.zarr", pseudo).embed([gen.directory])
    b = _pipe(tiny_fp32, tmp_path / "b.zarr", pseudo).embed([nii], modality="CT")
    assert a.ok and b.ok
    ea, eb = a.series[0], b.series[0]
    assert ea.entry == eb.entry  # same pixels + geometry + model + recipe ⇒ same cache key
    sa, sb = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "b.zarr")
    for kind in ("cls", "patch", "positions"):
        np.testing.assert_array_equal(sa.read(ea.entry, kind), sb.read(eb.entry, kind))
    # and in one store the NIfTI is a cache hit of the DICOM series
    mixed = _pipe(tiny_fp32, tmp_path / "a.zarr", pseudo).embed([nii], modality="CT")
    assert mixed.series[0].cache == "hit"


def test_bad_input_is_reported_and_the_rest_completes(
    tiny: Encoder, series, tmp_path: Path, store_path: Path, pseudo: Pseudonymizer
) -> None:
    from pydicom.data import get_testdata_file

    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    broken_nii = tmp_path / "broken.nii"
    broken_nii.write_bytes(b"\x00" * 100)
    truncated = get_testdata_file("MR_truncated.dcm")
    bad_jpeg = get_testdata_file("JPEG-lossy.dcm")
    report = _pipe(tiny, store_path, pseudo).embed(
        [series.directory, junk, broken_nii, truncated, bad_jpeg]
    )
    assert [r.cache for r in report.series] == ["miss"]
    codes = {Path(str(e.path).split(" ")[0]).name: e.code for e in report.errors}
    assert codes == {
        "notes.txt": "not-dicom",
        "broken.nii": "invalid-nifti",
        "MR_truncated.dcm": "truncated-file",
        "JPEG-lossy.dcm": "decode-failed",
    }
    assert not report.ok
    assert len(open_store(store_path).series()) == 1


def test_failure_mid_series_stores_nothing(
    tiny: Encoder, series, store_path: Path, pseudo: Pseudonymizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = _pipe(tiny, store_path, pseudo)
    real = tiny.forward
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("worker died")
        return real(*a, **k)

    monkeypatch.setattr(tiny, "forward", dying)
    with pytest.raises(RuntimeError, match="worker died"):
        pipe.embed([series.directory])
    monkeypatch.undo()
    st = open_store(store_path)
    assert st.series() == [] and st.spaces() == []


def test_no_patient_identity_at_rest(
    tiny: Encoder, tmp_path: Path, store_path: Path, pseudo: Pseudonymizer
) -> None:
    gen = write_series(tmp_path / "p", phantom(4, 16, 16))
    report = _pipe(tiny, store_path, pseudo).embed([gen.directory])
    assert report.ok
    blob = b"".join(p.read_bytes() for p in store_path.rglob("*") if p.is_file())
    for value in (*FAKE_IDENTITY.values(), gen.study_uid, gen.series_uid, "DOE", "12345"):
        assert value.encode() not in blob, value
    r = report.series[0]
    assert r.study == pseudo.name("study", gen.study_uid) and r.series == pseudo.name(
        "series", gen.series_uid
    )
    info = open_store(store_path).resolve(r.entry)
    assert info.patient == pseudo.name("patient", FAKE_IDENTITY["PatientID"])


def test_keep_uids_links_back_to_the_pacs(tiny: Encoder, tmp_path: Path, store_path: Path) -> None:
    gen = write_series(tmp_path / "p", phantom(3, 16, 16))
    keep = Pseudonymizer(b"k" * 32, keep_uids=True)
    r = _pipe(tiny, store_path, keep).embed([gen.directory]).series[0]
    assert (r.study, r.series) == (gen.study_uid, gen.series_uid)
    blob = b"".join(p.read_bytes() for p in store_path.rglob("*") if p.is_file())
    assert FAKE_IDENTITY["PatientID"].encode() not in blob


def test_stored_record_describes_the_embedding(
    tiny: Encoder, series, store_path: Path, pseudo: Pseudonymizer
) -> None:
    r = _pipe(tiny, store_path, pseudo).embed([series.directory]).series[0]
    st = open_store(store_path)
    info = st.resolve(r.entry)
    a = info.attrs
    assert a["model"]["random_weights"] is True and "RANDOM" in a["model"]["label"]
    assert a["precision"] == tiny.precision and a["recipe_hash"] == info.recipe_hash
    assert a["pooled"] == "mean of slice CLS tokens" and a["volume"]["modality"] == "CT"
    cls = st.read(r.entry, "cls")
    np.testing.assert_allclose(st.read(r.entry, "pooled"), cls.mean(0), rtol=1e-6)
    g = tiny.cfg.grid
    assert st.read(r.entry, "patch").shape == (6, g, g, tiny.cfg.dim)
    assert st.read(r.entry, "patch").dtype == np.float16
    assert st.read(r.entry, "cls_last").shape == (6, min(4, tiny.cfg.depth), tiny.cfg.dim)
    z = st.read(r.entry, "positions")[:, 2]
    assert np.all(np.diff(z) > 0)  # slices stored inferior → superior whatever the file order


def test_resent_files_are_recognised_without_parsing(
    tiny: Encoder,
    tmp_path: Path,
    store_path: Path,
    pseudo: Pseudonymizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import radcache.embeddings.pipeline as pipeline_mod

    a = write_series(tmp_path / "in" / "a", phantom(5, 16, 16), shuffle=True)
    b = write_series(tmp_path / "in" / "b", phantom(4, 16, 16, seed=4))
    first = _pipe(tiny, store_path, pseudo).embed([tmp_path / "in"])
    assert [r.cache for r in first.series] == ["miss", "miss"]
    assert first.ok

    def no_scan(*a, **k):
        raise AssertionError("a re-sent submission must not be parsed")

    monkeypatch.setattr(pipeline_mod, "scan", no_scan)
    before = tiny.forward_count
    again = _pipe(tiny, store_path, pseudo).embed([tmp_path / "in"])
    assert tiny.forward_count == before
    assert sorted((r.series, r.cache, r.entry) for r in again.series) == sorted(
        (r.series, "hit", r.entry) for r in first.series
    )
    monkeypatch.undo()
    # a subset of a series is a different volume: full path, a new entry
    partial = _pipe(tiny, store_path, pseudo).embed(a.files[:3])
    assert [r.cache for r in partial.series] == ["miss"]
    assert partial.series[0].entry not in {r.entry for r in first.series}
    # one changed file: full path again, and the unchanged series still hits
    changed = b.files[0]
    changed.write_bytes(changed.read_bytes()[:-2] + b"\x01\x00")
    mixed = _pipe(tiny, store_path, pseudo).embed([a.directory, b.directory])
    assert sorted(r.cache for r in mixed.series) == ["hit", "miss"]


def test_deleting_a_study_keeps_content_another_study_sent(
    tiny: Encoder, tmp_path: Path, store_path: Path, pseudo: Pseudonymizer
) -> None:
    raw = phantom(3, 16, 16, seed=50)
    a = write_series(tmp_path / "a", raw)
    b = write_series(tmp_path / "b", raw)  # the same pixels under other UIDs
    pipe = _pipe(tiny, store_path, pseudo)
    ra, rb = pipe.embed([a.directory]).series[0], pipe.embed([b.directory]).series[0]
    assert ra.entry == rb.entry and rb.cache == "hit" and ra.study != rb.study
    st = EmbeddingStore(store_path)
    assert st.delete_study(ra.study) == []  # b still refers to the entry
    info = st.resolve(rb.entry)
    assert info.study == rb.study and info.attrs.get("aliases") == []
    assert st.delete_study(rb.study) == [rb.entry]
    assert st.series() == [] and all(not st.table(s).keys for s in st.spaces())
    assert st.delete_study(rb.study) == []


def test_a_resent_study_is_named_by_its_own_files_in_stores_old_and_new(
    tiny: Encoder, tmp_path: Path, store_path: Path, pseudo: Pseudonymizer
) -> None:
    """Recognised from file digests, each study is answered under its own names, also in a
    store whose re-sent-file records predate per-file-set names (decoded once, then
    recognised); a NIfTI entry keeps the names it was stored under."""
    import zarr

    raw = phantom(3, 16, 16, seed=52)
    a = write_series(tmp_path / "a", raw, extra={"PatientID": "P-A"})
    b = write_series(tmp_path / "b", raw, extra={"PatientID": "P-B"})
    pipe = _pipe(tiny, store_path, pseudo)
    (ra,) = pipe.embed([a.directory]).series
    content = pipe.store.get(ra.entry).attrs["content_hash"]
    vol = zarr.open_group(store_path / "volumes" / content, mode="r+")
    old = {k: v for k, v in vol.attrs["radcache"].items() if k != "groups"}
    vol.attrs["radcache"] = old  # as an older radcache wrote it
    (rb,) = pipe.embed([b.directory]).series
    assert (rb.entry, rb.study, rb.cache) == (ra.entry, pseudo.name("study", b.study_uid), "hit")
    patient_b = pseudo.name("patient", "P-B")
    alias = {"study": rb.study, "series": rb.series, "part": "", "patient": patient_b}
    assert pipe.store.get(ra.entry).attrs["aliases"] == [alias]
    fresh = _pipe(tiny, store_path, pseudo)
    assert [r.study for r in fresh.recognise([b.directory]).series] == [rb.study]
    assert fresh.recognise([a.directory]) is None  # its names were not recorded: decode
    (again,) = fresh.embed([a.directory]).series
    assert (again.study, again.cache) == (ra.study, "hit")
    assert [r.study for r in fresh.recognise([a.directory]).series] == [ra.study]
    # deleting A leaves B's entry named by B and its patient, and forgets A's names
    st = EmbeddingStore(store_path)
    assert st.delete_study(ra.study) == []
    kept = st.get(ra.entry)
    assert (kept.study, kept.patient) == (rb.study, patient_b)
    assert fresh.recognise([a.directory]) is None
    assert [r.study for r in fresh.recognise([b.directory]).series] == [rb.study]
    # a NIfTI entry stored under its file's plain hash keeps that name when read
    nii = write_nifti(tmp_path / "v.nii", phantom(3, 16, 16, seed=53).astype(np.float32))
    (rn,) = pipe.embed([nii]).series
    g = zarr.open_group(store_path / "entries" / rn.entry, mode="r+")
    legacy = {**g.attrs["radcache"]}
    legacy["volume"] = {**legacy["volume"], "study": "0" * 31 + "1", "series": "0" * 31 + "1"}
    g.attrs["radcache"] = legacy
    (hit,) = pipe.embed([nii]).series
    assert (hit.cache, hit.series) == ("hit", rn.series)
    info = open_store(store_path).resolve("0" * 31 + "1")
    assert info.key == rn.entry and info.attrs["aliases"][0]["series"] == rn.series


def test_an_interrupted_run_keeps_what_finished_and_a_rerun_embeds_the_rest(
    tiny: Encoder,
    tmp_path: Path,
    store_path: Path,
    pseudo: Pseudonymizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from radcache.embeddings.ingest import Candidate

    archive = tmp_path / "archive"
    made = [
        write_series(archive / name, phantom(n, 16, 16, seed=60 + n))
        for name, n in (("a", 5), ("b", 6), ("c", 7))
    ]
    third = pseudo.name("series", made[2].series_uid)
    real_load = Candidate.load
    loaded: list[str] = []

    def load(cand: Candidate):
        loaded.append(cand.series)
        if cand.series == third:
            raise RuntimeError("the process was stopped")
        return real_load(cand)

    monkeypatch.setattr(Candidate, "load", load)
    before = tiny.forward_count
    with pytest.raises(RuntimeError, match="stopped"):
        _pipe(tiny, store_path, pseudo).embed([archive])
    assert tiny.forward_count - before == 4  # two series of ≤ 8 slices, batches of 4
    kept = open_store(store_path).series()
    assert len(kept) == 2  # each series was committed as soon as it was embedded
    monkeypatch.setattr(Candidate, "load", lambda c: loaded.append(c.series) or real_load(c))
    loaded.clear()
    before = tiny.forward_count
    report = _pipe(tiny, store_path, pseudo).embed([archive])
    assert report.ok
    assert [(r.series, r.cache) for r in report.series] == [
        (pseudo.name("series", m.series_uid), cache)
        for m, cache in zip(made, ("hit", "hit", "miss"), strict=True)
    ]
    assert tiny.forward_count - before == 2  # only the third series ran the model
    assert loaded == [third]  # the stored two were answered from their files' digests
    assert len(open_store(store_path).series()) == 3
