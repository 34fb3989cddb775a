"""Integrity: whether a store's own parts agree, and their repair (``radcache check``).

Every write of the store is ordered so that a crash leaves nothing visible half-written,
but an operation of several writes that a process did not finish leaves its parts
disagreeing. :func:`inspect` finds each such case (a :class:`Finding` of a stable kind);
:func:`repair` fixes each kind by the store's own means (:class:`Repair`):

* ``orphan-staging`` — a staged write whose writer died. Swept, as opening the store for
  writing does.
* ``damaged-entry`` — an entry folder that is not a whole, complete entry: a deletion
  that stopped halfway through its files, or (object storage) an in-place write that
  stopped. Removed, its table rows tombstoned: what it held cannot be read back, and a
  study sent again is embedded again.
* ``table-row-missing`` — a complete entry without a live row in its table (stopped
  between the commit and the append). The row is appended (``ensure_indexed``).
* ``table-row-orphan`` — a live table row whose entry is gone (a deletion stopped before
  its tombstones). Tombstoned, so its vectors leave at the next compaction.
* ``table-row-duplicate`` — a key with several live rows (an orphan row whose content was
  stored again). All but the last are tombstoned.
* ``orphan-compaction`` — rows of a table that its ``data`` does not name (a compaction
  that stopped before its swap). Removed. Only looked for as the store's sole writer: a
  running compaction writes such rows without a lock.

Findings name entry keys, never a file or anything of a patient. A candidate found while
other processes write is confirmed under the commit lock before it is reported or fixed.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._common import _array, _group, _meta, _words_key
from .tables import add_tombstones, data_group, read_table_meta, tombstones

if TYPE_CHECKING:
    from .embedding_store import EmbeddingStore

__all__ = ["KINDS", "Finding", "Repair", "StoreState", "inspect", "repair"]

#: What each kind of store finding means (the module docstring says how each is repaired).
KINDS = {
    "orphan-staging": "staged write of a writer that died",
    "damaged-entry": "entry folder that is not a whole, complete entry",
    "table-row-missing": "complete entry without a live table row",
    "table-row-orphan": "live table row whose entry is gone",
    "table-row-duplicate": "key with several live table rows",
    "orphan-compaction": "table rows of an interrupted compaction",
}
_SHOWN = 20  # keys a finding lists
_COMPACTED = re.compile(r"c[0-9a-f]{16}")  # the rows groups compaction writes
_WHOLE = ("cls", "pooled", "mean_patch")  # one chunk each, never all zeros: must be on disk


@dataclass(frozen=True)
class Finding:
    """One kind of disagreement, where it is, how often, and the keys (entries or jobs) it
    concerns (at most 20 listed)."""

    kind: str
    count: int
    about: str
    where: str = ""
    keys: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "count": self.count,
            "where": self.where,
            "about": self.about,
            "keys": list(self.keys),
        }


@dataclass(frozen=True)
class Repair:
    """What a repair did about one kind of finding."""

    kind: str
    count: int
    action: str
    where: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count, "action": self.action, "where": self.where}


def finding(
    kinds: Mapping[str, str], kind: str, keys: list[str], where: str = "", count: int | None = None
) -> Finding:
    """A finding of ``kind`` (described in ``kinds``) about ``keys``."""
    return Finding(
        kind, len(keys) if count is None else count, kinds[kind], where, tuple(keys[:_SHOWN])
    )


@dataclass
class StoreState:
    """What :func:`inspect` saw: its findings, and the store as the other parts of a check
    compare themselves with it."""

    findings: list[Finding]
    #: Metadata of every whole, complete entry.
    entries: dict[str, Mapping[str, Any]]
    #: Per space: the last live row of each key in its table.
    live: dict[str, dict[str, int]]
    #: Per space: the table's metadata as read.
    tables: dict[str, dict[str, Any]]
    #: Whether this process was the store's only writer (None: the backend cannot tell).
    sole: bool | None = None
    #: Kinds left unchecked, and why.
    skipped: list[str] = field(default_factory=list)
    #: Per space: every live row of keys that have several (for repair).
    duplicates: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    #: Per space: rows groups no swap named (for repair).
    leftovers: dict[str, list[str]] = field(default_factory=dict)

    def indexed(self, space: str) -> dict[str, Mapping[str, Any]]:
        """The entries of a space that readers see: a live row and a whole entry."""
        return {k: self.entries[k] for k in self.live.get(space, {}) if k in self.entries}


@contextlib.contextmanager
def _committing(store: EmbeddingStore) -> Iterator[None]:
    """The store's commit lock, or none where it cannot be taken (a read-only folder):
    then what is found may include writes in progress."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):
            stack.enter_context(store._writing())
        yield


