"""A space: the catalog and both level indexes of one (model weights, recipe) space.

:class:`SpaceIndex` searches, adds and removes entries, and saves / loads itself as
versioned folders behind an atomically replaced ``CURRENT`` pointer; :class:`Hit` is one
search result.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import SearchIndexError
from ._vectors import LEVELS, Level, normalise
from .catalog import Catalog, Filters, Record
from .level import LevelIndex, faiss

__all__ = ["INDEX_FORMAT", "Hit", "SpaceIndex"]

INDEX_FORMAT = 1


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
