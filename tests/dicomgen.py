"""Synthetic DICOM / NIfTI / ITK test data with known geometry.

Everything here writes small files whose every voxel position is known, so tests can
check ingest against an independent statement of where each value belongs:

* :func:`phantom` — an asymmetric integer volume (every voxel value distinct), so any
  wrong flip or transposition changes the array;
* :func:`write_series` — a single-frame DICOM series with options for the awkward cases
  real exports produce (shuffled files, reversed instance numbers, missing or duplicate
  slices, gantry tilt, several echoes, a localizer, an SR object, MONOCHROME1,
  compressed transfer syntaxes);
* :func:`write_enhanced_mr` — the same volume as one Enhanced MR multi-frame file;
* :func:`write_nifti` — the same volume as NIfTI, laid out the way dcm2niix writes it
  (rows flipped, RAS affine), so canonicalisation has real work to do;
* :func:`write_itk` — the same volume as NRRD / MetaImage through SimpleITK;
* :func:`expected_at` — the patient position and value of every generated voxel;
* :func:`assert_matches_series` / :func:`assert_matches_nifti` — check each voxel of an
  ingested ``Volume``, placed by its own geometry, against the generator / nibabel;
* :func:`kept_alive` / :func:`pixel_holders` — every object a value keeps alive, and
  those among them that hold pixels (what a scan result may not hold).

Every DICOM file carries recognisable fake identifiers (:data:`FAKE_IDENTITY`) so tests
can check that none of them reaches a ``Volume``.
"""

from __future__ import annotations

import gc
import gzip
import io
import random
import struct
import types
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_MR_STORAGE",
    "FAKE_IDENTITY",
    "MR_IMAGE_STORAGE",
    "ORIENTATIONS",
    "GeneratedSeries",
    "assert_matches_nifti",
    "assert_matches_series",
    "encoder_available",
    "expected_at",
    "fmt_ds",
    "kept_alive",
    "lps_affine",
    "phantom",
    "pixel_holders",
    "rescaled",
    "volume_points",
    "write_enhanced_mr",
    "write_itk",
    "write_nifti",
    "write_series",
    "write_sr",
    "zip_bytes",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"

#: Identifying values written into every generated file; none may reach a Volume.
FAKE_IDENTITY: dict[str, str] = {
    "PatientName": "DOE^JANE",
    "PatientID": "PID-12345",
    "AccessionNumber": "ACC-67890",
    "InstitutionName": "St Fakeington General",
    "PatientBirthDate": "19700101",
    "ReferringPhysicianName": "HOUSE^GREGORY",
}

_SQ2 = float(np.sqrt(0.5))
_C10, _S10 = float(np.cos(np.radians(10))), float(np.sin(np.radians(10)))
#: ImageOrientationPatient values (row direction, column direction) by name.
ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "axial": (1, 0, 0, 0, 1, 0),
    "axial-columns-rightward": (-1, 0, 0, 0, 1, 0),  # columns run toward the patient's right
    "coronal": (1, 0, 0, 0, 0, -1),
    "sagittal": (0, 1, 0, 0, 0, -1),
    "sagittal-upside-down": (0, -1, 0, 0, 0, 1),
    # axial plane rotated 10° about z, then tilted 10° about x: a genuinely oblique plane
    "oblique": (_C10, _S10, 0.0, -_S10 * _C10, _C10 * _C10, _S10),
}


def fmt_ds(value: float) -> str:
    """``value`` as a Decimal String of at most 16 characters."""
    for digits in (12, 11, 10, 9, 8):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(value)  # pragma: no cover


def _ds_list(values: Sequence[float]) -> list[str]:
    return [fmt_ds(float(v)) for v in values]


