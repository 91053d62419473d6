"""`compensa_partition_map`: where each virtual partition of the sagas lives
in a deployment partitioned over several PostgreSQL databases (`serve
--partition-db`, docs/partitions.md). Made empty here; the first start of a
partitioned deployment fills it, in the home database. Unused otherwise.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compensa_partition_map",
        sa.Column("partition_no", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("database_id", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    raise NotImplementedError("Compensa's schema only moves forward; restore a backup to go back")
