"""The UID vault: each stored DICOM series' original UIDs, sealed (AES-GCM) under a key
from the settings, keyed by (tenant, study pseudonym, entry). Empty while the vault is off.

Revision ID: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "uid_vault",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("study", sa.String(128), primary_key=True),
        sa.Column("entry", sa.String(32), primary_key=True),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("uid_vault")
