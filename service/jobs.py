"""Jobs: what was submitted, where it stands, what came of it — in SQL (SQLite by default).

SQLAlchemy 2 models, so a PostgreSQL URL works unchanged. A job is written ``queued``
before the upload is acknowledged, so a restart loses nothing that was accepted: jobs
found ``queued`` or ``running`` at start-up are queued again.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy import JSON, DateTime, Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = ["JobRow", "JobState", "JobStore"]

JobState = Literal["queued", "running", "done", "partially_failed", "failed"]
FINISHED: tuple[JobState, ...] = ("done", "partially_failed", "failed")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(20), index=True)
    upload: Mapped[str] = mapped_column(String(1024))
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    started: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    slices_done: Mapped[int] = mapped_column(Integer, default=0)
    slices_total: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    failure: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class JobStore:
    """Create, update and read jobs. Safe to share between the HTTP threads and the worker."""

    def __init__(self, url: str) -> None:
        args = {"check_same_thread": False} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, connect_args=args)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()  # SQLite has one writer at a time

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._lock, self._sessions.begin() as s:
            yield s

    def create(
        self,
        upload: str,
        *,
        state: JobState = "queued",
        report: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
    ) -> JobRow:
        row = JobRow(
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

    def get(self, job_id: str) -> JobRow | None:
        with self._session() as s:
            return s.get(JobRow, job_id)

    def recent(self, limit: int = 50) -> list[JobRow]:
        with self._session() as s:
            return list(s.scalars(select(JobRow).order_by(JobRow.created.desc()).limit(limit)))

    def unfinished(self) -> list[JobRow]:
        """Jobs a restart must pick up again, oldest first."""
        with self._session() as s:
            q = (
                select(JobRow)
                .where(JobRow.state.in_(("queued", "running")))
                .order_by(JobRow.created)
            )
            return list(s.scalars(q))

    def update(self, job_id: str, **fields: Any) -> None:
        with self._session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                return
            for k, v in fields.items():
                setattr(row, k, v)

    def start(self, job_id: str) -> None:
        self.update(job_id, state="running", started=_now(), slices_done=0)

    def finish(
        self,
        job_id: str,
        state: JobState,
        report: dict[str, Any] | None,
        failure: str | None = None,
    ) -> None:
        self.update(job_id, state=state, finished=_now(), report=report, failure=failure)
