"""A space: the catalog and both level indexes of one (model weights, recipe) space.

:class:`SpaceIndex` searches, adds and removes entries, and saves / loads itself as
version folders behind an atomically replaced ``CURRENT`` pointer (:mod:`.folders`);
:class:`Hit` is one search result.

A version folder holds ``meta.json`` (format, table position, how each level was built),
``catalog.npz`` (the catalog as arrays, :mod:`.catalog_arrays`) and ``series.faiss`` /
``slice.faiss``, read memory-mapped where FAISS can. Format 1 (a JSON document per catalog
record) is still read; format 2 is written.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import SearchIndexError
from ..store.spaces import describe_space, recipe_summary
from ._vectors import LEVELS, Level, normalise
from .catalog import Catalog, Filters, Record
from .catalog_arrays import from_arrays, to_arrays
from .folders import GRACE_SECONDS, KEEP_VERSIONS, begin, finish, open_current
from .level import LevelIndex

__all__ = ["INDEX_FORMAT", "Hit", "SpaceIndex"]

INDEX_FORMAT = 2
_READABLE = (1, 2)
_FILES = ("meta.json", "catalog.npz", "series.faiss", "slice.faiss")


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
        # Held while entries are added or removed, and while the space is saved: a save
        # reads the catalog and the FAISS indexes as one state without holding the lock
        # that searches take.
        self._writing = threading.Lock()

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

    def why_empty(self, level: Level, filters: Filters) -> str:
        """Why a search of this space with ``filters`` found nothing, in words one can act on."""
        count = self.catalog.allowed
        unit = "series" if level == "series" else "slices"
        total = count(level, Filters(tenant=filters.tenant))[2]
        if total == 0:
            return f"space {self.space} holds no {unit}; embed studies with its model and recipe."
        kept = count(
            level, replace(filters, exclude_studies=frozenset(), exclude_patients=frozenset())
        )[2]
        if kept == 0:
            return (
                f"none of the {total} {unit} of space {self.space} match the filters; loosen them."
            )
        if count(level, filters)[2] == 0:
            return (
                f"the {kept} matching {unit} of space {self.space} are the query's own study or "
                "patient, which are left out; let them match with include_same_study (CLI "
                "--include-same-study), or without exclude_same_patient."
            )
        return f"the approximate index of space {self.space} found none of the allowed {unit}."

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
        with self._writing:
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
        with self._writing:
            for key in keys:
                gone = self.catalog.remove(key)
                if gone is not None:
                    o, ids = gone
                    self.levels["series"].remove([o])
                    self.levels["slice"].remove(ids)
                    n += 1
        return n

    def tombstones(self) -> int:
        """Removed vectors still inside a level's FAISS data (types that cannot remove)."""
        return sum(li.tombstones for li in self.levels.values())

    def holds(self, tenant: str) -> bool:
        """Whether ``tenant`` has live entries here."""
        return self.catalog.count("tenant", tenant) > 0

    def info(self, tenant: str | None = None) -> dict[str, Any]:
        """What the space holds; for a ``tenant``, only its own entries and vector counts
        (nothing that another tenant's data changes: memory, training, tombstones)."""
        cat = self.catalog
        mine = None if tenant is None else cat.ordinals("tenant", tenant)
        mods = cat.modalities(tenant)
        recipe = recipe_summary(self.meta.get("recipe"))
        n = len(cat) if mine is None else len(mine)
        head = {
            "space": self.space,
            "model": self.meta.get("model"),
            "weights_hash": self.meta.get("weights_hash"),
            "recipe_hash": self.meta.get("recipe_hash"),
            "dim": self.dim,
            "modalities": mods,
            "recipe": recipe,
            "description": describe_space(str(self.meta.get("model")), mods, recipe, n),
        }
        if mine is None:
            levels = {lv: li.info() for lv, li in self.levels.items()}
            return {**head, "entries": n, "levels": levels}
        counts = {
            "series": len(mine),
            "slice": sum(self.catalog.record(o).n_slices for o in mine),
        }
        levels = {lv: {"level": lv, "vectors": counts[lv], "dim": self.dim} for lv in self.levels}
        return {**head, "entries": len(mine), "levels": levels}

    # -- persistence --
    def save(
        self,
        path: Path,
        *,
        keep: int = KEEP_VERSIONS,
        grace: float = GRACE_SECONDS,
    ) -> Path:
        """Write the space as a new version folder under ``path`` and make it current;
        returns the folder. Safe beside other processes saving or reading ``path``
        (:mod:`.folders`); searches go on meanwhile, adding and removing entries waits."""
        head: dict[str, Any] = {"format": INDEX_FORMAT, "space": self.space, **dict(self.meta)}
        # The metadata is copied first: a refresh updates it after the rows it names are
        # in, so a save may hold rows its metadata does not count yet (the next refresh
        # skips them), never the reverse.
        with self._writing:
            head["levels"] = {lv: _saved_info(li) for lv, li in self.levels.items()}
            tmp = begin(path)
            try:
                for lv, li in self.levels.items():
                    li.write(tmp / f"{lv}.faiss")
                with (tmp / "catalog.npz").open("wb") as fh:
                    np.savez(fh, **cast(dict[str, Any], to_arrays(self.catalog)))
                (tmp / "meta.json").write_text(json.dumps(head, indent=1))
                final = finish(path, tmp, keep=keep, grace=grace)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            for lv, li in self.levels.items():
                li.saved_as(final / f"{lv}.faiss")
        return final

    @classmethod
    def load(cls, path: Path, *, mmap: bool = True) -> SpaceIndex:
        """The version of a space that ``path/CURRENT`` names (FAISS files memory-mapped
        where the type allows, unless ``mmap`` is false)."""
        where, fds = open_current(path, _FILES)
        try:
            with os.fdopen(fds.pop("meta.json"), "rb") as fh:
                head = json.loads(fh.read())
            if int(head.get("format", 0)) not in _READABLE:
                raise SearchIndexError(
                    f"{where} has index format {head.get('format')}; this radcache reads "
                    f"formats {', '.join(map(str, _READABLE))}. Rebuild it with "
                    "`radcache index rebuild`."
                )
            with os.fdopen(fds.pop("catalog.npz"), "rb") as fh, np.load(fh) as z:
                catalog = from_arrays(z)
            levels: dict[Level, LevelIndex] = {}
            for lv in LEVELS:
                name = f"{lv}.faiss"
                info = head["levels"][lv]
                levels[lv] = LevelIndex.read(
                    where / name, lv, int(head["dim"]), info, fd=fds.pop(name), mmap=mmap
                )
        finally:
            for fd in fds.values():
                os.close(fd)
        meta = {k: v for k, v in head.items() if k not in ("format", "space", "levels")}
        return cls(head["space"], meta, catalog, levels)


def _saved_info(li: LevelIndex) -> dict[str, Any]:
    return {k: v for k, v in li.info().items() if k not in ("memory_bytes", "mapped")}
