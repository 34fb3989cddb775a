"""DICOM series assembly: frames in, geometrically consistent :class:`DicomSeries` out.

Series assembly follows what careful converters (dcm2niix, ITK's GDCM series reader) do
(steps 1 and 3 happen in :mod:`._dicom_read`, step 4 in :mod:`._dicom_volume`):

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

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # annotations only: assembling needs no pydicom
    from ._dicom_read import Frame

__all__ = ["DicomSeries", "assemble"]

_DUP_TOL_MM = 1e-3


@dataclass
class DicomSeries:
    """A consistent stack of frames that becomes one volume once decoded."""

    frames: list[Frame]
    part: str
    notes: list[str] = field(default_factory=list)
    resent: int = 0  # instances of this upload sent more than once (ignored)

    @property
    def name(self) -> str:
        srcs = sorted({f.source for f in self.frames})
        return srcs[0] if len(srcs) == 1 else f"{srcs[0]} (+{len(srcs) - 1} more files)"

    @property
    def n_slices(self) -> int:
        return len(self.frames)


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
        # Orientations, frames of reference and stack IDs that are not plain numbers
        # (header text) are numbered; the other keys are numbers read from the header.
        if i in {0, 4} or (i == 5 and not all(str(k[i]).isdigit() for k in keys)):
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
            sop = f.sop_instance
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
                stack.resent = resent
                stack.notes.extend(upload_notes((), resent))
                out.append(stack)
    return out


_RESENT = " duplicate instance(s) (same SOP Instance UID) ignored"


def upload_notes(recorded: Iterable[str], resent: int) -> tuple[str, ...]:
    """A series' warnings for one upload: those recorded for its volume, without the count
    of duplicates another upload sent, and this upload's own count."""
    kept = tuple(w for w in recorded if not w.endswith(_RESENT))
    return (*kept, f"{resent}{_RESENT}") if resent else kept


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
