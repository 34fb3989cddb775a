"""DICOM: read headers, assemble series, decode pixels into a :class:`Volume`.

Series assembly follows what careful converters (dcm2niix, ITK's GDCM series reader) do:

1. every file is read once; each frame (one per single-frame file, several per
   multi-frame file with per-frame functional groups) becomes a :class:`Frame`;
2. frames are grouped by study and SeriesInstanceUID, then split on orientation,
   frame of reference, matrix size, samples per pixel, echo, temporal position, stack
   and diffusion b-value, so each group is one geometrically consistent stack;
3. localizers and objects without pixels (SR, KOS, RTPLAN, …) are dropped with a note;
4. slices are sorted by ImagePositionPatient projected on the slice normal — never by
   InstanceNumber or file name; spacing comes from the positions. Irregular spacing
   (a missing slice) and gantry tilt are recorded as warnings; duplicate positions that
   no acquisition number explains are rejected.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ..errors import (
    DecodeError,
    InconsistentSeriesError,
    InputError,
    InvalidHeaderError,
    NoPixelDataError,
    NotDicomError,
    TruncatedFileError,
    UnsupportedTransferSyntaxError,
)
from ..keys import Pseudonymizer
from ..volume import Volume, VolumeMeta
from ._sources import Source

__all__ = ["DicomSeries", "Frame", "assemble", "read_frames"]

#: SOP classes that never carry an image to embed (reported as skipped, not as errors).
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.1.3.10": "media storage directory (DICOMDIR)",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT plan",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT ion plan",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set",
    "1.2.840.10008.5.1.4.1.1.481.4": "RT beams treatment record",
    "1.2.840.10008.5.1.4.1.1.88.59": "key object selection",
    "1.2.840.10008.5.1.4.1.1.11.1": "grayscale softcopy presentation state",
    "1.2.840.10008.5.1.4.1.1.66": "raw data",
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation",
    "1.2.840.10008.5.1.4.1.1.104.1": "encapsulated PDF",
}
_NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "RTPLAN", "RTSTRUCT", "RTRECORD", "DOC", "ECG"}
#: Modalities whose images are shown through their VOI LUT / window (projection X-ray).
VOI_MODALITIES = {"CR", "DX", "MG", "IO", "PX", "RG"}
_ORIENT_TOL = 1e-3
_DUP_TOL_MM = 1e-3
_IRREGULAR_REL = 0.1
_TILT_DEG = 0.5


@dataclass
class Frame:
    """One 2-D image: a frame of a file, with the header facts assembly needs."""

    source: str
    ds: Dataset
    index: int | None  # frame number within a multi-frame file, None for single-frame
    study_uid: str
    series_uid: str
    patient_id: str | None
    iop: np.ndarray | None
    ipp: np.ndarray | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    slope: float
    intercept: float
    window: tuple[float, float] | None
    split: tuple[Any, ...]
    acquisition: Any = None
    digest: str = ""  # keyed digest of the file's bytes (Pseudonymizer.file_digest)
    decoded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # shared per file


@dataclass
class DicomSeries:
    """A consistent stack of frames that becomes one volume once decoded."""

    frames: list[Frame]
    part: str
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        srcs = sorted({f.source for f in self.frames})
        return srcs[0] if len(srcs) == 1 else f"{srcs[0]} (+{len(srcs) - 1} more files)"

    @property
    def n_slices(self) -> int:
        return len(self.frames)


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _first(seq_parent: Dataset | None, seq: str) -> Dataset | None:
    if seq_parent is None:
        return None
    items = seq_parent.get(seq)
    return items[0] if items else None


def _fg_value(per: Dataset | None, shared: Dataset | None, seq: str, attr: str) -> Any:
    """Value of ``seq[0].attr`` from the per-frame group, else the shared group."""
    for group in (per, shared):
        item = _first(group, seq)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def _pair(v: np.ndarray | None) -> tuple[float, float] | None:
    return (float(v[0]), float(v[1])) if v is not None else None


def _str(ds: Dataset, kw: str) -> str | None:
    v = ds.get(kw)
    if v is None or v == "":
        return None
    return str(v).strip() or None


def _is_localizer(ds: Dataset) -> bool:
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = [image_type]
    return any(str(t).upper() == "LOCALIZER" for t in image_type)


def _window(ds: Dataset | None) -> tuple[float, float] | None:
    if ds is None:
        return None
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    c0 = c[0] if isinstance(c, pydicom.multival.MultiValue) else c
    w0 = w[0] if isinstance(w, pydicom.multival.MultiValue) else w
    try:
        return float(c0), float(w0)
    except (TypeError, ValueError):
        return None


def _read(source: Source) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with source.fileobj() as fp:
                ds = pydicom.dcmread(fp, force=True)
    except InvalidDicomError as exc:
        raise NotDicomError(f"not a valid DICOM file ({exc}).", path=source.name) from exc
    except (EOFError, OSError) as exc:
        raise TruncatedFileError(
            f"the file ends before its DICOM header does ({exc}); it was cut short in transfer.",
            path=source.name,
        ) from exc
    except Exception as exc:
        raise NotDicomError(
            f"the DICOM header could not be parsed ({exc}).", path=source.name
        ) from exc
    _check_last_element(ds, source)
    if "SOPClassUID" not in ds and "PixelData" not in ds and "Modality" not in ds:
        raise NotDicomError(
            "no DICOM dataset found (no SOP Class UID, Modality or Pixel Data).", path=source.name
        )
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # A bare dataset (no preamble or file meta, which sniff() accepts): record the
        # encoding it was read with so that its native pixel data can be decoded.
        implicit, little = ds.original_encoding
        if implicit is not None:
            if getattr(ds, "file_meta", None) is None:
                ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian
                if implicit
                else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
            )
    return ds


def _check_last_element(ds: Dataset, source: Source) -> None:
    """A file cut short ends inside its last element, or inside the header of the next one."""
    tags = list(ds.keys())
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not tags or tsyntax == DeflatedExplicitVRLittleEndian:  # offsets are in the inflated stream
        return
    raw = ds.get_item(tags[-1])
    length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
    if not isinstance(length, int) or not isinstance(tell, int) or length == 0xFFFFFFFF:
        return
    size = source.path.stat().st_size if source.path is not None else len(source.read())
    end = tell + length
    if end > size or 0 < size - end < 8:
        raise TruncatedFileError(
            f"the file ends inside element {tags[-1]} (it needs {end} bytes, the file has "
            f"{size}); it was cut short in transfer — send it again.",
            path=source.name,
        )


def _check_length(ds: Dataset, name: str) -> None:
    """Catch native (uncompressed) pixel data that is shorter than its header promises."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or tsyntax.is_compressed or "PixelData" not in ds:
        return
    bits = int(ds.get("BitsAllocated", 0) or 0)
    n_px = int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("SamplesPerPixel", 1))
    n_px *= int(ds.get("NumberOfFrames", 1) or 1)
    expected = (n_px * bits + 7) // 8
    got = len(ds.PixelData)
    if bits and got < expected:
        raise TruncatedFileError(
            f"the pixel data holds {got} bytes but the header describes {expected}; the file was "
            "cut short in transfer — send it again.",
            path=name,
        )


