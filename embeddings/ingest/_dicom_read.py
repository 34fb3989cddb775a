"""DICOM files in, :class:`Frame` values out: one read of each file's header.

Every file's header is read once, without its pixel data (values larger than
:data:`DEFER_BYTES` are skipped, not read); each frame (one per single-frame file, several
per multi-frame file with per-frame functional groups) becomes a :class:`Frame` carrying
only the header facts that series assembly needs and the way to read the file again.
The dataset itself is not kept: pixels and the attributes decoding needs are read from
the file when its series is loaded (:func:`read_dataset`). Truncated files, malformed
headers and objects without pixels are caught here; localizers and non-image objects
(SR, KOS, RTPLAN, …) raise :class:`Skipped`. Numbers are read through
:mod:`._dicom_values`: a value that does not parse is an error naming the attribute, never
quoting the value.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ..errors import (
    InputError,
    InvalidHeaderError,
    NoPixelDataError,
    NotDicomError,
    TruncatedFileError,
    UnsupportedInputError,
)
from ..pseudonyms import Pseudonymizer
from ._deidentify import clean_description
from ._dicom_deflate import open_dataset
from ._dicom_values import (
    finite,
    float_of,
    floats_of,
    integer,
    ints_of,
    malformed,
    one_of,
    uint_of,
    unsigned,
)
from ._limits import Budget
from ._sources import Source

__all__ = ["Frame", "Skipped", "read_dataset", "read_frames"]

#: Header values larger than this are not read when scanning (pixel data, large private
#: blobs, overlays); their position and length are still checked against the file size.
DEFER_BYTES = 4096

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


@dataclass(eq=False, slots=True)
class Frame:
    """One 2-D image: a frame of a file, with the header facts assembly needs.

    It holds no dataset and no pixels: ``file`` reads the file again when the series is
    loaded (``digest`` checks that it is still the file that was scanned).
    """

    source: str  # the file's name, for messages
    file: Source
    index: int | None  # frame number within a multi-frame file, None for single-frame
    study_uid: str
    series_uid: str
    patient_id: str | None
    sop_instance: str
    iop: np.ndarray | None
    ipp: np.ndarray | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    slope: float
    intercept: float
    window: tuple[float, float] | None
    split: tuple[Any, ...]
    acquisition: Any = None
    digest: str = ""  # keyed digest of the file's bytes (Pseudonymizer.file_digest)


@functools.lru_cache(maxsize=1024)
def _shared_pair(pair: tuple[float, float] | None) -> tuple[float, float] | None:
    return pair


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
    return _shared_pair((float(v[0]), float(v[1]))) if v is not None else None


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
        return _shared_pair((float(c0), float(w0)))
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def _parsed(source: Source, fp: IO[bytes], *, pixels: bool) -> Iterator[Dataset]:
    """The dataset in ``fp`` (the file of ``source``), usable inside the block; without
    values over :data:`DEFER_BYTES` unless ``pixels``. A deflated dataset charges the
    input's budget as it inflates (:mod:`._dicom_deflate`)."""
    name = source.name
    charge = (source.budget or Budget()).meter((source, "deflate"), name)
    opened = contextlib.ExitStack()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            defer = None if pixels else DEFER_BYTES
            ds = opened.enter_context(open_dataset(fp, charge, defer_size=defer))
    except InputError:  # the budget, spent while inflating
        raise
    except InvalidDicomError as exc:
        raise NotDicomError(f"not a valid DICOM file ({exc}).", path=name) from exc
    except (EOFError, OSError) as exc:
        raise TruncatedFileError(
            f"the file ends before its DICOM header does ({exc}); it was cut short in transfer.",
            path=name,
        ) from exc
    except Exception as exc:  # its text may quote a value: name the kind of failure only
        raise NotDicomError(
            f"the DICOM header could not be parsed ({type(exc).__name__}); expected a PS3.10 "
            "file or a bare dataset.",
            path=name,
        ) from None
    with opened:
        meta = getattr(ds, "file_meta", None)
        if meta is not None and isinstance(meta.get("TransferSyntaxUID"), MultiValue):
            raise malformed("TransferSyntaxUID", "one transfer syntax UID", name)
        _record_encoding(ds)
        yield ds


def _record_encoding(ds: Dataset) -> None:
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


def _check_header(ds: Dataset, size: int, name: str) -> None:
    """A header (of a file of ``size`` bytes) that is whole and describes a dataset."""
    _check_last_element(ds, size, name)
    if "SOPClassUID" not in ds and "PixelData" not in ds and "Modality" not in ds:
        raise NotDicomError(
            "no DICOM dataset found (no SOP Class UID, Modality or Pixel Data).", path=name
        )


