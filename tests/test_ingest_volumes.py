"""NIfTI and ITK (NRRD, MetaImage) ingest, and their agreement with DICOM.

The same anatomy written as a DICOM series, as NIfTI the way dcm2niix writes it (rows
flipped, RAS affine) and as NRRD/MHA must give the identical canonical array and the same
geometry. Real files come from nibabel's test data and nilearn's bundled MNI152 template.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA

from radcache.embeddings.errors import InputError
from radcache.embeddings.ingest import load_volumes, scan
from radcache.embeddings.pseudonyms import Pseudonymizer
from radcache.embeddings.volume import Volume
from tests.dicomgen import (
    ORIENTATIONS,
    assert_matches_nifti,
    assert_matches_series,
    kept_alive,
    phantom,
    pixel_holders,
    write_itk,
    write_nifti,
    write_series,
    zip_bytes,
)

SECRET = b"radcache-test-secret-0123456789"
AXIS_ALIGNED = ["axial", "axial-columns-rightward", "coronal", "sagittal", "sagittal-upside-down"]


def load(inputs, **kw) -> tuple[list[Volume], list[InputError]]:
    return load_volumes(list(inputs), Pseudonymizer(SECRET), **kw)


def load_one(inputs, **kw) -> Volume:
    vols, errs = load(inputs, **kw)
    assert not errs, [e.to_dict() for e in errs]
    assert len(vols) == 1
    return vols[0]


def assert_same_geometry(a: Volume, b: Volume, tol: float = 1e-4) -> None:
    np.testing.assert_allclose(a.geometry.spacing, b.geometry.spacing, atol=tol)
    np.testing.assert_allclose(a.geometry.origin, b.geometry.origin, atol=tol)
    np.testing.assert_allclose(a.geometry.direction_matrix, b.geometry.direction_matrix, atol=tol)
    np.testing.assert_allclose(a.geometry.positions, b.geometry.positions, atol=tol)


def _series_and_nifti(tmp_path: Path, orientation: str, slice_direction: float = 1.0, **nifti_kw):
    raw = phantom(5, 6, 8, seed=21)
    spacing = (2.5, 0.75, 0.5)
    s = write_series(
        tmp_path / "dicom",
        raw,
        iop=ORIENTATIONS[orientation],
        spacing=spacing,
        slice_direction=slice_direction,
        shuffle=True,
    )
    nifti_spacing = (spacing[0] * slice_direction, spacing[1], spacing[2])
    paths = {
        suffix: write_nifti(
            tmp_path / f"vol{suffix}",
            s.expected[0],
            iop=s.iop,
            spacing=nifti_spacing,
            origin=s.positions[0][0],
            **nifti_kw,
        )
        for suffix in (".nii", ".nii.gz")
    }
    return s, paths


@pytest.mark.parametrize("slice_direction", [1.0, -1.0], ids=["ascending", "descending"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_dicom_and_nifti_give_identical_volumes(tmp_path, orientation, slice_direction):
    s, paths = _series_and_nifti(tmp_path, orientation, slice_direction)
    v_dcm = load_one([s.directory])
    for suffix, path in paths.items():
        v_nii = load_one([path])
        assert v_nii.meta.source_format == "nifti", suffix
        np.testing.assert_array_equal(v_nii.voxels, v_dcm.voxels)
        assert_same_geometry(v_nii, v_dcm)
        assert_matches_series(v_nii, s)
        assert_matches_nifti(v_nii, nib.load(path))
        if orientation in AXIS_ALIGNED:
            assert v_nii.content_hash() == v_dcm.content_hash()


def test_nifti_without_row_flip_is_the_same_volume(tmp_path):
    s, flipped = _series_and_nifti(tmp_path / "a", "axial")
    _, plain = _series_and_nifti(tmp_path / "b", "axial", flip_rows=False)
    d_flipped = nib.load(flipped[".nii"]).get_fdata()
    d_plain = nib.load(plain[".nii"]).get_fdata()
    assert not np.array_equal(d_flipped, d_plain)  # the files really differ…
    a, b = load_one([flipped[".nii"]]), load_one([plain[".nii"]])
    np.testing.assert_array_equal(a.voxels, b.voxels)  # …the volumes do not
    assert a.content_hash() == b.content_hash()
    np.testing.assert_array_equal(a.voxels, s.expected[0])


def test_scaled_int16_nifti_like_dcm2niix_ct(tmp_path):
    s, paths = _series_and_nifti(tmp_path, "axial", scl=(0.5, -1024.0))
    img = nib.load(paths[".nii.gz"])
    assert img.get_data_dtype() == np.int16
    assert (img.dataobj.slope, img.dataobj.inter) == (0.5, -1024.0)
    v_dcm = load_one([s.directory])
    for path in paths.values():
        v = load_one([path])
        np.testing.assert_array_equal(v.voxels, v_dcm.voxels)
        assert v.content_hash() == v_dcm.content_hash()


def test_qform_only_nifti(tmp_path):
    s, paths = _series_and_nifti(tmp_path, "coronal", qform_only=True)
    hdr = nib.load(paths[".nii"]).header
    assert int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 1
    v = load_one([paths[".nii"]])
    assert v.meta.warnings == ()
    np.testing.assert_array_equal(v.voxels, load_one([s.directory]).voxels)
    assert_matches_series(v, s)


def test_nifti_without_any_orientation_warns(tmp_path):
    img = nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), np.eye(4))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    v = load_one([("bare.nii", img.to_bytes())])
    assert any("no sform or qform" in w for w in v.meta.warnings)
    assert v.shape == (5, 4, 3)


def test_nifti_metadata_and_modality_label(tmp_path):
    _, paths = _series_and_nifti(tmp_path, "axial")
    v = load_one([paths[".nii.gz"]], modality="CT")
    assert v.meta.modality == "CT"
    assert v.meta.source_format == "nifti"
    assert v.meta.intensity == "raw"
    assert v.meta.patient is None
    assert v.meta.study == v.meta.series
    assert v.meta.part == ""
    # the key is a content hash of the file: a copy under another name has the same key
    again = load_one([("renamed.nii.gz", paths[".nii.gz"].read_bytes())], modality="CT")
    assert again.meta.study == v.meta.study
    other = load_one([paths[".nii"]])
    assert other.meta.study != v.meta.study  # different bytes (uncompressed)
    assert other.meta.modality is None


def test_non_dicom_names_are_keyed_per_tenant_and_take_the_senders_references(tmp_path):
    """A NIfTI/NRRD file's names are keyed pseudonyms of its hash (never the hash itself, in
    every tenant's own domain, also where UIDs are kept), and the patient and study a sender
    names are pseudonymised exactly as a DICOM file's PatientID and StudyInstanceUID."""
    import xxhash

    raw = phantom(3, 6, 8, seed=23)
    nii = write_nifti(tmp_path / "v.nii.gz", raw.astype(np.float32))
    nrrd = write_itk(tmp_path / "v.nrrd", raw.astype(np.float32))
    pseudo = Pseudonymizer(SECRET)
    series = {}
    for path in (nii, nrrd):
        digest = xxhash.xxh3_128_hexdigest(path.read_bytes())
        v = load_one([path])
        assert v.meta.series == pseudo.keyed_name("series", f"file:{digest}") != digest
        assert v.meta.study == v.meta.series and v.meta.patient is None
        (other,), _ = load_volumes([path], pseudo.for_tenant("hospital-b"))
        assert other.meta.series not in (v.meta.series, digest)
        (kept,), _ = load_volumes([path], Pseudonymizer(SECRET, keep_uids=True))
        assert kept.meta.series != digest  # a file's hash is no UID to keep
        series[path] = v.meta.series
    dicom = write_series(
        tmp_path / "dcm", raw, study_uid="1.2.826.0.1.3680043.8.498.91", extra={"PatientID": "P-7"}
    )
    (dv,), _ = load_volumes([dicom.directory], pseudo)
    refs = pseudo.refs(patient=" P-7 ", study="1.2.826.0.1.3680043.8.498.91")
    (named,), errs = load_volumes([nii], pseudo, refs=refs)
    assert not errs and named.meta.patient == dv.meta.patient is not None
    assert named.meta.study == dv.meta.study and named.meta.series == series[nii]
    for bad in ("", "x" * 65, "P\\7", "P\n7"):
        with pytest.raises(InputError, match="expected 1–64 characters") as caught:
            pseudo.refs(patient=bad)
        assert bad.strip() == "" or bad not in str(caught.value)  # never quoted


