"""Preprocessing recipes: data that says how a volume becomes model input.

A :class:`Recipe` may leave choices to defaults (``intensity="auto"``, ``size=None``);
:meth:`Recipe.resolve` fills them in for a modality and a model, and the resolved recipe
is what is hashed and stored with every embedding, so a cache hit always means the same
preprocessing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RecipeError
from .models import ModelCfg

__all__ = [
    "CTWindows",
    "Intensity",
    "MinMax",
    "Percentile",
    "Recipe",
    "Resize",
    "SliceSelection",
    "VoiMinMax",
    "load_recipe",
]

XRAY_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RG", "XA", "RF"})
#: Named CT windows (centre, width) in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft-tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CTWindows(_Frozen):
    """HU windows: one replicated to three channels, or three as R, G, B."""

    kind: Literal["ct-windows"] = "ct-windows"
    windows: tuple[tuple[float, float], ...] = (CT_WINDOWS["soft-tissue"],)

    @model_validator(mode="after")
    def _check(self) -> CTWindows:
        if len(self.windows) not in (1, 3):
            raise ValueError(f"expected 1 or 3 windows, got {len(self.windows)}")
        if any(w <= 0 for _, w in self.windows):
            raise ValueError("window widths must be positive")
        return self


class Percentile(_Frozen):
    """Clip to percentiles of the volume's foreground (voxels above its minimum), then scale."""

    kind: Literal["percentile"] = "percentile"
    low: float = Field(0.5, ge=0, lt=100)
    high: float = Field(99.5, gt=0, le=100)
    foreground: bool = True

    @model_validator(mode="after")
    def _check(self) -> Percentile:
        if self.low >= self.high:
            raise ValueError(f"low percentile {self.low} must be below high {self.high}")
        return self


class VoiMinMax(_Frozen):
    """X-ray: the image's VOI LUT/window (applied at ingest), then per-slice min–max."""

    kind: Literal["voi-minmax"] = "voi-minmax"


class MinMax(_Frozen):
    """Per-slice min–max scaling (for images already in display range, e.g. RGB)."""

    kind: Literal["minmax"] = "minmax"


Intensity = Annotated[CTWindows | Percentile | VoiMinMax | MinMax, Field(discriminator="kind")]


class SliceSelection(_Frozen):
    """Which slices to embed: all, every ``step``-th, or ``count`` evenly spaced."""

    mode: Literal["all", "stride", "count"] = "all"
    step: int = Field(1, ge=1)
    count: int = Field(1, ge=1)


class Resize(_Frozen):
    """``pad``: keep the physical aspect ratio, pad to a square; ``stretch``: fill the square;
    ``native``: the model card's resize-shorter-side-then-centre-crop."""

    mode: Literal["pad", "stretch", "native"] = "pad"
    size: int | None = Field(
        None, ge=14, le=4096, description="input side in pixels; None = the model's"
    )


class Recipe(_Frozen):
    """How a volume becomes model input (see module docstring)."""

    version: Literal[1] = 1
    slice_axis: Literal["acquisition", "axial", "coronal", "sagittal"] = "acquisition"
    slices: SliceSelection = SliceSelection()
    intensity: Intensity | Literal["auto"] = "auto"
    resize: Resize = Resize()
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def resolve(
        self, modality: str | None, model: ModelCfg, *, photometric: str = "MONOCHROME2"
    ) -> Recipe:
        """Fill defaults for ``modality`` and ``model``; checks the size against the patch size."""
        intensity = self.intensity
        if intensity == "auto" and model.multi_sequence:  # MM-DINOv2's per-volume scaling
            intensity = Percentile(low=1.0, high=99.0)
        elif intensity == "auto":
            intensity = default_intensity(modality, photometric)
        size = self.resize.size or model.image_size
        if size % model.patch_size:
            raise RecipeError(
                f"resize size {size} is not a multiple of the model's patch size "
                f"{model.patch_size}; use {size - size % model.patch_size} or "
                f"{size - size % model.patch_size + model.patch_size}."
            )
        return self.model_copy(
            update={
                "intensity": intensity,
                "resize": Resize(mode=self.resize.mode, size=size),
                "mean": self.mean or model.mean,
                "std": self.std or model.std,
            }
        )

    @property
    def is_resolved(self) -> bool:
        return self.intensity != "auto" and self.resize.size is not None and self.mean is not None

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """Stable 16-hex-digit hash of the (resolved) recipe."""
        if not self.is_resolved:
            raise RecipeError("hash a resolved recipe: call recipe.resolve(modality, model) first.")
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


def default_intensity(
    modality: str | None, photometric: str = "MONOCHROME2"
) -> CTWindows | Percentile | VoiMinMax | MinMax:
    """Per-modality default: CT soft-tissue window, X-ray VOI + min–max, others percentiles."""
    m = (modality or "").upper()
    if photometric.upper() in ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"):
        return MinMax()
    if m == "CT":
        return CTWindows()
    if m in XRAY_MODALITIES:
        return VoiMinMax()
    return Percentile()


def load_recipe(source: str | Path | dict[str, Any] | None) -> Recipe:
    """A recipe from a JSON/YAML file, a dict, or ``None`` for the defaults."""
    if source is None:
        return Recipe()
    try:
        if isinstance(source, dict):
            return Recipe.model_validate(source)
        path = Path(source)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return Recipe.model_validate(yaml.safe_load(text))
        return Recipe.model_validate_json(text)
    except ValidationError as exc:
        raise RecipeError(
            f"invalid recipe {source}: {exc.errors()[0]['msg']} at "
            f"{'.'.join(str(p) for p in exc.errors()[0]['loc'])}"
        ) from exc
    except OSError as exc:
        raise RecipeError(f"recipe file {source} could not be read ({exc.strerror}).") from exc