def _entry_names(store: EmbeddingStore) -> list[str]:
    if store.local_path is not None:
        try:
            return sorted(d.name for d in (store.local_path / "entries").iterdir() if d.is_dir())
        except FileNotFoundError:
            return []
    entries = store._entries()
    return sorted(entries.group_keys()) if entries is not None else []


def _whole(store: EmbeddingStore, key: str) -> Mapping[str, Any] | None:
    """An entry's metadata if it is whole and complete, else None. On a local store its
    arrays' metadata, and the one chunk of each of its vector arrays, must be on disk."""
    if store.local_path is None:
        info = store.get(key)
        return info.attrs if info is not None else None
    folder = store.local_path / "entries" / key
    doc = store.backend.read_document(f"entries/{key}/zarr.json") or {}
    attrs = doc.get("attributes", {}).get("radcache", {})
    if not attrs.get("complete"):
        return None
    for kind in attrs.get("kinds", ()):
        meta = store.backend.read_document(f"entries/{key}/{kind}/zarr.json")
        if meta is None:
            return None
        shape = meta.get("shape", ())
        if (
            kind in _WHOLE
            and all(shape)
            and not (folder / kind / "c").joinpath(*["0"] * len(shape)).is_file()
        ):
            return None
    return dict(attrs)


def _rows(store: EmbeddingStore, space: str) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """A table's metadata and the numbers and keys of its live rows, in order (the caller
    holds the commit lock, so no swap moves them)."""
    meta = read_table_meta(store.root, space)
    d = data_group(_group(store.root[f"tables/{space}"]), meta)
    n = int(meta["count"])
    words = np.asarray(_array(d["keys"])[:n]).reshape(-1, 2)
    rows = np.arange(n, dtype=np.int64)
    live = ~np.isin(rows, tombstones(d, meta))
    return meta, rows[live], [_words_key(hi, lo) for hi, lo in words[live]]


def _leftovers(store: EmbeddingStore, space: str, meta: Mapping[str, Any]) -> list[str]:
    """Rows groups of a compaction (``c`` and 16 hex digits) that the table's ``data``
    does not name."""
    names = _group(store.root[f"tables/{space}"]).group_keys()
    return sorted(n for n in names if _COMPACTED.fullmatch(n) and n != meta.get("data"))


def inspect(store: EmbeddingStore, sole: bool | None = None) -> StoreState:
    """Find what disagrees in ``store`` (see the module docstring). ``sole``: whether this
    process is the store's only writer (``backend.sole_writer``); kinds that a live writer
    could cause are only looked for when it is."""
    state = StoreState([], {}, {}, {}, sole)
    in_place = not store.backend.supports_staging and not sole
    if in_place:
        state.skipped.append(
            "damaged-entry: on object storage only as the store's sole writer (a write in "
            "progress looks the same)"
        )
    if not sole:
        state.skipped.append(
            "orphan-compaction: only as the store's sole writer (a running compaction "
            "looks the same)"
        )
    staged = sorted(n.split(".")[0] for n in store.backend.orphan_staging())
    names = _entry_names(store)
    for key in names:
        attrs = _whole(store, key)
        if attrs is not None:
            state.entries[key] = attrs
    found: dict[str, list[tuple[str, list[str]]]] = {}
    with _committing(store):  # no commit, deletion or compaction swap meanwhile
        damaged = [] if in_place else [k for k in names if k not in state.entries]
        damaged = [k for k in damaged if _whole(store, k) is None and _exists(store, k)]
        for space in store.spaces():
            _table(store, state, space, set(damaged), found)
        missing = []
        for key in sorted(state.entries):
            space = str(state.entries[key].get("space"))
            if key in state.live.get(space, {}):
                continue
            if store.get(key) is None:  # deleted since it was listed
                del state.entries[key]
            else:
                missing.append(key)
    if staged:
        state.findings.append(finding(KINDS, "orphan-staging", staged, "staging"))
    if damaged:
        state.findings.append(finding(KINDS, "damaged-entry", damaged, "entries"))
    for kind in ("table-row-orphan", "table-row-duplicate", "orphan-compaction"):
        for space, keys in found.get(kind, []):
            count = sum(len(r) - 1 for r in state.duplicates.get(space, {}).values())
            state.findings.append(
                finding(KINDS, kind, keys, space, count if kind == "table-row-duplicate" else None)
            )
    if missing:
        state.findings.append(finding(KINDS, "table-row-missing", missing, "tables"))
    return state