def test_4d_nifti_gives_one_candidate_per_time_point(tmp_path):
    raw = phantom(4, 5, 6, seed=22).astype(np.float32)
    frames = np.stack([raw, raw * 2, raw - 7])
    path = write_nifti(tmp_path / "func.nii.gz", frames)
    assert nib.load(path).shape == (6, 5, 4, 3)
    result = scan([path], Pseudonymizer(SECRET))
    assert [(c.part, c.n_slices, c.source_format) for c in result.candidates] == [
        ("t=0", 4, "nifti"),
        ("t=1", 4, "nifti"),
        ("t=2", 4, "nifti"),
    ]
    vols, errs = load([path])
    assert errs == []
    for t, v in enumerate(vols):
        assert v.meta.part == f"t={t}"
        np.testing.assert_array_equal(v.voxels, frames[t])
    assert len({v.meta.study for v in vols}) == 1


def test_5d_nifti_with_trailing_unit_axis(tmp_path):
    data = np.arange(4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 3, 1)
    img = nib.Nifti1Image(data, np.diag([-2.0, -2.0, 2.0, 1.0]))
    assert img.shape == (4, 5, 6, 3, 1)
    vols, errs = load([("five.nii", img.to_bytes())])
    assert errs == []
    assert [v.meta.part for v in vols] == ["t=0", "t=1", "t=2"]
    for t, v in enumerate(vols):
        assert_matches_nifti(v, img, t=t)
        np.testing.assert_array_equal(v.voxels, data[..., t, 0].transpose(2, 1, 0))


