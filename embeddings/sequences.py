"""Multi-sequence MR studies: which series is T1, T1c, T2 or FLAIR, and one common grid.

Entry point :func:`assemble_study`. It takes the volumes of one study and an optional
explicit mapping (series name, ``series#part`` or input file name → sequence type). The
volumes the mapping leaves out are named by :func:`guess_sequence`, and every decision
says why. All volumes are then resampled with SimpleITK onto the grid of the reference
sequence (the first present of ``reference_order``), using their DICOM/NIfTI geometry.
Volumes in another frame of reference are refused: their coordinates need not match.

The heuristics, in order:

1. SeriesDescription patterns (FLAIR; T2; T1 with a contrast word such as post, +C, Gd,
   CE, contrast; T1 or MPRAGE). Ingest matches them while it reads the header
   (:func:`description_sequence`) and keeps the result as ``VolumeMeta.sequence_hint``,
   because the description itself is not kept by default;
2. a contrast agent recorded in the header (ContrastBolusAgent) turns T1 into T1c;
3. timing (ms): TI ≥ 1500 with TR ≥ 4000 is FLAIR; TR ≥ 2000 with TE ≥ 60 is T2;
   TR ≤ 1000 with TE ≤ 30 is T1 (T1c with a contrast agent); an MPRAGE-like TI of
   600–1300 with TE ≤ 10 is T1 too.

A decision's reason names the rule that matched; it never quotes the header text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import InputError
from .volume import Geometry, Volume

__all__ = [
    "FUSIONS",
    "SEQUENCES",
    "Decision",
    "Fusion",
    "Study",
    "assemble_study",
    "description_sequence",
    "guess_sequence",
    "resample_onto",
]

#: How a study's sequences become one embedding (:mod:`.multiseq`).
Fusion = Literal["mm", "concat", "mean"]
FUSIONS: tuple[Fusion, ...] = ("mm", "concat", "mean")

SEQUENCES = ("t1", "t1c", "t2", "flair")

_CONTRAST = r"(post|\+\s*c\b|\bgd\b|gad|\bce\b|contrast|\bc\+|kontrast)"
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("flair", r"flair|\bdark[\s_-]?fluid\b"),
    ("t2", r"\bt2(?![\s_-]*\*)(?!\s*star)|\bt2w\b|\bt2[\s_-]?(tse|fse|space|blade)"),
    ("t1c", rf"(\bt1|mprage|bravo|vibe|spgr|tfl).*{_CONTRAST}|{_CONTRAST}.*(\bt1|mprage)"),
    ("t1", r"\bt1|mprage|bravo|\bspgr\b|\btfl\b"),
)
#: How a reason names each description pattern.
_RULES = {
    "flair": "the FLAIR pattern",
    "t2": "the T2 pattern",
    "t1c": "the T1-with-contrast pattern",
    "t1": "the T1 pattern",
}


@dataclass(frozen=True)
class Decision:
    """Which sequence a volume was taken as, and why."""

    volume: str  # series name (``series#part``)
    sequence: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"volume": self.volume, "sequence": self.sequence, "reason": self.reason}


def _name(v: Volume) -> str:
    return v.meta.series + (f"#{v.meta.part}" if v.meta.part else "")


def description_sequence(description: str | None) -> str | None:
    """The sequence type (``t1``, ``t1c``, ``t2``, ``flair``) a series description names
    by the patterns above, or None."""
    desc = (description or "").lower().replace("_", " ")
    for seq, pattern in _PATTERNS:
        if desc and re.search(pattern, desc):
            return seq
    return None


def guess_sequence(volume: Volume) -> tuple[str | None, str]:
    """The sequence type of an MR volume by the heuristics above, and the reason (the rule
    that matched, never the header's text)."""
    meta = volume.meta
    acq = meta.acquisition
    agent = bool(acq.get("contrast_agent"))
    named = meta.sequence_hint or description_sequence(meta.series_description)
    if named is not None and named in _RULES:
        why = f"SeriesDescription matched {_RULES[named]}"
        if named == "t1" and agent:
            return "t1c", f"{why}, and a contrast agent is recorded"
        return named, why
    tr, te, ti = (acq.get(k) for k in ("repetition_time", "echo_time", "inversion_time"))
    if ti is not None and tr is not None and ti >= 1500 and tr >= 4000:
        return "flair", "timing: long inversion (TI ≥ 1500 ms, TR ≥ 4000 ms)"
    if tr is not None and te is not None and tr >= 2000 and te >= 60:
        return "t2", "timing: long TR and TE (TR ≥ 2000 ms, TE ≥ 60 ms)"
    if tr is not None and te is not None and tr <= 1000 and te <= 30:
        why = "timing: short TR and TE (TR ≤ 1000 ms, TE ≤ 30 ms)"
        return ("t1c", f"{why}, and a contrast agent is recorded") if agent else ("t1", why)
    if ti is not None and 600 <= ti <= 1300 and te is not None and te <= 10:
        why = "timing: MPRAGE-like inversion (TI 600–1300 ms, TE ≤ 10 ms)"
        return ("t1c", f"{why}, and a contrast agent is recorded") if agent else ("t1", why)
    known = [n for n, v in (("TR", tr), ("TE", te), ("TI", ti)) if v is not None]
    return None, (
        "no SeriesDescription pattern matched and the timing decides nothing "
        f"({', '.join(known) or 'no timing'} recorded)"
    )


@dataclass
class Study:
    """One study's sequences on one grid."""

    volumes: dict[str, Volume]  # sequence type → volume on the reference grid
    reference: str  # the sequence whose grid the others were resampled onto
    decisions: list[Decision]

    @property
    def present(self) -> list[str]:
        return list(self.volumes)


def assemble_study(
    volumes: Sequence[Volume],
    mapping: Mapping[str, str] | None = None,
    *,
    names: Sequence[str] | None = None,
    sequences: Sequence[str] = SEQUENCES,
    reference_order: Sequence[str] = ("t1", "t1c", "t2", "flair"),
) -> Study:
    """Name each volume's sequence (``mapping`` first, then :func:`guess_sequence`) and
    resample all onto the reference sequence's grid. ``mapping`` keys are series names,
    ``series#part``, or the input ``names`` (file names, one per volume). Volumes of no
    known sequence are left out (their decision says why); two volumes of one sequence, or
    none at all, are an error."""
    mapping = {k: v.lower() for k, v in (mapping or {}).items()}
    for ref, want in mapping.items():
        if want not in sequences:
            raise InputError(
                f"sequence mapping {ref!r} → {want!r}: expected one of {', '.join(sequences)}."
            )
    chosen: dict[str, Volume] = {}
    decisions = []
    for i, v in enumerate(volumes):
        name = _name(v)
        keys = [name, v.meta.series, *([names[i]] if names else [])]
        given = [mapping[k] for k in keys if k in mapping]
        seq, why = (
            (given[0], "given in the request's sequence mapping") if given else guess_sequence(v)
        )
        decisions.append(Decision(name, seq, why))
        if seq is None:
            continue
        if seq in chosen:
            raise InputError(
                f"two volumes were taken as {seq} ({_name(chosen[seq])} and {name}); name "
                "each series' sequence in the request's mapping."
            )
        chosen[seq] = v
    if not chosen:
        listing = "; ".join(f"{d.volume}: {d.reason}" for d in decisions)
        raise InputError(
            f"no volume could be named T1, T1c, T2 or FLAIR ({listing}); pass a sequence "
            'mapping such as {"<series>": "t1"}.'
        )
    ref = next(s for s in [*reference_order, *chosen] if s in chosen)
    target = chosen[ref]
    out = {s: (v if s == ref else resample_onto(v, target)) for s, v in chosen.items()}
    order = {s: i for i, s in enumerate(sequences)}
    return Study(dict(sorted(out.items(), key=lambda kv: order[kv[0]])), ref, decisions)


def _to_sitk(v: Volume) -> Any:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(v.voxels, dtype=np.float32))
    g = v.geometry
    img.SetSpacing(tuple(float(x) for x in g.spacing))
    img.SetOrigin(tuple(float(x) for x in g.origin))
    img.SetDirection(tuple(float(x) for x in g.direction_matrix.ravel()))
    return img


