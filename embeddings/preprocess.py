"""Preprocess: a resolved :class:`Recipe` turns a :class:`Volume` into model-ready tensors.

Entry point :func:`prepare`. Volume-level work (reslicing, the region-of-interest crop,
slice selection, intensity statistics) happens once; :meth:`Prepared.batch` then turns any
run of slices into a ``(n, 3, S, S)`` float tensor with torch ops over the whole batch — no
per-slice PIL round trips — so the encoder can pull batches as it goes: intensity policy,
resize (and crop or pad) onto the canvas, the optional per-channel min–max, grey to three
channels, mean/std. Per-slice percentiles are ``torch.quantile`` over each slice of the
batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidFieldError, RecipeError
from .geometry import PLANE_NORMAL_AXIS, nearest_axes
from .models import ModelCfg
from .recipe import (
    Clip,
    CTWindows,
    MinMax,
    Percentile,
    Recipe,
    Resize,
    Roi,
    SlicePercentile,
    SliceSelection,
    VoiMinMax,
)
from .volume import Geometry, Volume

__all__ = [
    "Placement",
    "Prepared",
    "crop",
    "placement",
    "prepare",
    "reslice",
    "roi_box",
    "select_slices",
]

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


def roi_box(volume: Volume, roi: Roi) -> tuple[slice, slice, slice]:
    """The (slice, row, column) index ranges ``roi`` covers in ``volume``, clipped to it.

    A box in millimetres covers the voxels whose centres lie in it: in-plane indices from
    the box's corners through the volume's direction and spacing, slices by their measured
    positions along the slice normal (an oblique volume gets the index box around it).
    Raises :class:`InvalidFieldError` when the box holds no voxel of the volume.
    """
    shape = volume.shape[:3]
    if roi.voxels is not None:
        lo, hi = np.asarray(roi.voxels[0::2]), np.asarray(roi.voxels[1::2])
    else:
        assert roi.mm is not None
        g = volume.geometry
        d, sp = g.direction_matrix, g.spacing
        corners = np.asarray(list(itertools.product(*zip(roi.mm[0::2], roi.mm[1::2], strict=True))))
        rel = corners - np.asarray(g.origin)
        cols, rows = rel @ d[:, 0] / sp[0], rel @ d[:, 1] / sp[1]
        along, at = corners @ d[:, 2], g.positions @ d[:, 2]
        eps = 1e-6
        inside = np.nonzero((at >= along.min() - eps) & (at <= along.max() + eps))[0]
        z = (inside.min(), inside.max() + 1) if inside.size else (0, 0)
        lo = np.asarray([z[0], math.ceil(rows.min() - eps), math.ceil(cols.min() - eps)])
        hi = np.asarray([z[1], math.floor(rows.max() + eps) + 1, math.floor(cols.max() + eps) + 1])
    lo = np.clip(lo, 0, shape)
    hi = np.clip(hi, 0, shape)
    if np.any(hi <= lo):
        raise InvalidFieldError(
            f"the roi {roi.model_dump(exclude_none=True)} holds no voxel of this volume "
            f"(slices, rows, columns {shape}); give voxel indices within it, or a box in "
            "patient millimetres (LPS) that overlaps it."
        )
    return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])


def crop(volume: Volume, roi: Roi) -> Volume:
    """``volume`` cut to ``roi`` (see :func:`roi_box`), its geometry moved with it: voxel
    ``[0, 0, 0]`` of the result is the box's first voxel."""
    zs, ys, xs = roi_box(volume, roi)
    g = volume.geometry
    d, sp = g.direction_matrix, g.spacing
    shift = xs.start * sp[0] * d[:, 0] + ys.start * sp[1] * d[:, 1]
    positions = g.positions[zs] + shift
    origin = np.asarray(g.origin) + (g.positions[zs.start] - g.positions[0]) + shift
    geometry = Geometry(
        spacing=g.spacing,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=g.direction,
        positions=positions,
    )
    return Volume(voxels=volume.voxels[zs, ys, xs], geometry=geometry, meta=volume.meta)


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

    The slice is resized to ``nr × nc`` (``interp``, ``antialias``) and put at
    ``(top, left)``; a negative offset means the canvas is a crop of the resized slice
    (``native`` mode, ``stretch`` with ``stretch_to``), a positive one padding (``pad``
    mode). :meth:`to_canvas` is the image's (and a mask's) way in, :meth:`from_canvas` the
    way back for anything predicted on the canvas.
    """

    mode: str
    size: int
    rows: int
    cols: int
    nr: int
    nc: int
    top: int
    left: int
    interp: str = "bilinear"
    antialias: bool = True

    def to_canvas(self, x: torch.Tensor, *, interp: str | None = None) -> torch.Tensor:
        """(n, C, rows, cols) → (n, C, size, size); ``interp`` overrides the recipe's."""
        interp = interp or self.interp
        if self.mode != "pad" or (self.nr, self.nc) != tuple(x.shape[-2:]):
            smooth = {"antialias": self.antialias, "align_corners": False}
            aa = smooth if interp != "nearest" else {}
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
    how = (resize.interpolation, resize.antialias)
    if mode == "stretch":  # to stretch_to, then torchvision's CenterCrop offset (round half even)
        s = resize.stretch_to or size
        off = -round((s - size) / 2)
        return Placement(mode, size, rows, cols, s, s, off, off, *how)
    if mode == "native":  # resize shorter side to size·256/224, bicubic, centre crop
        scale = round(size * 256 / 224) / min(rows, cols)
        nr, nc = max(size, round(rows * scale)), max(size, round(cols * scale))
        top, left = -((nr - size) // 2), -((nc - size) // 2)
        return Placement(mode, size, rows, cols, nr, nc, top, left, *how)
    # pad: keep the physical aspect ratio
    h_mm, w_mm = rows * spacing[1], cols * spacing[0]
    scale = size / max(h_mm, w_mm)
    nr, nc = max(1, round(h_mm * scale)), max(1, round(w_mm * scale))
    return Placement(mode, size, rows, cols, nr, nc, (size - nr) // 2, (size - nc) // 2, *how)


@dataclass
class Prepared:
    """A volume made ready for the encoder; pull tensors with :meth:`batch`."""

    volume: Volume  # resliced and cut to the roi if the recipe asks
    recipe: Recipe  # resolved
    indices: np.ndarray  # which slices of ``volume`` are embedded
    grid: tuple[int, int]
    _range: tuple[float, float] | None
    _uploaded: tuple[torch.device, torch.Tensor] | None = field(default=None, repr=False)

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
            return _minmax(x, per_channel=False)
        if isinstance(policy, Clip):
            return torch.clamp(x, policy.low, policy.high)
        if isinstance(policy, SlicePercentile):
            return _slice_percentile(x, policy)
        raise RecipeError(f"unresolved intensity policy {policy!r}")

    def placement(self) -> Placement:
        """Where this volume's slices land on the model's input canvas."""
        r, c = self.volume.shape[1:3]
        return placement(self.recipe.resize, r, c, self.volume.geometry.spacing[:2])

    def _on(self, device: torch.device) -> torch.Tensor:
        """The raw volume on ``device``, uploaded once (non-blocking from pinned memory)."""
        if self._uploaded is None or self._uploaded[0] != device:
            host = torch.from_numpy(np.ascontiguousarray(self.volume.voxels))
            if device.type == "cuda":
                host = host.pin_memory()
            self._uploaded = (device, host.to(device, non_blocking=True))
        return self._uploaded[1]

    def batch(self, start: int, stop: int, *, device: torch.device | None = None) -> torch.Tensor:
        """Model input for embedded slices ``start:stop``: ``(n, 3, S, S)`` float32, made
        on ``device`` (default: the CPU) by the same ops; off the CPU the raw volume is
        uploaded once, at the first batch."""
        idx = self.indices[start:stop]
        run = bool(np.all(np.diff(idx) == 1))
        if device is None or device.type == "cpu":
            vox = self.volume.voxels
            x = torch.from_numpy(
                np.ascontiguousarray(vox[idx[0] : idx[-1] + 1] if run else vox[idx])
            )
        else:
            vol = self._on(device)
            x = vol[idx[0] : idx[-1] + 1] if run else vol[torch.as_tensor(idx, device=device)]
        x = self._intensity(x)
        x = self.placement().to_canvas(x)
        if self.recipe.rescale == "minmax":
            x = _minmax(x, per_channel=True)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.recipe.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.recipe.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        out = torch.sub(x, mean).div_(std)  # a new (n, 3, S, S) tensor, contiguous
        if self.recipe.normalize == "nonzero":
            out.masked_fill_(x == 0, 0.0)
        return out

    def batches(
        self, batch_size: int, *, device: torch.device | None = None
    ) -> Iterator[torch.Tensor]:
        for start in range(0, self.n, batch_size):
            yield self.batch(start, min(start + batch_size, self.n), device=device)


def _minmax(x: torch.Tensor, *, per_channel: bool) -> torch.Tensor:
    """(n, C, r, c) scaled to [0, 1] per slice (or per slice and channel); a constant
    image becomes 0 (where the reference code divides by zero)."""
    flat = x.reshape(x.shape[0], x.shape[1] if per_channel else 1, -1)
    shape = (x.shape[0], x.shape[1] if per_channel else 1, 1, 1)
    mins, maxs = flat.amin(dim=2).view(shape), flat.amax(dim=2).view(shape)
    return torch.sub(x, mins).div_((maxs - mins).clamp_min(1e-6))


def _slice_percentile(x: torch.Tensor, policy: SlicePercentile) -> torch.Tensor:
    """(n, C, r, c) clipped to each slice's own percentiles (all channels together)."""
    q = torch.tensor([policy.low / 100, policy.high / 100], dtype=x.dtype, device=x.device)
    lo, hi = torch.quantile(x.reshape(x.shape[0], -1), q, dim=1).view(2, -1, 1, 1, 1)
    if policy.below == "zero":  # above high → high, then at or below low → 0
        y = torch.minimum(x, hi)
        return y.masked_fill_(y <= lo, 0.0)
    y = torch.maximum(torch.minimum(x, hi), lo)
    return y.sub_(lo).div_((hi - lo).clamp_min(1e-6)) if policy.scale else y


def prepare(volume: Volume, recipe: Recipe, model: ModelCfg) -> Prepared:
    """Resolve ``recipe`` for the volume and model, reslice, cut to the roi, select slices,
    gather statistics."""
    if not recipe.is_resolved:
        recipe = recipe.resolve(volume.meta.modality, model, photometric=volume.meta.photometric)
    vol = reslice(volume, recipe.slice_axis)
    if recipe.roi is not None:
        vol = crop(vol, recipe.roi)
    indices = select_slices(vol.n_slices, recipe.slices)
    rng = None
    if isinstance(recipe.intensity, Percentile):
        rng = _percentiles(vol.voxels, recipe.intensity)
    size = recipe.resize.size
    assert size is not None
    g = size // model.patch_size
    return Prepared(volume=vol, recipe=recipe, indices=indices, grid=(g, g), _range=rng)