def test_2d_nifti_is_a_single_slice(tmp_path):
    data = np.arange(20, dtype=np.float32).reshape(4, 5)
    v = load_one([("slice.nii", nib.Nifti1Image(data, np.eye(4)).to_bytes())])
    assert v.shape == (1, 5, 4)


def test_nifti2_is_read():
    path = Path(NIBABEL_DATA) / "example_nifti2.nii.gz"
    img = nib.load(path)
    assert isinstance(img, nib.Nifti2Image)
    vols, errs = load([path])
    assert errs == []
    assert len(vols) == img.shape[3]
    for t, v in enumerate(vols):
        assert_matches_nifti(v, img, t=t)


def test_nifti_nan_voxels_become_zero(tmp_path):
    data = np.ones((3, 4, 5), dtype=np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    v = load_one([("nan.nii", nib.Nifti1Image(data, np.eye(4)).to_bytes())])
    assert np.all(np.isfinite(v.voxels))
    assert int((v.voxels == 0).sum()) == 2


def _patched(good: bytes, offset: int, fmt: str, *values) -> bytes:
    b = bytearray(good)
    b[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    return bytes(b)


@pytest.fixture
def good_nifti() -> bytes:
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    return nib.Nifti1Image(data, np.eye(4), dtype=np.int16).to_bytes()


@pytest.mark.parametrize(
    "corruption",
    [
        "magic",
        "sizeof_hdr+magic",
        "datatype",
        "header-garbage",
        "truncated-header",
        "truncated-data",
        "vox_offset-beyond-end",
        "empty",
    ],
)
def test_corrupted_nifti_is_invalid_nifti(good_nifti, corruption):
    bad = {
        "magic": lambda g: _patched(g, 344, "4s", b"zz1\0"),
        "sizeof_hdr+magic": lambda g: _patched(_patched(g, 0, "<i", 99999), 344, "4s", b"\0\0\0\0"),
        "datatype": lambda g: _patched(g, 70, "<h", 999),
        "header-garbage": lambda g: bytes(range(256)) + bytes(92) + g[348:],
        "truncated-header": lambda g: g[:200],
        "truncated-data": lambda g: g[:-40],
        "vox_offset-beyond-end": lambda g: _patched(g, 108, "<f", 1e7),
        "empty": lambda g: b"",
    }[corruption](good_nifti)
    for name, data in (("bad.nii", bad), ("bad.nii.gz", gzip.compress(bad))):
        vols, errs = load([(name, data)])
        assert vols == []
        assert [e.code for e in errs] == ["invalid-nifti"], [e.to_dict() for e in errs]
        assert errs[0].path == name


def test_truncated_nifti_on_disk_fails_only_at_load(tmp_path, good_nifti):
    p = tmp_path / "cut.nii"
    p.write_bytes(good_nifti[:-40])
    result = scan([p], Pseudonymizer(SECRET))
    assert result.errors == []
    (cand,) = result.candidates
    with pytest.raises(InputError) as info:
        cand.load()
    assert info.value.code == "invalid-nifti"
    assert "truncated" in info.value.message


def test_nifti_good_and_bad_together(tmp_path, good_nifti):
    vols, errs = load([("good.nii", good_nifti), ("bad.nii", good_nifti[:100])])
    assert len(vols) == 1
    assert [(e.code, e.path) for e in errs] == [("invalid-nifti", "bad.nii")]


def test_zip_with_nifti_and_dicom(tmp_path):
    s, paths = _series_and_nifti(tmp_path, "sagittal")
    s_dir_zip = zip_bytes(s.directory, extra={"nifti/vol.nii.gz": paths[".nii.gz"].read_bytes()})
    vols, errs = load([("upload.zip", s_dir_zip)])
    assert errs == []
    by_format = {v.meta.source_format: v for v in vols}
    assert sorted(by_format) == ["dicom", "nifti"]
    np.testing.assert_array_equal(by_format["dicom"].voxels, by_format["nifti"].voxels)
    assert by_format["dicom"].content_hash() == by_format["nifti"].content_hash()


# ---------------------------------------------------------------------------------------
# ITK formats


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("orientation", ["axial", "sagittal-upside-down", "oblique"])
def test_itk_formats_match_dicom(tmp_path, suffix, orientation):
    raw = phantom(5, 6, 8, seed=23)
    s = write_series(tmp_path / "dicom", raw, iop=ORIENTATIONS[orientation])
    path = write_itk(tmp_path / f"vol{suffix}", s.expected[0], iop=s.iop, origin=s.positions[0][0])
    v_dcm = load_one([s.directory])
    for inp in (path, (f"upload{suffix}", path.read_bytes())):
        v = load_one([inp])
        assert v.meta.source_format == "itk"
        np.testing.assert_array_equal(v.voxels, v_dcm.voxels)
        assert_same_geometry(v, v_dcm)
        assert_matches_series(v, s)
        if orientation != "oblique":
            assert v.content_hash() == v_dcm.content_hash()


def test_unreadable_itk_file(tmp_path):
    p = tmp_path / "broken.nrrd"
    p.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4\n\nxx")
    vols, errs = load([p])
    assert vols == []
    assert [e.code for e in errs] == ["unreadable-volume"]
    assert errs[0].path == str(p)


def test_2d_itk_image_is_one_slice(tmp_path):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.arange(20, dtype=np.float32).reshape(4, 5))
    img.SetSpacing((0.5, 0.25))
    p = tmp_path / "plane.mha"
    sitk.WriteImage(img, str(p))
    v = load_one([p])
    assert v.shape == (1, 4, 5)
    assert v.geometry.spacing[:2] == (0.5, 0.25)


def test_4d_itk_image_is_unsupported(tmp_path):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), dtype=np.float32), isVector=False)
    p = tmp_path / "time.nrrd"
    sitk.WriteImage(img, str(p))
    vols, errs = load([p])
    assert vols == []
    assert [e.code for e in errs] == ["unsupported-input"]


