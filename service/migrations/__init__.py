"""Alembic migrations of the job database (SQLite and PostgreSQL alike).

:func:`upgrade` brings a database to the newest schema. Several processes may call it at
once: PostgreSQL serialises them with an advisory lock, SQLite with a lock file beside the
database. A database made before migrations existed (tables, no ``alembic_version``) is
stamped at the first revision, whose tables it already has, and upgraded from there.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, inspect, text

__all__ = ["upgrade"]

_HERE = Path(__file__).resolve().parent
_LOCK_ID = 0x7261_6463  # "radc": the advisory lock every radcache process agrees on


def _config(conn: Connection) -> object:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.attributes["connection"] = conn
    return cfg


@contextlib.contextmanager
def _sqlite_lock(engine: Engine) -> Iterator[None]:
    db = engine.url.database
    if not db or db == ":memory:":
        yield
        return
    with open(f"{db}.migrate.lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def upgrade(engine: Engine) -> None:
    """Run every migration the database lacks."""
    from alembic import command

    sqlite = engine.dialect.name == "sqlite"
    with _sqlite_lock(engine) if sqlite else contextlib.nullcontext(), engine.begin() as conn:
        if not sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        cfg = _config(conn)
        tables = set(inspect(conn).get_table_names())
        if "jobs" in tables and "alembic_version" not in tables:
            command.stamp(cfg, "0001")  # type: ignore[arg-type]
        command.upgrade(cfg, "head")  # type: ignore[arg-type]
