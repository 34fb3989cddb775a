"""Identifiers of one DICOM instance, read from its header alone (a receiver's check).

A DICOM receiver (STOW-RS, C-STORE) answers per instance: which SOP class and instance
it took or refused, and whether the instance belongs to the study it was sent for. This
reads those UIDs and the series UID (a receiver groups instances by study and series) and
nothing after them (a deflated instance is inflated only that far); they are answered to
the sender, never stored. :func:`cut_short` tells an instance whose last element ends past
the end of its file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ..errors import NotDicomError
from ._dicom_deflate import open_dataset
from ._limits import Budget, Limits

__all__ = ["InstanceIds", "cut_short", "instance_ids"]

#: Most bytes a deflated instance is inflated to for its UIDs (they come first).
_HEADER_INFLATE = 64 << 20
_LAST_TAG = 0x0020000E  # SeriesInstanceUID: nothing after it is read


def _past_uids(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) > _LAST_TAG


@dataclass(frozen=True)
class InstanceIds:
    sop_class: str
    sop_instance: str
    study: str  # StudyInstanceUID as in the file ("" when absent)
    series: str = ""  # SeriesInstanceUID as in the file ("" when absent)


def instance_ids(path: str | Path) -> InstanceIds:
    """The SOP class, SOP instance, study and series UIDs of the DICOM file at ``path``;
    raises :class:`NotDicomError` when it has no readable header with the first two."""
    charge = Budget(Limits(max_decompressed_bytes=_HEADER_INFLATE)).meter(path, str(path))
    try:
        with warnings.catch_warnings(), open(path, "rb") as f:
            warnings.simplefilter("ignore")
            with open_dataset(f, charge, defer_size=4096, stop_when=_past_uids) as ds:
                return InstanceIds(
                    str(ds.SOPClassUID),
                    str(ds.SOPInstanceUID),
                    str(ds.get("StudyInstanceUID", "")),
                    str(ds.get("SeriesInstanceUID", "")),
                )
    except Exception:  # pydicom's text may quote a header value: not passed on
        raise NotDicomError(
            "not a DICOM instance with SOP class and instance UIDs; send PS3.10 files.",
            path=Path(path).name,
        ) from None


def cut_short(path: Path) -> str | None:
    """How a readable DICOM file ends too soon (inside its last element, or inside the
    header of one more), or None. Large values are skipped, not read."""
    size = path.stat().st_size
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # no file meta: read below
        meta = None
    if meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return None  # offsets of the inflated data, which pydicom would inflate whole
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, defer_size=1024)
    except (EOFError, OSError) as exc:
        return f"it ends inside its data set ({type(exc).__name__})"
    except Exception:  # unreadable in another way: the job reports it
        return None
    tags = list(ds.keys())
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not tags or tsyntax == DeflatedExplicitVRLittleEndian:  # offsets of the inflated data
        return None
    raw = ds.get_item(tags[-1])
    length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
    if not isinstance(length, int) or not isinstance(tell, int) or length == 0xFFFFFFFF:
        return None
    end = tell + length
    if end > size or 0 < size - end < 8:
        return f"element {tags[-1]} needs {end} bytes, the file has {size}"
    return None
