"""Preprocess: a resolved :class:`Recipe` turns a :class:`Volume` into model-ready tensors.

Entry point :func:`prepare`. Volume-level work (reslicing, slice selection, intensity
statistics) happens once; :meth:`Prepared.batch` then turns any run of slices into a
``(n, 3, S, S)`` float tensor with torch ops over the whole batch — no per-slice PIL
round trips — so the encoder can pull batches as it goes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import RecipeError
from .geometry import PLANE_NORMAL_AXIS, nearest_axes
from .models import ModelCfg
from .recipe import CTWindows, MinMax, Percentile, Recipe, Resize, SliceSelection, VoiMinMax
from .volume import Volume

__all__ = ["Placement", "Prepared", "placement", "prepare", "reslice", "select_slices"]

_PERCENTILE_SAMPLE = 1 << 22


def reslice(volume: Volume, axis: str) -> Volume:
    """The volume re-cut along ``axis`` (``acquisition`` or a plane name); no interpolation."""
    if axis == "acquisition":
        return volume
    dirs, spacing = volume.axis_dirs()
    lps = nearest_axes(dirs)
    target = PLANE_NORMAL_AXIS[axis]
    slice_axis = lps.index(target)
    if slice_axis == 0:
        return volume
    return Volume.from_array(
        volume.voxels,
        dirs,
        spacing,
        np.asarray(volume.geometry.origin),
        volume.meta,
        slice_axis=slice_axis,
    )


def select_slices(n: int, sel: SliceSelection) -> np.ndarray:
    """Indices of the slices a selection keeps, in ascending order."""
    if sel.mode == "all" or n == 0:
        return np.arange(n)
    if sel.mode == "stride":
        return np.arange(0, n, sel.step)
    count = min(sel.count, n)
    return np.unique(np.round(np.linspace(0, n - 1, count)).astype(np.int64))


def _percentiles(vox: np.ndarray, policy: Percentile) -> tuple[float, float]:
    flat = vox.reshape(-1)
    stride = max(1, math.ceil(flat.size / _PERCENTILE_SAMPLE))
    sample = flat[::stride]
    if policy.foreground:
        fg = sample[sample > sample.min()]
        if fg.size:
            sample = fg
    lo, hi = np.percentile(sample, [policy.low, policy.high])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Placement:
    """Where a ``rows × cols`` slice lands on the ``size × size`` model input (the canvas).

    The slice is resized to ``nr × nc`` and put at ``(top, left)``; a negative offset means
    the canvas is a crop of the resized slice (``native`` mode), a positive one padding
    (``pad`` mode). :meth:`to_canvas` is the image's (and a mask's) way in, :meth:`from_canvas`
    the way back for anything predicted on the canvas.
    """

    mode: str
    size: int
    rows: int
    cols: int
    nr: int
    nc: int
    top: int
    left: int

    def to_canvas(self, x: torch.Tensor, *, interp: str | None = None) -> torch.Tensor:
        """(n, C, rows, cols) → (n, C, size, size); ``interp`` overrides the recipe's."""
        interp = interp or ("bicubic" if self.mode == "native" else "bilinear")
        if self.mode != "pad" or (self.nr, self.nc) != tuple(x.shape[-2:]):
            aa = {"antialias": True, "align_corners": False} if interp != "nearest" else {}
            x = F.interpolate(x, size=(self.nr, self.nc), mode=interp, **aa)
        if self.top < 0 or self.left < 0:
            t, lf = -self.top, -self.left
            return x[..., t : t + self.size, lf : lf + self.size]
        pads = (
            self.left,
            self.size - self.nc - self.left,
            self.top,
            self.size - self.nr - self.top,
        )
        return F.pad(x, pads, value=0.0) if any(pads) else x

    def from_canvas(self, y: torch.Tensor) -> torch.Tensor:
        """(n, C, size, size) → (n, C, rows, cols), bilinear; parts of the slice that a
        ``native`` crop cut away take the nearest canvas value."""
        if self.top < 0 or self.left < 0:
            t, lf = -self.top, -self.left
            pads = (lf, self.nc - self.size - lf, t, self.nr - self.size - t)
            y = F.pad(y, pads, mode="replicate")
        else:
            y = y[..., self.top : self.top + self.nr, self.left : self.left + self.nc]
        return F.interpolate(y, size=(self.rows, self.cols), mode="bilinear", align_corners=False)

    def valid(self) -> torch.Tensor:
        """(size, size) bool: canvas pixels that show the slice (not padding)."""
        out = torch.zeros(self.size, self.size, dtype=torch.bool)
        top, left = max(self.top, 0), max(self.left, 0)
        out[top : top + min(self.nr, self.size), left : left + min(self.nc, self.size)] = True
        return out


