"""Hostile uploads end in a clean input error, with bounded memory, before the expensive
work: detached headers naming files outside the upload, decompression bombs (a gzipped
NIfTI declaring 1024³ voxels of zeros, a zip padded past the ratio check), and a DICOM
whose few kilobytes of RLE declare a 15000 × 15000 RGB image.

Memory is measured with tracemalloc (numpy and nibabel allocations are traced): each
refusal must come before anything near the declared size is allocated.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid

from radcache.embeddings import Pipeline, Pseudonymizer
from radcache.embeddings.encode import Encoder
from radcache.embeddings.errors import InputError
from radcache.embeddings.ingest import Limits, load_volumes, scan
from radcache.embeddings.settings import Settings
from radcache.embeddings.store import EmbeddingStore

MiB = 1 << 20
GiB = 1 << 30
META = (
    "ObjectType = Image\nNDims = 3\nDimSize = 8 6 3\nElementType = MET_UCHAR\n"
    "ElementSpacing = 1 1 2\nElementDataFile = {}\n"
)
NRRD = "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 8 6 3\nencoding: raw\ndata file: {}\n"
VOXELS = np.arange(8 * 6 * 3, dtype=np.uint8)


@contextlib.contextmanager
def peak_traced() -> Iterator[list[int]]:
    """The peak of traced Python allocations inside the block, appended on exit."""
    out: list[int] = []
    tracemalloc.start()
    try:
        yield out
    finally:
        out.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def codes(errors: list[InputError] | list[Exception]) -> list[str]:
    return [getattr(e, "code", type(e).__name__) for e in errors]


def pipeline(tiny: Encoder, tmp_path: Path, pseudo: Pseudonymizer, limits: Limits) -> Pipeline:
    return Pipeline(tiny, EmbeddingStore(tmp_path / "store"), pseudo, limits=limits)


# ---------------------------------------------------------------------------------------
# Decompression bombs


@pytest.fixture(scope="module")
def zeros_nifti_gz() -> bytes:
    """A ~1 MB .nii.gz declaring 1024³ uint8 zeros: the deflate stream of 1 MiB of zeros,
    written once and repeated (each block starts afresh after a full flush)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 1024))
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    head = hdr.binaryblock + b"\0" * 4
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(MiB)
    first = co.compress(head) + co.flush(zlib.Z_FULL_FLUSH)
    block = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
    assert co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH) == block
    crc = zlib.crc32(head)
    for _ in range(1024):
        crc = zlib.crc32(zeros, crc)
    size = (len(head) + GiB) & 0xFFFFFFFF
    gzip_head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
    data = gzip_head + first + block * 1024 + co.flush() + struct.pack("<II", crc, size)
    assert len(data) < 2 * MiB
    return data


def test_a_nifti_declaring_too_many_voxels_is_refused_from_its_header(
    zeros_nifti_gz: bytes, tiny: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(zeros_nifti_gz)
    limits = Limits(max_voxels=512**3)
    with peak_traced() as peak:
        found = scan([path], pseudo, limits=limits)
    assert found.candidates == [] and codes(found.errors) == ["volume-too-large"]
    err = found.errors[0]
    assert err.path == str(path) and "1024×1024×1024" in err.message
    assert peak[0] < 16 * MiB, peak  # the header only: nothing near 1 GiB

    pipe = pipeline(tiny, tmp_path, pseudo, limits)
    report = pipe.embed([("upload.nii.gz", zeros_nifti_gz)])
    assert report.series == [] and codes(report.errors) == ["volume-too-large"]


def test_a_gzipped_nifti_is_refused_before_it_inflates_past_the_budget(
    zeros_nifti_gz: bytes, tiny: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    limits = Limits(max_voxels=2 * GiB, max_decompressed_bytes=64 * MiB)
    found = scan([("bomb.nii.gz", zeros_nifti_gz)], pseudo, limits=limits)
    assert found.errors == [] and len(found.candidates) == 1  # the header is small
    with peak_traced() as peak, pytest.raises(InputError) as caught:
        found.candidates[0].load()
    assert caught.value.code == "decompressed-too-large" and caught.value.path == "bomb.nii.gz"
    assert peak[0] < 16 * MiB, peak  # refused from the declared size, before allocating it

    report = pipeline(tiny, tmp_path, pseudo, limits).embed([("bomb.nii.gz", zeros_nifti_gz)])
    assert report.series == [] and codes(report.errors) == ["decompressed-too-large"]


def test_inflating_stops_as_soon_as_the_budget_is_spent(pseudo: Pseudonymizer) -> None:
    """A header whose extension inflates to 8 MiB: reading stops after about 1 MiB."""
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, bytes(8 * MiB)))
    data = gzip.compress(img.to_bytes(), compresslevel=1)
    assert len(data) < MiB // 8
    limits = Limits(max_decompressed_bytes=MiB)
    with peak_traced() as peak:
        found = scan([("ext.nii.gz", data)], pseudo, limits=limits)
    assert codes(found.errors) == ["decompressed-too-large"]
    assert peak[0] < 4 * MiB, peak  # not the 8 MiB the extension declares
    roomy = scan([("ext.nii.gz", data)], pseudo, limits=Limits())
    assert roomy.errors == [] and len(roomy.candidates) == 1


