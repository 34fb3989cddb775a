"""Jobs: what was submitted, where it stands, what came of it — in SQL (SQLite by default,
PostgreSQL for several API replicas and workers).

SQLAlchemy 2 models; the schema is made and upgraded by Alembic migrations
(``service/migrations``) for both databases, once per database even when several processes
start together. A job is written ``queued`` before the upload is acknowledged, so a restart
loses nothing that was accepted. ``entries`` records, once per content key (a unique
primary key), which job first stored each entry. A finished job's row and report (which
names the files the client uploaded) are kept only until :meth:`JobStore.purge` deletes it;
its ``entries`` rows stay. An *erasure* job (``options.kind`` ``erase``) stands for the
background part of a consent deletion (:mod:`.erasure`); no embedding worker runs it.

On SQLite, deleted rows are overwritten with zeros at once (``secure_delete``), so that
what a deletion removes is not left in the database file's free pages.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, overload

import orjson
from sqlalchemy import (
    JSON,
    DateTime,
    Integer,
    String,
    Text,
    TypeDecorator,
    cast,
    create_engine,
    delete,
    event,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from radcache.embeddings.pseudonyms import DEFAULT_TENANT

__all__ = [
    "EntryRow",
    "JobKind",
    "JobRow",
    "JobState",
    "JobStore",
    "UtcDateTime",
    "kind_of",
    "utc",
]

#: ``dead``: failed on every delivery the queue allowed (scale-out), kept for inspection.
JobState = Literal["queued", "running", "done", "partially_failed", "failed", "dead"]
FINISHED: tuple[JobState, ...] = ("done", "partially_failed", "failed", "dead")
#: What a job does: embed an upload, or finish erasing a deleted study.
JobKind = Literal["embed", "erase"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@overload
def utc(t: dt.datetime) -> dt.datetime: ...
@overload
def utc(t: None) -> None: ...
def utc(t: dt.datetime | None) -> dt.datetime | None:
    """``t`` as aware UTC, so that it goes on the wire with its offset (RFC 3339); a naive
    time is UTC (radcache writes no other)."""
    if t is None:
        return None
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A time column written and read back as aware UTC: SQLite keeps no zone and gives
    back naive times, PostgreSQL the session's zone; either way a row's times are UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return utc(value)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return utc(value)


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(20), index=True)
    upload: Mapped[str] = mapped_column(String(1024))
    created: Mapped[dt.datetime] = mapped_column(UtcDateTime(), index=True)
    started: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    slices_done: Mapped[int] = mapped_column(Integer, default=0)
    slices_total: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    failure: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT)


def kind_of(row: JobRow) -> JobKind:
    """What ``row`` does (``embed`` unless its options say ``erase``)."""
    return "erase" if (row.options or {}).get("kind") == "erase" else "embed"


class EntryRow(Base):
    __tablename__ = "entries"

    key: Mapped[str] = mapped_column(String(32), primary_key=True)  # the content key
    space: Mapped[str] = mapped_column(String(200), index=True)
    study: Mapped[str] = mapped_column(String(128), index=True)
    series: Mapped[str] = mapped_column(String(128))
    job: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class JobStore:
    """Create, update and read jobs. Safe to share between the HTTP threads and the worker."""

    def __init__(self, url: str) -> None:
        from .migrations import upgrade

        self.sqlite = url.startswith("sqlite")
        args = {"check_same_thread": False} if self.sqlite else {}
        self.engine = create_engine(
            url, connect_args=args, pool_pre_ping=True, json_deserializer=json_loads
        )
        if self.sqlite:
            event.listen(self.engine, "connect", _secure_delete)
        upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time; PostgreSQL takes concurrent sessions.
        self._lock = threading.Lock() if self.sqlite else None

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._lock or contextlib.nullcontext(), self._sessions.begin() as s:
            yield s

    def session(self) -> contextlib.AbstractContextManager[Session]:
        """A transaction on the job database (one at a time on SQLite), for the rooms that
        keep tables of their own in it (:mod:`.entry_catalog`)."""
        return self._session()

    def create(
        self,
        upload: str,
        *,
        state: JobState = "queued",
        report: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> JobRow:
        row = JobRow(
            tenant=tenant,
            id=uuid.uuid4().hex,
            state=state,
            upload=upload,
            created=_now(),
            report=report,
            options=options or {},
            slices_done=0,
            slices_total=0,
        )
        if state in FINISHED:
            row.started = row.finished = row.created
        with self._session() as s:
            s.add(row)
        return row

    def get(self, job_id: str, tenant: str | None = None) -> JobRow | None:
        """A job (None if unknown, or not ``tenant``'s when one is given)."""
        with self._session() as s:
            row = s.get(JobRow, job_id)
        return row if row is not None and tenant in (None, row.tenant) else None

    def recent(self, limit: int = 50, tenant: str | None = None) -> list[JobRow]:
        """The newest jobs (of ``tenant`` when given)."""
        q = select(JobRow)
        if tenant is not None:
            q = q.where(JobRow.tenant == tenant)
        with self._session() as s:
            return list(s.scalars(q.order_by(JobRow.created.desc()).limit(limit)))

    def unfinished(self, kind: JobKind = "embed") -> list[JobRow]:
        """Jobs of ``kind`` a restart must pick up again, oldest first."""
        with self._session() as s:
            q = (
                select(JobRow)
                .where(JobRow.state.in_(("queued", "running")))
                .order_by(JobRow.created)
            )
            return [r for r in s.scalars(q) if kind_of(r) == kind]

    def finished_among(self, ids: Collection[str]) -> list[JobRow]:
        """The jobs of ``ids`` that have finished (a process watching the jobs it queued)."""
        wanted = list(ids)
        out: list[JobRow] = []
        with self._session() as s:
            for i in range(0, len(wanted), 500):
                q = select(JobRow).where(
                    JobRow.id.in_(wanted[i : i + 500]), JobRow.state.in_(FINISHED)
                )
                out += s.scalars(q)
        return out

    def update(self, job_id: str, **fields: Any) -> None:
        with self._session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                return
            for k, v in fields.items():
                setattr(row, k, v)

    def start(self, job_id: str, worker: str | None = None) -> JobRow | None:
        """Mark a job running (one more attempt); None if it is already finished."""
        with self._session() as s:
            row = s.get(JobRow, job_id, with_for_update=not self.sqlite)
            if row is None or row.state in FINISHED:
                return None
            row.state, row.started, row.slices_done = "running", _now(), 0
            row.attempts = (row.attempts or 0) + 1
            row.worker = worker
            return row

    def record_entries(
        self, job_id: str, series: list[dict[str, Any]], space_of: Callable[[str], str]
    ) -> int:
        """Note the entries a job stored; an entry already noted (by any job) is left as it
        is. Returns how many were new."""
        if not series:
            return 0
        rows = [
            {
                "key": s["entry"],
                "space": space_of(s["entry"]),
                "study": s["study"],
                "series": s["series"] + (f"#{s['part']}" if s.get("part") else ""),
                "job": job_id,
                "created": _now(),
            }
            for s in series
        ]
        insert = (postgresql.insert if not self.sqlite else sqlite.insert)(EntryRow)
        stmt = insert.values(rows).on_conflict_do_nothing(index_elements=["key"])
        with self._session() as s:
            return len(s.execute(stmt.returning(EntryRow.key)).all())

    def entry_count(self) -> int:
        from sqlalchemy import func

        with self._session() as s:
            return int(s.scalar(select(func.count()).select_from(EntryRow)) or 0)

    def finish(
        self,
        job_id: str,
        state: JobState,
        report: dict[str, Any] | None,
        failure: str | None = None,
    ) -> None:
        self.update(job_id, state=state, finished=_now(), report=report, failure=failure)

    def redact(self, tenant: str, names: Collection[str]) -> int:
        """Take every item that mentions one of ``names`` (a deleted study's pseudonyms and
        entry keys) out of ``tenant``'s job reports; returns how many jobs changed."""
        wanted = {n for n in names if n}
        if not wanted:
            return 0
        changed = 0
        text = cast(JobRow.report, Text)
        q = select(JobRow).where(JobRow.tenant == tenant, or_(*(text.contains(n) for n in wanted)))
        with self._session() as s:
            for row in s.scalars(q):
                if row.report is None:
                    continue
                report = _without(row.report, wanted)
                if report != row.report:
                    row.report = report
                    changed += 1
        return changed

    def rename_entries(self, names: Mapping[str, tuple[str, str]]) -> None:
        """Note the study and series that now name entries (key → (study, series)) whose
        first study was deleted while another kept them."""
        with self._session() as s:
            for key, (study, series) in names.items():
                s.execute(
                    update(EntryRow).where(EntryRow.key == key).values(study=study, series=series)
                )

    def purge(self, older_than: dt.timedelta) -> int:
        """Delete the jobs (their reports, failures and options) that finished more than
        ``older_than`` ago; the entries they stored stay noted. Returns how many went."""
        cutoff = _now() - older_than
        stmt = delete(JobRow).where(JobRow.state.in_(FINISHED), JobRow.finished < cutoff)
        with self._session() as s:
            return len(s.execute(stmt.returning(JobRow.id)).all())


def json_loads(text: str | bytes) -> Any:
    """A JSON document of the job database (orjson: several times faster than the standard
    library; documents written with ``NaN`` or ``Infinity``, which orjson refuses, are
    decoded by the standard library)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _secure_delete(conn: Any, _record: Any) -> None:
    """SQLite overwrites deleted content with zeros (PRAGMA secure_delete)."""
    cur = conn.cursor()
    cur.execute("PRAGMA secure_delete = ON")
    cur.close()


def _without(value: Any, names: set[str]) -> Any:
    """``value`` (a JSON report) with every list item that mentions one of ``names``
    dropped, and every other string that mentions one blanked."""
    if isinstance(value, dict):
        return {k: _without(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_without(v, names) for v in value if not _mentions(v, names)]
    if isinstance(value, str) and _mentions(value, names):
        return ""
    return value


def _mentions(value: Any, names: set[str]) -> bool:
    if isinstance(value, str):
        return any(n in value for n in names)
    if isinstance(value, dict):
        return any(_mentions(v, names) for v in value.values())
    if isinstance(value, list):
        return any(_mentions(v, names) for v in value)
    return False
