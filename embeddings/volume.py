"""The ``Volume``: voxels plus geometry plus non-identifying metadata.

A ``Volume`` is what ingest hands to preprocessing. Its voxel array is always laid out
``(slice, row, column)`` (plus a trailing channel axis for colour images) in radcache's
canonical orientation (see :mod:`radcache.embeddings.geometry`), so the same anatomy
delivered as a DICOM series or as a NIfTI file yields the same array.

It has no field for patient name, patient ID, birth date, accession number or
institution: identity is reduced to keyed pseudonyms (:mod:`radcache.embeddings.pseudonyms`)
before a ``Volume`` is built. Header free text is not kept either: body part only as a
defined term, the series description only where a deployment keeps descriptions, and then
cleaned of the file's identifying values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import xxhash

from .geometry import canonicalize

__all__ = ["Geometry", "Volume", "VolumeMeta"]

SourceFormat = Literal["dicom", "nifti", "itk"]


@dataclass(frozen=True)
class Geometry:
    """Where the voxels are, in DICOM patient coordinates (LPS, millimetres).

    ``direction`` is a 3×3 matrix whose columns are the unit vectors of the column
    (``i``), row (``j``) and slice (``k``) axes; ``spacing`` is ``(i, j, k)``;
    ``origin`` is the centre of voxel ``[0, 0, 0]``; ``positions`` holds the measured
    position of each slice's first voxel (``n_slices × 3``), which differs from
    ``origin + k·spacing·normal`` when slices are irregularly spaced or tilted.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    positions: np.ndarray = field(repr=False, compare=False)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": [list(r) for r in self.direction],
        }


@dataclass(frozen=True)
class VolumeMeta:
    """Non-identifying description of a volume and where it came from.

    ``study``/``series``/``patient`` are keyed pseudonyms (or the original UIDs
    where a deployment keeps them); ``part`` names the split of a series into
    several volumes (``"echo=2"``, ``"t=3"``), empty when the series is one volume.
    ``body_part`` is a Body Part Examined defined term or ``OTHER``;
    ``series_description`` is None unless the deployment keeps descriptions (then it is
    cleaned of names, IDs, dates and institution); ``sequence_hint`` is the MR sequence
    type (``t1``, ``t1c``, ``t2``, ``flair``) the description names, which is kept in its
    stead.
    """

    source_format: SourceFormat
    study: str
    series: str
    part: str = ""
    patient: str | None = None
    modality: str | None = None
    body_part: str | None = None
    manufacturer_model: str | None = None
    series_description: str | None = None
    sequence_hint: str | None = None
    photometric: str = "MONOCHROME2"
    intensity: str = "raw"
    window: tuple[float, float] | None = None
    warnings: tuple[str, ...] = ()
    n_files: int = 1
    #: MR acquisition parameters (repetition/echo/inversion time in ms, contrast agent
    #: given, scanning sequence) and a pseudonym of the frame of reference, where known.
    acquisition: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["warnings"] = list(self.warnings)
        d["window"] = list(self.window) if self.window else None
        return d


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels ``(n_slices, rows, cols[, 3])`` as float32, with geometry and metadata."""

    voxels: np.ndarray
    geometry: Geometry
    meta: VolumeMeta

    def __post_init__(self) -> None:
        if self.voxels.ndim not in (3, 4):
            raise ValueError(f"voxels must be 3-D or 4-D (colour), got shape {self.voxels.shape}")
        if self.geometry.positions.shape != (self.voxels.shape[0], 3):
            raise ValueError(
                f"positions shape {self.geometry.positions.shape} does not match "
                f"{self.voxels.shape[0]} slices"
            )

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        dirs: np.ndarray,
        spacing: np.ndarray,
        origin: np.ndarray,
        meta: VolumeMeta,
        *,
        positions: np.ndarray | None = None,
        slice_axis: int = 0,
        owned: bool = False,
    ) -> Volume:
        """Build a canonical volume from any array and its per-axis directions.

        ``dirs[a]``/``spacing[a]`` describe array axis ``a`` (LPS, mm), ``origin`` is voxel
        ``[0, 0, 0]``; ``slice_axis`` is the array axis to slice along. The voxels are
        converted to float32 and rearranged a slice at a time; ``owned``: the caller hands
        ``array`` over, and a float32 array is rearranged within itself where it can be.
        """
        vox, d, sp, org, pos = canonicalize(
            array,
            dirs,
            spacing,
            origin,
            slice_axis=slice_axis,
            positions=positions,
            dtype=np.float32,
            in_place=owned,
        )
        geometry = Geometry(
            spacing=(float(sp[2]), float(sp[1]), float(sp[0])),
            origin=(float(org[0]), float(org[1]), float(org[2])),
            direction=tuple((float(d[2][r]), float(d[1][r]), float(d[0][r])) for r in range(3)),
            positions=pos,
        )
        return cls(voxels=np.asarray(vox, dtype=np.float32), geometry=geometry, meta=meta)

    def axis_dirs(self) -> tuple[np.ndarray, np.ndarray]:
        """Direction rows and spacings of the array axes (slice, row, column)."""
        d = self.geometry.direction_matrix
        sp = self.geometry.spacing
        return np.stack([d[:, 2], d[:, 1], d[:, 0]]), np.asarray([sp[2], sp[1], sp[0]])

    @property
    def n_slices(self) -> int:
        return int(self.voxels.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.voxels.shape)

    def content_hash(self) -> str:
        """Hash of decoded voxels and geometry: equal for equal images, whatever the file format."""
        if "_content_hash" in self.__dict__:  # computed once per volume (frozen: no setattr)
            return str(self.__dict__["_content_hash"])
        h = xxhash.xxh3_128()
        vox = np.ascontiguousarray(self.voxels, dtype=np.float32)
        h.update(repr(vox.shape).encode())
        h.update(vox.data)  # the buffer itself, no copy
        g = self.geometry
        geo = np.concatenate(
            [
                np.asarray(g.spacing, dtype=np.float64),
                np.asarray(g.origin, dtype=np.float64),
                g.direction_matrix.ravel(),
                g.positions.ravel(),
            ]
        )
        # Round so that float noise from different file formats hashes alike (µm precision).
        h.update((np.round(geo, 3) + 0.0).tobytes())  # + 0.0 folds -0.0 into 0.0
        h.update(self.meta.photometric.encode())
        self.__dict__["_content_hash"] = h.hexdigest()
        return str(self.__dict__["_content_hash"])
