"""Tables: every entry of one (model weights, recipe) space, under ``tables/<space>/``.

Functions over the store's root group. A row becomes visible when the table's ``count``
attribute, written last, covers it. Deleting an entry appends its row number to the
table's tombstones (``deleted`` rows, the ``deleted`` count written last): rows are never
rewritten in place, so a reader never sees a table shrink. Compaction
(:mod:`.compaction`) writes the live rows beside the old ones, then names them in the
table's ``data`` attribute (the swap) and bumps ``generation``: rows were renumbered.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from ..errors import NotFoundError, StoreError
from ._common import _array, _group, _key_words, _meta, _now, _words_key
from .entries import EntryInfo

__all__ = [
    "RowIndex",
    "Table",
    "add_tombstones",
    "append_row",
    "list_spaces",
    "read_keys",
    "read_table",
    "read_table_meta",
    "space_id",
    "tombstoned_keys",
]

_TABLE_CHUNK = 4096
COLUMNS = ("keys", "pooled", "offsets", "cls")
_RETRIES = 5  # reads repeated when a compaction swapped the rows away meanwhile


@dataclass
class Table:
    """Live series-level vectors of one space (tombstoned rows left out), read in one pass.

    ``rows`` are the rows' numbers in the table (they skip tombstones), for readers that
    follow the table by row number.
    """

    space: str
    keys: list[str]
    pooled: np.ndarray  # (N, D)
    offsets: np.ndarray  # (N+1,)
    cls: np.ndarray  # (S, D)
    attrs: Mapping[str, Any]
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def slice_cls(self, i: int) -> np.ndarray:
        return self.cls[self.offsets[i] : self.offsets[i + 1]]


def space_id(model_name: str, weights_hash: str, recipe_hash: str) -> str:
    """Name of the table holding one (model weights, recipe) space."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)[:48]
    return f"{safe}.{weights_hash[:8]}.{recipe_hash[:8]}"


def list_spaces(root: zarr.Group) -> list[str]:
    """The spaces that have a table (one whose metadata is written: a table another writer
    is creating this moment is not listed yet)."""
    try:
        t = root["tables"]
    except KeyError:
        return []
    assert isinstance(t, zarr.Group)
    return sorted(name for name, g in t.groups() if "count" in _meta(g))


def create_columns(g: zarr.Group, dim: int, n: int = 0, s: int = 0) -> None:
    """The table's row arrays in group ``g``, sized for ``n`` rows of ``s`` slices."""
    g.create_array(
        "keys",
        shape=(n, 2),
        dtype="uint64",
        chunks=(_TABLE_CHUNK, 2),
        dimension_names=("series", "word"),
    )
    for name, rows, size in (("pooled", "series", n), ("cls", "slice", s)):
        g.create_array(
            name,
            shape=(size, dim),
            dtype="float32",
            chunks=(_TABLE_CHUNK, dim),
            dimension_names=(rows, "feature"),
        )
    off = g.create_array(
        "offsets", shape=(n + 1,), dtype="int64", chunks=(_TABLE_CHUNK,), dimension_names=("edge",)
    )
    off[0] = 0


def data_group(g: zarr.Group, meta: Mapping[str, Any]) -> zarr.Group:
    """Where a table's rows live: the subgroup its ``data`` attribute names (after a
    compaction), else the table's group itself."""
    name = meta.get("data")
    if not name:
        return g
    try:
        return _group(g[str(name)])
    except KeyError:
        raise StoreError(f"table group {g.path} names rows {name!r} that do not exist.") from None


def _table_group(root: zarr.Group, info: EntryInfo, dim: int) -> zarr.Group:
    tables = root.require_group("tables")
    if info.space in tables:
        g = tables[info.space]
        assert isinstance(g, zarr.Group)
        return g
    g = tables.create_group(info.space)
    create_columns(g, dim)
    # a space's entries share model and recipe, all but the region of interest each may cut
    recipe = {k: v for k, v in (info.attrs.get("recipe") or {}).items() if k != "roi"}
    g.attrs["radcache"] = {
        "count": 0,
        "slices": 0,
        "deleted": 0,
        "dim": dim,
        "model": info.model,
        "weights_hash": info.weights_hash,
        "recipe_hash": info.recipe_hash,
        "recipe": recipe,
        "level": "series+slice",
        "table_id": uuid.uuid4().hex,  # tells an index this table from a re-created one
        "modalities": [],  # every modality a row was added for (listings read it, not entries)
    }
    return g


def append_row(root: zarr.Group, info: EntryInfo, pooled: np.ndarray, cls: np.ndarray) -> int:
    """Add one entry's row to its space's table (created on first use); returns its row."""
    g = _table_group(root, info, int(pooled.shape[-1]))
    meta = _meta(g)
    d = data_group(g, meta)
    n, s = int(meta["count"]), int(meta["slices"])
    keys_a, pooled_a, cls_a, off_a = (_array(d[k]) for k in ("keys", "pooled", "cls", "offsets"))
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
    if info.modality and "modalities" in meta:  # older tables: read from their entries
        meta["modalities"] = sorted({*meta["modalities"], info.modality.upper()})
    g.attrs["radcache"] = meta  # the commit point
    return n


