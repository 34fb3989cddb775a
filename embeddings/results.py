"""What embedding produces and records: per-volume results (with the warning for a
volume sent without a modality), a submission's report, and the attributes an entry is
stored with.

Shared by :mod:`.pipeline` (one volume at a time) and :mod:`.multiseq` (one study of
several sequences), which both import it; it imports neither.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from ._version import __version__
from .encode import Encoder
from .errors import RadcacheError
from .models import ModelCfg
from .recipe import Recipe
from .store import EntryInfo, space_id
from .volume import Volume, VolumeMeta

__all__ = [
    "EmbedReport",
    "Progress",
    "SeriesResult",
    "Transient",
    "entry_attrs",
    "series_result",
    "unknown_modality",
]


class Progress(Protocol):
    """Where the pipeline reports progress (a terminal bar, a job record…)."""

    def total(self, slices: int) -> None: ...
    def advance(self, slices: int) -> None: ...


@dataclass
class SeriesResult:
    """What happened to one volume."""

    study: str
    series: str
    part: str
    entry: str
    modality: str | None
    slices: int
    cache: Literal["hit", "miss"]
    seconds: float
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "series": self.series,
            "part": self.part,
            "entry": self.entry,
            "modality": self.modality,
            "slices": self.slices,
            "cache": self.cache,
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
        }


@dataclass
class EmbedReport:
    series: list[SeriesResult] = field(default_factory=list)
    errors: list[RadcacheError] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "series": [s.to_dict() for s in self.series],
            "errors": [e.to_dict() for e in self.errors],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


@dataclass
class Transient:
    """A volume embedded for a query and not stored: its space, vectors and metadata."""

    key: str
    space: str
    meta: dict[str, Any]  # the volume's non-identifying metadata (pseudonyms included)
    pooled: np.ndarray  # (D,)
    cls: np.ndarray  # (n, D)


def series_result(
    info: EntryInfo,
    cache: Literal["hit", "miss"],
    t0: float,
    warnings: tuple[str, ...],
    refs: dict[str, str],
) -> SeriesResult:
    """The outcome, named by the references this submission used (maybe an alias)."""
    return SeriesResult(
        study=refs["study"],
        series=refs["series"],
        part=refs["part"],
        entry=info.key,
        modality=info.modality,
        slices=info.n_slices,
        cache=cache,
        seconds=time.perf_counter() - t0,
        warnings=warnings,
    )


def entry_attrs(
    enc: Encoder,
    volume: Volume,
    sliced: Volume,
    recipe: Recipe,
    grid: tuple[int, int],
    n: int,
    cls_last_n: int,
    *,
    tenant: str,
    patch_storage: str = "none",
) -> dict[str, Any]:
    """The attributes an entry is stored with: the volume's non-identifying metadata, its
    geometry as embedded, the model, recipe and precision, the form its patch grids are
    kept in, the space it belongs to and the tenant that owns it."""
    cfg = enc.cfg
    return {
        "tenant": tenant,
        "volume": volume.meta.to_dict(),
        "geometry": {**sliced.geometry.to_dict(), "shape": list(sliced.shape)},
        "content_hash": volume.content_hash(),
        "n_slices": n,
        "volume_slices": sliced.n_slices,
        "model": {
            "name": cfg.name,
            "label": cfg.label,
            "hf_id": cfg.hf_id,
            "arch": cfg.arch,
            "dim": cfg.dim,
            "patch_size": cfg.patch_size,
            "image_size": cfg.image_size,
            "num_registers": cfg.num_registers,
            "random_weights": cfg.random_weights,
            "weights_hash": enc.weights_hash,
        },
        "recipe": recipe.model_dump(mode="json"),
        "recipe_hash": recipe.hash(),
        "precision": enc.precision,
        "device": enc.device.type,
        "grid": list(grid),
        "cls_last_n": cls_last_n,
        "patch_storage": patch_storage,
        "pooled": "mean of slice CLS tokens",
        "space": space_id(cfg.name, enc.weights_hash, recipe.space_hash()),
        "radcache_version": __version__,
    }


def unknown_modality(meta: VolumeMeta, recipe: Recipe, model: ModelCfg) -> str:
    """The warning for a volume without a modality (NIfTI, NRRD and MetaImage carry
    none): stored without one, and the intensity ``recipe`` then gives it (its default
    for an unknown modality) against what a CT would get."""
    kind = {"nifti": "NIfTI", "itk": "NRRD/MetaImage"}.get(meta.source_format, "these")

    def policy(modality: str | None) -> str:
        p = recipe.resolve(modality, model, photometric=meta.photometric).intensity
        assert not isinstance(p, str)  # resolved: never "auto"
        values = p.model_dump(mode="json", exclude={"kind"})
        return " ".join([p.kind, *(f"{k}={json.dumps(v)}" for k, v in values.items())])

    unknown, ct = policy(None), policy("CT")
    return (
        f"no modality given ({kind} files carry none): stored with modality unknown, which "
        "modality filters do not match, and preprocessed with the recipe's intensity for an "
        f"unknown modality: {unknown}"
        + (f" (a CT gets {ct})" if ct != unknown else "")
        + ". Name it with --modality (a submission's modality option), e.g. CT or MR."
    )
