"""Catalog: what the index knows of each entry, and which ids a search may return.

:class:`Record` (one entry's references and metadata), :class:`Filters` (what a search may
return) and :class:`Catalog` (records by ordinal, their slice ids, lookups, the bitmaps of
allowed ids). Its persistence as arrays is :mod:`.catalog_arrays`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..errors import NotFoundError
from ..pseudonyms import DEFAULT_TENANT
from ._vectors import Level

__all__ = ["Catalog", "Filters", "Record"]


@dataclass(frozen=True)
class Record:
    """One entry as the index knows it: references and non-identifying metadata only."""

    key: str
    study: str
    series: str
    part: str
    n_slices: int
    refs: tuple[tuple[str, str, str], ...] = ()  # every (study, series, part) that sent it
    patient: str | None = None
    modality: str | None = None
    body_part: str | None = None
    description: str | None = None
    labels: Mapping[str, Any] = field(default_factory=dict)
    collections: tuple[str, ...] = ()
    slice_index: tuple[int, ...] = ()  # volume slice of each embedded row
    tenant: str = DEFAULT_TENANT  # who owns the entry (searches never cross tenants)

    @classmethod
    def from_attrs(cls, key: str, attrs: Mapping[str, Any]) -> Record:
        vol = attrs.get("volume", {})
        primary = (str(vol.get("study", "")), str(vol.get("series", "")), str(vol.get("part", "")))
        aliases = [
            (str(a.get("study", "")), str(a.get("series", "")), str(a.get("part", "")))
            for a in attrs.get("aliases", [])
        ]
        n = int(attrs["n_slices"])
        return cls(
            key=key,
            study=primary[0],
            series=primary[1],
            part=primary[2],
            n_slices=n,
            refs=(primary, *aliases),
            patient=vol.get("patient"),
            modality=(vol.get("modality") or None),
            body_part=(vol.get("body_part") or None),
            description=(vol.get("series_description") or None),
            labels=dict(attrs.get("labels", {})),
            collections=tuple(attrs.get("collections", ())),
            slice_index=tuple(range(n)),
            tenant=str(attrs.get("tenant") or DEFAULT_TENANT),
        )

    @property
    def studies(self) -> set[str]:
        return {r[0] for r in self.refs}

    def public(self) -> dict[str, Any]:
        """What a search result shows of the entry."""
        return {
            "entry": self.key,
            "study": self.study,
            "series": self.series,
            "part": self.part,
            "modality": self.modality,
            "body_part": self.body_part,
            "series_description": self.description,
            "labels": dict(self.labels),
            "collections": list(self.collections),
        }


@dataclass(frozen=True)
class Filters:
    """Which entries a search may return. Empty fields do not filter.

    ``description`` matches case-insensitively anywhere in the series description;
    ``labels`` must all match; ``exclude_*`` drop whole studies or patients (pseudonyms);
    ``tenant`` confines the search to one tenant's entries.
    """

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    description: str | None = None
    collection: str | None = None
    labels: tuple[tuple[str, str], ...] = ()  # (field, JSON of the value)
    has_label: str | None = None
    exclude_studies: frozenset[str] = frozenset()
    exclude_patients: frozenset[str] = frozenset()
    tenant: str | None = None

    @classmethod
    def make(
        cls,
        *,
        modality: Iterable[str] = (),
        body_part: Iterable[str] = (),
        description: str | None = None,
        collection: str | None = None,
        labels: Mapping[str, Any] | None = None,
        has_label: str | None = None,
        exclude_studies: Iterable[str] = (),
        exclude_patients: Iterable[str] = (),
        tenant: str | None = None,
    ) -> Filters:
        return cls(
            modality=tuple(sorted(m.upper() for m in modality)),
            body_part=tuple(sorted(b.upper() for b in body_part)),
            description=description.lower() if description else None,
            collection=collection or None,
            labels=tuple(sorted((k, _label_json(v)) for k, v in (labels or {}).items())),
            has_label=has_label or None,
            exclude_studies=frozenset(exclude_studies),
            exclude_patients=frozenset(exclude_patients),
            tenant=tenant,
        )

    def without_exclusions(self) -> Filters:
        return dataclasses.replace(self, exclude_studies=frozenset(), exclude_patients=frozenset())


def _label_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Catalog:
    """Records by ordinal, with lookups by key, study, series and patient."""

    def __init__(self) -> None:
        self.records: list[Record | None] = []
        self.slice_start: list[int] = []
        self.next_slice = 0
        self.by_key: dict[str, int] = {}
        self._by: dict[str, dict[str, set[int]]] = {
            "study": {},
            "series": {},
            "patient": {},
            "tenant": {},
        }
        self._live = np.zeros(0, dtype=bool)
        self._slice_live = np.zeros(0, dtype=bool)
        self.version = 0
        self._masks: dict[tuple[Level, Filters], tuple[int, np.ndarray]] = {}
        self._bits: dict[tuple[str, Level, Filters], tuple[int, np.ndarray, int]] = {}
        self._columns: tuple[int, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.by_key)

    @property
    def n_ordinals(self) -> int:
        return len(self.records)

    def _index(self, o: int, rec: Record, add: bool) -> None:
        names = {
            "study": rec.studies,
            "series": {r[1] for r in rec.refs} | {f"{r[1]}#{r[2]}" for r in rec.refs if r[2]},
            "patient": {rec.patient} if rec.patient else set(),
            "tenant": {rec.tenant},
        }
        for kind, values in names.items():
            table = self._by[kind]
            for v in values:
                if add:
                    table.setdefault(v, set()).add(o)
                else:
                    table.get(v, set()).discard(o)
                    if not table.get(v, True):
                        del table[v]

    def add(self, rec: Record) -> tuple[int, int]:
        """Give ``rec`` the next ordinal and slice ids; returns (ordinal, first slice id)."""
        o, first = len(self.records), self.next_slice
        self.records.append(rec)
        self.slice_start.append(first)
        self.next_slice += rec.n_slices
        self.by_key[rec.key] = o
        self._index(o, rec, True)
        self._live = _grow(self._live, o + 1)
        self._live[o] = True
        self._slice_live = _grow(self._slice_live, self.next_slice)
        self._slice_live[first : self.next_slice] = True
        self.version += 1
        return o, first

    def update(self, rec: Record) -> None:
        """New metadata (labels, aliases, collections) for a known entry."""
        o = self.by_key[rec.key]
        old = self.records[o]
        assert old is not None
        self._index(o, old, False)
        self.records[o] = rec
        self._index(o, rec, True)
        self.version += 1

    def remove(self, key: str) -> tuple[int, range] | None:
        """Tombstone an entry; returns its ordinal and slice ids (None if unknown)."""
        o = self.by_key.pop(key, None)
        if o is None:
            return None
        rec = self.records[o]
        assert rec is not None
        ids = self.slice_ids(o)  # before the tombstone, which has no slices
        self._index(o, rec, False)
        self.records[o] = None
        self._live[o] = False
        self._slice_live[ids.start : ids.stop] = False
        self.version += 1
        return o, ids

    def slice_ids(self, o: int) -> range:
        rec = self.records[o]
        n = rec.n_slices if rec is not None else 0
        return range(self.slice_start[o], self.slice_start[o] + n)

    def record(self, o: int) -> Record:
        rec = self.records[o]
        if rec is None:
            raise NotFoundError(f"entry ordinal {o} was deleted.")
        return rec

    def ordinals(
        self, kind: Literal["study", "series", "patient", "tenant"], name: str
    ) -> list[int]:
        return sorted(self._by[kind].get(name, ()))

    def count(self, kind: Literal["study", "series", "patient", "tenant"], name: str) -> int:
        """How many live entries ``name`` names (O(1))."""
        return len(self._by[kind].get(name, ()))

    def owner_of_slice(self, slice_ids: np.ndarray) -> np.ndarray:
        """Ordinal of each slice id."""
        return np.searchsorted(np.asarray(self.slice_start), slice_ids, side="right") - 1

    def live(self, level: Level) -> np.ndarray:
        return self._live if level == "series" else self._slice_live[: self.next_slice]

    def _cols(self) -> dict[str, np.ndarray]:
        if self._columns is None or self._columns[0] != self.version:
            recs = self.records
            cols = {
                "modality": np.array([(r.modality or "").upper() if r else "" for r in recs]),
                "body_part": np.array([(r.body_part or "").upper() if r else "" for r in recs]),
                "description": np.array([(r.description or "").lower() if r else "" for r in recs]),
            }
            self._columns = (self.version, cols)
        return self._columns[1]

    def modalities(self, tenant: str | None = None) -> list[str]:
        """The modalities of the live entries (``tenant``'s alone when given), from the
        filter columns and mask searches use (cached per version: no walk per call)."""
        live = self.mask("series", Filters(tenant=tenant))
        return sorted(set(self._cols()["modality"][: live.size][live].tolist()) - {""})

    def mask(self, level: Level, filters: Filters) -> np.ndarray:
        """Bool mask over the level's ids: live and passing ``filters`` (cached per version)."""
        base = filters.without_exclusions()
        hit = self._masks.get((level, base))
        if hit is not None and hit[0] == self.version:
            return hit[1]
        m = self._live[: self.n_ordinals].copy()
        if base.tenant is not None:
            own = np.zeros_like(m)
            own[np.fromiter(self._by["tenant"].get(base.tenant, ()), np.int64)] = True
            m &= own
        cols = self._cols() if (base.modality or base.body_part or base.description) else {}
        if base.modality:
            m &= np.isin(cols["modality"], base.modality)
        if base.body_part:
            m &= np.isin(cols["body_part"], base.body_part)
        if base.description and m.any():
            m &= np.char.find(cols["description"], base.description) >= 0
        if base.collection or base.labels or base.has_label:
            for o in np.flatnonzero(m):
                rec = self.records[o]
                assert rec is not None
                if (
                    (base.collection and base.collection not in rec.collections)
                    or any(_label_json(rec.labels.get(k)) != v for k, v in base.labels)
                    or (base.has_label and rec.labels.get(base.has_label) is None)
                ):
                    m[o] = False
        if level == "slice":
            counts = np.diff(np.append(self.slice_start, self.next_slice))
            m = np.repeat(m, counts) & self._slice_live[: self.next_slice]
        if len(self._masks) > 64:
            self._masks.clear()
            self._bits.clear()
        self._masks[(level, base)] = (self.version, m)
        return m

    def allowed(self, level: Level, filters: Filters) -> tuple[np.ndarray, int, int]:
        """Little-endian bitmap of the ids a search may return, its length and its count."""
        m = self.mask(level, filters)
        key = ("bits", level, filters.without_exclusions())
        hit = self._bits.get(key)
        if hit is None or hit[0] != self.version:
            hit = (self.version, np.packbits(m, bitorder="little"), int(np.count_nonzero(m)))
            self._bits[key] = hit
        bits, count = hit[1].copy(), hit[2]
        for r in self.excluded(level, filters):
            count -= int(np.count_nonzero(m[r.start : r.stop]))
            _clear(bits, r)
        return bits, len(m), count

    def excluded(self, level: Level, filters: Filters) -> list[range]:
        """Id ranges that ``filters.exclude_*`` remove."""
        ords: set[int] = set()
        for s in filters.exclude_studies:
            ords.update(self._by["study"].get(s, ()))
        for p in filters.exclude_patients:
            ords.update(self._by["patient"].get(p, ()))
        if level == "series":
            return [range(o, o + 1) for o in sorted(ords)]
        return [self.slice_ids(o) for o in sorted(ords)]

    # -- bulk loading --
    def adopt(self, records: list[Record | None], slice_start: list[int], next_slice: int) -> None:
        """Take ``records`` (ordinal order, tombstones as None) and their first slice ids in
        one go, into an empty catalog."""
        self.records, self.slice_start, self.next_slice = records, slice_start, next_slice
        self.by_key = {r.key: o for o, r in enumerate(records) if r is not None}
        by_study, by_series, by_patient = self._by["study"], self._by["series"], self._by["patient"]
        by_tenant = self._by["tenant"]

        def put(table: dict[str, set[int]], name: str, o: int) -> None:
            found = table.get(name)
            if found is None:
                table[name] = {o}
            else:
                found.add(o)

        for o, rec in enumerate(records):
            if rec is None:
                continue
            if len(rec.refs) != 1:
                self._index(o, rec, True)
                continue
            ((study, series, part),) = rec.refs
            found = by_study.get(study)  # `put`, inlined: this loop runs once per entry
            if found is None:
                by_study[study] = {o}
            else:
                found.add(o)
            found = by_series.get(series)
            if found is None:
                by_series[series] = {o}
            else:
                found.add(o)
            if part:
                put(by_series, f"{series}#{part}", o)
            if rec.patient:
                put(by_patient, rec.patient, o)
            put(by_tenant, rec.tenant, o)
        live = np.fromiter((r is not None for r in records), dtype=bool, count=len(records))
        self._live = live
        counts = np.diff(np.append(np.asarray(slice_start, np.int64), next_slice))
        self._slice_live = np.repeat(live, counts) if len(records) else np.zeros(0, bool)
        self.version += 1


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    if len(a) >= n:
        return a
    out = np.zeros(max(n, 2 * len(a)), dtype=a.dtype)
    out[: len(a)] = a
    return out


def _clear(bits: np.ndarray, ids: range) -> None:
    """Clear bits ``ids`` of a little-endian packed bitmap."""
    lo, hi = ids.start, ids.stop
    while lo < hi and lo % 8:
        bits[lo >> 3] &= ~np.uint8(1 << (lo & 7))
        lo += 1
    while hi > lo and hi % 8:
        hi -= 1
        bits[hi >> 3] &= ~np.uint8(1 << (hi & 7))
    bits[lo >> 3 : hi >> 3] = 0