def read_dataset(frame: Frame, pseudo: Pseudonymizer) -> Dataset:
    """The whole dataset (pixel data included) of the file behind ``frame``, read again
    (streamed: never whole in memory beside its dataset) when its series is loaded; it
    must still be the file that was scanned."""
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(frame.file.spooled())
        except InputError as exc:  # a file removed or a zip member gone bad since the scan
            why = exc.__cause__ or exc
            raise UnsupportedInputError(
                f"the file could not be read again to load its series ({why}); keep the input "
                "in place until embedding has finished.",
                path=frame.source,
            ) from exc
        if frame.digest and pseudo.file_digest(f) != frame.digest:
            raise UnsupportedInputError(
                "the file changed after its header was read (its content differs); expected "
                "input files that stay unchanged while they are embedded. Send it again once "
                "it is complete.",
                path=frame.source,
            )
        f.seek(0)
        ds = stack.enter_context(_parsed(frame.file, f, pixels=True))
    return ds  # every value read: nothing refers to the file any more


def _check_last_element(ds: Dataset, size: int, name: str) -> None:
    """A file cut short ends inside its last element, or inside the header of the next one."""
    tags = list(ds.keys())
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not tags or tsyntax == DeflatedExplicitVRLittleEndian:  # offsets are in the inflated stream
        return
    raw = ds.get_item(tags[-1], keep_deferred=True)  # its length, not its value
    length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
    if not isinstance(length, int) or not isinstance(tell, int) or length == 0xFFFFFFFF:
        return
    end = tell + length
    if end > size or 0 < size - end < 8:
        raise TruncatedFileError(
            f"the file ends inside element {tags[-1]} (it needs {end} bytes, the file has "
            f"{size}); it was cut short in transfer — send it again.",
            path=name,
        )


def _pixel_bytes(ds: Dataset) -> int | None:
    """Length of the Pixel Data value (present) as the header gives it, without reading it."""
    raw = ds.get_item("PixelData", keep_deferred=True)
    length = getattr(raw, "length", None)
    if isinstance(length, int) and length != 0xFFFFFFFF:
        return length
    value = raw.value
    return len(value) if isinstance(value, bytes) else None