# ---------------------------------------------------------------------------------------
# Real files: nibabel's test data and nilearn's MNI152 template


def _assert_axial_and_ascending(v: Volume) -> None:
    d = v.geometry.direction_matrix
    assert np.abs(d[:, 2]).argmax() == 2, "slice axis should be nearest z"
    assert np.all(np.diff(v.geometry.positions[:, 2]) > 0), "slices must ascend inferior→superior"
    assert d[0, 0] > 0 and d[1, 1] > 0 and d[2, 2] > 0  # columns → left, rows → posterior
    assert np.linalg.det(d) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "functional.nii"])
def test_nibabel_test_data(name):
    path = Path(NIBABEL_DATA) / name
    img = nib.load(path)
    vols, errs = load([path])
    assert errs == []
    n_t = img.shape[3] if len(img.shape) == 4 else 1
    assert len(vols) == n_t
    for t, v in enumerate(vols):
        _assert_axial_and_ascending(v)
        assert_matches_nifti(v, img, t=t if n_t > 1 else None)
        np.testing.assert_allclose(
            sorted(v.geometry.spacing), sorted(img.header.get_zooms()[:3]), rtol=1e-5
        )


def test_nibabel_big_endian_anatomical_values():
    path = Path(NIBABEL_DATA) / "anatomical.nii"
    img = nib.load(path)
    assert img.get_data_dtype().byteorder == ">"
    v = load_one([path])
    # LAS on disk: i already runs left (+x in LPS), j runs anterior and must flip
    np.testing.assert_array_equal(v.voxels, img.get_fdata().transpose(2, 1, 0)[:, ::-1, :])


