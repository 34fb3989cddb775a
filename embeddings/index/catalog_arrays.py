"""A catalog as arrays, for ``catalog.npz``: :func:`to_arrays`, :func:`from_arrays`.

Format 2 (:data:`CATALOG_FORMAT`) is columnar: the string fields of every record as one
JSON document of columns (one parse at load), slice counts and first slice ids as integer
arrays, and each record's labels as a slice of one blob that is parsed only when that
record's labels are read (:class:`_StoredLabels`). What is rare (aliases, collections,
selected slices) rides in an ``other`` column; the tenant of each record is a column of its
own, left out when every record is the default tenant's (as in files written before
tenants, which read as the default tenant's). Format 1 (one JSON document per record,
newline-separated) is still read.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import SearchIndexError
from ..pseudonyms import DEFAULT_TENANT
from .catalog import Catalog, Record

__all__ = ["CATALOG_FORMAT", "from_arrays", "to_arrays"]

CATALOG_FORMAT = 2
_COLUMNS = ("key", "study", "series", "part", "patient", "modality", "body_part", "description")


def to_arrays(cat: Catalog) -> dict[str, np.ndarray]:
    """``cat`` as arrays (format :data:`CATALOG_FORMAT`). Entries must not be added or
    removed meanwhile (:meth:`SpaceIndex.save` holds its write lock); metadata updates may
    go on, each record is taken whole."""
    records = list(cat.records)
    starts = np.asarray(cat.slice_start, np.int64)
    cols: dict[str, list[Any]] = {c: [] for c in (*_COLUMNS, "other")}
    tenants: list[str | None] = []
    labels: list[bytes] = []
    n_slices = np.zeros(len(records), np.int64)
    for o, r in enumerate(records):
        if r is None:
            for values in cols.values():
                values.append(None)
            tenants.append(None)
            labels.append(b"")
            continue
        for c in _COLUMNS:
            cols[c].append(getattr(r, c))
        tenants.append(r.tenant)
        n_slices[o] = r.n_slices
        other: dict[str, Any] = {}
        if r.refs != ((r.study, r.series, r.part),):
            other["refs"] = r.refs
        if r.collections:
            other["collections"] = r.collections
        if r.slice_index != tuple(range(r.n_slices)):
            other["slice_index"] = r.slice_index
        cols["other"].append(other or None)
        text = json.dumps(dict(r.labels), separators=(",", ":")) if r.labels else ""
        labels.append(text.encode())
    if any(t not in (None, DEFAULT_TENANT) for t in tenants):
        cols["tenant"] = tenants
    return {
        "format": np.asarray(CATALOG_FORMAT, np.int64),
        "columns": _bytes(json.dumps(cols, separators=(",", ":")).encode()),
        "n_slices": n_slices,
        "slice_start": starts,
        "next_slice": np.asarray(cat.next_slice, np.int64),
        "labels": _bytes(b"".join(labels)),
        "labels_end": np.cumsum([len(b) for b in labels], dtype=np.int64),
    }


def from_arrays(arrays: Mapping[str, np.ndarray]) -> Catalog:
    """The catalog :func:`to_arrays` gave (or format 1's JSON-lines arrays)."""
    with _no_gc():  # a few objects per entry, none cyclic: collecting meanwhile is waste
        return _from_rows(arrays) if "catalog" in arrays else _from_columns(arrays)


def _from_columns(arrays: Mapping[str, np.ndarray]) -> Catalog:
    found = int(arrays["format"]) if "format" in arrays else None
    if found != CATALOG_FORMAT:
        raise SearchIndexError(
            f"index catalog has format {found}; expected {CATALOG_FORMAT} or the JSON-lines "
            "catalog of format 1. Rebuild the index (`radcache index rebuild`)."
        )
    cols = json.loads(arrays["columns"].tobytes())
    n_slices = arrays["n_slices"].tolist()
    blob = arrays["labels"].tobytes()
    ends = arrays["labels_end"].tolist()
    ranges = [tuple(range(k)) for k in range(max(n_slices, default=0) + 1)]
    records: list[Record | None] = []
    begin = 0
    tenants = cols.get("tenant") or [DEFAULT_TENANT] * len(n_slices)
    rows = zip(*(cols[c] for c in _COLUMNS), cols["other"], n_slices, ends, tenants, strict=True)
    for (
        key,
        study,
        series,
        part,
        patient,
        modality,
        body_part,
        description,
        other,
        n,
        end,
        t,
    ) in rows:
        if key is None:
            records.append(None)
        else:
            refs: tuple[tuple[str, str, str], ...]
            if other is None:  # the usual record: one reference, every slice, no collection
                refs, collections, selected = ((study, series, part),), (), ranges[n]
            else:
                r, sel = other.get("refs"), other.get("slice_index")
                own = ((study, series, part),)
                refs = tuple((a, b, c) for a, b, c in r) if r is not None else own
                collections = tuple(other.get("collections", ()))
                selected = tuple(sel) if sel is not None else ranges[n]
            labels = _StoredLabels(blob, begin, end) if end > begin else {}
            records.append(
                Record(
                    key,
                    study,
                    series,
                    part,
                    n,
                    refs,
                    patient,
                    modality,
                    body_part,
                    description,
                    labels,
                    collections,
                    selected,
                    t,
                )
            )
        begin = end
    cat = Catalog()
    cat.adopt(records, arrays["slice_start"].tolist(), int(arrays["next_slice"]))
    return cat


def _from_rows(arrays: Mapping[str, np.ndarray]) -> Catalog:
    """Format 1: one JSON document per record (empty for a tombstone), newline-separated."""
    starts = arrays["slice_start"].tolist()
    rows = arrays["catalog"].tobytes().decode().split("\n") if starts else []
    records: list[Record | None] = []
    for row in rows:
        if not row:
            records.append(None)
            continue
        d = json.loads(row)
        d["refs"] = tuple(tuple(x) for x in d["refs"])
        d["collections"] = tuple(d["collections"])
        d["slice_index"] = tuple(d["slice_index"])
        records.append(Record(**d))
    cat = Catalog()
    cat.adopt(records, starts, int(arrays["next_slice"]))
    return cat


class _StoredLabels(Mapping[str, Any]):
    """A record's labels as saved: a slice of the catalog's labels blob, parsed on first read."""

    __slots__ = ("_blob", "_end", "_start", "_value")

    def __init__(self, blob: bytes, start: int, end: int) -> None:
        self._blob, self._start, self._end = blob, start, end
        self._value: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any]:
        if self._value is None:
            self._value = json.loads(self._blob[self._start : self._end])
        return self._value

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused (if it ran) for the ``with`` block."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _bytes(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8)
