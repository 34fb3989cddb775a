"""Compaction: a table rewritten without its tombstoned rows, beside the rows it replaces.

The live rows are copied into a new group inside the table's group while writers go on
(no lock held); then, under the commit lock, the rows appended and the tombstones
written meanwhile are carried over, and one metadata write names the new group as the
table's ``data`` and bumps ``generation`` (the swap). The old rows are removed after the
swap. A reader never sees a table with fewer rows than before and no rows at all in
between: it reads the old rows or the new ones, and a read that the swap overtook is
repeated (:func:`.tables.read_table`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from ._common import _array, _group, _meta, _now
from .tables import (
    _TABLE_CHUNK,
    COLUMNS,
    create_columns,
    data_group,
    read_table_meta,
    tombstones,
)

__all__ = ["compact_table"]


def _where(meta: dict[str, Any]) -> tuple[Any, ...]:
    return meta.get("table_id"), meta.get("data"), meta["generation"]


def _copy_rows(src: zarr.Group, dst: zarr.Group, keep: np.ndarray, at: tuple[int, int]) -> None:
    """Copy rows ``keep`` (a mask over src rows ``0:len(keep)``) into ``dst`` from row,
    slice ``at``, one chunk of rows at a time (memory bounded by a chunk)."""
    s_keys, s_pooled, s_off, s_cls = (_array(src[k]) for k in COLUMNS)
    d_keys, d_pooled, d_off, d_cls = (_array(dst[k]) for k in COLUMNS)
    row, sl = at
    for a in range(0, len(keep), _TABLE_CHUNK):
        b = min(len(keep), a + _TABLE_CHUNK)
        mask = keep[a:b]
        if not mask.any():
            continue
        edges = np.asarray(s_off[a : b + 1])
        lengths = np.diff(edges)
        words = np.asarray(s_keys[a:b])[mask]
        pooled = np.asarray(s_pooled[a:b])[mask]
        cls = np.asarray(s_cls[int(edges[0]) : int(edges[-1])])[np.repeat(mask, lengths)]
        k = len(words)
        d_keys[row : row + k] = words
        d_pooled[row : row + k] = pooled
        d_off[row + 1 : row + k + 1] = sl + np.cumsum(lengths[mask])
        if len(cls):
            d_cls[sl : sl + len(cls)] = cls
        row, sl = row + k, sl + len(cls)


def _grow(dst: zarr.Group, n: int, s: int) -> None:
    for name in ("keys", "pooled", "cls"):
        a = _array(dst[name])
        a.resize((s if name == "cls" else n, a.shape[1]))
    _array(dst["offsets"]).resize((n + 1,))


def _lengths(d: zarr.Group, n: int) -> np.ndarray:
    return np.diff(np.asarray(_array(d["offsets"])[: n + 1]))


def compact_table(
    root: zarr.Group, space: str, writing: Callable[[], contextlib.AbstractContextManager[None]]
) -> int:
    """Rewrite a table without its tombstoned rows; returns how many rows went (0: nothing
    to do, or another process compacted it first). ``writing`` is the store's commit lock."""
    meta0 = read_table_meta(root, space)
    m0, n0 = int(meta0["deleted"]), int(meta0["count"])
    if not m0:
        return 0
    g = _group(root[f"tables/{space}"])
    src = data_group(g, meta0)
    keep = np.ones(n0, dtype=bool)
    keep[tombstones(src, meta0)] = False
    lengths = _lengths(src, n0)
    n, s = int(keep.sum()), int(lengths[keep].sum())
    name = f"c{uuid.uuid4().hex[:16]}"
    new = g.create_group(name)
    swapped = False
    try:
        create_columns(new, int(meta0["dim"]), n, s)
        _copy_rows(src, new, keep, (0, 0))  # the bulk of the work, no lock held
        with writing():
            meta1 = read_table_meta(root, space)
            if _where(meta1) != _where(meta0):
                return 0  # compacted by another process meanwhile
            n1 = int(meta1["count"])
            dead1 = tombstones(src, meta1)
            if n1 > n0:  # rows appended meanwhile: carried over, live ones only
                later = np.ones(n1, dtype=bool)
                later[:n0] = False
                later[dead1] = False
                grown = _lengths(src, n1)[later]
                _grow(new, n + int(later.sum()), s + int(grown.sum()))
                _copy_rows(src, new, later, (n, s))
                n, s = n + int(later.sum()), s + int(grown.sum())
            late = dead1[m0:]
            late = late[late < n0]
            late = late[keep[late]]  # copied rows tombstoned meanwhile: tombstoned anew
            renumber = np.cumsum(keep) - 1
            meta = {
                **meta1,
                "data": name,
                "count": n,
                "slices": s,
                "deleted": len(late),
                "generation": int(meta1["generation"]) + 1,
                "compacted": _now(),
            }
            meta.pop("tombstoned", None)
            if len(late):
                dead = new.create_array(
                    "deleted",
                    shape=(len(late),),
                    dtype="int64",
                    chunks=(_TABLE_CHUNK,),
                    dimension_names=("tombstone",),
                )
                dead[:] = np.sort(renumber[late])
                meta["tombstoned"] = _now()
            g.attrs["radcache"] = meta  # the swap
            swapped = True
            _sweep(g, keep={name, str(meta0.get("data") or "")})
    finally:
        if not swapped:
            with contextlib.suppress(KeyError, FileNotFoundError):
                del g[name]
    _drop(g, meta0)
    return n1 - n


def _drop(g: zarr.Group, meta: dict[str, Any]) -> None:
    """Remove the rows a swap replaced."""
    if meta.get("data"):
        with contextlib.suppress(KeyError, FileNotFoundError):
            del g[str(meta["data"])]
        return
    for column in (*COLUMNS, "deleted"):  # a table whose rows were never compacted
        with contextlib.suppress(KeyError, FileNotFoundError):
            del g[column]


def _sweep(g: zarr.Group, keep: set[str]) -> None:
    """Remove the leftovers of interrupted compactions (groups no swap named)."""
    current = str(_meta(g).get("data") or "")
    for sub in list(g.group_keys()):
        if sub not in keep and sub != current:
            with contextlib.suppress(KeyError, FileNotFoundError):
                del g[sub]
