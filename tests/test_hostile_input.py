"""Hostile uploads end in a clean input error, with bounded memory, before the expensive
work: detached headers naming files outside the upload, decompression bombs (a gzipped
NIfTI declaring 1024³ voxels of zeros, a zip padded past the ratio check, a deflated
DICOM dataset), a DICOM whose few kilobytes of RLE declare a 15000 × 15000 RGB image, and
multi-sequence studies held to the same limits. What is accepted is loaded in bounded
memory: one float32 copy of a volume, a large DICOM zip member streamed through disk.

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
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from radcache.embeddings import Pipeline, Pseudonymizer
from radcache.embeddings.encode import Encoder
from radcache.embeddings.errors import InputError
from radcache.embeddings.ingest import Limits, instance_ids, load_volumes, scan
from radcache.embeddings.models import get_cfg
from radcache.embeddings.preprocess import prepare
from radcache.embeddings.recipe import Recipe
from radcache.embeddings.settings import Settings
from radcache.embeddings.store import EmbeddingStore
from tests.dicomgen import write_series

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


def _zeros_nifti_gz(n: int, dtype: type[np.generic] = np.uint8, slope: float = 1.0) -> bytes:
    """A .nii.gz declaring n³ zeros of ``dtype`` (scaled by ``slope``, less 1024, when it is
    not 1): the deflate stream of 1 MiB of zeros, written once and repeated (each block
    starts afresh after a full flush)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((n, n, n))
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    if slope != 1.0:
        hdr["scl_slope"], hdr["scl_inter"] = slope, -1024.0
    head = hdr.binaryblock + b"\0" * 4
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(MiB)
    first = co.compress(head) + co.flush(zlib.Z_FULL_FLUSH)
    block = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
    assert co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH) == block
    nbytes = n**3 * np.dtype(dtype).itemsize
    assert nbytes % MiB == 0
    crc = zlib.crc32(head)
    for _ in range(nbytes // MiB):
        crc = zlib.crc32(zeros, crc)
    size = (len(head) + nbytes) & 0xFFFFFFFF
    gzip_head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
    body = first + block * (nbytes // MiB) + co.flush()
    return gzip_head + body + struct.pack("<II", crc, size)


@pytest.fixture(scope="module")
def zeros_nifti_gz() -> bytes:
    """A ~1 MB .nii.gz declaring 1024³ uint8 zeros."""
    data = _zeros_nifti_gz(1024)
    assert len(data) < 2 * MiB
    return data


def test_the_1024_cubed_bomb_is_refused_from_its_header_by_default(
    zeros_nifti_gz: bytes, tiny: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    """1024³ voxels would be 4 GiB as float32: past the default limit (2²⁹, a 512 × 512 ×
    2048 CT), so it is refused before a voxel is inflated."""
    with peak_traced() as peak:
        found = scan([("bomb.nii.gz", zeros_nifti_gz)], pseudo)
    assert found.candidates == [] and codes(found.errors) == ["volume-too-large"]
    err = found.errors[0]
    assert err.path == "bomb.nii.gz" and "RADCACHE_MAX_VOXELS" in err.message
    assert peak[0] < 16 * MiB, peak
    report = pipeline(tiny, tmp_path, pseudo, Limits()).embed([("bomb.nii.gz", zeros_nifti_gz)])
    assert report.series == [] and codes(report.errors) == ["volume-too-large"]


@pytest.mark.parametrize(("dtype", "slope"), [(np.uint8, 1.0), (np.int16, 0.5)])
def test_a_volume_within_the_limit_is_loaded_and_prepared_in_one_float32_copy(
    pseudo: Pseudonymizer, dtype: type[np.generic], slope: float
) -> None:
    """256³ voxels (64 MiB as float32) of a gzipped NIfTI whose axes must be flipped: read,
    scaled and flipped a slice at a time into the one float32 volume, never a whole copy
    in the file's type, in float64 or for the flip (that took 2.2× to 4× the volume)."""
    data = _zeros_nifti_gz(256, dtype, slope)
    found = scan([("big.nii.gz", data)], pseudo, modality="CT")
    assert found.errors == [] and len(found.candidates) == 1
    with peak_traced() as peak:
        volume = found.candidates[0].load()
        prepared = prepare(volume, Recipe(), get_cfg("dinov2-tiny-random"))
        batch = prepared.batch(0, 4)
    size = volume.voxels.nbytes
    assert size == 64 * MiB and volume.voxels.dtype == np.float32
    assert peak[0] < size + 8 * MiB, (peak, size)
    assert (
        float(volume.voxels.min()) == float(volume.voxels.max()) == (0.0 if slope == 1 else -1024)
    )
    assert batch.shape[0] == 4 and torch.isfinite(batch).all()


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


def _mr_sequences() -> list[tuple[str, bytes]]:
    """Two gzipped 16 × 16 × 8 float32 NIfTI sequences (2048 voxels, 8 KiB each)."""
    rng = np.random.default_rng(7)
    out = []
    for name in ("t1", "t2"):
        img = nib.Nifti1Image(rng.random((16, 16, 8), dtype=np.float32), np.eye(4))
        out.append((f"{name}.nii.gz", gzip.compress(img.to_bytes(), compresslevel=1)))
    return out


def test_a_multi_sequence_study_is_held_to_the_pipelines_limits(
    tiny_fp32: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    inputs, mapping = _mr_sequences(), {"t1.nii.gz": "t1", "t2.nii.gz": "t2"}

    def study(limits: Limits) -> tuple[int, list[InputError]]:
        pipe = pipeline(tiny_fp32, tmp_path, pseudo, limits)
        report = pipe.embed_study(inputs, mapping=mapping, fusion="mean")
        return len(report.series), [e for e in report.errors if e.code != "invalid-input"]

    assert study(Limits()) == (1, [])
    n, errors = study(Limits(max_voxels=2000))  # each sequence's header: 2048 voxels
    assert n == 0 and codes(errors) == ["volume-too-large"] * 2
    assert [e.path for e in errors] == ["t1.nii.gz", "t2.nii.gz"]
    n, errors = study(Limits(max_decompressed_bytes=12 * 1024))  # one inflates within it
    assert n == 1 and codes(errors) == ["decompressed-too-large"] and errors[0].path == "t2.nii.gz"
    n, errors = study(Limits(max_voxels=3000))  # each fits, both together do not
    assert n == 1 and codes(errors) == ["volume-too-large"] and errors[0].path == "t2.nii.gz"
    assert "multi-sequence" in errors[0].message and "RADCACHE_MAX_VOXELS" in errors[0].message


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


def _secondary_capture(tsyntax: str, rows: int, cols: int) -> Dataset:
    """An 8-bit secondary capture of ``rows`` × ``cols`` in ``tsyntax``, without pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def _rle_dicom(path: Path, rows: int, cols: int, segment: bytes) -> Path:
    """An RGB RLE Lossless secondary capture whose three segments are ``segment`` (PackBits:
    ``b"\\x81\\x00"`` decodes to 128 zeros, ``b"\\xc1\\x00"`` to 64)."""
    ds = _secondary_capture(RLELossless, rows, cols)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
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
    found = scan([path], pseudo, limits=Limits(max_voxels=1 << 30))
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


def _deflated_dicom(path: Path, frames: int, rows: int, cols: int) -> Path:
    """A Deflated Explicit VR Little Endian secondary capture of ``frames`` zero frames."""
    ds = _secondary_capture(DeflatedExplicitVRLittleEndian, rows, cols)
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = frames, 1, "MONOCHROME2"
    ds.PixelData = bytes(frames * rows * cols)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_deflated_dicom_inflates_within_the_budget_and_memory(
    tiny: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    """64 MiB of zero frames deflated to a few dozen kilobytes: pydicom would inflate it
    whole, in memory; here it inflates as it is parsed, counted, spooled to disk."""
    path = _deflated_dicom(tmp_path / "dfl.dcm", 64, 1024, 1024)
    assert path.stat().st_size < MiB // 4
    limits = Limits(max_decompressed_bytes=4 * MiB)
    with peak_traced() as peak:
        found = scan([path], pseudo, limits=limits)
    assert codes(found.errors) == ["decompressed-too-large"] and found.errors[0].path == str(path)
    assert "RADCACHE_MAX_DECOMPRESSED_BYTES" in found.errors[0].message
    assert peak[0] < 8 * MiB, peak  # stopped at the budget, not at 64 MiB
    report = pipeline(tiny, tmp_path, pseudo, limits).embed([path])
    assert report.series == [] and codes(report.errors) == ["decompressed-too-large"]
    with peak_traced() as peak:  # within the budget: 16 MiB in memory, the rest on disk
        found = scan([path], pseudo)
    assert found.errors == [] and found.candidates[0].n_slices == 64
    assert peak[0] < 24 * MiB, peak
    ids = instance_ids(path)  # a receiver's per-instance check inflates only to its UIDs
    assert ids.sop_class == SecondaryCaptureImageStorage


def test_a_large_dicom_in_a_zip_is_streamed_to_disk_not_read_whole(
    tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    raw = np.random.default_rng(3).integers(-1000, 2000, (1, 3072, 3072), dtype=np.int16)
    gen = write_series(tmp_path / "big", raw)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # stored: an 18 MiB member, over the 16 MiB spool
        zf.write(gen.files[0], "study/big.dcm")
    upload = buf.getvalue()
    assert len(upload) > 18 * MiB
    with peak_traced() as peak:
        found = scan([("up.zip", upload)], pseudo)
    assert found.errors == [] and len(found.candidates) == 1
    assert peak[0] < 4 * MiB, peak  # digested and parsed from a temporary file
    with peak_traced() as peak:
        volume = found.candidates[0].load()
    np.testing.assert_array_equal(volume.voxels, gen.expected[0])
    assert peak[0] < volume.voxels.nbytes + len(upload) + 4 * MiB, peak  # no second copy
    refused = scan([("up.zip", upload)], pseudo, limits=Limits(max_decompressed_bytes=8 * MiB))
    assert codes(refused.errors) == ["decompressed-too-large"]


# ---------------------------------------------------------------------------------------
# Settings


def test_the_limits_come_from_the_settings(
    tiny: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().max_voxels == Limits().max_voxels == 1 << 29
    assert Settings().max_decompressed_bytes == Limits().max_decompressed_bytes == 16 << 30
    monkeypatch.setenv("RADCACHE_MAX_VOXELS", "1000")
    monkeypatch.setenv("RADCACHE_MAX_DECOMPRESSED_BYTES", "2000")
    pipe = Pipeline.from_settings(Settings(store=str(tmp_path / "store")), encoder=tiny)
    assert pipe.limits == Limits(max_voxels=1000, max_decompressed_bytes=2000)
    assert pipe.variant(tenant="other").limits == pipe.limits