def tombstones(d: zarr.Group, meta: Mapping[str, Any], start: int = 0) -> np.ndarray:
    """Tombstoned row numbers ``start:`` (of the ``deleted`` count) of a table's rows ``d``."""
    m = int(meta.get("deleted", 0))
    if m <= start:
        return np.zeros(0, np.int64)
    return np.asarray(_array(d["deleted"])[start:m], dtype=np.int64)


def add_tombstones(root: zarr.Group, space: str, rows: Iterable[int]) -> int:
    """Mark table rows deleted (the ``deleted`` count, written last, is the commit point);
    returns how many were added. The caller holds the commit lock and passes live rows."""
    new = np.asarray(sorted({int(r) for r in rows}), dtype=np.int64)
    if not len(new):
        return 0
    g = _group(root[f"tables/{space}"])
    meta = _meta(g)
    d = data_group(g, meta)
    m = int(meta.get("deleted", 0))
    if "deleted" in d:
        dead = _array(d["deleted"])
    else:
        dead = d.create_array(
            "deleted",
            shape=(0,),
            dtype="int64",
            chunks=(_TABLE_CHUNK,),
            dimension_names=("tombstone",),
        )
    dead.resize((m + len(new),))
    dead[m:] = new
    if not m:
        meta["tombstoned"] = _now()  # when the oldest tombstone was written
    meta["deleted"] = m + len(new)
    g.attrs["radcache"] = meta  # the commit point
    return len(new)


def read_table_meta(root: zarr.Group, space: str) -> dict[str, Any]:
    """A table's metadata: ``count`` rows, ``slices``, ``deleted`` (tombstones),
    ``generation`` (bumped whenever rows are renumbered: compaction, or a deletion by an
    older radcache), ``data`` (where the rows live), model and recipe."""
    try:
        g = _group(root[f"tables/{space}"])
    except KeyError:
        raise NotFoundError(
            f"no table {space!r}; known: {', '.join(list_spaces(root)) or 'none'}."
        ) from None
    return {"generation": 0, "deleted": 0, **_meta(g)}


def _where(meta: Mapping[str, Any]) -> tuple[Any, ...]:
    return meta.get("table_id"), meta.get("data"), meta["generation"]


def _read(d: zarr.Group, meta: Mapping[str, Any], space: str, rows: np.ndarray) -> Table:
    """Rows ``rows`` (sorted, live, below ``count``) of rows group ``d``."""
    keys_a, pooled_a, off_a, cls_a = (_array(d[k]) for k in COLUMNS)
    dim = int(meta["dim"])
    lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
    if len(rows) and len(rows) * 4 < hi - lo:  # sparse: point reads
        words = np.asarray(keys_a.oindex[rows, :])
        pooled = np.asarray(pooled_a.oindex[rows, :])
        starts = np.asarray(off_a.oindex[rows], dtype=np.int64)
        ends = np.asarray(off_a.oindex[rows + 1], dtype=np.int64)
        parts = [np.asarray(cls_a[int(a) : int(b)]) for a, b in zip(starts, ends, strict=True)]
        cls = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        lengths = np.asarray(ends - starts, dtype=np.int64)
    else:  # one span read in one pass, the rows kept
        words, pooled = np.asarray(keys_a[lo:hi]), np.asarray(pooled_a[lo:hi])
        edges = np.asarray(off_a[lo : hi + 1]) if hi > lo else np.zeros(1, np.int64)
        cls = np.asarray(cls_a[int(edges[0]) : int(edges[-1])])
        lengths = np.diff(edges)
        if len(rows) < hi - lo:
            keep = np.isin(np.arange(lo, hi), rows)
            words, pooled, cls = words[keep], pooled[keep], cls[np.repeat(keep, lengths)]
            lengths = lengths[keep]
    return Table(
        space=space,
        keys=[_words_key(h, w) for h, w in np.asarray(words).reshape(-1, 2)],
        pooled=np.asarray(pooled, dtype=np.float32).reshape(-1, dim),
        offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
        cls=np.asarray(cls, dtype=np.float32).reshape(-1, dim),
        attrs=meta,
        rows=np.asarray(rows, dtype=np.int64),
    )


