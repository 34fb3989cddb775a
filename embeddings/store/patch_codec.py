"""How patch-token grids are kept: ``fp16``, ``int8``, ``pooled:N`` or ``none``.

Patch tokens are the bulk of an entry. ``fp16`` keeps the encoder's grids as they are;
``int8`` keeps each token vector as int8 with one float32 scale per token (symmetric:
``scale = max|x| / 127``, stored beside it as ``patch_scale``); ``pooled:N`` keeps the
grid area-pooled to ``N × N`` (fp16); ``none`` keeps no grid. Whatever the form,
:func:`decode` gives readers float16 grids, so ``store.read(key, "patch")`` never shows
the encoding. Grids may carry leading axes (MM-DINOv2's ``(slice, sequence, h, w, D)``):
every form works on the last three axes.

Pooling follows ``torch.nn.functional.adaptive_avg_pool2d``: output cell ``i`` of an axis
of length ``h`` averages rows ``floor(i·h/N)`` to ``ceil((i+1)·h/N)``, so a grid that ``N``
does not divide is pooled into slightly overlapping cells; an axis shorter than ``N`` is
kept at its own length.

A stored form *covers* a requested one when it is at least as rich
(``fp16 > int8 > pooled:N > pooled:M (N > M) > none``): the cache answers a request with an
entry whose form covers it, and re-embeds (replacing the entry's arrays) otherwise. The
form is not part of the entry's key: the CLS and pooled vectors, which the indexes hold,
do not depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import zarr

from ._common import _array

__all__ = [
    "decode",
    "encode",
    "patch_layout",
    "pool",
    "put_patches",
    "stored_form",
]

_INT8_MAX = 127.0


def stored_form(attrs: Mapping[str, Any]) -> str:
    """The form an entry's patch grids are kept in (entries written before the setting
    existed kept fp16 grids or none)."""
    form = attrs.get("patch_storage")
    if form:
        return str(form)
    return "fp16" if "patch" in attrs.get("kinds", ()) else "none"


def _pooled_size(form: str, h: int, w: int) -> tuple[int, int]:
    n = int(form.partition(":")[2])
    return min(n, h), min(n, w)


def patch_layout(form: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The arrays a grid of ``shape`` (``(..., h, w, D)``) is stored as in ``form``."""
    if form == "none":
        return {}
    *lead, h, w, d = shape
    if form == "int8":
        return {"patch": (tuple(shape), np.int8), "patch_scale": ((*lead, h, w), np.float32)}
    if form.startswith("pooled:"):
        return {"patch": ((*lead, *_pooled_size(form, h, w), d), np.float16)}
    return {"patch": (tuple(shape), np.float16)}


def _edges(size: int, n: int) -> list[tuple[int, int]]:
    return [((i * size) // n, -((-(i + 1) * size) // n)) for i in range(n)]


def pool(grid: np.ndarray, n: int) -> np.ndarray:
    """Area-pool the ``(h, w)`` axes of ``(..., h, w, D)`` to at most ``n × n`` (fp16)."""
    *_, h, w, _d = grid.shape
    oh, ow = min(n, h), min(n, w)
    x = grid.astype(np.float32)
    rows = [x[..., a:b, :, :].mean(axis=-3) for a, b in _edges(h, oh)]
    out = np.stack(
        [np.stack([r[..., a:b, :].mean(axis=-2) for a, b in _edges(w, ow)], axis=-2) for r in rows],
        axis=-3,
    )
    return out.astype(np.float16)


def encode(form: str, grid: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays ``grid`` (``(..., h, w, D)``, any float) is stored as in ``form``."""
    if form == "none":
        return {}
    if form == "int8":
        x = grid.astype(np.float32)
        scale = np.abs(x).max(axis=-1) / _INT8_MAX
        safe = np.where(scale > 0, scale, 1.0)[..., None]
        q = np.clip(np.rint(x / safe), -_INT8_MAX, _INT8_MAX).astype(np.int8)
        return {"patch": q, "patch_scale": scale.astype(np.float32)}
    if form.startswith("pooled:"):
        return {"patch": pool(grid, int(form.partition(":")[2]))}
    return {"patch": grid.astype(np.float16, copy=False)}


def decode(group: zarr.Group, attrs: Mapping[str, Any]) -> np.ndarray:
    """An entry's patch grids as float16, whatever form ``attrs`` says they are kept in."""
    patch = np.asarray(_array(group["patch"])[...])
    if stored_form(attrs) != "int8":
        return patch
    scale = np.asarray(_array(group["patch_scale"])[...])
    out: np.ndarray = (patch.astype(np.float32) * scale[..., None]).astype(np.float16)
    return out


class _Writer(Protocol):
    def put(self, name: str, start: int, values: np.ndarray, *, wait: bool = True) -> None: ...


class _Batch(Protocol):
    patch: np.ndarray | None


def put_patches(writer: _Writer, form: str, start: int, part: _Batch) -> None:
    """Stream a batch's patch grids (the bulk of an entry), encoded in ``form``, to the
    store while the model runs the next batch."""
    if part.patch is None:
        return
    for name, values in encode(form, part.patch).items():
        writer.put(name, start, values, wait=False)
