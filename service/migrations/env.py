"""Alembic environment: runs on the connection :func:`radcache.service.migrations.upgrade`
hands over (no alembic.ini, no URL of its own)."""

from __future__ import annotations

from alembic import context

from radcache.service.jobs import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters by copying tables
)
with context.begin_transaction():
    context.run_migrations()