def _check_length(ds: Dataset, name: str) -> None:
    """Catch native (uncompressed) pixel data that is shorter than its header promises."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or tsyntax.is_compressed or "PixelData" not in ds:
        return
    bits = uint_of(ds, "BitsAllocated", name, 0)
    n_px = uint_of(ds, "Rows", name, 0) * uint_of(ds, "Columns", name, 0)
    n_px *= uint_of(ds, "SamplesPerPixel", name, 1) * (uint_of(ds, "NumberOfFrames", name, 1) or 1)
    expected = (n_px * bits + 7) // 8
    got = _pixel_bytes(ds)
    if bits and got is not None and got < expected:
        raise TruncatedFileError(
            f"the pixel data holds {got} bytes but the header describes {expected}; the file was "
            "cut short in transfer — send it again.",
            path=name,
        )


class Skipped(Exception):
    """A valid DICOM object that holds no image to embed (SR, RT plan, localizer…)."""


def read_frames(source: Source, pseudo: Pseudonymizer) -> list[Frame]:
    """Digest one DICOM file and read its header into its frames, streamed (a zip member
    over :data:`~._sources.SPOOL_BYTES` through a temporary file); raise :class:`Skipped`
    for non-image objects."""
    with source.spooled() as f:
        digest = pseudo.file_digest(f)
        size = f.tell()
        f.seek(0)
        with _parsed(source, f, pixels=False) as ds:
            _check_header(ds, size, source.name)
            return _frames_of(source, ds, digest)


def _frames_of(source: Source, ds: Dataset, digest: str) -> list[Frame]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _frames(source, ds, digest)
    except (Skipped, InputError):
        raise
    except Exception as exc:  # its text may quote the value: name the kind of failure only
        raise InvalidHeaderError(
            f"a header value is malformed ({type(exc).__name__}); expected values valid for "
            "their VR. Fix the header at the source or re-export the file.",
            path=source.name,
        ) from None


def _uid(value: Any) -> str:
    """A UID or ID as a plain string, shared by every frame that carries it."""
    return sys.intern(str(value))


def _frames(source: Source, ds: Dataset, digest: str) -> list[Frame]:
    sop = str(ds.get("SOPClassUID", ""))
    modality = _str(ds, "Modality") or ""
    if sop in NON_IMAGE_SOP_CLASSES:
        raise Skipped(f"{NON_IMAGE_SOP_CLASSES[sop]} object, no image")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if modality in _NON_IMAGE_MODALITIES:
            raise Skipped(f"{modality} object, no image")
        raise NoPixelDataError(
            "the dataset has no Pixel Data element; expected an image object. Send the image "
            "series, not its report or plan.",
            path=source.name,
        )
    if _is_localizer(ds):
        raise Skipped("localizer (scout) image")
    name = source.name
    _check_length(ds, name)
    study = _uid(str(ds.get("StudyInstanceUID", "")) or "unknown-study")
    series = _uid(str(ds.get("SeriesInstanceUID", "")) or f"unknown-series:{source.name}")
    patient = _str(ds, "PatientID")
    rows, cols = uint_of(ds, "Rows", name, 0), uint_of(ds, "Columns", name, 0)
    spp = uint_of(ds, "SamplesPerPixel", name, 1)
    for_uid = _uid(ds.get("FrameOfReferenceUID", ""))
    n_frames = uint_of(ds, "NumberOfFrames", name, 1) or 1
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    top_slope = float_of(ds.get("RescaleSlope"), "RescaleSlope", name, 1.0) or 1.0
    # RT dose grids: stored value × scaling = Gy
    top_slope *= float_of(ds.get("DoseGridScaling"), "DoseGridScaling", name, 1.0)
    top_intercept = float_of(ds.get("RescaleIntercept"), "RescaleIntercept", name, 0.0)
    # Split keys become part labels ("echo=2"): numbers only, never header text.
    echo = ints_of(ds.get("EchoNumbers"), "EchoNumbers", name)
    temporal = ints_of(ds.get("TemporalPositionIdentifier"), "TemporalPositionIdentifier", name)
    bvalue = one_of(ds.get("DiffusionBValue"), "DiffusionBValue", name, finite)
    frames: list[Frame] = []
    # Fields every frame of this file shares.
    make = functools.partial(
        Frame,
        source=name,
        file=source,
        study_uid=study,
        series_uid=series,
        patient_id=_uid(patient) if patient is not None else None,
        sop_instance=str(ds.get("SOPInstanceUID", "")),
        digest=digest,
    )
    if per_frame is not None and len(per_frame) == n_frames:
        for i, per in enumerate(per_frame):
            iop = floats_of(
                _fg_value(per, shared, "PlaneOrientationSequence", "ImageOrientationPatient"),
                6,
                "ImageOrientationPatient",
                name,
                shared=True,
            )
            ipp = floats_of(
                _fg_value(per, shared, "PlanePositionSequence", "ImagePositionPatient"),
                3,
                "ImagePositionPatient",
                name,
            )
            ps = floats_of(
                _fg_value(per, shared, "PixelMeasuresSequence", "PixelSpacing"),
                2,
                "PixelSpacing",
                name,
                shared=True,
            )
            slope = _fg_value(per, shared, "PixelValueTransformationSequence", "RescaleSlope")
            inter = _fg_value(per, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            content = _first(per, "FrameContentSequence")
            stack = content.get("StackID") if content is not None else None
            tpos = content.get("TemporalPositionIndex") if content is not None else None
            tpos = one_of(tpos, "TemporalPositionIndex", name, unsigned)
            f_echo = _fg_value(per, shared, "MREchoSequence", "EffectiveEchoTime")
            f_echo = one_of(f_echo, "EffectiveEchoTime", name, finite)
            f_b = _fg_value(per, shared, "MRDiffusionSequence", "DiffusionBValue")
            f_b = one_of(f_b, "DiffusionBValue", name, finite)
            frames.append(
                make(
                    index=i,
                    iop=iop,
                    ipp=ipp,
                    pixel_spacing=_pair(ps),
                    slope=float_of(slope, "RescaleSlope", name, top_slope),
                    intercept=float_of(inter, "RescaleIntercept", name, top_intercept),
                    window=_window(_first(per, "FrameVOILUTSequence")) or _window(ds),
                    split=(rows, cols, spp, for_uid, stack, tpos, f_echo, f_b),
                )
            )
        return frames
    iop = floats_of(
        ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", name, shared=True
    )
    ipp = floats_of(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", name)
    ps_kw = "PixelSpacing" if ds.get("PixelSpacing") else "ImagerPixelSpacing"
    ps = floats_of(ds.get(ps_kw), 2, ps_kw, name, shared=True)
    offsets = None
    if n_frames > 1:
        offsets = floats_of(
            ds.get("GridFrameOffsetVector"), n_frames, "GridFrameOffsetVector", name
        )
    step = float_of(ds.get("SpacingBetweenSlices"), "SpacingBetweenSlices", name, 0.0)
    step = step or float_of(ds.get("SliceThickness"), "SliceThickness", name, 0.0)
    for i in range(n_frames):
        f_ipp = ipp
        if n_frames > 1 and ipp is not None and iop is not None:
            normal = np.cross(iop[:3], iop[3:])
            if offsets is not None:
                f_ipp = ipp + offsets[i] * normal
            elif step:
                f_ipp = ipp + i * step * normal
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
                acquisition=one_of(ds.get("AcquisitionNumber"), "AcquisitionNumber", name, integer),
            )
        )
    return frames


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
            text = "\\".join(str(x) for x in v) if isinstance(v, MultiValue) else str(v)
            kept = clean_description(text, ds)  # header text: never a name, ID or date
            if kept is not None:
                out[name] = kept
    for_uid = str(ds.get("FrameOfReferenceUID", ""))
    if for_uid:
        out["frame_of_reference"] = pseudo.name("frame", for_uid)
    return out
