"""Consistency: whether a store, its tables and its search indexes agree (``radcache check``).

:func:`check` composes the store's own :mod:`.store.integrity` with the saved search
indexes (:class:`IndexPart`) and with any further :class:`Part` a caller adds (the
service adds its entry catalog and job database), finds what disagrees, and, asked to,
repairs each kind by the existing means and looks again. The index kinds:

* ``index-unreadable`` — a saved index that cannot be read.
* ``indexed-missing`` — an indexed entry that is gone from the store or its table: a
  search could return a deleted study.
* ``unindexed-entry`` — a stored, live entry the index lacks.
* ``index-stale`` — an indexed entry whose names, labels or collections are not the
  entry's (a search excluding a study could return it).
* ``index-vectors`` — a level holds more or fewer vectors than its catalog names.

Each is repaired by rebuilding the space from the store (:meth:`IndexSet.rebuild`). A
saved index is first brought up to date in memory, as a starting service does: one that
is merely behind the store is not a finding. Spaces without a saved index are built at
the next start and are not compared.

Beside other processes: :func:`check` holds the backend's sole-writer lock while it runs
(:meth:`~.store.backend.Backend.sole_writer`): a local store's writers (``radcache
serve``, ``worker``, ``embed``) wait to open it meanwhile. A repair refuses to run
(:class:`~.errors.StoreBusyError`) while another process has the store open for writing;
a check without repair runs, confirms what it finds against the store as it is, and
leaves out the kinds that a live writer's work in progress looks like
(:attr:`CheckReport.skipped`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import StoreBusyError, StoreError
from .index import LEVELS, IndexSet, Record
from .index.folders import POINTER
from .store import EmbeddingStore
from .store.integrity import KINDS as STORE_KINDS
from .store.integrity import Finding, Repair, StoreState, finding
from .store.integrity import inspect as inspect_store
from .store.integrity import repair as repair_store

__all__ = ["INDEX_KINDS", "CheckReport", "Finding", "IndexPart", "Part", "Repair", "check"]

#: What each kind of index finding means (each is repaired by a rebuild of its space).
INDEX_KINDS = {
    "index-unreadable": "saved index that cannot be read",
    "indexed-missing": "indexed entry that is gone from the store or its table",
    "unindexed-entry": "live stored entry the index lacks",
    "index-stale": "indexed names, labels or collections that are not the entry's",
    "index-vectors": "vectors the index holds that its catalog does not name, or lacks",
}


class Part(Protocol):
    """One more thing a check compares with the store (the service's catalog, its jobs)."""

    def inspect(self, store: EmbeddingStore, state: StoreState) -> list[Finding]:
        """What disagrees with the store as ``state`` saw it (kinds left out and why go to
        ``state.skipped``)."""
        ...

    def repair(
        self, store: EmbeddingStore, state: StoreState, found: list[Finding]
    ) -> list[Repair]:
        """Fix ``found`` (this part's findings against ``state``); returns what was done."""
        ...


@dataclass
class CheckReport:
    """What a check found, what a repair did, and what disagrees after it."""

    findings: list[Finding]
    repairs: list[Repair] = field(default_factory=list)
    #: What disagrees at the end: after a repair, what it could not fix; else the findings.
    remaining: list[Finding] = field(default_factory=list)
    #: Whether the check ran as the store's only writer (None: the backend cannot tell).
    sole: bool | None = None
    skipped: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        """Nothing disagrees (any longer)."""
        return not self.remaining

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "repaired": self.repaired,
            "sole_writer": self.sole,
            "findings": [f.to_dict() for f in self.findings],
            "repairs": [r.to_dict() for r in self.repairs],
            "remaining": [f.to_dict() for f in self.remaining],
            "skipped": list(self.skipped),
        }


def _same(indexed: Record, stored: Record) -> bool:
    """Whether an index record says what the entry's metadata says (slice numbers are
    read from the entry's arrays, and not compared)."""

    def norm(r: Record) -> Record:
        return dataclasses.replace(r, refs=tuple(sorted(set(r.refs))), slice_index=())

    return norm(indexed) == norm(stored)