def placement(resize: Resize, rows: int, cols: int, spacing: tuple[float, ...]) -> Placement:
    """The :class:`Placement` of a resolved ``resize`` for a slice of ``rows × cols`` pixels
    with ``spacing`` (column, row) in mm."""
    size = resize.size
    assert size is not None
    mode = resize.mode
    if mode == "stretch":
        return Placement(mode, size, rows, cols, size, size, 0, 0)
    if mode == "native":  # resize shorter side to size·256/224, bicubic, centre crop
        scale = round(size * 256 / 224) / min(rows, cols)
        nr, nc = max(size, round(rows * scale)), max(size, round(cols * scale))
        return Placement(mode, size, rows, cols, nr, nc, -((nr - size) // 2), -((nc - size) // 2))
    # pad: keep the physical aspect ratio
    h_mm, w_mm = rows * spacing[1], cols * spacing[0]
    scale = size / max(h_mm, w_mm)
    nr, nc = max(1, round(h_mm * scale)), max(1, round(w_mm * scale))
    return Placement(mode, size, rows, cols, nr, nc, (size - nr) // 2, (size - nc) // 2)


@dataclass
class Prepared:
    """A volume made ready for the encoder; pull tensors with :meth:`batch`."""

    volume: Volume  # resliced if the recipe asked for another axis
    recipe: Recipe  # resolved
    indices: np.ndarray  # which slices of ``volume`` are embedded
    grid: tuple[int, int]
    _range: tuple[float, float] | None

    @property
    def n(self) -> int:
        return int(self.indices.size)

    @property
    def positions(self) -> np.ndarray:
        return np.asarray(self.volume.geometry.positions[self.indices])

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        """(n, r, c[, 3]) raw → (n, C, r, c) in [0, 1]. Each window is one new tensor
        written in place (a full-resolution batch is tens of MB)."""
        policy = self.recipe.intensity
        if x.ndim == 4:  # colour
            x = x.permute(0, 3, 1, 2)
        else:
            x = x.unsqueeze(1)
        if isinstance(policy, CTWindows):
            chans = [torch.sub(x, c - w / 2).div_(w).clamp_(0, 1) for c, w in policy.windows]
            return chans[0] if len(chans) == 1 else torch.cat(chans, dim=1)
        if isinstance(policy, Percentile):
            assert self._range is not None
            lo, hi = self._range
            return torch.sub(x, lo).div_(max(hi - lo, 1e-6)).clamp_(0, 1)
        if isinstance(policy, VoiMinMax | MinMax):
            flat = x.reshape(x.shape[0], -1)
            mins = flat.amin(dim=1).view(-1, 1, 1, 1)
            maxs = flat.amax(dim=1).view(-1, 1, 1, 1)
            return torch.sub(x, mins).div_((maxs - mins).clamp_min(1e-6))
        raise RecipeError(f"unresolved intensity policy {policy!r}")

    def placement(self) -> Placement:
        """Where this volume's slices land on the model's input canvas."""
        r, c = self.volume.shape[1:3]
        return placement(self.recipe.resize, r, c, self.volume.geometry.spacing[:2])

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Model input for embedded slices ``start:stop``: ``(n, 3, S, S)`` float32."""
        idx = self.indices[start:stop]
        vox = self.volume.voxels
        sel = vox[idx[0] : idx[-1] + 1] if np.all(np.diff(idx) == 1) else vox[idx]
        x = torch.from_numpy(np.ascontiguousarray(sel))
        x = self._intensity(x)
        x = self.placement().to_canvas(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.recipe.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.recipe.std, dtype=x.dtype).view(1, 3, 1, 1)
        return torch.sub(x, mean).div_(std)  # a new (n, 3, S, S) tensor, contiguous

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, self.n, batch_size):
            yield self.batch(start, min(start + batch_size, self.n))


def prepare(volume: Volume, recipe: Recipe, model: ModelCfg) -> Prepared:
    """Resolve ``recipe`` for the volume and model, reslice, select slices, gather statistics."""
    if not recipe.is_resolved:
        recipe = recipe.resolve(volume.meta.modality, model, photometric=volume.meta.photometric)
    vol = reslice(volume, recipe.slice_axis)
    indices = select_slices(vol.n_slices, recipe.slices)
    rng = None
    if isinstance(recipe.intensity, Percentile):
        rng = _percentiles(vol.voxels, recipe.intensity)
    size = recipe.resize.size
    assert size is not None
    g = size // model.patch_size
    return Prepared(volume=vol, recipe=recipe, indices=indices, grid=(g, g), _range=rng)