def phantom(n_slices: int = 7, rows: int = 10, cols: int = 12, *, seed: int = 0) -> np.ndarray:
    """An int16 volume ``(n_slices, rows, cols)`` whose voxel values are all distinct.

    A shuffled ramp: any flip, transposition or slice reordering changes the array, and
    no two voxels can be confused.
    """
    n = n_slices * rows * cols
    rng = np.random.default_rng(seed)
    values = rng.permutation(n).astype(np.int16) * 3 + 7
    return values.reshape(n_slices, rows, cols)


def rescaled(raw: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """What ingest should make of ``raw`` stored with ``slope`` / ``intercept`` (float32)."""
    return (raw.astype(np.float64) * slope + intercept).astype(np.float32)


#: Lossless syntaxes GDCM can transcode to when pydicom has no encoder for them
#: (pydicom encodes JPEG-LS only through pyjpegls, JPEG Lossless not at all).
_GDCM_SYNTAXES = {
    "1.2.840.10008.1.2.4.80": "JPEGLSLossless",
    "1.2.840.10008.1.2.4.70": "JPEGLosslessProcess14_1",
    "1.2.840.10008.1.2.4.57": "JPEGLosslessProcess14",
}


def _pydicom_can_encode(tsyntax: UID) -> bool:
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(tsyntax).is_available)
    except NotImplementedError:
        return False


def _gdcm_can_encode(tsyntax: UID) -> bool:
    if str(tsyntax) not in _GDCM_SYNTAXES:
        return False
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def encoder_available(uid: str) -> bool:
    """Whether ``uid`` can be written here (pydicom's encoder plugins, else GDCM)."""
    tsyntax = UID(uid)
    if not tsyntax.is_compressed or tsyntax == DeflatedExplicitVRLittleEndian:
        return True
    return _pydicom_can_encode(tsyntax) or _gdcm_can_encode(tsyntax)


