"""Delivery attempts and the worker per job; the entries table (one row per content key).

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("worker", sa.String(200), nullable=True))
    op.create_table(
        "entries",
        sa.Column("key", sa.String(32), primary_key=True),
        sa.Column("space", sa.String(200), nullable=False),
        sa.Column("study", sa.String(128), nullable=False),
        sa.Column("series", sa.String(128), nullable=False),
        sa.Column("job", sa.String(32), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_entries_space", "entries", ["space"])
    op.create_index("ix_entries_study", "entries", ["study"])


def downgrade() -> None:
    op.drop_table("entries")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("worker")
        batch.drop_column("attempts")