def read_table(
    root: zarr.Group, space: str, start: int = 0, rows: Iterable[int] | None = None
) -> Table:
    """Live rows ``start:`` of a space's table in one pass (rows past the committed count
    and tombstoned rows left out), or only ``rows``. ``offsets`` and ``cls`` then cover
    those rows only, offsets from 0. A read that a compaction overtook is repeated."""
    for _ in range(_RETRIES):
        meta = read_table_meta(root, space)
        g = _group(root[f"tables/{space}"])
        n = int(meta["count"])
        wanted = (
            np.arange(min(start, n), n, dtype=np.int64)
            if rows is None
            else np.unique(np.asarray(list(rows), dtype=np.int64))
        )
        wanted = wanted[(wanted >= 0) & (wanted < n)]
        try:  # the rows group the metadata names may be swapped away from here on
            d = data_group(g, meta)
            dead = tombstones(d, meta)
            if len(dead):
                wanted = wanted[~np.isin(wanted, dead)]
            table = _read(d, meta, space, wanted)
        except (KeyError, FileNotFoundError, StoreError):
            table = None  # the rows went away under us: a compaction swapped them
        if _where(read_table_meta(root, space)) == _where(meta) and table is not None:
            return table
    raise StoreError(
        f"table {space!r} was compacted {_RETRIES} times while it was read; read it again."
    )


def read_keys(root: zarr.Group, space: str, start: int = 0) -> list[str]:
    """Keys of the live rows ``start:`` of a table (only its ``keys`` column is read)."""
    for _ in range(_RETRIES):
        meta = read_table_meta(root, space)
        n = int(meta["count"])
        try:  # the rows group the metadata names may be swapped away from here on
            d = data_group(_group(root[f"tables/{space}"]), meta)
            words = np.asarray(_array(d["keys"])[min(start, n) : n])
            dead = tombstones(d, meta)
        except (KeyError, FileNotFoundError, StoreError):
            words = None
        if words is not None and _where(read_table_meta(root, space)) == _where(meta):
            live = ~np.isin(np.arange(min(start, n), n), dead)
            return [_words_key(hi, lo) for hi, lo in words[live]]
    raise StoreError(
        f"table {space!r} was compacted {_RETRIES} times while it was read; read it again."
    )


def tombstoned_keys(
    root: zarr.Group, space: str, start: int, stop: int, generation: int | None = None
) -> list[str] | None:
    """Keys of the rows behind tombstones ``start:stop`` (of the ``deleted`` count); None
    when the table is no longer at ``generation`` (its rows were renumbered since the
    caller read its metadata: the positions mean nothing now, reconcile by key)."""
    for _ in range(_RETRIES):
        meta = read_table_meta(root, space)
        if generation is not None and int(meta["generation"]) != generation:
            return None
        try:
            d = data_group(_group(root[f"tables/{space}"]), meta)
            rows = tombstones(d, {**meta, "deleted": min(stop, int(meta["deleted"]))}, start)
            words = _array(d["keys"]).oindex[rows, :] if len(rows) else np.zeros((0, 2))
        except (KeyError, FileNotFoundError, StoreError):
            continue
        if _where(read_table_meta(root, space)) == _where(meta):
            return [_words_key(hi, lo) for hi, lo in np.asarray(words).reshape(-1, 2)]
    raise StoreError(
        f"table {space!r} was compacted {_RETRIES} times while it was read; read it again."
    )


class RowIndex:
    """The live rows of one table by entry key, caught up incrementally: each
    :meth:`update` reads only the rows and tombstones added since the last one (the whole
    ``keys`` column again only after a compaction)."""

    def __init__(self) -> None:
        self._reset(None)

    def _reset(self, where: tuple[Any, ...] | None) -> None:
        self.where = where
        self.count = 0
        self.deleted = 0
        self.rows: dict[str, int] = {}

    def update(self, root: zarr.Group, space: str) -> dict[str, int]:
        """Live ``{key: row}``, up to date with the table."""
        try:
            meta = read_table_meta(root, space)
        except NotFoundError:
            self._reset(None)
            return self.rows
        if _where(meta) != self.where:
            self._reset(_where(meta))
        d = data_group(_group(root[f"tables/{space}"]), meta)
        n, m = int(meta["count"]), int(meta["deleted"])
        if n > self.count:
            words = np.asarray(_array(d["keys"])[self.count : n])
            for i, (hi, lo) in enumerate(words):
                self.rows[_words_key(hi, lo)] = self.count + i
            self.count = n
        if m > self.deleted:
            dead = tombstones(d, meta, self.deleted)
            words = np.asarray(_array(d["keys"]).oindex[dead, :]).reshape(-1, 2)
            for row, (hi, lo) in zip(dead, words, strict=True):
                key = _words_key(hi, lo)
                if self.rows.get(key) == int(row):
                    del self.rows[key]
            self.deleted = m
        return self.rows

    def appended(self, key: str, row: int) -> None:
        """Note a row this process appended (if the index had caught up to it)."""
        if self.count == row:
            self.rows[key] = row
            self.count = row + 1

    def removed(self, key: str) -> None:
        """Note a row this process tombstoned (its ``deleted`` count catches up later)."""
        self.rows.pop(key, None)
