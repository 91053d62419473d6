"""Participant addresses are data: stored, shared by every replica, and
changed on a running deployment (before, each replica had them as flags).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compensa_participants",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("Compensa's schema only moves forward; restore a backup to go back")
