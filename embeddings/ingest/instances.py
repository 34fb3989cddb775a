"""Identifiers of one DICOM instance, read from its header alone (a receiver's check).

A DICOM receiver (STOW-RS, C-STORE) answers per instance: which SOP class and instance
it took or refused, and whether the instance belongs to the study it was sent for. This
reads those three UIDs and nothing else; they are answered to the sender, never stored.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom

from ..errors import NotDicomError

__all__ = ["InstanceIds", "instance_ids"]


@dataclass(frozen=True)
class InstanceIds:
    sop_class: str
    sop_instance: str
    study: str  # StudyInstanceUID as in the file ("" when absent)


def instance_ids(path: str | Path) -> InstanceIds:
    """The SOP class, SOP instance and study UIDs of the DICOM file at ``path``; raises
    :class:`NotDicomError` when it has no readable header with the first two."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return InstanceIds(
            str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.get("StudyInstanceUID", ""))
        )
    except Exception:  # pydicom's text may quote a header value: not passed on
        raise NotDicomError(
            "not a DICOM instance with SOP class and instance UIDs; send PS3.10 files.",
            path=Path(path).name,
        ) from None