def test_mni152_template_has_sane_geometry():
    datasets = pytest.importorskip("nilearn.datasets")
    load_mni152_template = datasets.load_mni152_template

    img = load_mni152_template(resolution=2)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = img.to_bytes()
    img = nib.Nifti1Image.from_bytes(data)  # what was written (uint8 with scaling)
    v = load_one([("mni152_2mm.nii", data)], modality="MR")
    x, y, z = img.shape[:3]
    assert v.shape == (z, y, x)
    _assert_axial_and_ascending(v)
    np.testing.assert_allclose(v.geometry.direction_matrix, np.eye(3), atol=1e-6)
    assert v.geometry.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert_matches_nifti(v, img)
    # anatomy: the top slices (vertex) hold less brain than the middle ones, and the
    # template's first canonical voxel is the patient's right-anterior-inferior corner
    mass = (v.voxels > 0).sum(axis=(1, 2))
    assert mass[-3:].sum() < mass[z // 2]
    ras_first = v.geometry.positions[0] * np.array([-1.0, -1.0, 1.0])
    affine = img.affine
    corner = affine[:3, :3] @ np.array([x - 1, y - 1, 0]) + affine[:3, 3]
    np.testing.assert_allclose(ras_first, corner, atol=1e-4)
    assert ras_first[0] > 0 and ras_first[1] > 0  # right (+R) and anterior (+A)


def test_gzipped_nifti_under_another_name(tmp_path):
    raw = phantom(seed=21)
    path = write_nifti(tmp_path / "vol.nii.gz", raw.astype(np.float32))
    renamed = tmp_path / "upload.bin"
    renamed.write_bytes(path.read_bytes())
    a, b = load_one([path]), load_one([renamed])
    np.testing.assert_array_equal(a.voxels, b.voxels)


# ---------------------------------------------------------------------------------------
# Headers at scan, voxels at load


def test_volume_files_are_read_at_load_not_at_scan(tmp_path):
    raw = phantom(5, 30, 40, seed=66)
    values = raw.astype(np.float32)
    files = [
        write_nifti(tmp_path / "v.nii.gz", values),
        write_nifti(tmp_path / "v.nii", values),
        write_itk(tmp_path / "v.nrrd", values),
        write_itk(tmp_path / "v.mha", values),
    ]
    archive = tmp_path / "volumes.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f"vols/{f.name}")
    for inputs in (files, [archive]):
        result = scan(inputs, Pseudonymizer(SECRET))
        assert result.errors == []
        assert sorted(c.source_format for c in result.candidates) == ["itk"] * 2 + ["nifti"] * 2
        assert pixel_holders(kept_alive(result)) == []  # headers only
        for cand in result.candidates:
            v = cand.load()
            assert v.n_slices == cand.n_slices == 5
            np.testing.assert_array_equal(v.voxels, values)
        assert pixel_holders(kept_alive(result)) == []  # nothing kept after loading


def test_4d_nifti_time_points_load_in_any_order(tmp_path):
    raw = phantom(4, 5, 6, seed=67).astype(np.float32)
    frames = np.stack([raw, raw + 1, raw + 2, raw + 3])
    path = write_nifti(tmp_path / "func.nii.gz", frames)
    result = scan([path], Pseudonymizer(SECRET))
    last = result.candidates[-1].load()  # any order: each reads only its own time point
    np.testing.assert_array_equal(last.voxels, frames[3])
    np.testing.assert_array_equal(result.candidates[1].load().voxels, frames[1])
