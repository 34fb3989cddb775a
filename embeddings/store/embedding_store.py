"""The :class:`EmbeddingStore` and :func:`open_store`: one store, composed of its rooms.

The store keeps the per-process state (open root, commit lock, caches) and asks its
:class:`~.backend.Backend` what the place it lives in supports; entries, tables and
re-sent files are kept by :mod:`.entries`, :mod:`.tables` and :mod:`.files`.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from ..cache_keys import tenant_content
from ..errors import AmbiguousReferenceError, NotFoundError, StoreError, StoreMismatchError
from ..patch_forms import covers
from ..pseudonyms import DEFAULT_TENANT
from ._common import _array, _group, _meta, _now
from .backend import Backend, open_backend
from .compaction import compact_table
from .entries import ARRAY_KINDS, EntryInfo, EntryWriter, Kind, carried
from .files import FileIndex, forget_study, same_ref, volume_record
from .locks import Locks
from .patch_codec import decode, stored_form
from .tables import (
    RowIndex,
    Table,
    add_tombstones,
    append_row,
    list_spaces,
    read_keys,
    read_table,
    read_table_meta,
    tombstoned_keys,
)

__all__ = ["STORE_FORMAT", "EmbeddingStore", "open_store"]

#: The format this radcache writes. Format 1 stores (no table tombstones) open as they are
#: and become format 2 when a row is first tombstoned or compacted.
STORE_FORMAT = 2
_READS = (1, 2)


class EmbeddingStore:
    """Read and write radcache entries in a Zarr v3 store."""

    def __init__(
        self,
        url: str | Path,
        *,
        mode: Literal["r", "a"] = "a",
        storage_options: dict[str, Any] | None = None,
        locks: Locks | None = None,
    ) -> None:
        """``locks`` coordinate writers of an object store (see :mod:`.locks`); local
        stores lock with ``flock`` and ignore them."""
        self.url = str(url)
        self.locks = locks
        self.read_only = mode == "r"
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._rows: dict[str, RowIndex] = {}
        self._files = FileIndex()
        self.backend: Backend = open_backend(
            self.url, read_only=self.read_only, storage_options=storage_options, locks=locks
        )
        #: The directory of a local store, else None.
        self.local_path: Path | None = self.backend.local_path
        with self._writing() if not self.read_only else contextlib.nullcontext():
            # Under the lock: two processes creating one new store must not race.
            try:
                self.root = zarr.open_group(
                    store=self.backend.zarr_store,
                    mode="r" if self.read_only else "a",
                    zarr_format=3,
                )
            except Exception as exc:
                raise StoreError(f"could not open the store at {self.url} ({exc}).") from exc
            meta = _meta(self.root)
            if not meta:
                if self.read_only:
                    raise NotFoundError(f"{self.url} is a Zarr store but not a radcache store.")
                meta = {"format": STORE_FORMAT, "created": _now()}
                self.root.attrs["radcache"] = meta
        self.format = int(meta.get("format", 0))
        if self.format not in _READS:
            raise StoreMismatchError(
                f"store {self.url} has format {meta.get('format')}; this radcache reads formats "
                f"{', '.join(map(str, _READS))}. Use a matching radcache version or a new store."
            )

    # -- identity ----------------------------------------------------------------------
    def bind_pseudonyms(self, fingerprint: str) -> None:
        """Record (first use) or check the fingerprint of the pseudonym secret."""
        if not self.read_only:
            with self._writing():
                self._bind(fingerprint)
        else:
            self._bind(fingerprint)

    def _bind(self, fingerprint: str) -> None:
        # Re-read the root's metadata: another process may have bound it since we opened.
        fresh = zarr.open_group(
            store=self.root.store, mode="r" if self.read_only else "a", zarr_format=3
        )
        self.root = fresh
        meta = _meta(fresh)
        known = meta.get("pseudonym_fingerprint")
        if known is None and not self.read_only:
            meta["pseudonym_fingerprint"] = fingerprint
            self.root.attrs["radcache"] = meta
        elif known is not None and known != fingerprint:
            raise StoreMismatchError(
                f"store {self.url} was written with another pseudonym secret (fingerprint {known}, "
                f"now {fingerprint}); the same study would get a different name. Use the original "
                "secret (RADCACHE_PSEUDONYM_KEY or its key file) or a new store."
            )

    # -- entries -----------------------------------------------------------------------
    def _entries(self) -> zarr.Group | None:
        try:
            g = self.root["entries"]
        except KeyError:
            return None
        return g if isinstance(g, zarr.Group) else None

    def get(self, key: str, *, patches: str = "none") -> EntryInfo | None:
        """The complete entry ``key``, or None (missing, half-written, or its patch grids
        kept in a form poorer than ``patches``, see :mod:`.patch_codec`)."""
        entries = self._entries()
        if entries is None:
            return None
        try:
            g = entries[key]
        except KeyError:
            return None
        attrs = _meta(_group(g))
        if not attrs.get("complete") or not covers(stored_form(attrs), patches):
            return None
        return EntryInfo.from_attrs(key, attrs)

    def begin(self, key: str, layout: Mapping[str, tuple[tuple[int, ...], Any]]) -> EntryWriter:
        """Start writing entry ``key`` with arrays of the given ``{name: (shape, dtype)}``.

        Nothing is visible until :meth:`EntryWriter.commit`; an earlier unfinished write
        of the same key is replaced.
        """
        if self.read_only:
            raise StoreError(f"store {self.url} is open read-only.")
        return EntryWriter(self, key, layout)

    def write(self, key: str, attrs: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> EntryInfo:
        """Write one entry atomically (arrays first, metadata last), then index it in its table."""
        writer = self.begin(key, {name: (a.shape, a.dtype) for name, a in arrays.items()})
        for name, arr in arrays.items():
            writer.put(name, 0, arr)
        return writer.commit(attrs, arrays["pooled"], arrays["cls"])

    def _commit(
        self, writer: EntryWriter, attrs: dict[str, Any], pooled: np.ndarray, cls: np.ndarray
    ) -> EntryInfo:
        key = writer.key
        with self._writing():
            existing = self.get(key)
            if existing is not None and covers(stored_form(existing.attrs), stored_form(attrs)):
                self._discard(writer)  # another writer finished the same content first
                self.ensure_indexed(existing)
                return existing
            # Else new, or replacing an entry whose patch grids are poorer (its row is kept).
            attrs = carried(existing.attrs if existing else writer.previous, attrs)
            writer.group.attrs["radcache"] = attrs  # the commit point of an in-place write
            if self.backend.supports_staging:  # ...of a staged one: the rename into entries/
                if existing is not None:
                    self.backend.remove(self.root, f"entries/{key}")
                self.backend.publish(self.root, writer.path, key)
            info = EntryInfo.from_attrs(key, attrs)
            if (existing or writer.previous) is None or key not in self._live_rows(info.space):
                self._append(info, pooled, cls)
            return info

    def _discard(self, writer: EntryWriter) -> None:
        if self.backend.supports_staging:
            self.backend.discard(writer.path)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Exclusive right to commit: this process's threads, and other processes as far
        as the backend's commit lock reaches (an flock on a local store, the ``commit``
        lock of an object store's locks)."""
        with self._lock:
            if self._lock_depth:  # re-entered: already held
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            with self.backend.commit_lock():
                self._lock_depth = 1
                try:
                    yield
                finally:
                    self._lock_depth = 0

    def claim(self, key: str) -> contextlib.AbstractContextManager[None]:
        """The right to write entry ``key``: exclusive across processes on an object store
        with locks (so no two writers fill the same chunks); local stores stage each
        writer privately and need no claim."""
        return self.backend.claim(key)

    def ensure_indexed(self, info: EntryInfo) -> None:
        """Add an entry to its table if a crash left it out."""
        if info.key not in self._live_rows(info.space):
            with self._writing():
                if info.key in self._live_rows(info.space):  # another process may have
                    return
                g = _group(self.root[f"entries/{info.key}"])
                pooled, cls = _array(g["pooled"])[...], _array(g["cls"])[...]
                self._append(info, np.asarray(pooled), np.asarray(cls))

    def add_alias(self, key: str, ref: Mapping[str, str | None]) -> None:
        """Record another study/series (and its patient) that delivered the same content as
        entry ``key``: the entry is then listed, and deleted, under that study too."""
        with self._lock:
            g = _group(self.root[f"entries/{key}"])
            attrs = _meta(g)
            aliases = list(attrs.get("aliases", []))
            if not any(same_ref(a, ref) for a in (attrs["volume"], *aliases)):
                aliases.append(dict(ref))
                attrs["aliases"] = aliases
                g.attrs["radcache"] = attrs

    def annotate(
        self, key: str, *, labels: Mapping[str, Any] | None = None, collection: str | None = None
    ) -> None:
        """Merge ``labels`` into entry ``key``'s metadata (``attrs.radcache.labels``) and add
        it to ``collection`` (``attrs.radcache.collections``)."""
        if not labels and not collection:
            return
        with self._writing():
            g = _group(self.root[f"entries/{key}"])
            attrs = _meta(g)
            attrs["labels"] = {**attrs.get("labels", {}), **(labels or {})}
            if collection and collection not in attrs.get("collections", []):
                attrs["collections"] = [*attrs.get("collections", []), collection]
            g.attrs["radcache"] = attrs

    def iter_entries(self) -> Iterator[EntryInfo]:
        entries = self._entries()
        if entries is None:
            return
        for key in sorted(entries.group_keys()):
            info = self.get(key)
            if info is not None:
                yield info

    def series(self) -> list[EntryInfo]:
        """Every complete entry with its metadata."""
        return list(self.iter_entries())

    def delete_study(self, study: str, keys: Iterable[str] | None = None) -> list[str]:
        """Remove a study (consent withdrawal); returns the entry keys deleted. Idempotent.

        An entry whose content another study also delivered (an alias) stays, named by
        that study; every other entry of ``study`` goes at once, with its re-sent-file
        record, and its table row is tombstoned (its vectors leave the table's files at the
        next :meth:`compact`). ``keys`` are the entries that name the study, as a catalog
        knows them; without them every entry's metadata is read to find them (O(store)).
        """
        if self.read_only:
            raise StoreError(f"store {self.url} is open read-only.")
        if keys is None:
            keys = [e.key for e in self.iter_entries() if study in _studies(e.attrs)]
        gone: list[EntryInfo] = []
        with self._writing():
            for key in sorted(set(keys)):
                e = self.get(key)
                if e is None:
                    continue
                primary = {k: e.attrs["volume"].get(k) for k in ("study", "series", "part")}
                refs = [primary, *e.attrs.get("aliases", [])]
                keep = [r for r in refs if r.get("study") != study]
                if len(keep) == len(refs):
                    continue
                g = _group(self.root[f"entries/{e.key}"])
                if keep:  # another study delivered the same pixels: it keeps the entry
                    attrs = _meta(g)
                    attrs["volume"] = {**attrs["volume"], **keep[0]}
                    attrs["aliases"] = keep[1:]
                    g.attrs["radcache"] = attrs
                    forget_study(self.root, e.attrs, study, keep[0])
                    continue
                gone.append(e)
                tenant = str(e.attrs.get("tenant") or DEFAULT_TENANT)
                content = tenant_content(str(e.attrs.get("content_hash", "")), tenant)
                self.backend.remove(self.root, f"volumes/{content}")
                self.backend.remove(self.root, f"entries/{e.key}")
            for space in sorted({e.space for e in gone}):
                self._tombstone(space, {e.key for e in gone if e.space == space})
        return [e.key for e in gone]

    def _tombstone(self, space: str, keys: set[str]) -> None:
        """Tombstone the table rows of ``keys`` (under the commit lock)."""
        live = self._live_rows(space)
        rows = [live[k] for k in keys if k in live]
        if rows:
            self._upgrade_format()
            add_tombstones(self.root, space, rows)
        for k in keys:
            self._row_index(space).removed(k)

    def _upgrade_format(self) -> None:
        """Mark a format 1 store format 2 before its first tombstone (under the commit lock),
        so that an older radcache refuses it rather than showing deleted rows."""
        if self.format >= STORE_FORMAT:
            return
        fresh = zarr.open_group(store=self.root.store, mode="a", zarr_format=3)
        meta = _meta(fresh)
        if int(meta.get("format", 0)) < STORE_FORMAT:
            fresh.attrs["radcache"] = {**meta, "format": STORE_FORMAT}
        self.root, self.format = fresh, STORE_FORMAT

    def compact(self, space: str | None = None) -> dict[str, int]:
        """Rewrite tables (all, or one space) without their tombstoned rows, beside the rows
        they replace, and swap them in; returns the rows removed per space. Readers and
        writers go on meanwhile (see :mod:`.compaction`)."""
        if self.read_only:
            raise StoreError(f"store {self.url} is open read-only.")
        names = [space] if space else self.spaces()
        out: dict[str, int] = {}
        for name in names:
            read_table_meta(self.root, name)  # unknown space: not-found
            with self._writing():
                self._upgrade_format()
            out[name] = compact_table(self.root, name, self._writing)
        return out

    def resolve(self, ref: str, *, model: str | None = None) -> EntryInfo:
        """An entry by key, or by series name (``series`` or ``series#part``). A name is
        found by reading every entry's metadata (O(store)); the service looks names up in
        its entry catalog instead."""
        info = self.get(ref) if re.fullmatch(r"[0-9a-f]{32}", ref) else None
        if info is not None:
            return info
        series, _, part = ref.partition("#")
        hits = [
            e
            for e in self.iter_entries()
            if (
                e.series == series
                or any(a.get("series") == series for a in e.attrs.get("aliases", []))
            )
            and (not part or e.part == part)
            and (model is None or e.model == model)
        ]
        if not hits:
            raise NotFoundError(
                f"no entry for {ref!r} in {self.url}; `radcache show {self.url}` lists them."
            )
        if len(hits) > 1:
            listing = "; ".join(
                f"{e.key} ({e.model}, recipe {e.recipe_hash}, part {e.part or '-'})" for e in hits
            )
            raise AmbiguousReferenceError(
                f"{ref!r} matches {len(hits)} entries: {listing}. "
                "Pass an entry key, series#part, or a model."
            )
        return hits[0]

    def read(self, ref: str, kind: Kind = "cls", *, model: str | None = None) -> np.ndarray:
        """One array of one entry, as numpy."""
        if kind not in ARRAY_KINDS:
            raise StoreError(
                f"unknown array kind {kind!r}; expected one of {', '.join(ARRAY_KINDS)}."
            )
        info = self.resolve(ref, model=model)
        if kind not in info.kinds:
            raise NotFoundError(
                f"entry {info.key} has no {kind!r} array (it has {', '.join(info.kinds)}); "
                "embed with --patch-storage fp16, int8 or pooled:N to keep patch tokens."
            )
        if kind == "patch":  # float16 whatever the stored form
            return decode(_group(self.root[f"entries/{info.key}"]), info.attrs)
        return np.asarray(_array(self.root[f"entries/{info.key}/{kind}"])[...])

    # -- re-sent files (see .files) ---------------------------------------------------
    def remember_files(self, content: str, digests: Iterable[str], record: dict[str, Any]) -> None:
        """Record that exactly the files ``digests`` make the volume with ``content`` hash."""
        if self.read_only:
            return
        with self._writing():
            self._files.remember(self.root, content, digests, record)

    def file_index(self) -> Mapping[str, str]:
        """Every known file digest → the content hash of its volume (reloaded if it grew)."""
        return self._files.mapping(self.root)

    def volume_record(self, content: str) -> dict[str, Any] | None:
        return volume_record(self.root, content)

    # -- tables (see .tables) ----------------------------------------------------------
    def spaces(self) -> list[str]:
        """The spaces that have a table (whose metadata is written: one being created this
        moment by another writer is left out until it is)."""
        names = self.backend.child_groups("tables")
        if names is None:
            return list_spaces(self.root)
        return sorted(n for n in names if "count" in self._table_attrs(n))

    def _table_attrs(self, space: str) -> dict[str, Any]:
        doc = self.backend.read_document(f"tables/{space}/zarr.json") or {}
        return dict(doc.get("attributes", {}).get("radcache", {}))

    def _row_index(self, space: str) -> RowIndex:
        return self._rows.setdefault(space, RowIndex())

    def _live_rows(self, space: str) -> dict[str, int]:
        """Live ``{key: row}`` of a table, cached per process and caught up incrementally
        (only rows and tombstones added since the last call are read)."""
        with self._lock:
            return self._row_index(space).update(self.root, space)

    def table_rows(self, space: str, keys: Iterable[str] | None = None) -> dict[str, int]:
        """The live rows of ``keys`` (default: every key) in a space's table; keys without
        one are left out."""
        live = self._live_rows(space)
        return dict(live) if keys is None else {k: live[k] for k in keys if k in live}

    def _append(self, info: EntryInfo, pooled: np.ndarray, cls: np.ndarray) -> None:
        row = append_row(self.root, info, pooled, cls)
        self._row_index(info.space).appended(info.key, row)

    def table_meta(self, space: str) -> dict[str, Any]:
        """A table's metadata: ``count`` rows, ``slices``, ``deleted`` (tombstones),
        ``generation`` (bumped whenever rows are renumbered: a compaction), model and
        recipe."""
        return read_table_meta(self.root, space)

    def table(self, space: str, start: int = 0, rows: Iterable[int] | None = None) -> Table:
        """Live rows ``start:`` (or only ``rows``) of a space's table in one pass (rows past
        the committed count and tombstoned rows left out; ``Table.rows`` numbers the rest).
        ``offsets`` and ``cls`` then cover those rows only, offsets from 0."""
        return read_table(self.root, space, start, rows)

    def table_keys(self, space: str, start: int = 0) -> list[str]:
        """Keys of the live rows ``start:`` of a space's table (its ``keys`` column only)."""
        return read_keys(self.root, space, start)

    def tombstoned(
        self, space: str, start: int, stop: int, generation: int | None = None
    ) -> list[str] | None:
        """Keys of the rows behind a table's tombstones ``start:stop``, in the order they
        were deleted (a key deleted, stored again and deleted again comes twice); None if
        the table has left ``generation`` (compacted meanwhile: reconcile by key)."""
        return tombstoned_keys(self.root, space, start, stop, generation)

    def entry_attrs(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Metadata of many complete entries (missing or unfinished ones left out); on a local
        store read straight from each entry's ``zarr.json``."""
        out: dict[str, dict[str, Any]] = {}
        for key in keys:
            if self.backend.supports_direct_reads:
                doc = self.backend.read_document(f"entries/{key}/zarr.json")
                if doc is None:
                    continue
                attrs = doc.get("attributes", {}).get("radcache", {})
            else:
                info = self.get(key)
                attrs = dict(info.attrs) if info is not None else {}
            if attrs.get("complete"):
                out[key] = attrs
        return out


def _studies(attrs: Mapping[str, Any]) -> set[str]:
    """Every study that names an entry: its own and its aliases'."""
    return {str(attrs.get("volume", {}).get("study", ""))} | {
        str(a.get("study", "")) for a in attrs.get("aliases", [])
    }


def open_store(
    url: str | Path,
    *,
    mode: Literal["r", "a"] = "r",
    storage_options: dict[str, Any] | None = None,
    locks: Locks | None = None,
) -> EmbeddingStore:
    """Open a radcache store: ``.series()`` lists entries, ``.read(ref, kind)`` gives arrays."""
    return EmbeddingStore(url, mode=mode, storage_options=storage_options, locks=locks)
