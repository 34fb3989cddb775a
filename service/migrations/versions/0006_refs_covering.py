"""A page of studies reads its entry keys from the (tenant, study) index alone: the index
also holds the key, so listing never visits the references' table rows.

Revision ID: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_catalog_refs_tenant_study", "catalog_refs")
    op.create_index("ix_catalog_refs_tenant_study", "catalog_refs", ["tenant", "study", "key"])


def downgrade() -> None:
    op.drop_index("ix_catalog_refs_tenant_study", "catalog_refs")
    op.create_index("ix_catalog_refs_tenant_study", "catalog_refs", ["tenant", "study"])