def _padded_bomb(zeros: int, padding: int) -> bytes:
    """A zip whose random member keeps the whole under the 200:1 ratio check."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pad.bin", np.random.default_rng(0).bytes(padding))
        zf.writestr("zeros.dcm", bytes(zeros))
    return buf.getvalue()


def test_a_zip_padded_past_the_ratio_check_is_refused_before_inflating(
    tiny: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    bomb = _padded_bomb(8 * MiB, 256 * 1024)
    limits = Limits(max_decompressed_bytes=4 * MiB)
    with peak_traced() as peak:
        found = scan([("bomb.zip", bomb)], pseudo, limits=limits)
    assert codes(found.errors) == ["decompressed-too-large"] and found.errors[0].path == "bomb.zip"
    assert peak[0] < 2 * MiB, peak  # the central directory only

    report = pipeline(tiny, tmp_path, pseudo, limits).embed([("bomb.zip", bomb)])
    assert report.series == [] and codes(report.errors) == ["decompressed-too-large"]
    # the same archive within a budget that holds it: read (and refused as not DICOM)
    roomy = scan([("bomb.zip", bomb)], pseudo, limits=Limits(max_decompressed_bytes=16 * MiB))
    assert codes(roomy.errors) == ["not-dicom", "not-dicom"]


def test_the_budget_is_shared_by_one_upload_and_a_file_read_again_counts_once(
    pseudo: Pseudonymizer,
) -> None:
    rng = np.random.default_rng(1)
    nii = nib.Nifti1Image(rng.integers(0, 255, (96, 96, 96), dtype=np.uint8), np.eye(4))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("vol.nii", nii.to_bytes())  # ~0.85 MiB, stored
    one = buf.getvalue()
    limits = Limits(max_decompressed_bytes=MiB + MiB // 2)
    vols, errs = load_volumes([("a.zip", one)], pseudo, limits=limits)  # scanned, then loaded
    assert errs == [] and vols[0].shape == (96, 96, 96)
    vols, errs = load_volumes([("a.zip", one), ("b.zip", one)], pseudo, limits=limits)
    assert len(vols) == 1 and codes(errs) == ["decompressed-too-large"]
    assert errs[0].path == "b.zip"


# ---------------------------------------------------------------------------------------
# Detached headers


def test_a_metaimage_header_naming_a_server_file_is_refused(
    tiny: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    header = META.format("/etc/passwd").encode()
    bad = tmp_path / "bad.mhd"
    bad.write_bytes(header)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("s/bad.mhd", header)
    for inp, name in [
        (bad, str(bad)),
        (("bad.mhd", header), "bad.mhd"),
        (("up.zip", buf.getvalue()), "up.zip!s/bad.mhd"),
    ]:
        found = scan([inp], pseudo)
        assert found.candidates == [] and codes(found.errors) == ["unsafe-reference"]
        assert found.errors[0].path == name and "without any directory" in found.errors[0].message
    report = pipeline(tiny, tmp_path, pseudo, Limits()).embed([bad])
    assert report.series == [] and codes(report.errors) == ["unsafe-reference"]


def test_a_metaimage_header_with_its_data_file_beside_it_is_embedded(
    tiny: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    header, raw = META.format("v.raw").encode(), VOXELS.tobytes()
    d = tmp_path / "d"
    d.mkdir()
    (d / "v.mhd").write_bytes(header)
    (d / "v.raw").write_bytes(raw)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("series/v.mhd", header)
        zf.writestr("series/v.raw", raw)
    uploads = [("up/v.mhd", header), ("up/v.raw", raw)]
    expected = VOXELS.reshape(3, 6, 8).astype(np.float32)
    for inputs in ([d], [d / "v.mhd"], [("up.zip", buf.getvalue())], uploads):
        vols, errs = load_volumes(inputs, pseudo)
        assert errs == [], [e.to_dict() for e in errs]  # the data file is not an input of its own
        assert len(vols) == 1
        np.testing.assert_array_equal(vols[0].voxels, expected)
    report = pipeline(tiny, tmp_path, pseudo, Limits()).embed([("up.zip", buf.getvalue())])
    assert report.errors == [] and len(report.series) == 1


@pytest.mark.parametrize(
    ("header", "data_name"),
    [
        (NRRD.format("../x.raw"), "x.raw"),
        (NRRD.format("/tmp/x.raw"), "x.raw"),
        (NRRD.format("sub\\x.raw"), "x.raw"),
        (NRRD.format("LIST") + "x.raw\n../x.raw\n", "x.raw"),
        (NRRD.format("../x%d.raw 1 3 1"), "x1.raw"),
        (NRRD.format("-"), "x.raw"),
        (NRRD.format("y.raw"), "x.raw"),  # a bare name, but not in the upload
        (META.format("C:/x.raw"), "x.raw"),
        (META.format("LIST") + "x.raw\n/etc/passwd\n", "x.raw"),
        (META.format("x%d.raw 1 3 1").replace("x%d", "../x%d"), "x1.raw"),
        ("NDims = 3\nelementDataFile = x.raw\nElementDataFile = /etc/passwd\n", "x.raw"),
    ],
)
def test_detached_headers_name_only_files_beside_them(
    tmp_path: Path, pseudo: Pseudonymizer, header: str, data_name: str
) -> None:
    suffix = ".nhdr" if header.startswith("NRRD") else ".mhd"
    inner = tmp_path / "in"
    inner.mkdir()
    (tmp_path / "x.raw").write_bytes(VOXELS.tobytes())  # one level up: must stay unread
    (inner / data_name).write_bytes(VOXELS.tobytes())
    (inner / f"h{suffix}").write_text(header)
    found = scan([inner / f"h{suffix}"], pseudo)
    assert found.candidates == [] and codes(found.errors) == ["unsafe-reference"]


def test_a_metaimage_value_on_the_next_line_is_not_read(
    tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    """MetaIO takes a value from the next line when a line ends at its '='."""
    (tmp_path / "h.mhd").write_text("NDims = 3\nElementDataFile =\n/etc/passwd\n")
    found = scan([tmp_path / "h.mhd"], pseudo)
    assert found.candidates == [] and codes(found.errors) == ["unreadable-volume"]


def test_a_data_file_linked_from_outside_the_directory_is_refused(
    tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    (tmp_path / "outside.raw").write_bytes(VOXELS.tobytes())
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(tmp_path / "outside.raw", d / "v.raw")
    (d / "v.nhdr").write_text(NRRD.format("v.raw"))
    found = scan([d / "v.nhdr"], pseudo)
    assert codes(found.errors) == ["unsafe-reference"]
    (d / "v.raw").unlink()
    (d / "v.raw").write_bytes(VOXELS.tobytes())
    vols, errs = load_volumes([d / "v.nhdr"], pseudo)
    assert errs == [] and vols[0].shape == (3, 6, 8)


def test_an_itk_header_declaring_too_many_voxels_is_refused(
    tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    (tmp_path / "big.nrrd").write_text(
        "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4096 4096 2000\nencoding: gzip\n\n"
    )
    found = scan([tmp_path / "big.nrrd"], pseudo)
    assert codes(found.errors) == ["volume-too-large"]


# ---------------------------------------------------------------------------------------
# DICOM pixel data that declares far more than it holds


def _rle_dicom(path: Path, rows: int, cols: int, segment: bytes) -> Path:
    """An RGB RLE Lossless secondary capture whose three segments are ``segment`` (PackBits:
    ``b"\\x81\\x00"`` decodes to 128 zeros, ``b"\\xc1\\x00"`` to 64)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    offsets = [64 + i * len(segment) for i in range(3)]
    head = struct.pack("<16I", 3, *offsets, *([0] * 12))
    ds.PixelData = encapsulate([head + segment * 3])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_tiny_rle_dicom_declaring_a_huge_image_is_refused_before_decoding(
    tiny: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    path = _rle_dicom(tmp_path / "huge.dcm", 15000, 15000, b"\x81\x00" * 16)
    assert path.stat().st_size < 8 * 1024
    limits = Limits(max_voxels=100_000_000)
    pipe = pipeline(tiny, tmp_path, pseudo, limits)
    with peak_traced() as peak:
        report = pipe.embed([path])
    assert report.series == [] and codes(report.errors) == ["volume-too-large"]
    assert "15000×15000" in report.errors[0].message
    assert peak[0] < 32 * MiB, peak  # not the 675 MB the header declares
    # within the voxel limit, RLE cannot hold it (at most 64:1): corrupt, before decoding
    found = scan([path], pseudo)
    with peak_traced() as peak, pytest.raises(InputError) as caught:
        found.candidates[0].load()
    assert caught.value.code == "decode-failed" and "RLE" in caught.value.message
    assert peak[0] < 32 * MiB, peak


def test_compressed_pixel_data_charges_the_budget_before_decoding(
    tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    path = _rle_dicom(tmp_path / "small.dcm", 64, 64, b"\xc1\x00" * 64)  # 64×64 RGB zeros
    _, errs = load_volumes([path], pseudo, limits=Limits(max_decompressed_bytes=8 * 1024))
    assert codes(errs) == ["decompressed-too-large"]
    vols, errs = load_volumes([path], pseudo, limits=Limits(max_decompressed_bytes=MiB))
    assert errs == [] and vols[0].voxels.shape[:3] == (1, 64, 64)


# ---------------------------------------------------------------------------------------
# Settings


def test_the_limits_come_from_the_settings(
    tiny: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().max_voxels == Limits().max_voxels == 1 << 30
    assert Settings().max_decompressed_bytes == Limits().max_decompressed_bytes == 16 << 30
    monkeypatch.setenv("RADCACHE_MAX_VOXELS", "1000")
    monkeypatch.setenv("RADCACHE_MAX_DECOMPRESSED_BYTES", "2000")
    pipe = Pipeline.from_settings(Settings(store=str(tmp_path / "store")), encoder=tiny)
    assert pipe.limits == Limits(max_voxels=1000, max_decompressed_bytes=2000)
    assert pipe.variant(tenant="other").limits == pipe.limits
