"""DICOM ingest: pydicom's bundled real-world files plus generated series.

The generated series come from :mod:`tests.dicomgen`, which knows the patient position of
every voxel it writes; :func:`assert_matches_series` checks each ingested voxel against
that, so these tests state *where* values must land, not just what the array looks like.
"""

from __future__ import annotations

import gc
import io
import os
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from radcache.embeddings.errors import InputError
from radcache.embeddings.ingest import load_volumes, scan
from radcache.embeddings.pseudonyms import Pseudonymizer
from radcache.embeddings.volume import Volume
from tests.dicomgen import (
    FAKE_IDENTITY,
    ORIENTATIONS,
    assert_matches_series,
    encoder_available,
    kept_alive,
    phantom,
    pixel_holders,
    rescaled,
    write_enhanced_mr,
    write_series,
    zip_bytes,
)

SECRET = b"radcache-test-secret-0123456789"


@pytest.fixture
def pseudo() -> Pseudonymizer:
    return Pseudonymizer(SECRET)


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not shipped with this pydicom"
    return str(path)


def load(
    inputs, pseudo: Pseudonymizer | None = None, **kw
) -> tuple[list[Volume], list[InputError]]:
    return load_volumes(list(inputs), pseudo or Pseudonymizer(SECRET), **kw)


def load_one(inputs, pseudo: Pseudonymizer | None = None, **kw) -> Volume:
    vols, errs = load(inputs, pseudo, **kw)
    assert not errs, [e.to_dict() for e in errs]
    assert len(vols) == 1, [v.meta for v in vols]
    return vols[0]


def codes(errors: list[InputError]) -> list[str]:
    return [e.code for e in errors]


# ---------------------------------------------------------------------------------------
# pydicom's bundled files


