"""Participants' contracts: the compiled .proto of a participant's steps
(compensa.v1.ParticipantContract), stored with its name and checked against
the definitions that name it. A table of its own: a participant's address
and health change often, its contract seldom.

Revision ID: 0009
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compensa_participant_contracts",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("service", sa.String(255), nullable=False),
        sa.Column("contract", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("Compensa's schema only moves forward; restore a backup to go back")
