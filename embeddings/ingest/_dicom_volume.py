"""DICOM series to :class:`Volume`: slice order, geometry checks, decoded voxels.

Slices are sorted by ImagePositionPatient projected on the slice normal, never by
InstanceNumber or file name; spacing comes from the positions. Irregular spacing (a
missing slice) and gantry tilt are recorded as warnings; duplicate positions that no
acquisition number explains are rejected. The files are read here, again, for their
pixels: one float32 volume is filled slice by slice, and each file is let go once its
frames are in it.

Of the header's free text, the volume keeps the scanner model (without the file's names,
IDs and dates), Body Part Examined only as a defined term (else ``OTHER``), the sequence
type an MR series description names (not the description), and the description itself
only where the pseudonymizer says to keep descriptions, cleaned of the file's identifying
values (:mod:`._deidentify`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from pydicom.dataset import Dataset

from ..errors import DecodeError, InconsistentSeriesError
from ..pseudonyms import Pseudonymizer
from ..sequences import description_sequence
from ..volume import Volume, VolumeMeta
from ._decode_pool import shared_pool
from ._deidentify import body_part, clean_description
from ._dicom_assemble import _DUP_TOL_MM, DicomSeries, _projections
from ._dicom_decode import FilePixels
from ._dicom_lut import VOI_MODALITIES, _invert_monochrome1, _rescale_into, _voi
from ._dicom_read import Frame, _acquisition, _str
from ._dicom_values import float_of, malformed

__all__ = ["to_volume"]

_IRREGULAR_REL = 0.1
_TILT_DEG = 0.5
#: PhotometricInterpretation defined terms (PS3.3 C.7.6.3.1.2).
_PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "PALETTE COLOR",
    "RGB",
    "HSV",
    "ARGB",
    "CMYK",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
    "XYB",
}


def _geometry(
    series: DicomSeries, frames: list[Frame], name: str, thickness: float
) -> tuple[np.ndarray, ...]:
    """Direction rows (slice, row, col axes), spacing, origin and positions; plus warnings.

    ``thickness`` is the slice spacing of a single-slice series (it has no gap to measure).
    """
    f0 = frames[0]
    row_sp, col_sp = f0.pixel_spacing or (1.0, 1.0)
    if f0.pixel_spacing is None:
        series.notes.append("no pixel spacing in the header; 1 mm assumed")
    iop = f0.iop
    if iop is None:
        dirs = np.eye(3)[::-1].copy()  # rows of (slice, row, column) axes: z, y, x
        spacing = np.asarray([1.0, row_sp, col_sp])
        origin = np.zeros(3)
        positions = np.zeros((len(frames), 3))
        positions[:, 2] = np.arange(len(frames), dtype=np.float64)
        if len(frames) > 1:
            series.notes.append(
                "no orientation or position in the header; frames stacked 1 mm apart"
            )
        return dirs, spacing, origin, positions
    row_dir = iop[:3] / np.linalg.norm(iop[:3])
    col_dir = iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    if any(f.ipp is None for f in frames):
        positions = np.zeros((len(frames), 3))
        positions += np.arange(len(frames))[:, None] * normal[None, :]
        series.notes.append("slice positions missing; frames stacked 1 mm apart in file order")
        spacing_k = 1.0
    else:
        positions = np.asarray([f.ipp for f in frames], dtype=np.float64)
        spacing_k = _check_spacing(series, positions, normal, name, thickness)
    dirs = np.stack([normal, col_dir, row_dir])
    spacing = np.asarray([spacing_k, row_sp, col_sp])
    return dirs, spacing, positions[0].copy(), positions


def _check_spacing(
    series: DicomSeries, positions: np.ndarray, normal: np.ndarray, name: str, thickness: float
) -> float:
    if len(positions) < 2:
        return thickness
    proj = positions @ normal
    gaps = np.diff(proj)
    if np.any(np.abs(gaps) < _DUP_TOL_MM):
        dup = int(np.sum(np.abs(gaps) < _DUP_TOL_MM))
        raise InconsistentSeriesError(
            f"{dup} slice(s) share a position with another slice and no acquisition, echo or "
            "temporal number tells them apart; expected one slice per position. Send each "
            "acquisition as its own series.",
            path=name,
        )
    spacing = float(np.median(gaps))
    if np.max(np.abs(gaps - spacing)) > _IRREGULAR_REL * abs(spacing):
        series.notes.append(
            f"irregular slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm "
            f"(median {spacing:.3g} mm); a slice may be missing"
        )
    span = positions[-1] - positions[0]
    cos = abs(float(np.dot(span, normal))) / (float(np.linalg.norm(span)) or 1.0)
    tilt = math.degrees(math.acos(min(1.0, cos)))
    if tilt > _TILT_DEG:
        series.notes.append(
            f"gantry tilt of {tilt:.2f} degrees: slices are sheared, not stacked on the normal"
        )
    return spacing


def to_volume(series: DicomSeries, pseudo: Pseudonymizer) -> Volume:
    """Read, decode, rescale and stack a series into a canonical :class:`Volume`."""
    with warnings.catch_warnings():  # pydicom's warnings quote the malformed values
        warnings.simplefilter("ignore")
        return _to_volume(series, pseudo)


def _to_volume(series: DicomSeries, pseudo: Pseudonymizer) -> Volume:
    frames = series.frames
    proj = _projections(frames)
    if proj is not None:
        order = np.argsort(proj, kind="stable")
        frames = [frames[i] for i in order]
    name = series.name
    # Geometry first: a series that cannot be stacked is refused before a file is read.
    # A single slice's thickness comes from its file, once read (NaN until then).
    dirs, spacing, origin, positions = _geometry(series, frames, name, float("nan"))
    pixels = FilePixels(frames, pseudo, shared_pool())
    voxels: np.ndarray | None = None
    voi_applied = False
    for i, f in enumerate(frames):
        ds, arr = pixels.take(f)
        if voxels is None:  # the first file says what the series is
            head = _SeriesHead(ds, pseudo, f.source)
        if arr.ndim == 3 and head.photometric.startswith("MONOCHROME"):
            raise DecodeError(f"expected a 2-D frame, got shape {arr.shape}.", path=f.source)
        if voxels is None:  # one float32 volume, filled slice by slice (no stacking copy)
            voxels = np.empty((len(frames), *arr.shape), dtype=np.float32)
        if arr.shape != voxels.shape[1:]:
            raise InconsistentSeriesError(
                f"frame of shape {arr.shape} in a series of {voxels.shape[1:]} frames.",
                path=f.source,
            )
        if arr.ndim == 2:
            _rescale_into(arr, ds, f, voxels[i])
            if head.use_voi:
                voxels[i], applied = _voi(voxels[i], ds, f)
                voi_applied = voi_applied or applied
        else:
            voxels[i] = arr
        del ds, arr
    assert voxels is not None
    if np.isnan(spacing[0]):
        spacing[0] = head.thickness
    photometric, modality = head.photometric, head.modality
    if photometric == "MONOCHROME1":
        voxels = _invert_monochrome1(voxels)
    intensity = "voi" if voi_applied else ("HU" if (modality or "").upper() == "CT" else "modality")
    patient = frames[0].patient_id
    meta = VolumeMeta(
        source_format="dicom",
        study=pseudo.name("study", frames[0].study_uid),
        series=pseudo.name("series", frames[0].series_uid),
        part=series.part,
        patient=pseudo.name("patient", patient) if patient else None,
        modality=modality,
        body_part=head.body_part,
        manufacturer_model=head.model,
        series_description=head.description,
        sequence_hint=head.sequence_hint,
        # MONOCHROME1 voxels were inverted above: what is stored now reads as MONOCHROME2.
        photometric="RGB"
        if voxels.ndim == 4
        else photometric.replace("MONOCHROME1", "MONOCHROME2"),
        intensity=intensity,
        window=frames[0].window,
        warnings=tuple(series.notes),
        n_files=len({f.source for f in frames}),
        acquisition=head.acquisition,
    )
    return Volume.from_array(voxels, dirs, spacing, origin, meta, positions=positions, owned=True)


class _SeriesHead:
    """What the first file (in slice order) says about the whole series: no identifying
    text (see the module docstring)."""

    def __init__(self, ds: Dataset, pseudo: Pseudonymizer, name: str) -> None:
        self.modality = _str(ds, "Modality")
        self.photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip()
        if self.photometric not in _PHOTOMETRIC:
            raise malformed(
                "PhotometricInterpretation", "a defined term such as MONOCHROME2 or RGB", name
            )
        self.use_voi = (self.modality or "").upper() in VOI_MODALITIES
        self.thickness = float_of(ds.get("SliceThickness"), "SliceThickness", name, 1.0) or 1.0
        self.body_part = body_part(_str(ds, "BodyPartExamined"))
        # The scanner model, as free text kept without the file's names, IDs and dates; never
        # StationName or serial numbers.
        self.model = clean_description(_str(ds, "ManufacturerModelName"), ds)
        description = _str(ds, "SeriesDescription")
        mr = (self.modality or "MR").upper() == "MR"
        self.sequence_hint = description_sequence(description) if mr else None
        self.description = clean_description(description, ds) if pseudo.keep_descriptions else None
        self.acquisition = _acquisition(ds, pseudo)