def test_ct_small_is_in_hounsfield_units():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol = load_one([path])
    want = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    assert float(ds.RescaleIntercept) == -1024
    assert vol.shape == (1, 128, 128)
    np.testing.assert_array_equal(vol.voxels[0], want)
    np.testing.assert_array_equal(vol.voxels[0], ds.pixel_array.astype(np.float32) - 1024)
    assert vol.meta.intensity == "HU"
    assert vol.meta.modality == "CT"
    assert vol.meta.source_format == "dicom"
    # axial, row direction +x: canonical layout is the file's own layout
    np.testing.assert_allclose(vol.geometry.direction_matrix, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(vol.geometry.spacing[:2], [0.661468, 0.661468])
    ipp = [float(v) for v in ds.ImagePositionPatient]
    np.testing.assert_allclose(vol.geometry.positions[0], ipp)
    np.testing.assert_allclose(vol.geometry.origin, ipp)


@pytest.fixture(scope="module")
def mr_small_reference() -> np.ndarray:
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_mr_small_every_transfer_syntax_decodes_identically(name, mr_small_reference):
    vol = load_one([bundled(name)])
    assert vol.shape == (1, 64, 64)
    assert vol.voxels.dtype == np.float32
    np.testing.assert_array_equal(vol.voxels[0], mr_small_reference)
    assert vol.meta.modality == "MR"
    assert vol.meta.intensity == "modality"


@pytest.mark.parametrize(
    "name", ["JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "JPEG2000.dcm", "image_dfl.dcm"]
)
def test_other_codecs_decode_like_pydicom(name):
    path = bundled(name)
    ds = pydicom.dcmread(path)
    vol = load_one([path])
    assert vol.shape == (1, int(ds.Rows), int(ds.Columns))
    want = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    np.testing.assert_array_equal(vol.voxels[0], want)
    assert np.ptp(vol.voxels) > 0


def test_image_without_pixel_spacing_notes_the_assumption():
    vol = load_one([bundled("image_dfl.dcm")])
    assert any("no pixel spacing" in w for w in vol.meta.warnings)
    assert vol.geometry.spacing[:2] == (1.0, 1.0)


def test_rgb_rle_gives_a_colour_volume():
    path = bundled("SC_rgb_rle.dcm")
    ds = pydicom.dcmread(path)
    vol = load_one([path])
    assert vol.voxels.ndim == 4
    assert vol.shape == (1, 100, 100, 3)
    assert vol.meta.photometric == "RGB"
    np.testing.assert_array_equal(vol.voxels[0], ds.pixel_array.astype(np.float32))


def test_rtdose_legacy_multiframe_uses_grid_frame_offsets():
    path = bundled("rtdose.dcm")
    ds = pydicom.dcmread(path)
    vol = load_one([path])
    assert vol.n_slices == 15
    assert vol.shape == (15, 10, 10)
    offsets = np.asarray([float(v) for v in ds.GridFrameOffsetVector])
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(vol.geometry.positions[:, 2], ipp[2] + offsets)
    np.testing.assert_allclose(vol.geometry.positions[:, :2], np.tile(ipp[:2], (15, 1)))
    assert np.all(np.diff(vol.geometry.positions[:, 2]) > 0)
    assert vol.geometry.spacing == pytest.approx((10.0, 10.0, 5.0))
    dose = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)  # stored × scaling = Gy
    np.testing.assert_allclose(vol.voxels, dose.astype(np.float32), rtol=1e-6)
    assert vol.meta.warnings == ()


def test_truncated_file_is_reported_as_truncated():
    path = bundled("MR_truncated.dcm")
    vols, errs = load([path])
    assert vols == []
    assert codes(errs) == ["truncated-file"]
    assert errs[0].path == path
    assert errs[0].to_dict()["code"] == "truncated-file"


def test_slice_cut_short_in_its_pixel_data(tmp_path):
    s = write_series(tmp_path, phantom(seed=24))
    victim = s.files[3]
    victim.write_bytes(victim.read_bytes()[:-50])
    vols, errs = load([tmp_path])
    assert [(e.code, e.path) for e in errs] == [("truncated-file", str(victim))]
    # the rest of the series still loads, with the hole reported
    (vol,) = vols
    assert vol.n_slices == 6
    assert any("irregular slice spacing" in w for w in vol.meta.warnings)


@pytest.mark.parametrize("cut", [1500, 3000, 5000, 39000])
def test_file_cut_short_in_its_header_is_truncated(cut):
    with open(bundled("CT_small.dcm"), "rb") as f:
        data = f.read()[:cut]
    vols, errs = load([("CT_cut.dcm", data)])
    assert vols == []
    assert codes(errs) == ["truncated-file"]
    assert errs[0].path == "CT_cut.dcm"


def test_undecodable_jpeg_names_the_file():
    path = bundled("JPEG-lossy.dcm")
    vols, errs = load([path])
    assert vols == []
    assert codes(errs) == ["decode-failed"]
    assert errs[0].path == path
    assert "JPEG-lossy.dcm" in str(errs[0])


def test_candidate_load_raises_input_error(pseudo):
    path = bundled("JPEG-lossy.dcm")
    result = scan([path], pseudo)
    assert result.errors == []
    (cand,) = result.candidates
    assert cand.source_format == "dicom"
    assert cand.n_slices == 1
    with pytest.raises(InputError) as info:
        cand.load()
    assert info.value.code == "decode-failed"


@pytest.mark.parametrize(
    ("name", "reason"), [("rtplan.dcm", "RT plan"), ("test-SR.dcm", "SR object")]
)
def test_non_image_objects_are_skipped_not_errors(name, reason, pseudo):
    path = bundled(name)
    result = scan([path], pseudo)
    assert result.candidates == []
    assert result.errors == []
    assert len(result.skipped) == 1
    assert result.skipped[0][0] == path
    assert reason in result.skipped[0][1]


def test_text_file_is_not_dicom(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("Patient DOE^JANE, see attached.\n" * 20)
    vols, errs = load([p])
    assert vols == []
    assert codes(errs) == ["not-dicom"]
    assert errs[0].path == str(p)


def test_empty_file_and_missing_path(tmp_path):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    missing = tmp_path / "nope" / "IM0001"
    vols, errs = load([empty, missing])
    assert vols == []
    assert codes(errs) == ["not-dicom", "unsupported-input"]
    assert "empty" in errs[0].message
    assert errs[1].path == str(missing)


def test_dicom_with_garbage_after_the_preamble_is_not_dicom(tmp_path):
    p = tmp_path / "IM0001"
    p.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    vols, errs = load([p])
    assert vols == []
    assert len(errs) == 1
    assert errs[0].code in {"not-dicom", "truncated-file"}


def test_mixed_good_and_bad_inputs_keep_the_good_volumes(tmp_path):
    text = tmp_path / "readme.txt"
    text.write_text("not an image")
    series = write_series(tmp_path / "series", phantom())
    inputs = [
        bundled("CT_small.dcm"),
        text,
        bundled("MR_truncated.dcm"),
        bundled("rtplan.dcm"),
        series.directory,
        bundled("JPEG-lossy.dcm"),
        bundled("MR_small_RLE.dcm"),
    ]
    result = scan(inputs, Pseudonymizer(SECRET))
    assert len(result.skipped) == 1
    vols, errs = load(inputs)
    assert sorted(codes(errs)) == ["decode-failed", "not-dicom", "truncated-file"]
    assert sorted(v.shape for v in vols) == [(1, 64, 64), (1, 128, 128), (7, 10, 12)]
    (gen,) = [v for v in vols if v.n_slices == 7]
    assert_matches_series(gen, series)


# ---------------------------------------------------------------------------------------
# Generated series: geometry


def test_axial_series_geometry(tmp_path):
    raw = phantom()
    s = write_series(tmp_path, raw, spacing=(2.5, 0.75, 0.5), origin=(-100.0, -80.0, 40.0))
    vol = load_one([tmp_path])
    assert vol.shape == raw.shape
    np.testing.assert_array_equal(vol.voxels, rescaled(raw, 1.0, -1024.0))
    assert_matches_series(vol, s)
    np.testing.assert_allclose(vol.geometry.direction_matrix, np.eye(3), atol=1e-9)
    assert vol.geometry.spacing == pytest.approx((0.5, 0.75, 2.5))
    assert vol.geometry.origin == pytest.approx((-100.0, -80.0, 40.0))
    np.testing.assert_allclose(vol.geometry.positions, s.positions[0])
    assert vol.meta.intensity == "HU"
    assert vol.meta.n_files == raw.shape[0]
    assert vol.meta.part == ""
    assert vol.meta.warnings == ()
    assert vol.meta.series_description is None  # kept only where a deployment asks
    assert vol.meta.body_part == "HEAD"


@pytest.mark.parametrize("slice_direction", [1.0, -1.0], ids=["ascending", "descending"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_every_orientation_lands_voxels_where_the_scanner_put_them(
    tmp_path, orientation, slice_direction
):
    raw = phantom(5, 6, 8)
    s = write_series(tmp_path, raw, iop=ORIENTATIONS[orientation], slice_direction=slice_direction)
    vol = load_one([tmp_path])
    assert_matches_series(vol, s)
    d = vol.geometry.direction_matrix
    # right-handed: slices ascend along columns × rows
    assert np.linalg.det(d) == pytest.approx(1.0, abs=1e-6)
    # positions are the files' ImagePositionPatient values, sorted along the slice axis
    file_ipps = sorted(
        (tuple(float(v) for v in pydicom.dcmread(f).ImagePositionPatient) for f in s.files),
        key=lambda p: float(np.dot(p, d[:, 2])),
    )
    # a position is the slice's first *canonical* voxel: the files' IPP (their stored first
    # pixel) shifted by one constant in-plane vector, zero unless the plane was flipped
    shift = vol.geometry.positions - np.asarray(file_ipps)
    np.testing.assert_allclose(shift, np.tile(shift[0], (len(shift), 1)), atol=1e-6)
    assert float(np.dot(shift[0], d[:, 2])) == pytest.approx(0.0, abs=1e-6)
    if orientation in {"axial", "coronal", "sagittal", "oblique"}:
        np.testing.assert_allclose(shift[0], 0.0, atol=1e-6)
    else:
        assert np.linalg.norm(shift[0]) > 1.0
    assert np.all(np.diff(vol.geometry.positions @ d[:, 2]) > 0)
    np.testing.assert_allclose(vol.geometry.spacing[2], 2.5)
    # radiological display convention per plane
    col_axis, row_axis = np.abs(d[:, 0]).argmax(), np.abs(d[:, 1]).argmax()
    normal_axis = np.abs(d[:, 2]).argmax()
    if normal_axis == 2:  # axial: columns → patient left, rows → posterior
        assert (col_axis, row_axis) == (0, 1)
        assert d[0, 0] > 0 and d[1, 1] > 0 and d[2, 2] > 0
    elif normal_axis == 1:  # coronal: columns → left, rows → inferior
        assert (col_axis, row_axis) == (0, 2)
        assert d[0, 0] > 0 and d[2, 1] < 0
    else:  # sagittal: columns → posterior, rows → inferior
        assert (col_axis, row_axis) == (1, 2)
        assert d[1, 0] > 0 and d[2, 1] < 0


def test_shuffled_files_and_reversed_instance_numbers_change_nothing(tmp_path):
    raw = phantom(seed=3)
    plain = write_series(tmp_path / "plain", raw)
    messy = write_series(
        tmp_path / "messy",
        raw,
        shuffle=True,
        random_names=True,
        reverse_instance_numbers=True,
        seed=11,
    )
    # the messy files really are out of order: by writing order and by instance number
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in messy.files]
    z = [float(h.ImagePositionPatient[2]) for h in headers]
    assert z != sorted(z)
    by_instance = sorted(headers, key=lambda h: int(h.InstanceNumber))
    assert [float(h.ImagePositionPatient[2]) for h in by_instance] == sorted(z, reverse=True)
    v1, v2 = load_one([plain.directory]), load_one([messy.directory])
    np.testing.assert_array_equal(v1.voxels, v2.voxels)
    np.testing.assert_array_equal(v1.geometry.positions, v2.geometry.positions)
    assert v1.content_hash() == v2.content_hash()
    assert_matches_series(v2, messy)


def test_reversed_instance_numbers_alone(tmp_path):
    raw = phantom(seed=4)
    s = write_series(tmp_path, raw, reverse_instance_numbers=True)
    assert int(pydicom.dcmread(s.files[0]).InstanceNumber) == raw.shape[0]
    vol = load_one([tmp_path])
    np.testing.assert_array_equal(vol.voxels, s.expected[0])


_SYNTAXES = [
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEG2000Lossless,
]


@pytest.mark.parametrize("tsyntax", _SYNTAXES, ids=[t.name for t in _SYNTAXES])
def test_generated_transfer_syntaxes_decode_identically(tmp_path, tsyntax):
    if not encoder_available(tsyntax):
        why = f"no pydicom encoder installed for {tsyntax.name}"
        if os.environ.get("CI") == "true":  # CI installs every codec: a missing one is a failure
            pytest.fail(why)
        pytest.skip(why)
    raw = phantom(3, 32, 32, seed=5)  # JPEG 2000 needs at least 32×32 for its resolutions
    ref = write_series(tmp_path / "ref", raw, transfer_syntax=ExplicitVRLittleEndian)
    enc = write_series(tmp_path / "enc", raw, transfer_syntax=tsyntax)
    assert pydicom.dcmread(enc.files[0]).file_meta.TransferSyntaxUID == tsyntax
    v_ref, v_enc = load_one([ref.directory]), load_one([enc.directory])
    np.testing.assert_array_equal(v_enc.voxels, v_ref.voxels)
    np.testing.assert_array_equal(v_enc.voxels, rescaled(raw, 1.0, -1024.0))
    assert v_enc.content_hash() == v_ref.content_hash()


def test_rescale_slope_and_intercept(tmp_path):
    raw = phantom(seed=6)
    s = write_series(tmp_path, raw, slope=0.25, intercept=-3.5, modality="MR")
    vol = load_one([tmp_path])
    np.testing.assert_array_equal(vol.voxels, raw.astype(np.float64) * 0.25 - 3.5)
    assert_matches_series(vol, s)
    assert vol.meta.intensity == "modality"


def test_missing_slice_warns_about_irregular_spacing(tmp_path):
    raw = phantom()
    s = write_series(tmp_path, raw, missing=(3,))
    vol = load_one([tmp_path])
    assert vol.n_slices == raw.shape[0] - 1
    assert any("irregular slice spacing" in w for w in vol.meta.warnings), vol.meta.warnings
    assert_matches_series(vol, s)  # the gap stays a gap: positions are the measured ones
    gaps = np.diff(vol.geometry.positions[:, 2])
    np.testing.assert_allclose(sorted(gaps), [2.5] * 4 + [5.0])
    assert vol.geometry.spacing[2] == pytest.approx(2.5)


def test_duplicate_positions_are_an_inconsistent_series(tmp_path):
    write_series(tmp_path, phantom(), duplicates=(2,))
    vols, errs = load([tmp_path])
    assert vols == []
    assert codes(errs) == ["inconsistent-series"]
    assert "share a position" in errs[0].message
    assert str(tmp_path) in str(errs[0].path)


def test_repeated_acquisitions_split_by_acquisition_number(tmp_path):
    raw = phantom(seed=7)
    s = write_series(tmp_path, raw, repeats=2, repeat_by="AcquisitionNumber", shuffle=True)
    vols, errs = load([tmp_path])
    assert errs == []
    by_part = {v.meta.part: v for v in vols}
    assert sorted(by_part) == ["acquisition=1", "acquisition=2"]
    assert_matches_series(by_part["acquisition=1"], s, repeat=0)
    assert_matches_series(by_part["acquisition=2"], s, repeat=1)


def test_gantry_tilt_warns_and_keeps_the_sheared_positions(tmp_path):
    raw = phantom(seed=8)
    s = write_series(tmp_path, raw, tilt_deg=15.0)
    vol = load_one([tmp_path])
    assert any("gantry tilt of 15.0" in w for w in vol.meta.warnings), vol.meta.warnings
    assert_matches_series(vol, s)
    np.testing.assert_allclose(vol.geometry.positions, s.positions[0], atol=1e-6)
    assert vol.geometry.spacing[2] == pytest.approx(2.5)  # along the normal, not the shear


def test_no_tilt_warning_for_a_straight_stack(tmp_path):
    write_series(tmp_path, phantom(), tilt_deg=0.0)
    vol = load_one([tmp_path])
    assert not any("tilt" in w for w in vol.meta.warnings)


def test_two_echoes_become_two_volumes(tmp_path):
    raw = phantom(seed=9)
    s = write_series(tmp_path, raw, repeats=2, repeat_by="EchoNumbers", modality="MR", shuffle=True)
    result = scan([tmp_path], Pseudonymizer(SECRET))
    assert sorted(c.part for c in result.candidates) == ["echo=1", "echo=2"]
    assert {c.n_slices for c in result.candidates} == {raw.shape[0]}
    vols, errs = load([tmp_path])
    assert errs == []
    by_part = {v.meta.part: v for v in vols}
    assert_matches_series(by_part["echo=1"], s, repeat=0)
    assert_matches_series(by_part["echo=2"], s, repeat=1)
    assert by_part["echo=1"].meta.series == by_part["echo=2"].meta.series


def test_temporal_positions_become_separate_volumes(tmp_path):
    s = write_series(tmp_path, phantom(), repeats=2, repeat_by="TemporalPositionIdentifier")
    vols, errs = load([tmp_path])
    assert errs == []
    assert sorted(v.meta.part for v in vols) == ["temporal=1", "temporal=2"]
    for v in vols:
        assert_matches_series(v, s, repeat=int(v.meta.part[-1]) - 1)


def test_two_series_in_one_folder_are_two_volumes(tmp_path):
    a = write_series(tmp_path, phantom(seed=25))
    b = write_series(tmp_path / "sub", phantom(4, 6, 6, seed=26), study_uid=a.study_uid)
    vols, errs = load([tmp_path])
    assert errs == []
    assert sorted(v.shape for v in vols) == [(4, 6, 6), (7, 10, 12)]
    va, vb = sorted(vols, key=lambda v: -v.n_slices)
    assert_matches_series(va, a)
    assert_matches_series(vb, b)
    assert va.meta.study == vb.meta.study
    assert va.meta.series != vb.meta.series


def test_one_series_uid_with_two_orientations_splits(tmp_path):
    axial = write_series(tmp_path / "ax", phantom(4, 6, 8, seed=27))
    coronal = write_series(
        tmp_path / "cor",
        phantom(3, 6, 8, seed=28),
        iop=ORIENTATIONS["coronal"],
        study_uid=axial.study_uid,
        series_uid=axial.series_uid,
        frame_of_reference_uid=axial.frame_of_reference_uid,
    )
    vols, errs = load([tmp_path])
    assert errs == []
    assert sorted(v.meta.part for v in vols) == ["orientation=1", "orientation=2"]
    by_slices = {v.n_slices: v for v in vols}
    assert_matches_series(by_slices[4], axial)
    assert_matches_series(by_slices[3], coronal)


def test_series_without_positions_is_stacked_in_file_order_with_a_note(tmp_path):
    s = write_series(tmp_path, phantom(3, 4, 5, seed=29), modality="MR")
    for f in s.files:
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f, enforce_file_format=True)
    vol = load_one([tmp_path])
    assert vol.n_slices == 3
    assert any("slice positions missing" in w for w in vol.meta.warnings)


def test_localizer_is_dropped_from_the_series(tmp_path):
    raw = phantom()
    s = write_series(tmp_path, raw, localizer=True)
    result = scan([tmp_path], Pseudonymizer(SECRET))
    assert [(Path(n).name, r) for n, r in result.skipped] == [
        ("scout.dcm", "localizer (scout) image")
    ]
    vol = load_one([tmp_path])
    assert vol.n_slices == raw.shape[0]
    assert_matches_series(vol, s)


def test_sr_in_the_study_is_skipped(tmp_path):
    s = write_series(tmp_path, phantom(), sr=True)
    result = scan([tmp_path], Pseudonymizer(SECRET))
    assert result.errors == []
    assert [Path(n).name for n, _ in result.skipped] == ["report.dcm"]
    assert "SR" in result.skipped[0][1]
    assert len(result.candidates) == 1
    assert_matches_series(load_one([tmp_path]), s)


def test_image_object_without_pixels_is_an_error(tmp_path):
    s = write_series(tmp_path, phantom(2, 4, 4), modality="MR")
    ds = pydicom.dcmread(s.files[0])
    del ds.PixelData
    p = tmp_path / "nopixels.dcm"
    ds.save_as(p, enforce_file_format=True)
    s.files[0].unlink()
    vols, errs = load([tmp_path])
    assert codes(errs) == ["no-pixel-data"]
    assert errs[0].path == str(p)
    assert [v.n_slices for v in vols] == [1]


def test_oblique_series_positions_match_the_files(tmp_path):
    raw = phantom(seed=10)
    s = write_series(tmp_path, raw, iop=ORIENTATIONS["oblique"], shuffle=True)
    vol = load_one([tmp_path])
    np.testing.assert_array_equal(vol.voxels, s.expected[0])  # nearest plane is axial
    assert_matches_series(vol, s)
    np.testing.assert_allclose(vol.geometry.positions, s.positions[0], atol=1e-9)
    d = vol.geometry.direction_matrix
    np.testing.assert_allclose(d[:, 0], s.row_dir, atol=1e-9)
    np.testing.assert_allclose(d[:, 1], s.col_dir, atol=1e-9)
    np.testing.assert_allclose(d[:, 2], s.normal, atol=1e-9)


def test_monochrome1_is_inverted(tmp_path):
    raw = phantom(seed=12)
    write_series(tmp_path / "m2", raw, modality="MR", intercept=0.0)
    write_series(tmp_path / "m1", raw, modality="MR", intercept=0.0, photometric="MONOCHROME1")
    v2, v1 = load_one([tmp_path / "m2"]), load_one([tmp_path / "m1"])
    want = (v2.voxels.max() + v2.voxels.min()) - v2.voxels
    np.testing.assert_array_equal(v1.voxels, want)
    # the brightest stored value is now the darkest voxel
    assert v1.voxels.flat[np.argmax(v2.voxels)] == v2.voxels.min()
    assert v1.meta.photometric == "MONOCHROME2"  # inverted once; nothing downstream inverts again


def test_an_instance_sent_twice_counts_once(tmp_path):
    s = write_series(tmp_path / "a", phantom(seed=14))
    resend = tmp_path / "resend.dcm"
    resend.write_bytes(s.files[2].read_bytes())
    vols, errs = load([s.directory, resend])
    assert errs == []
    (vol,) = vols
    assert vol.n_slices == len(s.files)
    assert any("duplicate instance" in w for w in vol.meta.warnings)


def test_acquisition_parts_sort_numerically(tmp_path):
    write_series(tmp_path, phantom(3, 4, 4, seed=15), repeats=11, repeat_by="AcquisitionNumber")
    result = scan([tmp_path], Pseudonymizer(SECRET))
    parts = [c.part for c in result.candidates]
    numbers = [int(p.rsplit("=", 1)[1]) for p in parts]
    assert numbers == sorted(numbers) and len(numbers) == 11


def test_projection_xray_gets_its_voi_window(tmp_path):
    raw = phantom(1, 8, 8, seed=13).astype(np.uint16)
    s = write_series(tmp_path, raw, modality="DX", intercept=0.0, window=(100.0, 120.0))
    vol = load_one([tmp_path])
    assert vol.meta.intensity == "voi"
    assert vol.meta.window == (100.0, 120.0)
    ds = pydicom.dcmread(s.files[0])
    want = np.asarray(apply_voi_lut(ds.pixel_array.astype(np.float64), ds), dtype=np.float32)
    np.testing.assert_allclose(vol.voxels[0], want, rtol=1e-5)
    assert vol.voxels.min() == 0 and vol.voxels.max() == 65535  # window is narrower than data


def test_bare_dataset_without_preamble_or_file_meta(tmp_path):
    s = write_series(tmp_path, phantom(1, 6, 8, seed=14), modality="MR")
    ds = pydicom.dcmread(s.files[0])
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    data = buf.getvalue()
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"
    vol = load_one([("bare_dataset", data)])
    np.testing.assert_array_equal(vol.voxels, s.expected[0])


# ---------------------------------------------------------------------------------------
# Containers: zip archives and uploaded bytes


def test_zip_file_and_bytes_give_the_same_volume_as_the_directory(tmp_path):
    s = write_series(tmp_path / "dir", phantom(seed=15), shuffle=True, sr=True)
    data = zip_bytes(
        s.directory,
        extra={"__MACOSX/study/._IM0001": b"\0\x05\x16\x07junk", "study/.DS_Store": b"bud1"},
    )
    zpath = tmp_path / "study.zip"
    zpath.write_bytes(data)
    ref = load_one([s.directory])
    for inp in (zpath, ("study.zip", data)):
        result = scan([inp], Pseudonymizer(SECRET))
        assert result.errors == []
        assert [n.rsplit("!", 1)[1] for n, _ in result.skipped] == ["study/report.dcm"]
        vol = load_one([inp])
        np.testing.assert_array_equal(vol.voxels, ref.voxels)
        np.testing.assert_array_equal(vol.geometry.positions, ref.geometry.positions)
        assert vol.geometry == ref.geometry
        assert vol.content_hash() == ref.content_hash()
        assert vol.meta == ref.meta


def test_uploaded_single_files_as_bytes(tmp_path):
    s = write_series(tmp_path, phantom(seed=16))
    items = [(f"upload-{i}", f.read_bytes()) for i, f in enumerate(reversed(s.files))]
    vol = load_one(items)
    assert_matches_series(vol, s)


def test_nested_zips_are_opened_two_deep_only(tmp_path):
    s = write_series(tmp_path / "dir", phantom(seed=17))
    inner = zip_bytes(s.directory)
    middle = _zip({"inner.zip": inner})
    vol = load_one([("outer.zip", middle)])
    assert_matches_series(vol, s)
    vols, errs = load([("outermost.zip", _zip({"middle.zip": middle}))])
    assert vols == []
    assert codes(errs) == ["unsupported-input"]
    assert "nested" in errs[0].message


def test_corrupt_zip_is_unsupported_input():
    vols, errs = load([("broken.zip", b"PK\x03\x04" + b"\0" * 64)])
    assert vols == []
    assert codes(errs) == ["unsupported-input"]


def _zip(members: dict[str, bytes]) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Enhanced (multi-frame) MR


def test_enhanced_mr_matches_the_single_frame_series(tmp_path):
    raw = phantom(seed=18)
    single = write_series(tmp_path / "single", raw, modality="MR")
    enhanced = write_enhanced_mr(tmp_path / "enhanced.dcm", raw)
    assert pydicom.dcmread(enhanced).SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
    v_single, v_enh = load_one([single.directory]), load_one([enhanced])
    np.testing.assert_array_equal(v_enh.voxels, v_single.voxels)
    assert v_enh.geometry.spacing == pytest.approx(v_single.geometry.spacing)
    assert v_enh.geometry == v_single.geometry
    np.testing.assert_allclose(v_enh.geometry.positions, v_single.geometry.positions)
    assert v_enh.content_hash() == v_single.content_hash()
    assert_matches_series(v_enh, single)
    assert v_enh.meta.n_files == 1
    assert v_enh.meta.modality == "MR"


def test_enhanced_mr_frames_out_of_order_with_per_frame_rescale(tmp_path):
    raw = phantom(seed=19)
    single = write_series(tmp_path / "single", raw, modality="MR")
    enhanced = write_enhanced_mr(
        tmp_path / "enhanced.dcm", raw, shuffle_frames=True, vary_intercept=True, seed=3
    )
    ds = pydicom.dcmread(enhanced)
    stored_order = [
        int(f.FrameContentSequence[0].InStackPositionNumber)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    assert stored_order != sorted(stored_order)
    vol = load_one([enhanced])
    np.testing.assert_array_equal(vol.voxels, single.expected[0])
    assert_matches_series(vol, single)


@pytest.mark.parametrize(
    "tsyntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=lambda t: t.name
)
def test_compressed_enhanced_mr(tmp_path, tsyntax):
    if not encoder_available(tsyntax):
        why = f"no pydicom encoder installed for {tsyntax.name}"
        if os.environ.get("CI") == "true":  # CI installs every codec: a missing one is a failure
            pytest.fail(why)
        pytest.skip(why)
    raw = phantom(4, 32, 32, seed=20)
    single = write_series(tmp_path / "single", raw, modality="MR")
    enhanced = write_enhanced_mr(tmp_path / "enh.dcm", raw, transfer_syntax=tsyntax)
    assert pydicom.dcmread(enhanced).file_meta.TransferSyntaxUID == tsyntax
    vol = load_one([enhanced])
    np.testing.assert_array_equal(vol.voxels, single.expected[0])


# ---------------------------------------------------------------------------------------
# Privacy: nothing identifying reaches a Volume


def _identifying_strings(series) -> list[str]:
    return [
        *FAKE_IDENTITY.values(),
        "DOE",
        "JANE",
        "Fakeington",
        series.study_uid,
        series.series_uid,
    ]


def _everything_said_about(vol: Volume, result) -> str:
    return " ".join(
        [
            repr(vol),
            repr(vol.meta),
            str(vol.meta.to_dict()),
            str(vol.geometry.to_dict()),
            repr(result.candidates),
            repr(result.skipped),
        ]
    )


def test_volume_never_carries_identifiers(tmp_path):
    s = write_series(tmp_path, phantom(), sr=True, localizer=True)
    pseudo = Pseudonymizer(SECRET)
    result = scan([tmp_path], pseudo)
    vol = load_one([tmp_path], pseudo)
    text = _everything_said_about(vol, result)
    for value in _identifying_strings(s):
        assert value not in text, value
    assert vol.meta.study == pseudo.name("study", s.study_uid)
    assert vol.meta.series == pseudo.name("series", s.series_uid)
    assert vol.meta.patient == pseudo.name("patient", FAKE_IDENTITY["PatientID"])
    assert len(vol.meta.study) == len(vol.meta.series) == len(vol.meta.patient) == 32
    assert result.candidates[0].study == vol.meta.study
    assert result.candidates[0].series == vol.meta.series


def test_pseudonyms_depend_on_the_secret(tmp_path):
    write_series(tmp_path, phantom(2, 4, 4))
    a = load_one([tmp_path], Pseudonymizer(SECRET))
    b = load_one([tmp_path], Pseudonymizer(b"another-secret-0123456789abcdef"))
    assert a.meta.study != b.meta.study
    assert a.meta.patient != b.meta.patient
    assert a.content_hash() == b.content_hash()


def test_keep_uids_keeps_uids_but_not_the_patient(tmp_path):
    s = write_series(tmp_path, phantom())
    pseudo = Pseudonymizer(SECRET, keep_uids=True)
    result = scan([tmp_path], pseudo)
    vol = load_one([tmp_path], pseudo)
    assert vol.meta.study == s.study_uid
    assert vol.meta.series == s.series_uid
    assert result.candidates[0].study == s.study_uid
    assert vol.meta.patient == Pseudonymizer(SECRET).name("patient", FAKE_IDENTITY["PatientID"])
    text = _everything_said_about(vol, result)
    for value in FAKE_IDENTITY.values():
        assert value not in text, value


def test_enhanced_and_bundled_files_carry_no_identifiers(tmp_path):
    enhanced = write_enhanced_mr(tmp_path / "enh.dcm", phantom(3, 4, 4))
    ct = bundled("CT_small.dcm")
    ds = pydicom.dcmread(ct)
    pseudo = Pseudonymizer(SECRET)
    vols, errs = load([enhanced, ct], pseudo)
    assert errs == []
    result = scan([enhanced, ct], pseudo)
    text = " ".join(_everything_said_about(v, result) for v in vols)
    for value in [
        *FAKE_IDENTITY.values(),
        str(ds.PatientName),
        str(ds.PatientID),
        str(ds.InstitutionName),
        str(ds.StudyInstanceUID),
    ]:
        assert value not in text, value


def test_zip_bomb_is_refused_before_inflating():
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * (50 << 20))  # 50 MiB of zeros packs to ~50 kB
    vols, errs = load([("bomb.zip", buf.getvalue())])
    assert vols == []
    assert codes(errs) == ["unsupported-input"]
    assert "inflate" in str(errs[0]) and errs[0].path == "bomb.zip"


def test_zip_member_names_cannot_escape(tmp_path):
    import zipfile

    s = write_series(tmp_path / "s", phantom(2, 8, 8, seed=60))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, f in enumerate(s.files):
            zf.writestr(f"../../../../tmp/escape{i}.dcm", f.read_bytes())
    vols, errs = load([("evil.zip", buf.getvalue())])
    assert errs == [] and vols[0].n_slices == 2
    assert not list(Path("/tmp").glob("escape*.dcm"))


def test_a_transfer_syntax_without_decoder_is_named():
    ds = pydicom.dcmread(bundled("JPEG2000.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    vols, errs = load([("video.dcm", buf.getvalue())])
    assert vols == []
    assert codes(errs) == ["unsupported-transfer-syntax"]
    assert "MPEG2" in str(errs[0]) and errs[0].path == "video.dcm"


# ---------------------------------------------------------------------------------------
# Headers only: a scan holds no pixels, a load keeps nothing


def _add_bulk(files: list[Path]) -> None:
    """Give each file what real headers carry and a scan must not keep: a 12 KB private
    blob (a CSA header) and a referenced-image sequence."""
    for f in files:
        ds = pydicom.dcmread(f)
        ds.add_new((0x0029, 0x0010), "LO", "SIEMENS CSA HEADER")
        ds.add_new((0x0029, 0x1010), "OB", b"\x01" * 12000)
        refs = []
        for _ in range(5):
            item = pydicom.Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            item.ReferencedSOPInstanceUID = pydicom.uid.generate_uid()
            refs.append(item)
        ds.ReferencedImageSequence = refs
        ds.save_as(f, enforce_file_format=True)


def test_scan_holds_headers_only_and_a_load_keeps_nothing(tmp_path, pseudo):
    s = write_series(tmp_path / "dir", phantom(5, 48, 64, seed=61), shuffle=True)
    _add_bulk(s.files)
    zpath = tmp_path / "study.zip"
    zpath.write_bytes(zip_bytes(s.directory))
    for inp in (s.directory, zpath):
        result = scan([inp], pseudo)
        (cand,) = result.candidates
        assert pixel_holders(kept_alive(result)) == []
        first = cand.load()
        assert_matches_series(first, s)
        assert pixel_holders(kept_alive(result)) == []  # the candidate kept none of it
        again = cand.load()  # read from the files again
        np.testing.assert_array_equal(again.voxels, first.voxels)


def test_held_headers_are_small(tmp_path, pseudo):
    n = 40
    write_series(tmp_path, phantom(n, 8, 8, seed=62))
    _add_bulk(sorted(tmp_path.iterdir()))
    scan([tmp_path], pseudo)  # imports and caches, once
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = scan([tmp_path], pseudo)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert [c.n_slices for c in result.candidates] == [n]
    # each file's header is over 13 KB on disk; what the scan keeps of it is a few facts
    assert held / n < 3000, f"{held / n:.0f} bytes held per file"


def test_a_file_changed_or_removed_after_the_scan_is_named(tmp_path, pseudo):
    s = write_series(tmp_path, phantom(4, 8, 8, seed=63))
    victim = s.files[1]
    result = scan([tmp_path], pseudo)
    ds = pydicom.dcmread(victim)
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(victim, enforce_file_format=True)
    with pytest.raises(InputError) as info:
        result.candidates[0].load()
    assert (info.value.code, info.value.path) == ("unsupported-input", str(victim))
    assert "changed after its header was read" in info.value.message
    result = scan([tmp_path], pseudo)
    victim.unlink()
    with pytest.raises(InputError) as info:
        result.candidates[0].load()
    assert (info.value.code, info.value.path) == ("unsupported-input", str(victim))
    assert "could not be read again" in info.value.message


def test_a_zip_inside_a_zip_is_spilled_to_disk_and_removed(tmp_path, pseudo, monkeypatch):
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    s = write_series(tmp_path / "dir", phantom(seed=64))
    outer = tmp_path / "outer.zip"
    outer.write_bytes(_zip({"inner.zip": zip_bytes(s.directory)}))
    result = scan([outer], pseudo)
    assert len(list(spill.iterdir())) == 1  # the inner archive, on disk
    assert pixel_holders(kept_alive(result)) == []
    assert_matches_series(result.candidates[0].load(), s)
    del result
    gc.collect()
    assert list(spill.iterdir()) == []


def test_diffusion_b_values_become_separate_volumes(tmp_path):
    s = write_series(
        tmp_path, phantom(seed=65), repeats=2, repeat_by="DiffusionBValue", modality="MR"
    )
    vols, errs = load([tmp_path])
    assert errs == []
    by_part = {v.meta.part: v for v in vols}
    assert sorted(by_part) == ["b=0.0", "b=500.0"]
    assert_matches_series(by_part["b=500.0"], s, repeat=1)