class IndexPart:
    """The saved search indexes of a store, compared with its live entries."""

    def __init__(self, directory: Path | None = None, **options: Any) -> None:
        """``directory`` and ``options`` as :class:`IndexSet` takes them."""
        self.directory = directory
        self.options = options
        self._indexes: IndexSet | None = None

    def inspect(self, store: EmbeddingStore, state: StoreState) -> list[Finding]:
        idx = self._indexes = IndexSet(store, self.directory, **self.options)
        saved = [s for s in store.spaces() if (idx.path(s) / POINTER).exists()]
        idx.load()
        out = [
            finding(INDEX_KINDS, "index-unreadable", [], s, 1) for s in saved if s not in idx.spaces
        ]
        idx.refresh(spaces=list(idx.spaces))  # in memory, as a starting service does
        for space, si in sorted(idx.spaces.items()):
            truth = state.indexed(space)
            have = dict(si.catalog.by_key)
            extra = sorted(k for k in have if k not in truth)
            lacking = sorted(k for k in truth if k not in have)
            if not state.sole and (extra or lacking):  # confirmed against the store as it is
                now = store.table_rows(space, extra + lacking)
                extra = [k for k in extra if k not in now or store.get(k) is None]
                lacking = [k for k in lacking if k in now and store.get(k) is not None]
            stale = sorted(
                k
                for k, o in have.items()
                if k in truth and not _same(si.catalog.record(o), Record.from_attrs(k, truth[k]))
            )
            off = 0
            for lv in LEVELS:
                li = si.levels[lv]
                off += abs(li.ntotal - li.tombstones - int(np.count_nonzero(si.catalog.live(lv))))
            for kind, keys in (
                ("indexed-missing", extra),
                ("unindexed-entry", lacking),
                ("index-stale", stale),
            ):
                if keys:
                    out.append(finding(INDEX_KINDS, kind, keys, space))
            if off:
                out.append(finding(INDEX_KINDS, "index-vectors", [], space, off))
        return out

    def repair(
        self, store: EmbeddingStore, state: StoreState, found: list[Finding]
    ) -> list[Repair]:
        idx = self._indexes or IndexSet(store, self.directory, **self.options)
        spaces = sorted({f.where for f in found})
        for space in spaces:
            idx.rebuild(space)
        idx.save()  # and what a refresh caught up with
        return [Repair(f.kind, f.count, "space rebuilt from the store", f.where) for f in found]


def _inspect(
    store: EmbeddingStore, sole: bool | None, parts: Sequence[Part]
) -> tuple[StoreState, list[list[Finding]]]:
    state = inspect_store(store, sole)
    return state, [p.inspect(store, state) for p in parts]


def check(
    store: EmbeddingStore,
    *,
    repair: bool = False,
    parts: Sequence[Part] | None = None,
    index_dir: Path | None = None,
    index_options: Mapping[str, Any] | None = None,
) -> CheckReport:
    """Whether ``store``, its tables, its saved indexes and ``parts`` agree; with
    ``repair``, fix what they do not and look again. ``parts`` default to the indexes
    alone (an :class:`IndexPart` of ``index_dir`` and ``index_options``). A repair needs
    the store open for writing and no other process writing it (else
    :class:`StoreBusyError`)."""
    if parts is None:
        parts = [IndexPart(index_dir, **(index_options or {}))]
    if repair and store.read_only:
        raise StoreError(f"store {store.url} is open read-only; open it for writing to repair.")
    with store.backend.sole_writer() as sole:
        if repair and sole is False:
            raise StoreBusyError(
                f"another process has the store {store.url} open for writing (radcache serve, "
                "worker or embed); stop it and repair again, or check without --repair "
                "to only report."
            )
        swept, store.backend.swept = store.backend.swept, 0
        state, found = _inspect(store, sole, parts)
        first = state.findings + [f for fs in found for f in fs]
        report = CheckReport(first, remaining=first, sole=sole, skipped=list(state.skipped))
        if swept:  # by opening the store for writing, as every writer does
            report.findings = [finding(STORE_KINDS, "orphan-staging", [], "staging", swept), *first]
            report.repairs = [Repair("orphan-staging", swept, "swept at open", "staging")]
            report.repaired = True
        if not repair or not first:
            return report
        report.repairs += repair_store(store, state)
        state = inspect_store(store, sole)  # the other parts compare with the repaired store
        for part in parts:
            report.repairs += part.repair(store, state, part.inspect(store, state))
        state, found = _inspect(store, sole, parts)
        report.remaining = state.findings + [f for fs in found for f in fs]
        report.skipped = list(state.skipped)
        report.repaired = True
        acted = {r.kind for r in report.repairs} | {f.kind for f in report.remaining}
        report.repairs += [
            Repair(f.kind, f.count, "resolved by the repairs above", f.where)
            for f in report.findings
            if f.kind not in acted
        ]
        return report
