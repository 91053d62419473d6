"""Bulk actions: `compensa_bulk_actions` (the jobs, leased like sagas) and
`compensa_bulk_items` (the sagas each selected, with the sequence they had
then and what was done to them).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compensa_bulk_actions",
        sa.Column("bulk_action_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.Integer, nullable=False),
        sa.Column("filter", sa.Text, nullable=False),
        sa.Column("selection", sa.LargeBinary, nullable=False),
        sa.Column("definition_name", sa.String(64), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("started_by", sa.String(256), nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("max_per_second", sa.Float, nullable=False),
        sa.Column("selected", sa.BigInteger, nullable=False),
        sa.Column("done", sa.BigInteger, nullable=False),
        sa.Column("skipped", sa.BigInteger, nullable=False),
        sa.Column("failed", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
    )
    op.create_index("compensa_bulk_actions_list", "compensa_bulk_actions", ["created_at", "bulk_action_id"])
    op.create_table(
        "compensa_bulk_items",
        sa.Column("bulk_action_id", sa.String(64), primary_key=True),
        sa.Column("saga_id", sa.String(128), primary_key=True),
        sa.Column("selected_sequence", sa.BigInteger, nullable=False),
        sa.Column("outcome", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("acted_at", sa.Float, nullable=True),
    )
    op.create_index("compensa_bulk_items_outcome", "compensa_bulk_items", ["bulk_action_id", "outcome", "saga_id"])


def downgrade() -> None:
    raise NotImplementedError("Compensa's schema only moves forward; restore a backup to go back")