def _table(
    store: EmbeddingStore,
    state: StoreState,
    space: str,
    damaged: set[str],
    found: dict[str, list[tuple[str, list[str]]]],
) -> None:
    """Compare one table with the entries (the caller holds the commit lock)."""
    meta, rows, keys = _rows(store, space)
    state.tables[space] = meta
    last: dict[str, int] = {}
    every: dict[str, list[int]] = {}
    for row, key in zip(rows.tolist(), keys, strict=True):
        last[key] = row
        every.setdefault(key, []).append(row)
    state.live[space] = last
    for key in last:  # stored since the entries were listed
        if key not in state.entries and key not in damaged:
            attrs = _whole(store, key)
            if attrs is not None:
                state.entries[key] = attrs
    dups = {k: r for k, r in every.items() if len(r) > 1}
    if dups:
        state.duplicates[space] = dups
        found.setdefault("table-row-duplicate", []).append((space, sorted(dups)))
    gone = sorted(k for k in last if k not in state.entries)
    if gone:
        found.setdefault("table-row-orphan", []).append((space, gone))
    if state.sole:
        extra = _leftovers(store, space, meta)
        if extra:
            state.leftovers[space] = extra
            found.setdefault("orphan-compaction", []).append((space, extra))


def _exists(store: EmbeddingStore, key: str) -> bool:
    if store.local_path is not None:
        return (store.local_path / "entries" / key).is_dir()
    entries = store._entries()
    return entries is not None and key in entries


def repair(store: EmbeddingStore, state: StoreState) -> list[Repair]:
    """Fix what :func:`inspect` found, by the store's own means; returns what was done.
    The caller is the store's sole writer where the backend can tell (see
    :meth:`~.backend.Backend.sole_writer`)."""
    done: list[Repair] = []
    kinds = {f.kind for f in state.findings}
    if "orphan-staging" in kinds:
        done.append(Repair("orphan-staging", store.backend.sweep_staging(), "swept", "staging"))
    with store._writing():
        if "damaged-entry" in kinds:
            gone = _remove_damaged(store)
            done.append(Repair("damaged-entry", gone, "removed", "entries"))
        for space, dups in state.duplicates.items():
            live = set(_rows(store, space)[1].tolist())
            rows = [r for rs in dups.values() for r in rs[:-1] if r in live]
            _tombstone(store, space, rows)
            done.append(Repair("table-row-duplicate", len(rows), "tombstoned", space))
        orphaned = {f.where for f in state.findings if f.kind == "table-row-orphan"}
        for space in sorted(state.live if "damaged-entry" in kinds else orphaned):
            n = _tombstone_orphans(store, space)  # the rows of removed entries too
            if n or space in orphaned:
                done.append(Repair("table-row-orphan", n, "tombstoned", space))
        for space, names in state.leftovers.items():
            g = _group(store.root[f"tables/{space}"])
            extra = [n for n in _leftovers(store, space, _meta(g)) if n in names]
            for name in extra:
                with contextlib.suppress(KeyError, FileNotFoundError):
                    del g[name]
            done.append(Repair("orphan-compaction", len(extra), "removed", space))
        if "table-row-missing" in kinds:
            n = 0
            for key in sorted(state.entries):
                info = store.get(key)
                if info is not None and key not in store.table_rows(info.space, [key]):
                    store.ensure_indexed(info)
                    n += 1
            done.append(Repair("table-row-missing", n, "appended", "tables"))
    return done


def _tombstone(store: EmbeddingStore, space: str, rows: list[int]) -> None:
    """Tombstone live ``rows`` of a table (the caller holds the commit lock)."""
    if rows:
        store._upgrade_format()
        add_tombstones(store.root, space, rows)


def _tombstone_orphans(store: EmbeddingStore, space: str) -> int:
    """Tombstone the live rows of ``space`` whose entry is gone (looked up again; the
    caller holds the commit lock)."""
    _, rows, keys = _rows(store, space)
    gone = [(int(r), k) for r, k in zip(rows, keys, strict=True) if store.get(k) is None]
    _tombstone(store, space, [r for r, _ in gone])
    for _, key in gone:
        store._row_index(space).removed(key)
    return len(gone)


def _remove_damaged(store: EmbeddingStore) -> int:
    """Remove the entry folders that are not whole (the caller holds the commit lock);
    returns how many went. Their rows are orphans from here on."""
    removed = 0
    for key in _entry_names(store):
        if _whole(store, key) is not None:
            continue
        if store.local_path is not None:
            shutil.rmtree(store.local_path / "entries" / key, ignore_errors=True)
        else:
            entries = store._entries()
            if entries is not None:
                with contextlib.suppress(KeyError, FileNotFoundError):
                    del entries[key]
        removed += 1
    return removed
