"""Tables: every entry of one (model weights, recipe) space, under ``tables/<space>/``.

Functions over the store's root group. A row becomes visible when the table's ``count``
attribute, written last, covers it; removing rows renumbers the rest and bumps the
table's ``generation``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from ..errors import NotFoundError
from ._common import _array, _group, _key_words, _meta, _words_key
from .entries import EntryInfo

__all__ = [
    "Table",
    "append_row",
    "drop_rows",
    "list_spaces",
    "read_table",
    "read_table_meta",
    "space_id",
    "table_keys",
]

_TABLE_CHUNK = 4096


@dataclass
class Table:
    """All series-level vectors of one space, read in one pass."""

    space: str
    keys: list[str]
    pooled: np.ndarray  # (N, D)
    offsets: np.ndarray  # (N+1,)
    cls: np.ndarray  # (S, D)
    attrs: Mapping[str, Any]

    def slice_cls(self, i: int) -> np.ndarray:
        return self.cls[self.offsets[i] : self.offsets[i + 1]]


def space_id(model_name: str, weights_hash: str, recipe_hash: str) -> str:
    """Name of the table holding one (model weights, recipe) space."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)[:48]
    return f"{safe}.{weights_hash[:8]}.{recipe_hash[:8]}"


def list_spaces(root: zarr.Group) -> list[str]:
    """The spaces that have a table."""
    try:
        t = root["tables"]
    except KeyError:
        return []
    assert isinstance(t, zarr.Group)
    return sorted(t.group_keys())


def _table_group(root: zarr.Group, info: EntryInfo, dim: int) -> zarr.Group:
    tables = root.require_group("tables")
    if info.space in tables:
        g = tables[info.space]
        assert isinstance(g, zarr.Group)
        return g
    g = tables.create_group(info.space)
    g.create_array(
        "keys",
        shape=(0, 2),
        dtype="uint64",
        chunks=(_TABLE_CHUNK, 2),
        dimension_names=("series", "word"),
    )
    for name, rows in (("pooled", "series"), ("cls", "slice")):
        g.create_array(
            name,
            shape=(0, dim),
            dtype="float32",
            chunks=(_TABLE_CHUNK, dim),
            dimension_names=(rows, "feature"),
        )
    off = g.create_array(
        "offsets", shape=(1,), dtype="int64", chunks=(_TABLE_CHUNK,), dimension_names=("edge",)
    )
    off[0] = 0
    g.attrs["radcache"] = {
        "count": 0,
        "slices": 0,
        "dim": dim,
        "model": info.model,
        "weights_hash": info.weights_hash,
        "recipe_hash": info.recipe_hash,
        "recipe": info.attrs.get("recipe"),
        "level": "series+slice",
        "table_id": uuid.uuid4().hex,  # tells an index this table from a re-created one
    }
    return g


def table_keys(root: zarr.Group, space: str) -> set[str]:
    """Entry keys in a table (only its ``keys`` column is read); empty if it has none."""
    keys: set[str] = set()
    if space in list_spaces(root):
        g = _group(root[f"tables/{space}"])
        n = int(_meta(g)["count"])
        keys = {_words_key(hi, lo) for hi, lo in np.asarray(_array(g["keys"])[:n])}
    return keys


def append_row(root: zarr.Group, info: EntryInfo, pooled: np.ndarray, cls: np.ndarray) -> None:
    """Add one entry's row to its space's table (created on first use)."""
    g = _table_group(root, info, int(pooled.shape[-1]))
    meta = _meta(g)
    n, s = int(meta["count"]), int(meta["slices"])
    keys_a, pooled_a, cls_a, off_a = (g[k] for k in ("keys", "pooled", "cls", "offsets"))
    assert isinstance(keys_a, zarr.Array) and isinstance(pooled_a, zarr.Array)
    assert isinstance(cls_a, zarr.Array) and isinstance(off_a, zarr.Array)
    m = int(cls.shape[0])
    cls_a.resize((s + m, cls_a.shape[1]))
    if m:
        cls_a[s : s + m] = cls
    off_a.resize((n + 2,))
    off_a[n + 1] = s + m
    pooled_a.resize((n + 1, pooled_a.shape[1]))
    pooled_a[n] = pooled
    keys_a.resize((n + 1, 2))
    keys_a[n] = np.asarray(_key_words(info.key), dtype=np.uint64)
    meta.update(count=n + 1, slices=s + m)
    g.attrs["radcache"] = meta  # the commit point


def drop_rows(root: zarr.Group, space: str, keys: set[str]) -> None:
    """Rewrite a table without ``keys`` (O(table); the index work will add tombstones)."""
    t = read_table(root, space)
    keep = [i for i, k in enumerate(t.keys) if k not in keys]
    g = _group(root[f"tables/{space}"])
    cls = [t.slice_cls(i) for i in keep]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cls])]).astype(np.int64)
    new = {
        "keys": np.asarray([_key_words(t.keys[i]) for i in keep], dtype=np.uint64).reshape(-1, 2),
        "pooled": t.pooled[keep],
        "cls": np.concatenate(cls) if cls else np.zeros((0, t.pooled.shape[1]), np.float32),
        "offsets": offsets,
    }
    meta = _meta(g)
    g.attrs["radcache"] = {**meta, "count": 0, "slices": 0}  # nothing visible while rewriting
    for name, arr in new.items():
        a = _array(g[name])
        a.resize(arr.shape)
        if arr.size:
            a[...] = arr
    g.attrs["radcache"] = {
        **meta,
        "count": len(keep),
        "slices": int(offsets[-1]),
        "generation": int(meta.get("generation", 0)) + 1,  # rows renumbered: readers resync
    }


def read_table_meta(root: zarr.Group, space: str) -> dict[str, Any]:
    """A table's metadata: ``count`` rows, ``slices``, ``generation`` (bumped whenever
    rows are removed and the rest renumbered), model and recipe."""
    try:
        g = _group(root[f"tables/{space}"])
    except KeyError:
        raise NotFoundError(
            f"no table {space!r}; known: {', '.join(list_spaces(root)) or 'none'}."
        ) from None
    return {"generation": 0, **_meta(g)}


def read_table(root: zarr.Group, space: str, start: int = 0) -> Table:
    """Rows ``start:`` of a space's table in one pass (rows past the committed count
    ignored). ``offsets`` and ``cls`` then cover those rows only, offsets from 0."""
    meta = read_table_meta(root, space)
    g = _group(root[f"tables/{space}"])
    n, s = int(meta["count"]), int(meta["slices"])
    start = min(start, n)
    words = np.asarray(_array(g["keys"])[start:n])
    offsets = np.asarray(_array(g["offsets"])[start : n + 1])
    first = int(offsets[0])
    return Table(
        space=space,
        keys=[_words_key(hi, lo) for hi, lo in words],
        pooled=np.asarray(_array(g["pooled"])[start:n]),
        offsets=offsets - first,
        cls=np.asarray(_array(g["cls"])[first:s]),
        attrs=meta,
    )