class Skipped(Exception):
    """A valid DICOM object that holds no image to embed (SR, RT plan, localizer…)."""


def read_frames(source: Source, digest: str = "") -> list[Frame]:
    """Read one DICOM file into its frames; raise :class:`Skipped` for non-image objects."""
    ds = _read(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _frames(source, ds, digest)
    except (Skipped, InputError):
        raise
    except Exception as exc:
        raise InvalidHeaderError(
            f"a header value is malformed ({type(exc).__name__}: {exc}); expected values valid "
            "for their VR. Fix the header at the source or re-export the file.",
            path=source.name,
        ) from exc


def _frames(source: Source, ds: Dataset, digest: str) -> list[Frame]:
    sop = str(ds.get("SOPClassUID", ""))
    modality = _str(ds, "Modality") or ""
    if sop in NON_IMAGE_SOP_CLASSES:
        raise Skipped(f"{NON_IMAGE_SOP_CLASSES[sop]} object, no image")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if modality in _NON_IMAGE_MODALITIES:
            raise Skipped(f"{modality} object, no image")
        raise NoPixelDataError(
            f"the dataset (modality {modality or 'unknown'}) has no Pixel Data element; "
            "expected an image object. Send the image series, not its report or plan.",
            path=source.name,
        )
    if _is_localizer(ds):
        raise Skipped("localizer (scout) image")
    _check_length(ds, source.name)
    study = str(ds.get("StudyInstanceUID", "")) or "unknown-study"
    series = str(ds.get("SeriesInstanceUID", "")) or f"unknown-series:{source.name}"
    patient = _str(ds, "PatientID")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    spp = int(ds.get("SamplesPerPixel", 1))
    for_uid = str(ds.get("FrameOfReferenceUID", ""))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    top_slope = float(ds.get("RescaleSlope", 1) or 1)
    if "DoseGridScaling" in ds:  # RT dose grids: stored value × scaling = Gy
        top_slope *= float(ds.DoseGridScaling)
    top_intercept = float(ds.get("RescaleIntercept", 0) or 0)
    echo = ds.get("EchoNumbers")
    temporal = ds.get("TemporalPositionIdentifier")
    bvalue = ds.get((0x0018, 0x9087))
    frames: list[Frame] = []
    # Fields every frame of this file shares, including one decode cache.
    make = functools.partial(
        Frame,
        source=source.name,
        ds=ds,
        study_uid=study,
        series_uid=series,
        patient_id=patient,
        digest=digest,
        decoded={},
    )
    if per_frame is not None and len(per_frame) == n_frames:
        for i, per in enumerate(per_frame):
            iop = _floats(
                _fg_value(per, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
            )
            ipp = _floats(
                _fg_value(per, shared, "PlanePositionSequence", "ImagePositionPatient"), 3
            )
            ps = _floats(_fg_value(per, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
            slope = _fg_value(per, shared, "PixelValueTransformationSequence", "RescaleSlope")
            inter = _fg_value(per, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            content = _first(per, "FrameContentSequence")
            stack = content.get("StackID") if content is not None else None
            tpos = content.get("TemporalPositionIndex") if content is not None else None
            f_echo = _fg_value(per, shared, "MREchoSequence", "EffectiveEchoTime")
            f_b = _fg_value(per, shared, "MRDiffusionSequence", "DiffusionBValue")
            frames.append(
                make(
                    index=i,
                    iop=iop,
                    ipp=ipp,
                    pixel_spacing=_pair(ps),
                    slope=float(slope) if slope is not None else top_slope,
                    intercept=float(inter) if inter is not None else top_intercept,
                    window=_window(_first(per, "FrameVOILUTSequence")) or _window(ds),
                    split=(rows, cols, spp, for_uid, stack, tpos, f_echo, f_b),
                )
            )
        return frames
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    ps = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    offsets = _floats(ds.get("GridFrameOffsetVector"), n_frames) if n_frames > 1 else None
    step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    for i in range(n_frames):
        f_ipp = ipp
        if n_frames > 1 and ipp is not None and iop is not None:
            normal = np.cross(iop[:3], iop[3:])
            if offsets is not None:
                f_ipp = ipp + offsets[i] * normal
            elif step:
                f_ipp = ipp + i * float(step) * normal
            else:
                f_ipp = None
        frames.append(
            make(
                index=i if n_frames > 1 else None,
                iop=iop,
                ipp=f_ipp,
                pixel_spacing=_pair(ps),
                slope=top_slope,
                intercept=top_intercept,
                window=_window(ds),
                split=(rows, cols, spp, for_uid, None, temporal, echo, bvalue),
                acquisition=ds.get("AcquisitionNumber"),
            )
        )
    return frames


def _iop_key(iop: np.ndarray | None) -> tuple[float, ...] | None:
    return None if iop is None else tuple(np.round(iop, 3).tolist())


def _part_label(keys: list[tuple[Any, ...]], key: tuple[Any, ...]) -> str:
    if len(keys) == 1:
        return ""
    names = (
        "orientation",
        "rows",
        "cols",
        "samples",
        "frame-of-reference",
        "stack",
        "temporal",
        "echo",
        "b",
    )
    differing = [i for i in range(len(key)) if len({k[i] for k in keys}) > 1]
    parts = []
    for i in differing:
        if i in {0, 4}:  # orientation / frame of reference: number them
            values = sorted({str(k[i]) for k in keys})
            parts.append(f"{names[i]}={values.index(str(key[i])) + 1}")
        else:
            parts.append(f"{names[i]}={key[i]}")
    return ",".join(parts)


def assemble(frames: Iterable[Frame]) -> list[DicomSeries]:
    """Group frames into consistent stacks (see module docstring)."""
    by_series: dict[tuple[str, str], list[Frame]] = defaultdict(list)
    for f in frames:
        by_series[(f.study_uid, f.series_uid)].append(f)
    out: list[DicomSeries] = []
    for (_study, _series), members in by_series.items():
        groups: dict[tuple[Any, ...], list[Frame]] = defaultdict(list)
        seen: set[tuple[str, int | None]] = set()
        resent = 0
        for f in members:
            sop = str(f.ds.get("SOPInstanceUID", ""))
            if sop and (sop, f.index) in seen:  # the same instance sent twice
                resent += 1
                continue
            seen.add((sop, f.index))
            rows, cols, spp, for_uid, stack, tpos, echo, b = f.split
            key = (_iop_key(f.iop), rows, cols, spp, for_uid, stack, tpos, echo, b)
            groups[key].append(f)
        keys = sorted(groups, key=str)
        for key in keys:
            for stack in _split_duplicates(groups[key], _part_label(keys, key)):
                if resent:
                    stack.notes.append(
                        f"{resent} duplicate instance(s) (same SOP Instance UID) ignored"
                    )
                out.append(stack)
    return out


def _natural(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers numerically (2 before 10), then text."""
    text = str(value)
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _projections(frames: list[Frame]) -> np.ndarray | None:
    iop = frames[0].iop
    if iop is None or any(f.ipp is None for f in frames):
        return None
    normal = np.cross(iop[:3], iop[3:])
    return np.asarray([float(np.dot(f.ipp, normal)) for f in frames])  # type: ignore[arg-type]


def _distinct_positions(frames: list[Frame]) -> bool:
    proj = _projections(frames)
    return proj is not None and len(set(np.round(proj / _DUP_TOL_MM).tolist())) == len(frames)


def _split_duplicates(frames: list[Frame], part: str) -> list[DicomSeries]:
    """Split a stack whose positions repeat by acquisition number, if that explains it."""
    proj = _projections(frames)
    if proj is None or len(frames) < 2:
        return [DicomSeries(frames=frames, part=part)]
    rounded = np.round(proj / _DUP_TOL_MM).astype(np.int64)
    if len(set(rounded.tolist())) == len(frames):
        return [DicomSeries(frames=frames, part=part)]
    by_acq: dict[Any, list[Frame]] = defaultdict(list)
    for f in frames:
        by_acq[str(f.acquisition)].append(f)
    if len(by_acq) > 1 and all(_distinct_positions(g) for g in by_acq.values()):
        return [
            DicomSeries(frames=g, part=",".join(p for p in (part, f"acquisition={a}") if p))
            for a, g in sorted(by_acq.items(), key=lambda kv: _natural(kv[0]))
        ]
    # Leave it whole; decoding reports the duplicate positions as a clear rejection.
    return [DicomSeries(frames=frames, part=part)]


# ---------------------------------------------------------------------------------------
# Decoding


_NATIVE_LE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """Uncompressed little-endian grey pixels straight from the buffer, when that is exact.

    Covers the common case (8/16-bit, all allocated bits stored, or unsigned) without
    pydicom's per-file decode machinery; anything else returns None and goes to pydicom.
    """
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax not in _NATIVE_LE or "PixelData" not in ds or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    bits, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits not in (8, 16) or (signed and stored != bits):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    buf = ds.PixelData
    if len(buf) < n * rows * cols * dtype.itemsize:
        return None
    arr = np.frombuffer(buf, dtype=dtype, count=n * rows * cols)
    if not signed and stored < bits:
        arr = arr & np.asarray((1 << stored) - 1, dtype=dtype)  # drop bits outside BitsStored
    return arr.reshape((n, rows, cols) if n > 1 else (rows, cols))


def _decode_file(frame: Frame) -> np.ndarray:
    """All frames of the file behind ``frame``, decoded once and shared by its frames."""
    cache = frame.decoded
    if "all" in cache:
        return cache["all"]
    ds = frame.ds
    fast = _native_pixels(ds)
    if fast is not None:
        cache["all"] = fast
        return fast
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except ValueError as exc:
        msg = str(exc)
        if "less than expected" in msg or "ended" in msg or "truncated" in msg:
            raise TruncatedFileError(
                "the pixel data is shorter than its header says "
                f"({msg.split(' - ', maxsplit=1)[0]}); "
                "the file was cut short in transfer — send it again.",
                path=frame.source,
            ) from exc
        raise DecodeError(f"pixel data could not be decoded: {msg}", path=frame.source) from exc
    except (NotImplementedError, RuntimeError) as exc:
        if tsyntax is not None and tsyntax.is_compressed:
            try:
                available = get_decoder(tsyntax).is_available
            except NotImplementedError:
                available = False
            if not available:
                raise UnsupportedTransferSyntaxError(
                    f"transfer syntax {tsyntax.name} ({tsyntax}) has no decoder here; radcache "
                    "decodes JPEG (baseline, extended, lossless), JPEG-LS, JPEG 2000, RLE, deflate "
                    "and uncompressed data. Send the series in one of those.",
                    path=frame.source,
                ) from exc
        raise DecodeError(
            f"the compressed frame could not be decoded ({exc}); the file may be corrupt.",
            path=frame.source,
        ) from exc
    except Exception as exc:
        raise DecodeError(f"pixel data could not be decoded ({exc}).", path=frame.source) from exc
    cache["all"] = arr
    return arr


def _frame_pixels(frame: Frame) -> np.ndarray:
    arr = _decode_file(frame)
    n_frames = int(frame.ds.get("NumberOfFrames", 1) or 1)
    spp = int(frame.ds.get("SamplesPerPixel", 1))
    if (n_frames > 1 or frame.index is not None) and arr.ndim == (3 if spp == 1 else 4):
        return np.asarray(arr[frame.index or 0])
    return arr


def _rescale_into(arr: np.ndarray, frame: Frame, out: np.ndarray) -> None:
    """Modality LUT: stored values → ``out`` (float32), e.g. Hounsfield units for CT."""
    ds = frame.ds
    if "ModalityLUTSequence" in ds:
        out[...] = apply_modality_lut(arr, ds)
        return
    slope, inter = frame.slope, frame.intercept
    if slope == 1.0 and float(inter).is_integer():  # exact in float32
        np.add(arr, np.float32(inter), out=out, casting="unsafe")
    else:  # as nibabel does: float64 arithmetic, then float32
        out[...] = arr.astype(np.float64) * slope + inter


def _voi(arr: np.ndarray, frame: Frame) -> tuple[np.ndarray, bool]:
    ds = frame.ds
    if "VOILUTSequence" in ds or frame.window is not None:
        if "VOILUTSequence" not in ds and frame.window is not None:
            c, w = frame.window
            if w <= 0:
                return arr, False
            ds = Dataset()
            ds.WindowCenter, ds.WindowWidth = c, w
            ds.BitsStored = frame.ds.get("BitsStored", 16)
            ds.PixelRepresentation = frame.ds.get("PixelRepresentation", 0)
            ds.PhotometricInterpretation = "MONOCHROME2"
            fn = frame.ds.get("VOILUTFunction")
            if fn:
                ds.VOILUTFunction = fn
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(apply_voi_lut(arr, ds), dtype=np.float32), True
    return arr, False


def _geometry(series: DicomSeries, frames: list[Frame], name: str) -> tuple[np.ndarray, ...]:
    """Direction rows (slice, row, col axes), spacing, origin and positions; plus warnings."""
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
        spacing_k = _check_spacing(series, positions, normal, name)
    dirs = np.stack([normal, col_dir, row_dir])
    spacing = np.asarray([spacing_k, row_sp, col_sp])
    return dirs, spacing, positions[0].copy(), positions


def _check_spacing(
    series: DicomSeries, positions: np.ndarray, normal: np.ndarray, name: str
) -> float:
    if len(positions) < 2:
        return float(series.frames[0].ds.get("SliceThickness") or 1.0)
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
    """Decode, rescale and stack a series into a canonical :class:`Volume`."""
    frames = series.frames
    proj = _projections(frames)
    if proj is not None:
        order = np.argsort(proj, kind="stable")
        frames = [frames[i] for i in order]
    name = series.name
    dirs, spacing, origin, positions = _geometry(series, frames, name)
    ds0 = frames[0].ds
    modality = _str(ds0, "Modality")
    photometric = str(ds0.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    use_voi = (modality or "").upper() in VOI_MODALITIES
    voxels: np.ndarray | None = None
    voi_applied = False
    for i, f in enumerate(frames):
        arr = _frame_pixels(f)
        if arr.ndim == 3 and photometric.startswith("MONOCHROME"):
            raise DecodeError(f"expected a 2-D frame, got shape {arr.shape}.", path=f.source)
        if voxels is None:  # one float32 volume, filled slice by slice (no stacking copy)
            voxels = np.empty((len(frames), *arr.shape), dtype=np.float32)
        if arr.shape != voxels.shape[1:]:
            raise InconsistentSeriesError(
                f"frame of shape {arr.shape} in a series of {voxels.shape[1:]} frames.",
                path=f.source,
            )
        if arr.ndim == 2:
            _rescale_into(arr, f, voxels[i])
            if use_voi:
                voxels[i], applied = _voi(voxels[i], f)
                voi_applied = voi_applied or applied
        else:
            voxels[i] = arr
    assert voxels is not None
    for f in frames:  # decoded pixels now live in ``voxels``; free the per-file copies
        f.decoded.clear()
    if photometric == "MONOCHROME1":
        voxels = (voxels.max() + voxels.min()) - voxels
    intensity = "voi" if voi_applied else ("HU" if (modality or "").upper() == "CT" else "modality")
    patient = frames[0].patient_id
    meta = VolumeMeta(
        source_format="dicom",
        study=pseudo.name("study", frames[0].study_uid),
        series=pseudo.name("series", frames[0].series_uid),
        part=series.part,
        patient=pseudo.name("patient", patient) if patient else None,
        modality=modality,
        body_part=_str(ds0, "BodyPartExamined"),
        manufacturer_model=_str(ds0, "ManufacturerModelName"),
        series_description=_str(ds0, "SeriesDescription"),
        # MONOCHROME1 voxels were inverted above: what is stored now reads as MONOCHROME2.
        photometric="RGB"
        if voxels.ndim == 4
        else photometric.replace("MONOCHROME1", "MONOCHROME2"),
        intensity=intensity,
        window=frames[0].window,
        warnings=tuple(series.notes),
        n_files=len({f.source for f in frames}),
        acquisition=_acquisition(ds0, pseudo),
    )
    return Volume.from_array(voxels, dirs, spacing, origin, meta, positions=positions)


#: MR timing attributes, at the top level or in the enhanced objects' functional groups.
_TIMING = {
    "repetition_time": ("RepetitionTime", "MRTimingAndRelatedParametersSequence"),
    "echo_time": ("EchoTime", "MREchoSequence", "EffectiveEchoTime"),
    "inversion_time": ("InversionTime", "MRModifierSequence", "InversionTimes"),
}


def _acquisition(ds: Dataset, pseudo: Pseudonymizer) -> dict[str, Any]:
    """Non-identifying acquisition parameters that tell MR sequences apart."""
    out: dict[str, Any] = {}
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    for name, (kw, group, *inner) in _TIMING.items():
        value = ds.get(kw)
        if value in (None, "") and shared is not None:
            item = _first(shared, group)
            value = item.get(inner[0] if inner else kw) if item is not None else None
        with contextlib.suppress(TypeError, ValueError):
            if value not in (None, ""):
                out[name] = float(value[0] if isinstance(value, list | MultiValue) else value)
    agent = _str(ds, "ContrastBolusAgent")
    if agent is not None or "ContrastBolusAgentSequence" in ds:
        out["contrast_agent"] = True
    for kw, name in (("ScanningSequence", "scanning_sequence"), ("SequenceName", "sequence")):
        v = ds.get(kw)
        if v not in (None, ""):
            out[name] = "\\".join(str(x) for x in v) if isinstance(v, MultiValue) else str(v)
    for_uid = str(ds.get("FrameOfReferenceUID", ""))
    if for_uid:
        out["frame_of_reference"] = pseudo.name("frame", for_uid)
    return out


def errors_for(exc: Exception, name: str) -> InputError:
    """Wrap an unexpected exception from decoding as an input error naming the series."""
    if isinstance(exc, InputError):
        return exc
    return DecodeError(f"the series could not be read ({type(exc).__name__}: {exc}).", path=name)
