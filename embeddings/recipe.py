"""Preprocessing recipes: data that says how a volume becomes model input.

A :class:`Recipe` may leave choices to defaults (``intensity="auto"``, ``size=None``);
:meth:`Recipe.resolve` fills them in for a modality and a model, and the resolved recipe
is what is hashed and stored with every embedding, so a cache hit always means the same
preprocessing. Fields added after the first hashes were stored are left out of the dump
while at their defaults, so a recipe that does not use them keeps its hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import RecipeError
from .models import ModelCfg

__all__ = [
    "CTWindows",
    "Clip",
    "Intensity",
    "MinMax",
    "Percentile",
    "Recipe",
    "Resize",
    "Roi",
    "SlicePercentile",
    "SliceSelection",
    "VoiMinMax",
    "load_recipe",
    "load_roi",
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
    #: Fields added after hashes were first stored: dumped only when not at their default.
    _LATER: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name in self._LATER:
            if getattr(self, name) == type(self).model_fields[name].default:
                out.pop(name, None)
        return out


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


class Clip(_Frozen):
    """Clip to a fixed range in the image's own units (HU for CT), without scaling: the
    recipe's ``rescale="minmax"`` (which it needs) brings the values to [0, 1] after the
    resize. Baharoon et al.'s CT input (``torch.clamp(image, -1024, 600)``)."""

    kind: Literal["clip"] = "clip"
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _check(self) -> Clip:
        if self.low is None and self.high is None:
            raise ValueError("a clip needs low, high or both")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"clip low {self.low} must be below high {self.high}")
        return self


class SlicePercentile(_Frozen):
    """Per slice: clip to the slice's own ``low``/``high`` percentiles (all its pixels,
    linear interpolation as numpy's). ``below="zero"`` sets the values at or below the
    low percentile to 0 instead of raising them to it; ``scale`` maps [low, high] to
    [0, 1] (MONAI's ``ScaleIntensityRangePercentiles(clip=True)``). Unscaled, the recipe's
    ``rescale="minmax"`` brings the values to [0, 1] after the resize."""

    kind: Literal["slice-percentile"] = "slice-percentile"
    low: float = Field(5.0, ge=0, lt=100)
    high: float = Field(95.0, gt=0, le=100)
    below: Literal["clip", "zero"] = "clip"
    scale: bool = False

    @model_validator(mode="after")
    def _check(self) -> SlicePercentile:
        if self.low >= self.high:
            raise ValueError(f"low percentile {self.low} must be below high {self.high}")
        if self.scale and self.below == "zero":
            raise ValueError('below="zero" keeps the image\'s units; it cannot also scale')
        return self


Intensity = Annotated[
    CTWindows | Percentile | VoiMinMax | MinMax | Clip | SlicePercentile,
    Field(discriminator="kind"),
]


class SliceSelection(_Frozen):
    """Which slices to embed: all, every ``step``-th, or ``count`` evenly spaced."""

    mode: Literal["all", "stride", "count"] = "all"
    step: int = Field(1, ge=1)
    count: int = Field(1, ge=1)


class Resize(_Frozen):
    """``pad``: keep the physical aspect ratio, pad to a square; ``stretch``: fill the square
    (with ``stretch_to``: stretch to that side, then centre-crop to ``size``, as
    torchvision's ``Resize((s, s))`` and ``CenterCrop``); ``native``: the model card's
    resize-shorter-side-then-centre-crop. ``interp`` (None: bicubic for ``native``, else
    bilinear) and ``antialias`` choose the resampling."""

    _LATER = ("interp", "antialias", "stretch_to")

    mode: Literal["pad", "stretch", "native"] = "pad"
    size: int | None = Field(
        None, ge=14, le=4096, description="input side in pixels; None = the model's"
    )
    interp: Literal["bilinear", "bicubic"] | None = None
    antialias: bool = True
    stretch_to: int | None = Field(None, ge=14, le=4096)

    @model_validator(mode="after")
    def _check(self) -> Resize:
        if self.stretch_to is not None and self.mode != "stretch":
            raise ValueError(f"stretch_to needs mode 'stretch', not {self.mode!r}")
        if self.stretch_to is not None and self.size is not None and self.stretch_to < self.size:
            raise ValueError(f"stretch_to {self.stretch_to} must be at least size {self.size}")
        return self

    @property
    def interpolation(self) -> str:
        """The resampling mode in effect."""
        return self.interp or ("bicubic" if self.mode == "native" else "bilinear")


