"""Index: FAISS nearest-neighbour indexes over the store's tables.

Entry point :func:`open_index` → :class:`IndexSet`, one :class:`SpaceIndex` per
(model weights, recipe) space, each with two FAISS indexes (levels): ``series`` (the
pooled vector of each entry) and ``slice`` (the CLS token of each embedded slice).
Vectors are L2-normalised, so inner product is cosine similarity.

Ids are stable: an entry gets the next *ordinal* when it joins the index, and its slices
the next run of *slice ids*. Deleted entries leave holes (tombstones) that a rebuild
compacts. Every search runs with a FAISS ``IDSelectorBitmap`` of the ids it may return —
live, matching the filters, not excluded — so filters and exclusions are applied inside
the search, and nothing deleted can come back.

Below ``exact_max`` vectors a level is exact (``Flat``); above it an IVF index trained on a
sample, whose ``nprobe`` is tuned at build time until recall@10 against exact search on
held-out vectors reaches ``recall_target``; the measured recall is kept in the metadata.
An index is saved as one folder per space next to the store (a new version written in
full, then a pointer file atomically replaced) and
brought up to date from the store's tables by :meth:`IndexSet.refresh`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from .errors import NotFoundError, SearchIndexError
from .store import EmbeddingStore, Table

__all__ = [
    "LEVELS",
    "Filters",
    "Hit",
    "IndexSet",
    "Level",
    "LevelIndex",
    "Record",
    "SpaceIndex",
    "choose_factory",
    "default_index_dir",
    "normalise",
    "open_index",
]

log = logging.getLogger(__name__)
# FAISS's bundled type stubs are partial and partly wrong; it is used untyped.
faiss: Any = importlib.import_module("faiss")

Level = Literal["series", "slice"]
LEVELS: tuple[Level, ...] = ("series", "slice")
INDEX_FORMAT = 1
_RECALL_K = 10
_HELD_OUT = 500
_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_EFSEARCH = (16, 32, 64, 128, 256, 512, 1024)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous; zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1]).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def choose_factory(n: int, *, exact_max: int) -> str:
    """``Flat`` (exact) up to ``exact_max`` vectors, else ``IVF<nlist>,Flat`` with
    nlist ≈ 2·√n rounded to a power of two."""
    if n <= exact_max:
        return "Flat"
    nlist = 2 ** round(math.log2(2 * math.sqrt(n)))
    return f"IVF{max(1, min(nlist, 65536, n // 16))},Flat"


# -- catalog -------------------------------------------------------------------------------
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
    ``labels`` must all match; ``exclude_*`` drop whole studies or patients (pseudonyms).
    """

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    description: str | None = None
    collection: str | None = None
    labels: tuple[tuple[str, str], ...] = ()  # (field, JSON of the value)
    has_label: str | None = None
    exclude_studies: frozenset[str] = frozenset()
    exclude_patients: frozenset[str] = frozenset()

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
        self._by: dict[str, dict[str, set[int]]] = {"study": {}, "series": {}, "patient": {}}
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
        self._index(o, rec, False)
        self.records[o] = None
        self._live[o] = False
        ids = self.slice_ids(o)
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

    def ordinals(self, kind: Literal["study", "series", "patient"], name: str) -> list[int]:
        return sorted(self._by[kind].get(name, ()))

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

    def mask(self, level: Level, filters: Filters) -> np.ndarray:
        """Bool mask over the level's ids: live and passing ``filters`` (cached per version)."""
        base = filters.without_exclusions()
        hit = self._masks.get((level, base))
        if hit is not None and hit[0] == self.version:
            return hit[1]
        m = self._live[: self.n_ordinals].copy()
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

    # -- persistence --
    def to_arrays(self) -> dict[str, np.ndarray]:
        rows = [
            json.dumps(_record_json(r), separators=(",", ":")) if r is not None else ""
            for r in self.records
        ]
        return {
            "catalog": np.frombuffer("\n".join(rows).encode(), dtype=np.uint8),
            "slice_start": np.asarray(self.slice_start, dtype=np.int64),
            "next_slice": np.asarray(self.next_slice, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Catalog:
        cat = cls()
        blob = arrays["catalog"].tobytes().decode()
        rows = blob.split("\n") if len(arrays["slice_start"]) else []
        for row, start in zip(rows, arrays["slice_start"], strict=True):
            cat.next_slice = int(start)
            if row:
                cat.add(_record_from_json(json.loads(row)))
            else:  # a tombstone keeps its ordinal and slice ids
                cat.records.append(None)
                cat.slice_start.append(int(start))
                cat._live = _grow(cat._live, len(cat.records))
        cat.next_slice = int(arrays["next_slice"])
        cat._slice_live = _grow(cat._slice_live, cat.next_slice)
        return cat


def _record_json(r: Record) -> dict[str, Any]:
    d = {k: getattr(r, k) for k in Record.__dataclass_fields__}
    d["labels"] = dict(r.labels)
    return d


def _record_from_json(d: dict[str, Any]) -> Record:
    d["refs"] = tuple(tuple(x) for x in d["refs"])
    d["collections"] = tuple(d["collections"])
    d["slice_index"] = tuple(d["slice_index"])
    return Record(**d)


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


# -- one FAISS index ---------------------------------------------------------------------
@dataclass
class LevelIndex:
    """One FAISS index (ids as described in the module docstring) and how it was built."""

    level: Level
    dim: int
    index: Any  # faiss.Index
    factory: str
    kind: Literal["exact", "approximate"]
    params: dict[str, int] = field(default_factory=dict)
    recall: float | None = None
    trained_size: int = 0
    build_seconds: float = 0.0
    tombstones: int = 0

    @classmethod
    def build(
        cls,
        level: Level,
        vectors: np.ndarray,
        ids: np.ndarray,
        *,
        factory: str = "auto",
        exact_max: int = 50_000,
        recall_target: float = 0.95,
        seed: int = 0,
    ) -> LevelIndex:
        """Index unit ``vectors`` under ``ids``: train (approximate types), add, then tune
        the search parameter on held-out vectors until recall@10 ≥ ``recall_target``."""
        t0 = time.perf_counter()
        n, dim = vectors.shape if vectors.ndim == 2 else (0, 0)
        spec = choose_factory(n, exact_max=exact_max) if factory == "auto" else factory
        index = _faiss_index(dim, spec)
        if not index.is_trained and n < max(1, int(getattr(_ivf(index), "nlist", 1))):
            log.info("%d vectors are too few to train %s; exact search until rebuilt", n, spec)
            spec = "Flat"
            index = _faiss_index(dim, spec)
        approximate = spec.removeprefix("IDMap2,").removeprefix("IDMap,") != "Flat"
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        held = order[: min(_HELD_OUT, n // 10)] if approximate else order[:0]
        if not index.is_trained:
            ivf = _ivf(index)
            train = order[len(held) : len(held) + _train_size(ivf, n)]
            if ivf is not None and faiss.get_num_gpus() > 0:  # pragma: no cover - no GPU here
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
            index.train(vectors[np.sort(train)])
        if n:
            index.add_with_ids(vectors, ids)
        out = cls(
            level,
            dim,
            index,
            spec,
            "approximate" if approximate else "exact",
            trained_size=n,
        )
        if approximate and len(held):
            out._tune(vectors, ids, held, recall_target)
        out.build_seconds = time.perf_counter() - t0
        return out

    def _tune(self, vectors: np.ndarray, ids: np.ndarray, held: np.ndarray, target: float) -> None:
        """Smallest nprobe / efSearch whose recall@10 on held-out vectors reaches ``target``."""
        queries = vectors[held]
        exact = faiss.IndexFlatIP(self.dim)
        exact.add(vectors)
        _, truth = exact.search(queries, _RECALL_K + 1)
        truth = ids[truth]
        ivf = _ivf(self.index)
        grid: list[tuple[str, int]] = [("", 0)]
        if ivf is not None:
            nlist = int(ivf.nlist)
            grid = [("nprobe", g) for g in _NPROBES if g < nlist] + [("nprobe", nlist)]
        elif _hnsw(self.index) is not None:
            grid = [("efSearch", g) for g in _EFSEARCH]
        for name, value in grid:
            if name:
                self.params = {name: value}
            _, got = self.index.search(queries, _RECALL_K + 1, params=self._search_params(None))
            hits = [
                len(set(g[g != own][:_RECALL_K]) & set(t[t != own][:_RECALL_K])) / _RECALL_K
                for g, t, own in zip(got, truth, ids[held], strict=True)
            ]
            self.recall = float(np.mean(hits))
            if self.recall >= target:
                break

    def _search_params(self, sel: Any, k: int = 0) -> Any:
        if _ivf(self.index) is not None:
            p = faiss.SearchParametersIVF()
            p.nprobe = self.params.get("nprobe", 1)
        elif _hnsw(self.index) is not None:
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(self.params.get("efSearch", 16), k)
        else:
            p = faiss.SearchParameters()
        if sel is not None:
            p.sel = sel
        return p

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: Sequence[int] | range) -> None:
        """Drop ids where FAISS can (flat, IVF); elsewhere (HNSW) they stay as tombstones,
        never returned because the search bitmap excludes them."""
        arr = np.asarray(list(ids), dtype=np.int64)
        if not len(arr):
            return
        try:
            self.index.remove_ids(arr)
        except RuntimeError:
            self.tombstones += len(arr)

    def search(
        self, queries: np.ndarray, k: int, bits: np.ndarray, nbits: int
    ) -> tuple[np.ndarray, np.ndarray]:
        sel = faiss.IDSelectorBitmap(nbits, faiss.swig_ptr(bits))
        d, i = self.index.search(queries, k, params=self._search_params(sel, k))
        return d, i

    def reconstruct(self, ids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.index.reconstruct_batch(np.asarray(ids, dtype=np.int64)))

    def info(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "factory": self.factory,
            "kind": self.kind,
            "vectors": self.ntotal,
            "dim": self.dim,
            "params": dict(self.params),
            "recall_at_10": self.recall,
            "trained_size": self.trained_size,
            "build_seconds": round(self.build_seconds, 3),
            "tombstones": self.tombstones,
            "memory_bytes": _memory(self.index),
            "device": "cpu",
        }


def _faiss_index(dim: int, spec: str) -> Any:
    try:
        if spec.startswith(("IVF", "IDMap")):
            index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.index_factory(dim, f"IDMap2,{spec}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise SearchIndexError(
            f"FAISS cannot build index type {spec!r} ({str(exc).splitlines()[-1]}); expected a "
            "factory string such as 'Flat', 'IVF1024,Flat', 'HNSW32' or 'IVF1024,PQ32'."
        ) from exc
    ivf = _ivf(index)
    if ivf is not None:  # so vectors can be read back by id and removed
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def _ivf(index: Any) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw(index: Any) -> Any:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _train_size(ivf: Any, n: int) -> int:
    k = int(ivf.nlist) if ivf is not None else 256
    return min(n, max(64 * k, 10_000))


def _memory(index: Any) -> int:
    ivf = _ivf(index)
    if ivf is not None:
        codes = int(ivf.ntotal) * int(ivf.code_size)
        return codes + int(ivf.ntotal) * 8 + int(ivf.nlist) * int(ivf.d) * 4
    return int(index.ntotal) * int(index.d) * 4 + int(index.ntotal) * 16


# -- a space: catalog + both levels --------------------------------------------------------
@dataclass
class Hit:
    """One search result (``slice`` is the volume slice for slice-level hits)."""

    rank: int
    score: float
    record: Record
    slice: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, "slice": self.slice, **self.record.public()}


class SpaceIndex:
    """The catalog and the two level indexes of one (model weights, recipe) space."""

    def __init__(
        self,
        space: str,
        meta: Mapping[str, Any],
        catalog: Catalog,
        levels: dict[Level, LevelIndex],
    ) -> None:
        self.space = space
        self.meta = dict(meta)  # model, weights_hash, recipe_hash, dim, generation, rows
        self.catalog = catalog
        self.levels = levels

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def ids_of(self, level: Level, o: int) -> range:
        return range(o, o + 1) if level == "series" else self.catalog.slice_ids(o)

    def search(
        self,
        level: Level,
        queries: np.ndarray,
        k: int,
        filters: Filters,
        *,
        group_by_series: bool = False,
    ) -> list[list[Hit]]:
        """Top ``k`` hits per query among live, matching, non-excluded ids."""
        cat, li = self.catalog, self.levels[level]
        q = normalise(queries)
        if q.shape[1] != self.dim:
            raise SearchIndexError(
                f"query vectors have {q.shape[1]} dimensions; space {self.space} has {self.dim}."
            )
        bits, nbits, allowed = cat.allowed(level, filters)
        if not allowed or k <= 0:
            return [[] for _ in q]
        out = []
        for qi in q:
            fetch = k
            while True:
                d, ids = li.search(qi[None], min(fetch, allowed), bits, nbits)
                hits = self._hits(level, d[0], ids[0], group_by_series)
                if not group_by_series or len(hits) >= k or fetch >= allowed:
                    break
                fetch *= 4  # distinct series wanted: ask deeper until k are found
            out.append(hits[:k])
        return out

    def _hits(self, level: Level, d: np.ndarray, ids: np.ndarray, group: bool) -> list[Hit]:
        cat = self.catalog
        valid = ids >= 0
        d, ids = d[valid], ids[valid]
        if level == "series":
            owners = ids
        else:
            owners = cat.owner_of_slice(ids)
        hits: list[Hit] = []
        seen: set[int] = set()
        for score, i, o in zip(d, ids, owners, strict=True):
            if group and o in seen:
                continue
            seen.add(int(o))
            rec = cat.record(int(o))
            row = int(i) - cat.slice_start[int(o)] if level == "slice" else None
            sl = rec.slice_index[row] if row is not None and row < len(rec.slice_index) else row
            hits.append(Hit(len(hits) + 1, float(score), rec, sl))
        return hits

    def vectors(self, level: Level, ordinals: Sequence[int]) -> np.ndarray:
        """Stored (unit) vectors of entries: one per entry (series) or all their slices."""
        ids = [i for o in ordinals for i in self.ids_of(level, o)]
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        return self.levels[level].reconstruct(ids)

    def add(self, records: Sequence[Record], pooled: np.ndarray, cls: np.ndarray) -> None:
        """Add entries (``cls`` holds their slices, concatenated in order)."""
        if not records:
            return
        starts = [self.catalog.add(r) for r in records]
        self.levels["series"].add(
            normalise(pooled), np.asarray([o for o, _ in starts], dtype=np.int64)
        )
        ids = np.concatenate(
            [np.arange(s, s + r.n_slices) for (_, s), r in zip(starts, records, strict=True)]
        ).astype(np.int64)
        self.levels["slice"].add(normalise(cls), ids)

    def remove(self, keys: Iterable[str]) -> int:
        n = 0
        for key in keys:
            gone = self.catalog.remove(key)
            if gone is not None:
                o, ids = gone
                self.levels["series"].remove([o])
                self.levels["slice"].remove(ids)
                n += 1
        return n

    def info(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "model": self.meta.get("model"),
            "weights_hash": self.meta.get("weights_hash"),
            "recipe_hash": self.meta.get("recipe_hash"),
            "dim": self.dim,
            "entries": len(self.catalog),
            "levels": {lv: li.info() for lv, li in self.levels.items()},
        }

    # -- persistence --
    def save(self, path: Path) -> None:
        """Write the space into folder ``path`` atomically: a new version folder is written
        in full, then the ``CURRENT`` pointer is replaced (a rename); older versions go."""
        levels = {
            lv: {k: v for k, v in li.info().items() if k != "memory_bytes"}
            for lv, li in self.levels.items()
        }
        head = {"format": INDEX_FORMAT, "space": self.space, **self.meta, "levels": levels}
        path.mkdir(parents=True, exist_ok=True)
        version = f"v{time.time_ns()}-{os.getpid()}"
        tmp = path / f".{version}.tmp"
        tmp.mkdir()
        try:
            for lv, li in self.levels.items():
                faiss.write_index(li.index, str(tmp / f"{lv}.faiss"))
            with (tmp / "catalog.npz").open("wb") as fh:
                np.savez(fh, **cast(dict[str, Any], self.catalog.to_arrays()))
            (tmp / "meta.json").write_text(json.dumps(head, indent=1))
            for f in tmp.iterdir():
                with f.open("rb+") as fh:
                    os.fsync(fh.fileno())
            os.rename(tmp, path / version)
            pointer = path / f".CURRENT.{version}"
            pointer.write_text(version)
            os.replace(pointer, path / "CURRENT")  # the commit point
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in path.iterdir():  # earlier versions and debris of interrupted saves
            if old.is_dir() and old.name != version:
                shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, path: Path) -> SpaceIndex:
        """The version of a space that ``path/CURRENT`` names."""
        where = path / (path / "CURRENT").read_text().strip()
        head = json.loads((where / "meta.json").read_text())
        if int(head.get("format", 0)) != INDEX_FORMAT:
            raise SearchIndexError(f"{where} has index format {head.get('format')}; rebuild it.")
        with np.load(where / "catalog.npz", allow_pickle=False) as z:
            catalog = Catalog.from_arrays(z)
        levels: dict[Level, LevelIndex] = {}
        for lv in LEVELS:
            info = head["levels"][lv]
            levels[lv] = LevelIndex(
                level=lv,
                dim=int(head["dim"]),
                index=faiss.read_index(str(where / f"{lv}.faiss")),
                factory=info["factory"],
                kind=info["kind"],
                params=dict(info["params"]),
                recall=info["recall_at_10"],
                trained_size=int(info["trained_size"]),
                build_seconds=float(info["build_seconds"]),
                tombstones=int(info["tombstones"]),
            )
        meta = {k: v for k, v in head.items() if k not in ("format", "space", "levels")}
        return cls(head["space"], meta, catalog, levels)


# -- all spaces of one store -------------------------------------------------------------------
def default_index_dir(store: EmbeddingStore) -> Path:
    """``<store>/indexes`` for a local store; a per-URL folder in the user cache otherwise."""
    if store.local_path is not None:
        return store.local_path / "indexes"
    digest = hashlib.sha256(store.url.encode()).hexdigest()[:16]
    return Path("~/.cache/radcache/indexes").expanduser() / digest


class IndexSet:
    """Every space's index for one store, kept in step with it by :meth:`refresh`."""

    def __init__(
        self,
        store: EmbeddingStore,
        directory: Path | None = None,
        *,
        factory: str = "auto",
        exact_max: int = 50_000,
        recall_target: float = 0.95,
    ) -> None:
        self.store = store
        self.directory = Path(directory) if directory is not None else default_index_dir(store)
        self.factory = factory
        self.exact_max = exact_max
        self.recall_target = recall_target
        self.spaces: dict[str, SpaceIndex] = {}
        self.lock = threading.RLock()
        self._dirty: set[str] = set()

    def path(self, space: str) -> Path:
        return self.directory / re.sub(r"[^A-Za-z0-9._-]", "_", space)

    def load(self) -> None:
        """Load the saved indexes (a damaged or old file is rebuilt by the next refresh)."""
        with self.lock:
            for space in self.store.spaces():
                p = self.path(space)
                if not (p / "CURRENT").exists():
                    continue
                try:
                    si = SpaceIndex.load(p)
                except (OSError, ValueError, KeyError, RuntimeError, SearchIndexError) as exc:
                    log.warning("index %s unreadable (%s); it will be rebuilt", p, exc)
                    continue
                if si.space == space:
                    self.spaces[space] = si

    def refresh(self) -> list[str]:
        """Bring every space up to date with the store; returns the spaces that changed.

        Rows appended to a table since the last refresh are added; a table whose rows were
        renumbered (a deletion) is reconciled by entry key; a space whose index no longer
        fits its size (exact past ``exact_max``, approximate grown 2× since training, a
        quarter tombstones) is rebuilt.
        """
        changed = []
        with self.lock:
            for space in self.store.spaces():
                if self._refresh_space(space):
                    changed.append(space)
                    self._dirty.add(space)
            for space in set(self.spaces) - set(self.store.spaces()):
                del self.spaces[space]
                shutil.rmtree(self.path(space), ignore_errors=True)
        return changed

    def _refresh_space(self, space: str) -> bool:
        tmeta = self.store.table_meta(space)
        si = self.spaces.get(space)
        if si is None or not self._matches(si, tmeta):
            self.spaces[space] = self._build(space)
            return True
        gen, rows = int(tmeta["generation"]), int(tmeta["count"])
        if si.meta["generation"] == gen and si.meta["rows"] == rows:
            return False
        if si.meta["generation"] == gen and si.meta["rows"] < rows:
            self._absorb(si, self.store.table(space, start=int(si.meta["rows"])))
        else:  # rows removed and renumbered: reconcile by key
            table = self.store.table(space)
            present = set(table.keys)
            si.remove([k for k in list(si.catalog.by_key) if k not in present])
            self._absorb(si, table)
        si.meta.update(generation=gen, rows=rows)
        if self._outgrown(si):
            self.spaces[space] = self._build(space)
        return True

    def _absorb(self, si: SpaceIndex, table: Table) -> None:
        """Add the table rows not yet indexed."""
        new = [i for i, k in enumerate(table.keys) if k not in si.catalog.by_key]
        attrs = self.store.entry_attrs(table.keys[i] for i in new)
        rows = [i for i in new if table.keys[i] in attrs]
        if rows:
            records = [_record(table.keys[i], attrs[table.keys[i]], self.store) for i in rows]
            cls = np.concatenate([table.slice_cls(i) for i in rows])
            si.add(records, table.pooled[rows], cls)

    @staticmethod
    def _matches(si: SpaceIndex, tmeta: Mapping[str, Any]) -> bool:
        """Whether a loaded index belongs to this table (else it is rebuilt)."""
        same = all(
            si.meta.get(k) == tmeta.get(k) for k in ("table_id", "weights_hash", "recipe_hash")
        )
        ahead = si.meta["generation"] == tmeta["generation"] and si.meta["rows"] > tmeta["count"]
        return same and int(si.meta["dim"]) == int(tmeta["dim"]) and not ahead

    def _outgrown(self, si: SpaceIndex) -> bool:
        if self.factory != "auto":
            return False
        for li in si.levels.values():
            n = li.ntotal
            if li.kind == "exact" and n > self.exact_max:
                return True
            if li.kind == "approximate" and (n > 2 * li.trained_size or li.tombstones > n / 4):
                return True
        return False

    def _build(
        self, space: str, *, factory: str | None = None, levels: Iterable[Level] = LEVELS
    ) -> SpaceIndex:
        """A space's index from its table and entry metadata alone."""
        tmeta = self.store.table_meta(space)
        table = self.store.table(space)
        attrs = self.store.entry_attrs(table.keys)
        keep = [i for i, k in enumerate(table.keys) if k in attrs]
        catalog = Catalog()
        records = [_record(table.keys[i], attrs[table.keys[i]], self.store) for i in keep]
        cls_rows = [table.slice_cls(i) for i in keep]
        for r in records:
            catalog.add(r)
        dim = int(tmeta["dim"])
        series_v = normalise(table.pooled[keep]) if keep else np.zeros((0, dim), np.float32)
        slice_v = (
            normalise(np.concatenate(cls_rows)) if cls_rows else np.zeros((0, dim), np.float32)
        )
        old = self.spaces.get(space)
        built: dict[Level, LevelIndex] = {}
        for lv, vecs, ids in (
            ("series", series_v, np.arange(len(records), dtype=np.int64)),
            ("slice", slice_v, np.arange(len(slice_v), dtype=np.int64)),
        ):
            lv = cast(Level, lv)
            spec = factory or self.factory
            if lv not in set(levels) and old is not None:
                spec = old.levels[lv].factory
            built[lv] = LevelIndex.build(
                lv,
                vecs,
                ids,
                factory=spec,
                exact_max=self.exact_max,
                recall_target=self.recall_target,
            )
        meta = {
            "model": tmeta.get("model"),
            "weights_hash": tmeta.get("weights_hash"),
            "recipe_hash": tmeta.get("recipe_hash"),
            "recipe": tmeta.get("recipe"),
            "dim": dim,
            "table_id": tmeta.get("table_id"),
            "generation": int(tmeta["generation"]),
            "rows": len(table.keys),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        log.info("built index %s (%d entries, %d slices)", space, len(records), len(slice_v))
        return SpaceIndex(space, meta, catalog, built)

    def rebuild(
        self,
        space: str | None = None,
        *,
        factory: str | None = None,
        levels: Iterable[Level] = LEVELS,
    ) -> list[str]:
        """Rebuild spaces from the store alone (all, or one) and save them."""
        with self.lock:
            names = [space] if space else self.store.spaces()
            for name in names:
                self.store.table_meta(name)  # unknown space: not-found
                self.spaces[name] = self._build(name, factory=factory, levels=levels)
                self._dirty.add(name)
            self.save()
            return names

    def save(self) -> None:
        """Write the spaces changed since the last save."""
        with self.lock:
            for space in sorted(self._dirty):
                if space in self.spaces:
                    self.spaces[space].save(self.path(space))
            self._dirty.clear()

    def touch(self, keys: Iterable[str]) -> None:
        """Re-read the metadata (labels, aliases) of entries already indexed."""
        with self.lock:
            wanted = list(keys)
            attrs = self.store.entry_attrs(wanted)
            for si in self.spaces.values():
                for key in wanted:
                    if key in si.catalog.by_key and key in attrs:
                        si.catalog.update(_record(key, attrs[key], self.store))
                        self._dirty.add(si.space)

    def get(self, space: str) -> SpaceIndex:
        si = self.spaces.get(space)
        if si is None:
            raise NotFoundError(
                f"no index for space {space!r}; indexed spaces: "
                f"{', '.join(sorted(self.spaces)) or 'none'}."
            )
        return si

    def study_entries(self, study: str) -> list[str]:
        """Keys of the indexed entries a study sent (primary or alias)."""
        with self.lock:
            return [
                si.catalog.record(o).key
                for si in self.spaces.values()
                for o in si.catalog.ordinals("study", study)
            ]

    def find(self, key: str) -> tuple[SpaceIndex, int]:
        """The space and ordinal of an indexed entry."""
        for si in self.spaces.values():
            o = si.catalog.by_key.get(key)
            if o is not None:
                return si, o
        raise NotFoundError(f"entry {key} is not indexed; `radcache index rebuild` adds it.")

    def info(self) -> list[dict[str, Any]]:
        with self.lock:
            return [si.info() for _, si in sorted(self.spaces.items())]


def _record(key: str, attrs: Mapping[str, Any], store: EmbeddingStore) -> Record:
    rec = Record.from_attrs(key, attrs)
    if attrs.get("volume_slices", attrs["n_slices"]) != attrs["n_slices"]:
        # slices were selected: name hits by the volume slice each row came from
        idx = store.read(key, "slice_index")
        rec = dataclasses.replace(rec, slice_index=tuple(int(i) for i in idx))
    return rec


def open_index(
    store: EmbeddingStore,
    directory: Path | None = None,
    *,
    factory: str = "auto",
    exact_max: int = 50_000,
    recall_target: float = 0.95,
) -> IndexSet:
    """Load the saved indexes of ``store`` and bring them up to date with it."""
    idx = IndexSet(
        store, directory, factory=factory, exact_max=exact_max, recall_target=recall_target
    )
    idx.load()
    idx.refresh()
    idx.save()
    return idx
