"""All spaces of one store: :class:`IndexSet`, :func:`open_index`, :func:`default_index_dir`.

Loads the saved spaces, keeps them in step with the store's tables (append, reconcile by
key after deletions, rebuild when outgrown) and saves the changed ones.

Locks: searches, refreshes and metadata updates take :attr:`IndexSet.lock`, briefly. A
build (a rebuild, or a refresh replacing an outgrown index) runs beside the serving index
without it, one build per space at a time, and swaps the new index in under it; metadata
updates that reached the old index meanwhile are carried over, and rows appended or
deleted meanwhile are caught up by the refresh that follows (:meth:`IndexSet.rebuild` runs
one at once). Saving holds only the space's own write lock (:class:`SpaceIndex`), so
searches go on while the files are written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from ..errors import NotFoundError, SearchIndexError
from ..store import EmbeddingStore, Table
from ._vectors import LEVELS, Level, normalise
from .catalog import Catalog, Record
from .folders import GRACE_SECONDS, KEEP_VERSIONS, POINTER, prune
from .level import LevelIndex
from .space import SpaceIndex

__all__ = ["IndexSet", "default_index_dir", "open_index"]

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        exact_max: int = 10_000,
        recall_target: float = 0.95,
        keep_versions: int = KEEP_VERSIONS,
        version_grace: float = GRACE_SECONDS,
    ) -> None:
        self.store = store
        self.directory = Path(directory) if directory is not None else default_index_dir(store)
        self.factory = factory
        self.exact_max = exact_max
        self.recall_target = recall_target
        self.keep_versions = keep_versions  # saved versions kept besides the current one
        self.version_grace = version_grace  # seconds a replaced version stays readable
        self.spaces: dict[str, SpaceIndex] = {}
        self.lock = threading.RLock()  # searches, refreshes, swaps: never held for a build
        self._dirty: set[str] = set()
        self._building: dict[str, threading.Lock] = {}  # one build per space at a time
        self._saving = threading.Lock()  # one save at a time

    def path(self, space: str) -> Path:
        return self.directory / re.sub(r"[^A-Za-z0-9._-]", "_", space)

    def load(self) -> None:
        """Load the saved indexes, FAISS files memory-mapped where the type allows (a
        damaged or unknown file is left to the next refresh, which rebuilds it)."""
        for space in self.store.spaces():
            p = self.path(space)
            if not (p / POINTER).exists():
                continue
            try:
                si = SpaceIndex.load(p)
            except (OSError, ValueError, KeyError, RuntimeError, SearchIndexError) as exc:
                log.warning("index %s unreadable (%s); it will be rebuilt", p, exc)
                continue
            if si.space == space:
                with self.lock:
                    self.spaces[space] = si

    def refresh(self, spaces: Iterable[str] | None = None) -> list[str]:
        """Bring every space (or only ``spaces``) up to date with the store; returns the
        spaces that changed.

        Rows appended to a table since the last refresh are added and rows tombstoned since
        are removed (reading only those rows); a table whose rows were renumbered (a
        compaction) is reconciled by entry key; a space whose index no longer fits its size
        (exact past ``exact_max``, approximate grown 2× since training, a quarter
        tombstones) is rebuilt.
        """
        changed = []
        wanted = None if spaces is None else set(spaces)
        with self.lock:
            for space in self.store.spaces():
                if wanted is not None and space not in wanted:
                    continue
                if self._refresh_space(space):
                    changed.append(space)
                    self._dirty.add(space)
            gone = set(self.spaces) - set(self.store.spaces())
            for space in gone if wanted is None else gone & wanted:
                del self.spaces[space]
                shutil.rmtree(self.path(space), ignore_errors=True)
        return changed

    def _refresh_space(self, space: str) -> bool:
        tmeta = self.store.table_meta(space)
        gen, rows, dead = int(tmeta["generation"]), int(tmeta["count"]), int(tmeta["deleted"])
        si = self.spaces.get(space)
        if si is None or not self._matches(si, tmeta):
            si = self.spaces[space] = self._build(space)
            # The build read the table after tmeta: tombstones from `dead` on are at most
            # read twice, which removing by key (and restoring what was re-stored) allows.
            si.meta.setdefault("deleted", dead)
            return True
        seen = int(si.meta.get("deleted", 0))
        if si.meta["generation"] == gen and si.meta["rows"] == rows and seen == dead:
            return False
        gone: list[str] | None = []
        if si.meta["generation"] == gen and dead > seen:  # deleted since: they leave at once
            gone = self.store.tombstoned(space, seen, dead, generation=gen)
        if si.meta["generation"] == gen and gone is not None:
            back: list[str] = []
            if gone:
                si.remove(gone)
                # a key deleted, then stored again (its entry exists) comes back below
                back = list(self.store.entry_attrs(set(gone)))
            if rows > si.meta["rows"]:
                self._absorb(si, self.store.table(space, start=int(si.meta["rows"])))
            back = [k for k in back if k not in si.catalog.by_key]
            if back:
                live = self.store.table_rows(space, back)
                self._absorb(si, self.store.table(space, rows=live.values()))
        else:  # rows renumbered (compacted, perhaps just now): reconcile by key
            live = self.store.table_rows(space)
            si.remove([k for k in list(si.catalog.by_key) if k not in live])
            missing = [r for k, r in live.items() if k not in si.catalog.by_key]
            self._absorb(si, self.store.table(space, rows=missing))
        si.meta.update(generation=gen, rows=rows, deleted=dead)
        if self._outgrown(si):
            self.spaces[space] = self._build(space)
            self.spaces[space].meta.setdefault("deleted", dead)
        return True

    def _absorb(self, si: SpaceIndex, table: Table) -> None:
        """Add the table rows not yet indexed (rows whose entry is gone are left out)."""
        new = [i for i, k in enumerate(table.keys) if k not in si.catalog.by_key]
        attrs = self.store.entry_attrs(table.keys[i] for i in new)
        rows = [i for i in new if table.keys[i] in attrs]
        if rows:
            records = [_record(table.keys[i], attrs[table.keys[i]], self.store) for i in rows]
            cls = np.concatenate([table.slice_cls(i) for i in rows])
            si.add(records, table.pooled[rows], cls)

    @staticmethod
    def _matches(si: SpaceIndex, tmeta: Mapping[str, Any]) -> bool:
        """Whether a loaded index belongs to this table (else it is rebuilt): same table,
        model and recipe, and not ahead of it (more rows or tombstones than it has)."""
        same = all(
            si.meta.get(k) == tmeta.get(k) for k in ("table_id", "weights_hash", "recipe_hash")
        )
        ahead = si.meta["generation"] == tmeta["generation"] and (
            si.meta["rows"] > tmeta["count"]
            or int(si.meta.get("deleted", 0)) > int(tmeta.get("deleted", 0))
        )
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
        self,
        space: str,
        *,
        factory: str | None = None,
        levels: Iterable[Level] = LEVELS,
        again: bool = False,
    ) -> SpaceIndex:
        """A space's index from its table and entry metadata alone, built beside the
        serving one and swapped in; returns it.

        Callable with :attr:`lock` held (from a refresh): the lock is released while the
        index is built and held again for the swap. An index that does not belong to the
        table (:meth:`_matches`) stops serving at once. A call that waited while another
        build replaced the same index takes that one, unless ``again`` (an explicit
        rebuild, which may ask for another type) is set.
        """
        with self.lock:
            first = self.spaces.get(space)
            if first is not None and not self._matches(first, self.store.table_meta(space)):
                del self.spaces[space]  # another store's, or ahead of this one: never served
                first = None
            gate = self._building.setdefault(space, threading.Lock())

        def build() -> SpaceIndex:
            with gate:
                with self.lock:
                    old = self.spaces.get(space)
                    if not again and old is not None and old is not first:
                        return old  # built by the call this one waited for
                    before = _Before(old)
                new = self._assemble(space, factory, levels, old)
                with self.lock:  # the swap
                    if old is not None and self.spaces.get(space) is old:
                        before.carry(new)
                    self.spaces[space] = new
                    self._dirty.add(space)
                return new

        return _beside(self.lock, build)

    def _assemble(
        self, space: str, factory: str | None, levels: Iterable[Level], old: SpaceIndex | None
    ) -> SpaceIndex:
        """The new index itself (no lock held: reads the store, trains, adds)."""
        table = self.store.table(space)
        tmeta = table.attrs  # the table's metadata as of this read
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
            "rows": int(tmeta["count"]),
            "deleted": int(tmeta.get("deleted", 0)),
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
        """Rebuild spaces from the store alone (all, or one) and save them. Searches are
        answered by the old index until the new one is swapped in; rows appended or
        deleted during the build are caught up right after the swap."""
        names = [space] if space else self.store.spaces()
        for name in names:
            self.store.table_meta(name)  # unknown space: not-found
            self._build(name, factory=factory, levels=levels, again=True)
            with self.lock:
                self._refresh_space(name)  # what the store gained or lost meanwhile
        self.save()
        return names

    def save(self, *, purge: bool = False) -> dict[str, Path]:
        """Write the spaces changed since the last save; returns the version folder written
        for each. Searches go on meanwhile (see the module docstring); the folders are safe
        to share with other processes (:mod:`.folders`).

        ``purge`` (after a consent deletion): first rebuild the spaces whose index keeps
        deleted vectors as tombstones (types FAISS cannot remove from, such as HNSW), and
        then delete every earlier saved version of every space at once, so that no index
        file holds what was deleted."""
        if purge:
            with self.lock:
                kept = [s for s, si in self.spaces.items() if si.tombstones()]
            for space in kept:
                self._build(space, again=True)
                with self.lock:
                    self._refresh_space(space)
        with self._saving:
            with self.lock:
                todo = {s: self.spaces[s] for s in sorted(self._dirty) if s in self.spaces}
                self._dirty.clear()
                every = list(self.spaces)
            written: dict[str, Path] = {}
            try:
                for space, si in todo.items():
                    keep, grace = (0, 0.0) if purge else (self.keep_versions, self.version_grace)
                    written[space] = si.save(self.path(space), keep=keep, grace=grace)
            except BaseException:
                with self.lock:
                    self._dirty.update(s for s in todo if s not in written)
                raise
            if purge:
                for space in every:
                    prune(self.path(space))
            return written

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

    def study_entries(self, study: str, tenant: str | None = None) -> list[str]:
        """Keys of the indexed entries a study sent (primary or alias), of ``tenant``'s
        entries only when given."""
        with self.lock:
            recs = [
                si.catalog.record(o)
                for si in self.spaces.values()
                for o in si.catalog.ordinals("study", study)
            ]
            return [r.key for r in recs if tenant is None or r.tenant == tenant]

    def find(self, key: str) -> tuple[SpaceIndex, int]:
        """The space and ordinal of an indexed entry."""
        for si in self.spaces.values():
            o = si.catalog.by_key.get(key)
            if o is not None:
                return si, o
        raise NotFoundError(f"entry {key} is not indexed; `radcache index rebuild` adds it.")

    def info(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Every space's :meth:`SpaceIndex.info`; for a ``tenant``, the spaces holding its
        entries, described by them alone."""
        with self.lock:
            return [
                si.info(tenant)
                for _, si in sorted(self.spaces.items())
                if tenant is None or si.holds(tenant)
            ]