class Roi(_Frozen):
    """A box cut from the volume (as the recipe slices it) before anything else, so the
    intensity statistics are the box's. ``voxels``: ``(z0, z1, y0, y1, x0, x1)``, slice, row
    and column indices, half-open; ``mm``: ``(l0, l1, p0, p1, s0, s1)`` in patient
    coordinates (LPS, millimetres): the voxels whose centres lie in the box."""

    voxels: tuple[int, int, int, int, int, int] | None = None
    mm: tuple[float, float, float, float, float, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> Roi:
        if (self.voxels is None) == (self.mm is None):
            raise ValueError("an roi is given by exactly one of voxels or mm")
        box = self.voxels if self.voxels is not None else self.mm
        assert box is not None
        if self.voxels is not None and min(self.voxels) < 0:
            raise ValueError(f"roi voxel indices must not be negative, got {self.voxels}")
        if any(box[i] >= box[i + 1] for i in (0, 2, 4)):
            raise ValueError(f"each roi range must run from low to high, got {box}")
        return self


class Recipe(_Frozen):
    """How a volume becomes model input (see module docstring).

    ``per_modality`` says what ``intensity="auto"`` becomes for each modality (``"*"``: any
    other; colour images always take min–max); ``rescale="minmax"`` scales each channel
    of the resized, cropped slice to [0, 1] before ``mean``/``std``; ``normalize="nonzero"``
    leaves pixels that are exactly 0 at 0 (MONAI's ``NormalizeIntensity(nonzero=True)``);
    ``roi`` cuts a box out of every volume first.
    """

    _LATER = ("per_modality", "rescale", "normalize", "roi")

    version: Literal[1] = 1
    slice_axis: Literal["acquisition", "axial", "coronal", "sagittal"] = "acquisition"
    slices: SliceSelection = SliceSelection()
    intensity: Intensity | Literal["auto"] = "auto"
    resize: Resize = Resize()
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    per_modality: dict[str, Intensity] | None = None
    rescale: Literal["none", "minmax"] = "none"
    normalize: Literal["all", "nonzero"] = "all"
    roi: Roi | None = None

    @field_validator("per_modality")
    @classmethod
    def _modalities(cls, v: dict[str, Intensity] | None) -> dict[str, Intensity] | None:
        return {k.upper(): p for k, p in v.items()} if v else None

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        policies = [*(self.per_modality or {}).values(), self.intensity]
        for policy in policies:
            _check_scaling(policy, self.rescale)
        return self

    def resolve(
        self, modality: str | None, model: ModelCfg, *, photometric: str = "MONOCHROME2"
    ) -> Recipe:
        """Fill defaults for ``modality`` and ``model``; checks the size against the patch size."""
        intensity = self.intensity
        colour = photometric.upper() in _COLOUR
        if intensity == "auto" and self.per_modality and not colour:
            m = (modality or "").upper()
            intensity = self.per_modality.get(m) or self.per_modality.get("*") or "auto"
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
        if (self.resize.stretch_to or size) < size:
            raise RecipeError(
                f"resize stretch_to {self.resize.stretch_to} is below the input size {size}; "
                "the centre crop needs the stretched slice at least as large."
            )
        return self.model_copy(
            update={
                "intensity": intensity,
                "per_modality": None,  # resolved: the hash is the preprocessing's alone
                "resize": self.resize.model_copy(update={"size": size}),
                "mean": self.mean or model.mean,
                "std": self.std or model.std,
            }
        )

    def with_roi(self, roi: Roi | None) -> Recipe:
        """This recipe, cutting every volume to ``roi`` first (itself for None)."""
        return self if roi is None else self.model_copy(update={"roi": roi})

    @property
    def is_resolved(self) -> bool:
        return self.intensity != "auto" and self.resize.size is not None and self.mean is not None

    def __hash__(self) -> int:  # per_modality is a dict: hash the canonical form instead
        return hash(self.canonical_json())

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """Stable 16-hex-digit hash of the (resolved) recipe."""
        if not self.is_resolved:
            raise RecipeError("hash a resolved recipe: call recipe.resolve(modality, model) first.")
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def space_hash(self) -> str:
        """The hash that names the recipe's space: :meth:`hash` without the region of
        interest, so volumes cut to different boxes (a tumour per study) are compared and
        probed together, while each box keeps its own cache key."""
        return self.model_copy(update={"roi": None}).hash()


_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"})


def _check_scaling(policy: object, rescale: str) -> None:
    """An intensity policy that keeps the image's units needs the post-resize min–max."""
    unscaled = isinstance(policy, Clip) or (
        isinstance(policy, SlicePercentile) and not policy.scale
    )
    if unscaled and rescale != "minmax":
        kind = policy.kind  # type: ignore[attr-defined]
        raise ValueError(
            f"intensity {kind!r} keeps the image's units; it needs rescale 'minmax' to bring "
            "the resized slice to [0, 1]"
        )


def default_intensity(
    modality: str | None, photometric: str = "MONOCHROME2"
) -> CTWindows | Percentile | VoiMinMax | MinMax:
    """Per-modality default: CT soft-tissue window, X-ray VOI + min–max, others percentiles."""
    m = (modality or "").upper()
    if photometric.upper() in _COLOUR:
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
        raise _invalid("recipe", source, exc) from exc
    except OSError as exc:
        raise RecipeError(f"recipe file {source} could not be read ({exc.strerror}).") from exc


def load_roi(source: str | dict[str, Any]) -> Roi:
    """A region of interest from JSON text or a dict: ``{"voxels": [z0, z1, y0, y1, x0, x1]}``
    or ``{"mm": [l0, l1, p0, p1, s0, s1]}`` (see :class:`Roi`)."""
    try:
        if isinstance(source, dict):
            return Roi.model_validate(source)
        return Roi.model_validate_json(source)
    except ValidationError as exc:
        expected = '{"voxels": [z0, z1, y0, y1, x0, x1]} or {"mm": [l0, l1, p0, p1, s0, s1]}'
        raise _invalid("roi", source, exc, f"; expected {expected}") from exc


def _invalid(what: str, source: object, exc: ValidationError, hint: str = "") -> RecipeError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    at = f" at {where}" if where else ""
    return RecipeError(f"invalid {what} {source}: {first['msg']}{at}{hint}")
