"""All spaces of one store: :class:`IndexSet`, :func:`open_index`, :func:`default_index_dir`.

Loads the saved spaces, keeps them in step with the store's tables (append, reconcile by
key after deletions, rebuild when outgrown) and saves the changed ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import NotFoundError, SearchIndexError
from ..store import EmbeddingStore, Table
from ._vectors import LEVELS, Level, normalise
from .catalog import Catalog, Record
from .level import LevelIndex
from .space import SpaceIndex

__all__ = ["IndexSet", "default_index_dir", "open_index"]

log = logging.getLogger(__name__)


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
