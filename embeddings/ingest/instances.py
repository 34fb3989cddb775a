"""Identifiers of one DICOM instance, read from its header alone (a receiver's check).

A DICOM receiver (STOW-RS, C-STORE) answers per instance: which SOP class and instance
it took or refused, and whether the instance belongs to the study it was sent for. This
reads those three UIDs and nothing after them (a deflated instance is inflated only that
far); they are answered to the sender, never stored.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NotDicomError
from ._dicom_deflate import open_dataset
from ._limits import Budget, Limits

__all__ = ["InstanceIds", "instance_ids"]

#: Most bytes a deflated instance is inflated to for its UIDs (they come first).
_HEADER_INFLATE = 64 << 20
_LAST_TAG = 0x0020000D  # StudyInstanceUID: nothing after it is read


def _past_uids(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) > _LAST_TAG


@dataclass(frozen=True)
class InstanceIds:
    sop_class: str
    sop_instance: str
    study: str  # StudyInstanceUID as in the file ("" when absent)


def instance_ids(path: str | Path) -> InstanceIds:
    """The SOP class, SOP instance and study UIDs of the DICOM file at ``path``; raises
    :class:`NotDicomError` when it has no readable header with the first two."""
    charge = Budget(Limits(max_decompressed_bytes=_HEADER_INFLATE)).meter(path, str(path))
    try:
        with warnings.catch_warnings(), open(path, "rb") as f:
            warnings.simplefilter("ignore")
            with open_dataset(f, charge, defer_size=4096, stop_when=_past_uids) as ds:
                return InstanceIds(
                    str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.get("StudyInstanceUID", ""))
                )
    except Exception:  # pydicom's text may quote a header value: not passed on
        raise NotDicomError(
            "not a DICOM instance with SOP class and instance UIDs; send PS3.10 files.",
            path=Path(path).name,
        ) from None