def resample_onto(moving: Volume, reference: Volume) -> Volume:
    """``moving`` resampled (linear) onto ``reference``'s grid, in patient coordinates.

    Both must share a frame of reference where the headers record one; otherwise their
    coordinates need not describe the same place, and this is an error."""
    import SimpleITK as sitk

    a = moving.meta.acquisition.get("frame_of_reference")
    b = reference.meta.acquisition.get("frame_of_reference")
    if a is not None and b is not None and a != b:
        raise InputError(
            f"series {_name(moving)} is in another frame of reference than {_name(reference)}; "
            "their coordinates cannot be matched without registration. Register the series "
            "first or send them from one acquisition."
        )
    if moving.voxels.ndim != 3 or reference.voxels.ndim != 3:
        raise InputError("multi-sequence resampling takes grey-scale volumes only.")
    same_grid = moving.shape == reference.shape and np.allclose(
        moving.geometry.positions, reference.geometry.positions, atol=1e-3
    )
    if same_grid and np.allclose(
        moving.geometry.direction_matrix, reference.geometry.direction_matrix, atol=1e-6
    ):
        return moving
    ref_img = _to_sitk(reference)
    out = sitk.Resample(_to_sitk(moving), ref_img, sitk.Transform(), sitk.sitkLinear, 0.0)
    voxels = np.asarray(sitk.GetArrayFromImage(out), dtype=np.float32)  # a copy already
    g = reference.geometry
    geometry = Geometry(g.spacing, g.origin, g.direction, g.positions.copy())
    return Volume(voxels=voxels, geometry=geometry, meta=moving.meta)
