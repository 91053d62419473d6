"""Whether a step's Execute may have reached its participant.

`compensa_saga_steps.delivery` (records.DELIVERY_*) tells a step whose every
attempt failed to connect (nothing to undo) from one whose outcome is unknown.
Steps stored before this revision are marked "possibly delivered": nobody
recorded whether their calls went out, so they are compensated as before.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_DELIVERY_POSSIBLE = 2


def upgrade() -> None:
    with op.batch_alter_table("compensa_saga_steps") as batch:
        batch.add_column(
            sa.Column("delivery", sa.Integer, nullable=False, server_default=sa.text(str(_DELIVERY_POSSIBLE)))
        )


def downgrade() -> None:
    with op.batch_alter_table("compensa_saga_steps") as batch:
        batch.drop_column("delivery")
