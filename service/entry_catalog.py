"""The entry catalog: what identifies each stored entry, in the job database, indexed.

Listing studies (a page at a time, by an opaque cursor), reading one study, finding an
entry by series name and QIDO answer from here in O(log n), never by reading the store's
entries. The Zarr store stays the source of truth: the catalog is derived from it and
can be rebuilt from it (:meth:`EntryCatalog.rebuild`, ``radcache index rebuild-catalog``).

It is kept in step with the store three ways: a finished job records what it stored
(:func:`.runner.finish_job`), a deletion forgets what it removed, and
:meth:`EntryCatalog.sync` (the index keeper's refresh) follows each table's appended rows
and tombstones, for entries written by other processes (``radcache embed``, replicas).

Its tables, and the rows an entry makes in them, are :mod:`.catalog_tables`'.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Text,
    and_,
    cast,
    delete,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import InstrumentedAttribute, Session

from radcache.embeddings import EmbeddingStore, EntryInfo
from radcache.embeddings.errors import AmbiguousReferenceError, InvalidFieldError, NotFoundError
from radcache.embeddings.pseudonyms import DEFAULT_TENANT

from .catalog_tables import CatalogEntry, CatalogRef, CatalogSpace, entry_rows
from .jobs import EntryRow, JobStore, json_loads

__all__ = ["MIN_PREFIX", "CatalogEntry", "CatalogRef", "CatalogSpace", "EntryCatalog", "Page"]

log = logging.getLogger(__name__)

_BATCH = 500  # keys per IN (...) clause
_REBUILD_LOCK = 0x7261_6464  # "radd": PostgreSQL advisory lock of a catalog rebuild
#: The fewest leading characters of an entry key or a hex pseudonym that stand for it whole
#: (as git takes a commit's): shown ids can be typed back.
MIN_PREFIX = 4
_HEX_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},}}")
_CANDIDATES = 20  # listed at most, when a reference matches several
_PLURAL = {"key": "entry keys", "study": "studies", "series": "series"}


@dataclass(frozen=True)
class Cursor:
    """How far one table has been followed."""

    table_id: str
    generation: int
    rows: int
    deleted: int

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> Cursor:
        """Where a table is now, from its metadata (``EmbeddingStore.table_meta``)."""
        return cls(
            str(meta.get("table_id", "")),
            int(meta["generation"]),
            int(meta["count"]),
            int(meta["deleted"]),
        )


@dataclass
class Page:
    """One page of studies (by name) and the cursor of the next one (None: the last)."""

    studies: list[tuple[str, list[EntryInfo]]]
    next: str | None


def encode_cursor(study: str) -> str:
    """An opaque cursor: the page goes on after ``study``."""
    return "s" + base64.urlsafe_b64encode(study.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    body = cursor[1:]
    try:
        if not cursor.startswith("s"):
            raise ValueError(cursor)
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidFieldError(
            f"cursor {cursor[:40]!r} is not one this service gave out; pass the cursor of "
            "the previous page's Link header unchanged, or leave it out to start again."
        ) from None


def _info(row: CatalogEntry) -> EntryInfo:
    return EntryInfo.from_attrs(row.key, row.doc)


def _by_study(rows: Iterable[tuple[str, str, str]]) -> dict[str, list[EntryInfo]]:
    """Entries by study from (study, key, document) rows ordered by study and key."""
    out: dict[str, list[EntryInfo]] = {}
    for study, key, doc in rows:
        got = out.setdefault(study, [])
        if not got or got[-1].key != key:  # named twice by one study: listed once
            got.append(EntryInfo.from_attrs(key, json_loads(doc)))
    return out


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), _BATCH):
        yield items[i : i + _BATCH]


def _starts(column: InstrumentedAttribute[str], prefix: str) -> ColumnElement[bool]:
    """``column`` begins with ``prefix``, as a range an index answers in O(log n)."""
    return and_(column >= prefix, column < prefix[:-1] + chr(ord(prefix[-1]) + 1))


def _prefix(ref: str) -> str | None:
    """``ref`` as a prefix to look up (lower case), or None where it cannot be one."""
    low = ref.lower()
    return low if _HEX_PREFIX.fullmatch(low) else None


class EntryCatalog:
    """The catalog in the job database of ``jobs``; safe to share between threads."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self._cursors: dict[str, Cursor] | None = None  # this process's, from the database
        self._sync = threading.Lock()

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        with self.jobs.session() as s:
            yield s

    # -- reading -------------------------------------------------------------------------
    def page(
        self, limit: int, cursor: str | None = None, offset: int = 0, tenant: str | None = None
    ) -> Page:
        """Studies in name order, ``limit`` of them after ``cursor`` (or ``offset``); of
        ``tenant`` alone when given (as every method that takes one)."""
        q = select(CatalogRef.study).distinct().order_by(CatalogRef.study)
        if tenant is not None:
            q = q.where(CatalogRef.tenant == tenant)
        if cursor:
            q = q.where(CatalogRef.study > decode_cursor(cursor))
        with self._session() as s:
            names = list(s.scalars(q.offset(offset).limit(limit + 1)))
            more = len(names) > limit
            names = names[:limit]
            rows = self._study_rows(s, names, tenant)
        found = _by_study(rows)
        studies = [(n, found.get(n, [])) for n in names]
        return Page(studies, encode_cursor(names[-1]) if more and names else None)

    def study(self, study: str, tenant: str | None = None) -> list[EntryInfo]:
        """The entries ``study`` names (its own and those another study first sent)."""
        with self._session() as s:
            rows = self._study_rows(s, [study], tenant)
        return _by_study(rows).get(study, [])

    def study_keys(self, study: str, tenant: str | None = None) -> list[str]:
        with self._session() as s:
            q = select(CatalogRef.key).where(CatalogRef.study == study)
            if tenant is not None:
                q = q.where(CatalogRef.tenant == tenant)
            return sorted(s.scalars(q.distinct()))

    @staticmethod
    def _study_rows(
        s: Session, names: list[str], tenant: str | None = None
    ) -> list[tuple[str, str, str]]:
        """(study, key, document as JSON text) of the entries each of ``names`` names; the
        documents are decoded by :func:`_by_study`, after the transaction (the job
        database's lock is not held while they decode)."""
        if not names:
            return []
        q = (
            select(CatalogRef.study, CatalogEntry.key, cast(CatalogEntry.doc, Text))
            .join(CatalogEntry, CatalogEntry.key == CatalogRef.key)
            .where(CatalogRef.study.in_(names))
            .order_by(CatalogRef.study, CatalogEntry.key)
        )
        if tenant is not None:
            q = q.where(CatalogRef.tenant == tenant)
        return [(str(a), str(b), str(c)) for a, b, c in s.execute(q)]

    def get(self, key: str, tenant: str | None = None) -> EntryInfo | None:
        with self._session() as s:
            row = s.get(CatalogEntry, key)
            if row is None or tenant not in (None, row.tenant):
                return None
            return _info(row)

    def resolve(
        self, ref: str, store: EmbeddingStore | None = None, tenant: str | None = None
    ) -> EntryInfo:
        """An entry by key, or by series name (``series`` or ``series#part``) of any study
        that sent it; by a unique prefix (``MIN_PREFIX`` hex characters or more) of either
        where nothing has the name whole. A key the catalog does not know yet (written by
        another process since the last sync) is looked up in ``store``."""
        if re.fullmatch(r"[0-9a-f]{32}", ref):
            found = self.get(ref, tenant)
            if found is None and store is not None and (late := store.get(ref)) is not None:
                found = late if tenant in (None, late.attrs.get("tenant", DEFAULT_TENANT)) else None
            if found is not None:
                return found
        series, _, part = ref.partition("#")
        with self._session() as s:
            hits = self._entries(s, [CatalogRef.series == series], part, tenant)
            if not hits and (pre := _prefix(series)) is not None:
                hits = self._entries(s, [_starts(CatalogEntry.key, pre)], part, tenant)
                hits |= self._entries(s, [_starts(CatalogRef.series, pre)], part, tenant)
        if not hits:
            raise NotFoundError(f"no cached series or entry {ref!r}; GET /v1/studies lists them.")
        if len(hits) > 1:
            listing = "; ".join(
                f"{e.key} (series {e.series}, {e.model}, recipe {e.recipe_hash}, "
                f"part {e.part or '-'})"
                for e in map(_info, sorted(hits.values(), key=lambda r: r.key)[:_CANDIDATES])
            )
            many = f"{len(hits)}" if len(hits) <= _CANDIDATES else f"over {_CANDIDATES}"
            raise AmbiguousReferenceError(
                f"{ref!r} matches {many} entries: {listing}. Pass an entry key (or more of "
                "its characters) or series#part."
            )
        return _info(next(iter(hits.values())))

    @staticmethod
    def _entries(
        s: Session, where: list[ColumnElement[bool]], part: str, tenant: str | None
    ) -> dict[str, CatalogEntry]:
        """Up to ``_CANDIDATES + 1`` entries a reference matching ``where`` names, by key."""
        q = select(CatalogEntry).join(CatalogRef, CatalogRef.key == CatalogEntry.key)
        q = q.where(*where)
        if tenant is not None:
            q = q.where(CatalogRef.tenant == tenant)
        if part:
            q = q.where(CatalogRef.part == part)
        q = q.order_by(CatalogEntry.key).limit(_CANDIDATES + 1)
        return {r.key: r for r in s.scalars(q)}

    def expand(
        self, what: Literal["key", "study", "series"], ref: str, tenant: str | None = None
    ) -> str:
        """The entry key, study or series name that ``ref`` begins: ``ref`` itself where
        something has it whole, where it is no hex prefix of ``MIN_PREFIX`` characters or
        more, or where nothing begins with it (the caller's lookup then says not-found).
        :class:`AmbiguousReferenceError` listing the candidates where several begin with it."""
        pre = _prefix(ref)
        if pre is None:
            return ref
        column, owner = {
            "key": (CatalogEntry.key, CatalogEntry.tenant),
            "study": (CatalogRef.study, CatalogRef.tenant),
            "series": (CatalogRef.series, CatalogRef.tenant),
        }[what]
        q = select(column).where(_starts(column, pre))
        if tenant is not None:
            q = q.where(owner == tenant)
        with self._session() as s:
            found = list(s.scalars(q.distinct().order_by(column).limit(_CANDIDATES + 1)))
        if not found or ref in found:
            return ref
        if len(found) == 1:
            return found[0]
        many = f"{len(found)}" if len(found) <= _CANDIDATES else f"over {_CANDIDATES}"
        raise AmbiguousReferenceError(
            f"{ref!r} begins {many} {_PLURAL[what]}: {', '.join(found[:_CANDIDATES])}. "
            "Pass more of its characters."
        )

    def has_patient(self, patient: str, tenant: str) -> bool:
        """Whether ``tenant`` has an entry of ``patient``."""
        q = select(CatalogEntry.key).where(
            CatalogEntry.patient == patient, CatalogEntry.tenant == tenant
        )
        with self._session() as s:
            return s.scalars(q.limit(1)).first() is not None

    def count(self) -> int:
        with self._session() as s:
            return int(s.scalar(select(func.count()).select_from(CatalogEntry)) or 0)

    # -- writing -------------------------------------------------------------------------
    def record(self, store: EmbeddingStore, keys: Iterable[str]) -> int:
        """Write (or rewrite) the rows of entries from their metadata in ``store``; entries
        that are gone are forgotten. Returns how many rows were written."""
        wanted = sorted(set(keys))
        if not wanted:
            return 0
        attrs = store.entry_attrs(wanted)
        self._write(attrs)
        # A deletion that ran while this read the store has forgotten its keys before this
        # wrote them: look again, so that nothing deleted stays listed.
        late = [k for k in attrs if store.get(k) is None]
        self.forget([k for k in wanted if k not in attrs] + late)
        return len(attrs) - len(late)

    def _write(self, attrs: Mapping[str, Mapping[str, Any]]) -> None:
        keys = sorted(attrs)
        rows = [entry_rows(k, attrs[k]) for k in keys]
        with self._session() as s:
            self._put(s, rows, replace=True)

    def _put(
        self, s: Session, rows: list[tuple[dict[str, Any], list[dict[str, str]]]], replace: bool
    ) -> None:
        """Insert or overwrite entry rows, then (``replace``: in place of their old ones)
        add their references. Upserts, because another process (a worker, a replica's sync)
        may write the same entry at the same time; and entry rows first, in key order, as
        every writer does, so that their row locks order the writers (no deadlock)."""
        if not rows:
            return
        ins = postgresql.insert if not self.jobs.sqlite else sqlite.insert
        entry = ins(CatalogEntry)
        fields = (
            "tenant",
            "space",
            "study",
            "series",
            "part",
            "modality",
            "patient",
            "created",
            "doc",
        )
        s.execute(
            entry.on_conflict_do_update(
                index_elements=["key"], set_={f: entry.excluded[f] for f in fields}
            ),
            [r for r, _ in rows],
        )
        if replace:
            for chunk in _chunks([r["key"] for r, _ in rows]):
                s.execute(delete(CatalogRef).where(CatalogRef.key.in_(chunk)))
        s.execute(
            ins(CatalogRef).on_conflict_do_nothing(),
            [x for _, refs in rows for x in refs],
        )

    def forget(self, keys: Iterable[str]) -> None:
        """Remove entries (and the job database's note of which job stored them)."""
        wanted = sorted(set(keys))
        with self._session() as s:
            for chunk in _chunks(wanted):  # entry rows first, as every writer does
                s.execute(delete(CatalogEntry).where(CatalogEntry.key.in_(chunk)))
                s.execute(delete(CatalogRef).where(CatalogRef.key.in_(chunk)))
                s.execute(delete(EntryRow).where(EntryRow.key.in_(chunk)))

    # -- following the store -------------------------------------------------------------
    def _load_cursors(self) -> dict[str, Cursor]:
        if self._cursors is None:
            with self._session() as s:
                self._cursors = {
                    r.space: Cursor(r.table_id, r.generation, r.rows, r.deleted)
                    for r in s.scalars(select(CatalogSpace))
                }
        return self._cursors

    def _save_cursor(self, space: str, c: Cursor) -> None:
        assert self._cursors is not None
        self._cursors[space] = c
        ins = postgresql.insert if not self.jobs.sqlite else sqlite.insert
        with self._session() as s:
            s.execute(ins(CatalogSpace).values(space=space, **vars(c)).on_conflict_do_nothing())
            row = s.get(CatalogSpace, space, with_for_update=not self.jobs.sqlite)
            assert row is not None
            if row.table_id != c.table_id or c.generation > row.generation:
                row.table_id, row.generation = c.table_id, c.generation
                row.rows, row.deleted = c.rows, c.deleted
            elif c.generation == row.generation:  # never backwards: another process may
                row.rows, row.deleted = max(row.rows, c.rows), max(row.deleted, c.deleted)

    def sync(self, store: EmbeddingStore) -> int:
        """Follow every table since the last sync: appended rows are recorded, tombstoned
        ones forgotten (or rewritten, if stored again), a compacted or new table is
        reconciled by key. Returns how many entries changed."""
        with self._sync:
            cursors = self._load_cursors()
            changed = 0
            for space in store.spaces():
                changed += self._sync_space(store, space, cursors.get(space))
            return changed

    def _sync_space(self, store: EmbeddingStore, space: str, cur: Cursor | None) -> int:
        now = Cursor.of(store.table_meta(space))
        if cur == now:
            return 0
        changed = 0
        dead: list[str] | None = []
        same = cur is not None and (cur.table_id, cur.generation) == (now.table_id, now.generation)
        if same and cur is not None and now.deleted > cur.deleted:
            dead = store.tombstoned(space, cur.deleted, now.deleted, generation=now.generation)
        if cur is None or not same or dead is None:  # new or compacted (perhaps just now)
            changed += self._reconcile(store, space)
        else:
            if dead:
                back = store.entry_attrs(set(dead))  # deleted, then stored again
                self.forget(k for k in dead if k not in back)
                self.record(store, back)
                changed += len(set(dead))
            if now.rows > cur.rows:
                changed += self.record(store, store.table_keys(space, cur.rows))
        self._save_cursor(space, now)
        return changed

    def _reconcile(self, store: EmbeddingStore, space: str) -> int:
        """Make the catalog's rows of one space those of its table (by key)."""
        live = set(store.table_keys(space))
        with self._session() as s:
            known = set(s.scalars(select(CatalogEntry.key).where(CatalogEntry.space == space)))
        self.forget(known - live)
        return self.record(store, live - known) + len(known - live)

    def rebuild(self, store: EmbeddingStore, *, only_if_empty: bool = False) -> int:
        """Make the catalog again from the store alone (every table's live rows and their
        entries' metadata); returns the entries catalogued. With ``only_if_empty`` nothing
        is done if another process has catalogued anything meanwhile."""
        spaces = store.spaces()
        cursors = {}
        attrs: dict[str, Mapping[str, Any]] = {}
        for space in spaces:
            cursors[space] = Cursor.of(store.table_meta(space))
            attrs.update(store.entry_attrs(store.table_keys(space)))
        rows = [entry_rows(k, attrs[k]) for k in sorted(attrs)]
        with self._sync, self._session() as s:
            if not self.jobs.sqlite:  # one rebuild at a time across processes
                s.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _REBUILD_LOCK})
            if only_if_empty and s.scalar(select(func.count()).select_from(CatalogSpace)):
                return 0
            s.execute(delete(CatalogEntry))  # entry rows first, as every writer does
            s.execute(delete(CatalogRef))
            s.execute(delete(CatalogSpace))
            self._put(s, rows, replace=False)
            s.add_all(CatalogSpace(space=sp, **vars(c)) for sp, c in cursors.items())
            self._cursors = dict(cursors)
        log.info("catalog rebuilt: %d entries in %d spaces", len(rows), len(spaces))
        return len(rows)

    def needs_rebuild(self, store: EmbeddingStore) -> bool:
        """Whether the catalog has never followed the store and the store has tables."""
        with self._session() as s:
            followed = s.scalar(select(func.count()).select_from(CatalogSpace))
        return not followed and bool(store.spaces())
