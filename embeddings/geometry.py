"""Canonical orientation: the same anatomy gives the same array, whatever the file format.

A volume is an array whose axes each point along a direction in patient space (LPS).
:func:`canonicalize` permutes and flips the array (no interpolation) so that

* axis 0 is the chosen slice axis, axes 1 and 2 are the in-plane rows and columns;
* columns run toward the patient's left (axial, coronal) or posterior (sagittal);
* rows run toward posterior (axial) or inferior (coronal, sagittal) — the radiological
  display convention, so images reach the encoder upright;
* slices ascend along ``columns × rows`` (inferior→superior for axial).

Each array axis is matched to the patient axis it is most aligned with (as nibabel's
``io_orientation`` does), so oblique acquisitions are handled by their nearest plane.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["PLANE_NORMAL_AXIS", "AxisPlan", "canonicalize", "nearest_axes", "plan"]

#: The LPS axis index that is normal to each named plane.
PLANE_NORMAL_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
# Display sign per LPS axis for in-plane axes: x → left (+), y → posterior (+),
# z → inferior (−) so that the head is at the top of coronal and sagittal images.
_DISPLAY_SIGN = (1.0, 1.0, -1.0)


def nearest_axes(dirs: np.ndarray) -> tuple[int, int, int]:
    """Assign each array axis (rows of ``dirs``) to a distinct LPS axis, maximising |cos|."""
    a = np.abs(np.asarray(dirs, dtype=np.float64))
    best = max(itertools.permutations(range(3)), key=lambda p: sum(a[i, p[i]] for i in range(3)))
    return (best[0], best[1], best[2])


@dataclass(frozen=True)
class AxisPlan:
    """How to turn an array into canonical layout: ``transpose(order)`` then flip ``flips``."""

    order: tuple[int, int, int]
    flips: tuple[bool, bool, bool]


def plan(dirs: np.ndarray, slice_axis: int) -> AxisPlan:
    """Work out the permutation and flips for array axes with direction rows ``dirs``.

    ``slice_axis`` is the array axis that becomes axis 0.
    """
    dirs = np.asarray(dirs, dtype=np.float64)
    lps = nearest_axes(dirs)
    in_plane = [a for a in range(3) if a != slice_axis]
    # Columns (last axis) get the in-plane axis whose patient axis comes first in x, y, z.
    in_plane.sort(key=lambda a: lps[a])
    rows_axis, cols_axis = in_plane[1], in_plane[0]
    order = (slice_axis, rows_axis, cols_axis)
    flips = [False, False, False]
    new_dirs = [dirs[a].copy() for a in order]
    for pos in (1, 2):
        a = order[pos]
        want = _DISPLAY_SIGN[lps[a]]
        if np.sign(dirs[a, lps[a]]) != want:
            flips[pos] = True
            new_dirs[pos] = -new_dirs[pos]
    normal = np.cross(new_dirs[2], new_dirs[1])  # columns × rows
    if float(np.dot(new_dirs[0], normal)) < 0:
        flips[0] = True
    return AxisPlan(order=order, flips=(flips[0], flips[1], flips[2]))


def canonicalize(
    array: np.ndarray,
    dirs: np.ndarray,
    spacing: np.ndarray,
    origin: np.ndarray,
    slice_axis: int,
    positions: np.ndarray | None = None,
    *,
    dtype: npt.DTypeLike | None = None,
    in_place: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Permute and flip ``array`` (first three axes) into canonical layout.

    ``dirs[a]`` is the unit LPS direction of array axis ``a``, ``spacing[a]`` its step in
    mm, ``origin`` the position of voxel ``[0, 0, 0]``; ``positions`` optionally gives the
    measured position of each slice along axis 0 (kept when axis 0 stays the slice axis).
    Returns the new array (of ``dtype``, default the input's), direction rows, spacings,
    origin and per-slice positions, all in the new axis order.

    The array is never copied whole: it is returned as is when already canonical, else
    rearranged slice by slice, into a new array (the only full-size allocation), or, with
    ``in_place`` (the caller hands ``array`` over), within ``array`` itself when that needs
    no new array (same dtype, the slice axis first, square slices if rows and columns swap).
    """
    dirs = np.asarray(dirs, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    origin = np.asarray(origin, dtype=np.float64)
    p = plan(dirs, slice_axis)
    shape = [array.shape[a] for a in p.order]
    new_dirs = dirs[list(p.order)].copy()
    new_spacing = spacing[list(p.order)].copy()
    new_origin = origin.copy()
    keep_positions = positions is not None and slice_axis == 0
    pos_arr = np.asarray(positions, dtype=np.float64).copy() if keep_positions else None
    for pos, flip in enumerate(p.flips):
        if flip:
            n = shape[pos]
            shift = (n - 1) * new_spacing[pos] * new_dirs[pos]
            new_origin = new_origin + shift
            if pos_arr is not None:
                pos_arr = pos_arr[::-1].copy() if pos == 0 else pos_arr + shift
            new_dirs[pos] = -new_dirs[pos]
    if pos_arr is None:
        steps = np.arange(shape[0], dtype=np.float64)[:, None]
        pos_arr = new_origin[None, :] + steps * new_spacing[0] * new_dirs[0][None, :]
    else:
        new_origin = pos_arr[0].copy()
    arranged = _arrange(array, p, np.dtype(array.dtype if dtype is None else dtype), in_place)
    return arranged, new_dirs, new_spacing, new_origin, pos_arr


def _arrange(array: np.ndarray, p: AxisPlan, dtype: np.dtype[Any], in_place: bool) -> np.ndarray:
    """``array`` transposed by ``p.order`` and flipped by ``p.flips``, C-contiguous, of
    ``dtype``, holding at most one extra slice besides the result."""
    extra = tuple(range(3, array.ndim))
    view = np.transpose(array, (*p.order, *extra))
    for axis, flip in enumerate(p.flips):
        if flip:
            view = np.flip(view, axis=axis)
    if view.flags.c_contiguous and view.dtype == dtype:
        return view
    within = p.order == (0, 1, 2) or (p.order == (0, 2, 1) and array.shape[1] == array.shape[2])
    if in_place and within and array.dtype == dtype and array.flags.c_contiguous:
        return _arrange_in_place(array, p)
    out = np.empty(view.shape, dtype=dtype)
    for s in range(view.shape[0]):
        out[s] = view[s]  # one slice at a time: converted as it is copied
    return out


def _arrange_in_place(array: np.ndarray, p: AxisPlan) -> np.ndarray:
    """:func:`_arrange` within ``array`` (slice axis first; rows and columns swap only
    when square), one slice of scratch at a time."""
    if p.flips[0]:
        n = array.shape[0]
        for s in range(n // 2):
            low = array[s].copy()
            array[s] = array[n - 1 - s]
            array[n - 1 - s] = low
    in_plane = tuple(slice(None, None, -1 if f else 1) for f in p.flips[1:])
    swap = p.order[1:] == (2, 1)
    if swap or p.flips[1] or p.flips[2]:
        for s in range(array.shape[0]):
            plane = array[s].swapaxes(0, 1) if swap else array[s]
            array[s] = plane[in_plane]  # numpy copies an overlapping source first
    return array
