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
from .recipe import CTWindows, MinMax, Percentile, Recipe, SliceSelection, VoiMinMax
from .volume import Volume

__all__ = ["Prepared", "prepare", "reslice", "select_slices"]

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
        """(n, r, c[, 3]) raw → (n, C, r, c) in [0, 1]."""
        policy = self.recipe.intensity
        if x.ndim == 4:  # colour
            x = x.permute(0, 3, 1, 2)
        else:
            x = x.unsqueeze(1)
        if isinstance(policy, CTWindows):
            chans = [((x - (c - w / 2)) / w).clamp_(0, 1) for c, w in policy.windows]
            return chans[0] if len(chans) == 1 else torch.cat(chans, dim=1)
        if isinstance(policy, Percentile):
            assert self._range is not None
            lo, hi = self._range
            return ((x - lo) / max(hi - lo, 1e-6)).clamp_(0, 1)
        if isinstance(policy, VoiMinMax | MinMax):
            flat = x.reshape(x.shape[0], -1)
            mins = flat.amin(dim=1).view(-1, 1, 1, 1)
            maxs = flat.amax(dim=1).view(-1, 1, 1, 1)
            return (x - mins) / (maxs - mins).clamp_min(1e-6)
        raise RecipeError(f"unresolved intensity policy {policy!r}")

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.recipe.resize.size
        assert size is not None
        mode = self.recipe.resize.mode
        r, c = x.shape[-2:]
        if mode == "stretch":
            return F.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        if mode == "native":  # resize shorter side to size·256/224, bicubic, centre crop
            short = round(size * 256 / 224)
            scale = short / min(r, c)
            nr, nc = max(size, round(r * scale)), max(size, round(c * scale))
            x = F.interpolate(x, size=(nr, nc), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nr - size) // 2, (nc - size) // 2
            return x[..., top : top + size, left : left + size]
        # pad: keep the physical aspect ratio
        sx, sy = self.volume.geometry.spacing[0], self.volume.geometry.spacing[1]
        h_mm, w_mm = r * sy, c * sx
        scale = size / max(h_mm, w_mm)
        nr, nc = max(1, round(h_mm * scale)), max(1, round(w_mm * scale))
        if (nr, nc) != (r, c):
            x = F.interpolate(
                x, size=(nr, nc), mode="bilinear", antialias=True, align_corners=False
            )
        pad_t, pad_l = (size - nr) // 2, (size - nc) // 2
        return F.pad(x, (pad_l, size - nc - pad_l, pad_t, size - nr - pad_t), value=0.0)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Model input for embedded slices ``start:stop``: ``(n, 3, S, S)`` float32."""
        idx = self.indices[start:stop]
        vox = self.volume.voxels
        sel = vox[idx[0] : idx[-1] + 1] if np.all(np.diff(idx) == 1) else vox[idx]
        x = torch.from_numpy(np.ascontiguousarray(sel))
        x = self._intensity(x)
        x = self._resize(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.recipe.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.recipe.std, dtype=x.dtype).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()

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
