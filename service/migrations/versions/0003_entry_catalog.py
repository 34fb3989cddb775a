"""The entry catalog: entries, the (study, series, part) references that name them, and
how far each store table has been followed.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_entries",
        sa.Column("key", sa.String(32), primary_key=True),
        sa.Column("space", sa.String(200), nullable=False),
        sa.Column("study", sa.String(128), nullable=False),
        sa.Column("series", sa.String(128), nullable=False),
        sa.Column("part", sa.String(128), nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("patient", sa.String(128), nullable=True),
        sa.Column("created", sa.String(40), nullable=False),
        sa.Column("doc", sa.JSON, nullable=False),
    )
    op.create_index("ix_catalog_entries_space", "catalog_entries", ["space"])
    op.create_index("ix_catalog_entries_patient", "catalog_entries", ["patient"])
    op.create_table(
        "catalog_refs",
        sa.Column("study", sa.String(128), primary_key=True),
        sa.Column("series", sa.String(128), primary_key=True),
        sa.Column("part", sa.String(128), primary_key=True),
        sa.Column("key", sa.String(32), primary_key=True),
    )
    op.create_index("ix_catalog_refs_key", "catalog_refs", ["key"])
    op.create_index("ix_catalog_refs_series", "catalog_refs", ["series", "part"])
    op.create_table(
        "catalog_spaces",
        sa.Column("space", sa.String(200), primary_key=True),
        sa.Column("table_id", sa.String(64), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("catalog_spaces")
    op.drop_table("catalog_refs")
    op.drop_table("catalog_entries")