class _Before:
    """What an index's catalog held when a build began, to carry later updates over."""

    def __init__(self, si: SpaceIndex | None) -> None:
        self.index = si
        self.version = si.catalog.version if si is not None else 0
        self.records = list(si.catalog.records) if si is not None else []

    def carry(self, new: SpaceIndex) -> None:
        """Metadata updates (labels, aliases) the old index took during the build."""
        old = self.index
        if old is None or old.catalog.version == self.version:
            return
        for o, rec in enumerate(old.catalog.records[: len(self.records)]):
            if rec is not None and rec is not self.records[o] and rec.key in new.catalog.by_key:
                new.catalog.update(rec)


def _beside(lock: threading.RLock, work: Callable[[], T]) -> T:
    """Run ``work`` on a thread of its own and wait for it with ``lock`` released, however
    often the caller holds it (held again, as before, on return)."""
    done = threading.Condition(lock)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = work()
        except BaseException as exc:  # handed to the waiting caller
            box["exc"] = exc
        with done:
            box["done"] = True
            done.notify_all()

    with done:
        threading.Thread(target=run, name="radcache-index-build", daemon=True).start()
        done.wait_for(lambda: "done" in box)
    if "exc" in box:
        raise box["exc"]
    return cast(T, box["out"])


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
    exact_max: int = 10_000,
    recall_target: float = 0.95,
    keep_versions: int = KEEP_VERSIONS,
    version_grace: float = GRACE_SECONDS,
) -> IndexSet:
    """Load the saved indexes of ``store`` (memory-mapped where the type allows) and bring
    them up to date with it; what changed is saved."""
    idx = IndexSet(
        store,
        directory,
        factory=factory,
        exact_max=exact_max,
        recall_target=recall_target,
        keep_versions=keep_versions,
        version_grace=version_grace,
    )
    idx.load()
    idx.refresh()
    idx.save()
    return idx