def _gdcm_transcode(path: Path, tsyntax: UID) -> None:
    """Re-encode the file at ``path`` in place to ``tsyntax`` with GDCM."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():  # pragma: no cover
        raise RuntimeError(f"GDCM could not read {path}")
    change = gdcm.ImageChangeTransferSyntax()
    target = getattr(gdcm.TransferSyntax, _GDCM_SYNTAXES[tsyntax])
    change.SetTransferSyntax(gdcm.TransferSyntax(target))
    change.SetInput(reader.GetImage())
    if not change.Change():  # pragma: no cover
        raise RuntimeError(f"GDCM could not encode {path} as {tsyntax.name}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():  # pragma: no cover
        raise RuntimeError(f"GDCM could not write {path}")


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@dataclass
class GeneratedSeries:
    """What :func:`write_series` wrote, and where every value is in patient space."""

    directory: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    iop: np.ndarray  # 6 floats as written (row direction, column direction)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as written
    slice_spacing: float
    #: one entry per repeat (echo / acquisition); each ``(n, rows, cols)`` float32 values
    #: in generator slice order, and the matching ImagePositionPatient of each slice
    expected: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    extra_files: dict[str, Path] = field(default_factory=dict)  # "localizer", "sr", …

    @property
    def row_dir(self) -> np.ndarray:
        return _unit(self.iop[:3])

    @property
    def col_dir(self) -> np.ndarray:
        return _unit(self.iop[3:])

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)


def _file_meta(sop_class: str, sop_instance: str, tsyntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = tsyntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    return meta


def _base_dataset(
    sop_class: str,
    *,
    modality: str,
    study_uid: str,
    series_uid: str,
    for_uid: str | None,
    series_number: int = 1,
) -> Dataset:
    ds = Dataset()
    sop_instance = generate_uid()
    ds.file_meta = _file_meta(sop_class, sop_instance, ExplicitVRLittleEndian)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    if for_uid is not None:
        ds.FrameOfReferenceUID = for_uid
    ds.Modality = modality
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "S1"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "synthetic phantom"
    ds.Manufacturer = "radcache-tests"
    ds.ManufacturerModelName = "dicomgen"
    ds.BodyPartExamined = "HEAD"
    ds.PatientSex = "F"
    for kw, value in FAKE_IDENTITY.items():
        setattr(ds, kw, value)
    return ds


def _set_pixels(ds: Dataset, raw: np.ndarray, photometric: str = "MONOCHROME2") -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(raw.shape[-2]), int(raw.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if raw.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(raw).tobytes()


def _save(ds: Dataset, path: Path, tsyntax: str) -> None:
    """Write ``ds`` as a DICOM file in transfer syntax ``tsyntax``."""
    tsyntax = UID(tsyntax)
    if tsyntax == ExplicitVRLittleEndian:
        pass
    elif tsyntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = tsyntax
    elif tsyntax == ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = tsyntax
        arr = np.frombuffer(ds.PixelData, dtype="<i2" if ds.PixelRepresentation else "<u2")
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    elif tsyntax.is_compressed and not _pydicom_can_encode(tsyntax) and _gdcm_can_encode(tsyntax):
        ds.save_as(path, enforce_file_format=True)
        _gdcm_transcode(path, tsyntax)
        return
    elif tsyntax.is_compressed:
        ds.compress(tsyntax, generate_instance_uid=False)
    else:  # pragma: no cover
        raise ValueError(f"unsupported transfer syntax {tsyntax}")
    ds.save_as(
        path,
        implicit_vr=tsyntax.is_implicit_VR,
        little_endian=tsyntax.is_little_endian,
        enforce_file_format=True,
    )


def write_series(
    directory: Path,
    raw: np.ndarray,
    *,
    iop: Sequence[float] = ORIENTATIONS["axial"],
    spacing: tuple[float, float, float] = (2.5, 0.75, 0.5),
    origin: Sequence[float] = (-100.0, -80.0, 40.0),
    slice_direction: float = 1.0,
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    shuffle: bool = False,
    random_names: bool = False,
    reverse_instance_numbers: bool = False,
    missing: Sequence[int] = (),
    duplicates: Sequence[int] = (),
    tilt_deg: float = 0.0,
    repeats: int = 1,
    repeat_by: str = "EchoNumbers",
    photometric: str = "MONOCHROME2",
    localizer: bool = False,
    sr: bool = False,
    window: tuple[float, float] | None = None,
    extra: dict[str, Any] | None = None,
    seed: int = 0,
) -> GeneratedSeries:
    """Write ``raw`` (``(n_slices, rows, cols)`` stored values) as single-frame DICOM files.

    Geometry: slice ``k`` has ImagePositionPatient ``origin + k·spacing[0]·slice_direction
    ·normal`` (plus a shear of ``k·spacing[0]·tan(tilt_deg)`` along the column direction
    for gantry tilt); pixel ``[r, c]`` of a slice lies ``c·spacing[2]`` along the row
    direction and ``r·spacing[1]`` along the column direction (``iop[:3]`` / ``iop[3:]``).

    Options:

    * ``shuffle`` writes the files in random order; ``random_names`` names them with
      random UIDs rather than ``IM0001``…; ``reverse_instance_numbers`` numbers the
      slices backwards (InstanceNumber must never be used to sort);
    * ``missing`` omits those slice indices; ``duplicates`` writes a second file at the
      position of each listed slice (same acquisition — an inconsistent series);
    * ``repeats`` > 1 writes the whole stack again, ``repeat_by`` (``EchoNumbers``,
      ``AcquisitionNumber``, ``TemporalPositionIdentifier`` or ``DiffusionBValue``, the
      latter 0, 500, 1000…) telling the copies apart; repeat ``e`` stores ``raw + 100·e``;
    * ``localizer`` adds a sagittal LOCALIZER image to the series; ``sr`` adds a Basic
      Text SR object to the study;
    * ``photometric="MONOCHROME1"`` labels the pixels MONOCHROME1 (ingest should invert);
    * ``transfer_syntax`` — any uncompressed syntax (including deflate and big endian) or
      a compressed one with an installed encoder (see :func:`encoder_available`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = np.asarray(raw)
    if raw.dtype not in (np.int16, np.uint16):
        raise TypeError("raw must be int16 or uint16")
    n, _rows, _cols = raw.shape
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    iop_arr = np.asarray([float(s) for s in _ds_list(iop)])
    row_dir, col_dir = _unit(iop_arr[:3]), _unit(iop_arr[3:])
    normal = np.cross(row_dir, col_dir)
    origin_arr = np.asarray(origin, dtype=np.float64)
    step = spacing[0] * slice_direction
    shear = spacing[0] * np.tan(np.radians(tilt_deg))
    rng = random.Random(seed)

    jobs: list[dict[str, Any]] = []
    out = GeneratedSeries(
        directory=directory,
        files=[],
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=for_uid,
        iop=iop_arr,
        pixel_spacing=(float(fmt_ds(spacing[1])), float(fmt_ds(spacing[2]))),
        slice_spacing=abs(spacing[0]),
    )
    for e in range(repeats):
        kept = [k for k in range(n) if k not in set(missing)]
        positions = []
        for k in kept:
            ipp = origin_arr + k * step * normal + k * shear * col_dir
            ipp = np.asarray([float(s) for s in _ds_list(ipp)])
            positions.append(ipp)
            jobs.append({"k": k, "e": e, "ipp": ipp})
        for k in duplicates:
            jobs.append({"k": k, "e": e, "ipp": positions[kept.index(k)], "dup": True})
        out.positions.append(np.asarray(positions))
        out.expected.append(rescaled(raw[kept].astype(np.int32) + 100 * e, slope, intercept))
    if shuffle:
        rng.shuffle(jobs)
    total = len(jobs)
    for idx, job in enumerate(jobs):
        k, e = job["k"], job["e"]
        ds = _base_dataset(
            CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE,
            modality=modality,
            study_uid=study_uid,
            series_uid=series_uid,
            for_uid=for_uid,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        number = (n * repeats - (e * n + k)) if reverse_instance_numbers else e * n + k + 1
        ds.InstanceNumber = number
        ds.ImageOrientationPatient = _ds_list(iop_arr)
        ds.ImagePositionPatient = _ds_list(job["ipp"])
        ds.PixelSpacing = _ds_list(spacing[1:])
        ds.SliceThickness = fmt_ds(abs(spacing[0]))
        ds.SliceLocation = fmt_ds(float(np.dot(job["ipp"], normal)))
        ds.RescaleSlope = fmt_ds(slope)
        ds.RescaleIntercept = fmt_ds(intercept)
        if modality == "CT":
            ds.RescaleType = "HU"
        if tilt_deg:
            ds.GantryDetectorTilt = fmt_ds(tilt_deg)
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = fmt_ds(window[0]), fmt_ds(window[1])
        if repeats > 1:
            if repeat_by == "EchoNumbers":
                ds.EchoNumbers = e + 1
                ds.EchoTime = fmt_ds(10.0 * (e + 1))
            elif repeat_by == "AcquisitionNumber":
                ds.AcquisitionNumber = e + 1
            elif repeat_by == "TemporalPositionIdentifier":
                ds.TemporalPositionIdentifier = e + 1
            elif repeat_by == "DiffusionBValue":
                ds.DiffusionBValue = 500.0 * e
            else:  # pragma: no cover
                raise ValueError(repeat_by)
        else:
            ds.AcquisitionNumber = 1
        if job.get("dup"):
            ds.AcquisitionNumber = 1
        for kw, value in (extra or {}).items():
            setattr(ds, kw, value)
        pixels = raw[k].astype(np.int32) + 100 * e
        _set_pixels(ds, pixels.astype(raw.dtype), photometric)
        name = f"{generate_uid()}.dcm" if random_names else f"IM{idx + 1:04d}"
        if random_names and rng.random() < 0.5:
            name = f"{total - idx:03d}_{name}"
        path = directory / name
        _save(ds, path, transfer_syntax)
        out.files.append(path)
    if localizer:
        ds = _base_dataset(
            CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE,
            modality=modality,
            study_uid=study_uid,
            series_uid=series_uid,
            for_uid=for_uid,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.InstanceNumber = 0
        ds.ImageOrientationPatient = _ds_list(ORIENTATIONS["sagittal"])
        ds.ImagePositionPatient = _ds_list(origin_arr)
        ds.PixelSpacing = ["1", "1"]
        _set_pixels(ds, np.zeros((16, 16), dtype=np.int16) + 5)
        path = directory / "scout.dcm"
        _save(ds, path, ExplicitVRLittleEndian)
        out.extra_files["localizer"] = path
    if sr:
        out.extra_files["sr"] = write_sr(directory / "report.dcm", study_uid=study_uid)
    return out


def write_sr(path: Path, *, study_uid: str | None = None) -> Path:
    """A Basic Text SR object (no pixels) in study ``study_uid``."""
    ds = _base_dataset(
        BASIC_TEXT_SR,
        modality="SR",
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        for_uid=None,
        series_number=99,
    )
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "18748-4", "LN"
    concept.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = [concept]
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.TextValue = "Patient DOE^JANE: no acute findings."
    ds.ContentSequence = [item]
    _save(ds, Path(path), ExplicitVRLittleEndian)
    return Path(path)


def write_enhanced_mr(
    path: Path,
    raw: np.ndarray,
    *,
    iop: Sequence[float] = ORIENTATIONS["axial"],
    spacing: tuple[float, float, float] = (2.5, 0.75, 0.5),
    origin: Sequence[float] = (-100.0, -80.0, 40.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    vary_intercept: bool = False,
    shuffle_frames: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    seed: int = 0,
) -> Path:
    """Write ``raw`` as one Enhanced MR Image Storage file (one frame per slice).

    Geometry as :func:`write_series` (slice ``k`` at ``origin + k·spacing[0]·normal``),
    expressed through the functional groups: PlaneOrientationSequence and
    PixelMeasuresSequence shared, PlanePositionSequence, PixelValueTransformationSequence
    and FrameContentSequence per frame. With ``vary_intercept`` each frame has its own
    RescaleIntercept (``intercept + 10·k``) and stores ``raw − 10·k`` so the decoded values
    stay the same; ``shuffle_frames`` stores the frames out of anatomical order.
    """
    raw = np.asarray(raw)
    n = raw.shape[0]
    iop_arr = np.asarray([float(s) for s in _ds_list(iop)])
    normal = np.cross(_unit(iop_arr[:3]), _unit(iop_arr[3:]))
    origin_arr = np.asarray(origin, dtype=np.float64)
    ds = _base_dataset(
        ENHANCED_MR_STORAGE,
        modality="MR",
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        for_uid=generate_uid(),
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = "20240102", "101500"
    ds.AcquisitionDateTime = "20240102101500"
    ds.NumberOfFrames = n
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = _ds_list(iop_arr)
    shared.PlaneOrientationSequence = [orient]
    measures = Dataset()
    measures.PixelSpacing = _ds_list(spacing[1:])
    measures.SliceThickness = fmt_ds(spacing[0])
    measures.SpacingBetweenSlices = fmt_ds(spacing[0])
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    order = list(range(n))
    if shuffle_frames:
        random.Random(seed).shuffle(order)
    per_frame = []
    frames = []
    dim_org = generate_uid()
    for k in order:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = _ds_list(origin_arr + k * spacing[0] * normal)
        item.PlanePositionSequence = [pos]
        offset = 10 * k if vary_intercept else 0
        pvt = Dataset()
        pvt.RescaleSlope = fmt_ds(slope)
        pvt.RescaleIntercept = fmt_ds(intercept + offset)
        pvt.RescaleType = "US"
        item.PixelValueTransformationSequence = [pvt]
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        item.FrameContentSequence = [content]
        per_frame.append(item)
        frames.append(raw[k].astype(np.int32) - offset)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    dim_index = []
    frame_content = (0x0020, 0x9111)
    for pointer in ((0x0020, 0x9056), (0x0020, 0x9057)):  # StackID, InStackPositionNumber
        d = Dataset()
        d.DimensionOrganizationUID = dim_org
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = frame_content
        dim_index.append(d)
    org = Dataset()
    org.DimensionOrganizationUID = dim_org
    ds.DimensionOrganizationSequence = [org]
    ds.DimensionIndexSequence = dim_index
    _set_pixels(ds, np.stack(frames).astype(raw.dtype))
    _save(ds, Path(path), transfer_syntax)
    return Path(path)


def lps_affine(
    iop: Sequence[float],
    spacing: tuple[float, float, float],
    origin: Sequence[float],
    n_rows: int,
    *,
    flip_rows: bool = True,
) -> np.ndarray:
    """4×4 LPS affine of the NIfTI layout ``data[i, j, k] = raw[k, j', i]``.

    ``j' = n_rows − 1 − j`` with ``flip_rows`` (as dcm2niix stores it), else ``j' = j``.
    """
    iop_arr = np.asarray(iop, dtype=np.float64)
    row_dir, col_dir = _unit(iop_arr[:3]), _unit(iop_arr[3:])
    normal = np.cross(row_dir, col_dir)
    aff = np.eye(4)
    aff[:3, 0] = spacing[2] * row_dir
    aff[:3, 1] = spacing[1] * col_dir
    aff[:3, 2] = spacing[0] * normal
    aff[:3, 3] = np.asarray(origin, dtype=np.float64)
    if flip_rows:
        aff[:3, 3] += (n_rows - 1) * aff[:3, 1]
        aff[:3, 1] = -aff[:3, 1]
    return aff


def write_nifti(
    path: Path,
    values: np.ndarray,
    *,
    iop: Sequence[float] = ORIENTATIONS["axial"],
    spacing: tuple[float, float, float] = (2.5, 0.75, 0.5),
    origin: Sequence[float] = (-100.0, -80.0, 40.0),
    flip_rows: bool = True,
    scl: tuple[float, float] | None = None,
    qform_only: bool = False,
) -> Path:
    """Write ``values`` (``(n_slices, rows, cols)`` or ``(t, n_slices, rows, cols)``) as NIfTI-1.

    Laid out the way dcm2niix writes a DICOM series with the same geometry as
    :func:`write_series`: ``data[i, j, k]`` is column ``i``, row ``j`` (flipped when
    ``flip_rows``), slice ``k``, time last; the affine is RAS. ``values`` are stored as
    float32, or — with ``scl=(slope, inter)`` — as int16 ``(values − inter) / slope``
    with ``scl_slope``/``scl_inter`` set, as dcm2niix stores CT. ``.nii.gz`` is gzipped.
    """
    import nibabel as nib

    values = np.asarray(values)
    four_d = values.ndim == 4
    vol = values if four_d else values[None]
    data = np.transpose(vol, (3, 2, 1, 0))  # (i, j, k, t)
    if flip_rows:
        data = data[:, ::-1]
    if not four_d:
        data = data[..., 0]
    n_rows = values.shape[-2]
    aff = lps_affine(iop, spacing, origin, n_rows, flip_rows=flip_rows)
    ras = aff.copy()
    ras[:2, :] = -ras[:2, :]
    if scl is not None:
        slope, inter = scl
        stored = np.rint((data.astype(np.float64) - inter) / slope).astype(np.int16)
        img = nib.Nifti1Image(np.ascontiguousarray(stored), ras, dtype=np.int16)
    else:
        img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), ras, dtype=np.float32)
    img.set_qform(ras, code=1)
    if qform_only:
        img.set_sform(None, code=0)
    else:
        img.set_sform(ras, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw = bytearray(img.to_bytes())
    if scl is not None:
        raw[112:120] = struct.pack("<ff", scl[0], scl[1])  # scl_slope, scl_inter
    path = Path(path)
    out = gzip.compress(bytes(raw), mtime=0) if path.name.endswith(".gz") else bytes(raw)
    path.write_bytes(out)
    return path


def write_itk(
    path: Path,
    values: np.ndarray,
    *,
    iop: Sequence[float] = ORIENTATIONS["axial"],
    spacing: tuple[float, float, float] = (2.5, 0.75, 0.5),
    origin: Sequence[float] = (-100.0, -80.0, 40.0),
) -> Path:
    """Write ``values`` ``(n_slices, rows, cols)`` with SimpleITK (format from the suffix).

    ITK's array order is ``[k, j, i]`` with LPS direction columns, so a DICOM series'
    geometry carries over directly: ``i`` along the row direction, ``j`` along the
    column direction, ``k`` along the normal.
    """
    import SimpleITK as sitk

    iop_arr = np.asarray(iop, dtype=np.float64)
    row_dir, col_dir = _unit(iop_arr[:3]), _unit(iop_arr[3:])
    normal = np.cross(row_dir, col_dir)
    img = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    img.SetSpacing((spacing[2], spacing[1], spacing[0]))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(np.stack([row_dir, col_dir, normal], axis=1).ravel().tolist()))
    sitk.WriteImage(img, str(path))
    return Path(path)


def zip_bytes(directory: Path, *, extra: dict[str, bytes] | None = None) -> bytes:
    """Zip every file under ``directory`` (relative names, in a ``study/`` folder)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(Path(directory).rglob("*")):
            if p.is_file():
                zf.write(p, f"study/{p.relative_to(directory)}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def expected_at(series: GeneratedSeries, repeat: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions and values of every voxel the series holds: ``(N, 3)`` LPS and ``(N,)``."""
    values = series.expected[repeat]
    positions = series.positions[repeat]
    _, rows, cols = values.shape
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    inplane = (
        cc[..., None] * series.pixel_spacing[1] * series.row_dir
        + rr[..., None] * series.pixel_spacing[0] * series.col_dir
    )  # (rows, cols, 3)
    pts = positions[:, None, None, :] + inplane[None]
    return pts.reshape(-1, 3), values.reshape(-1)


def volume_points(volume: Any) -> tuple[np.ndarray, np.ndarray]:
    """Positions (LPS) and values of every voxel of a grey-level ``Volume``, from its geometry.

    Uses the per-slice ``positions`` plus the in-plane directions and spacings, so
    tilted or irregular stacks are placed where the scanner put them.
    """
    g = volume.geometry
    d = g.direction_matrix  # columns: i (columns), j (rows), k (slices)
    _, rows, cols = volume.voxels.shape
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    inplane = cc[..., None] * g.spacing[0] * d[:, 0] + rr[..., None] * g.spacing[1] * d[:, 1]
    pts = g.positions[:, None, None, :] + inplane[None]
    return pts.reshape(-1, 3), volume.voxels.reshape(-1)


def _check_integral(idx: np.ndarray, what: str, tol: float = 1e-3) -> np.ndarray:
    rounded = np.rint(idx)
    err = float(np.max(np.abs(idx - rounded))) if idx.size else 0.0
    assert err < tol, f"{what}: voxel centres are {err:.3g} voxels off the source grid"
    return rounded.astype(np.int64)


def assert_matches_series(volume: Any, series: GeneratedSeries, repeat: int = 0) -> None:
    """Assert every voxel of ``volume`` sits where the generator put that value.

    Each voxel's patient position (from the volume's own geometry) is mapped back to the
    generator's (slice, row, column) index; the value there must be the voxel's value,
    and every generated voxel must be hit exactly once.
    """
    expected = series.expected[repeat]
    positions = series.positions[repeat]
    pts, vals = volume_points(volume)
    assert vals.size == expected.size, f"{volume.shape} vs generated {expected.shape}"
    proj = positions @ series.normal
    p_proj = pts @ series.normal
    k = np.abs(p_proj[:, None] - proj[None, :]).argmin(axis=1)
    assert np.max(np.abs(p_proj - proj[k])) < 1e-3, "voxel between generated slices"
    d = pts - positions[k]
    c = _check_integral(d @ series.row_dir / series.pixel_spacing[1], "columns")
    r = _check_integral(d @ series.col_dir / series.pixel_spacing[0], "rows")
    _, rows, cols = expected.shape
    assert r.min() >= 0 and r.max() < rows and c.min() >= 0 and c.max() < cols
    flat = (k * rows + r) * cols + c
    assert len(np.unique(flat)) == expected.size, "some generated voxels were hit twice"
    np.testing.assert_array_equal(vals, expected.reshape(-1)[flat])


def assert_matches_nifti(volume: Any, img: Any, t: int | None = None) -> None:
    """Assert ``volume`` holds nibabel's data for ``img`` at every voxel's RAS position."""
    data = np.asarray(img.dataobj, dtype=np.float64)
    while data.ndim > (3 if t is None else 4) and data.shape[-1] == 1:
        data = data[..., 0]
    if t is not None:
        data = data[..., t]
    pts, vals = volume_points(volume)
    ras = pts * np.array([-1.0, -1.0, 1.0])
    inv = np.linalg.inv(np.asarray(img.affine, dtype=np.float64))
    ijk = _check_integral(ras @ inv[:3, :3].T + inv[:3, 3], "nifti index", tol=1e-2)
    assert ijk.min() >= 0 and np.all(ijk.max(axis=0) < data.shape[:3]), "voxel outside the file"
    flat = np.ravel_multi_index((ijk[:, 0], ijk[:, 1], ijk[:, 2]), data.shape[:3])
    assert np.unique(flat).size == data.size, "some file voxels were hit twice"
    want = data.reshape(-1)[flat]
    np.testing.assert_allclose(vals, want, rtol=1e-6, atol=1e-6)


def kept_alive(root: Any) -> list[Any]:
    """Every object ``root`` keeps alive: through containers, instances, bound methods
    and closures (function globals, modules and classes are not followed)."""
    seen, out, todo = {id(root)}, [], [root]
    while todo:
        obj = todo.pop()
        out.append(obj)
        if isinstance(obj, types.ModuleType | type):
            continue
        if isinstance(obj, types.FunctionType):
            cells = []
            for cell in obj.__closure__ or ():
                try:
                    cells.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    continue
            nxt = [*cells, *(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
        else:
            nxt = gc.get_referents(obj)
        for o in nxt:
            if id(o) not in seen:
                seen.add(id(o))
                todo.append(o)
    return out


def pixel_holders(objs: Sequence[Any]) -> list[str]:
    """What among ``objs`` holds image data: pydicom datasets, bytes over 4 KB, arrays
    over 1 KB (header values are far smaller)."""
    found = []
    for o in objs:
        if isinstance(o, Dataset):
            found.append("a pydicom Dataset")
        elif isinstance(o, bytes | bytearray) and len(o) > 4096:
            found.append(f"{type(o).__name__} of {len(o)} bytes")
        elif isinstance(o, np.ndarray) and o.nbytes > 1024:
            found.append(f"an array of shape {o.shape}")
    return found


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dicom3tools' IOD check of the file at ``path``: its (errors, warnings) lines. Skips
    the test where dciodvfy is not installed (fails it under CI=true: .ci/run installs
    dicom3tools)."""
    import os
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("dciodvfy")
    if exe is None:
        reason = "dciodvfy is not installed (apt-get install dicom3tools): IOD not checked"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}, and CI=true requires it: .ci/run installs dicom3tools.")
        print(reason)
        pytest.skip(reason)
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (out.stdout + out.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [
        ln for ln in lines if ln.startswith("Warning")
    ]
