"""Tenants: the tenant of every job, catalogued entry and reference. Rows made before
tenants belong to the default tenant.

Revision ID: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TABLES = ("jobs", "catalog_entries", "catalog_refs")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("tenant", sa.String(64), nullable=False, server_default="default")
            )
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant", "created"])
    op.create_index("ix_catalog_refs_tenant_study", "catalog_refs", ["tenant", "study"])
    # A lookup by series name is (series, tenant): with the tenant second, the planner
    # never prefers the (tenant, study) index, which would scan the tenant's every study.
    op.drop_index("ix_catalog_refs_series", "catalog_refs")
    op.create_index("ix_catalog_refs_series", "catalog_refs", ["series", "tenant", "part"])


def downgrade() -> None:
    op.drop_index("ix_catalog_refs_series", "catalog_refs")
    op.create_index("ix_catalog_refs_series", "catalog_refs", ["series", "part"])
    op.drop_index("ix_catalog_refs_tenant_study", "catalog_refs")
    op.drop_index("ix_jobs_tenant_created", "jobs")
    for table in reversed(_TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant")
