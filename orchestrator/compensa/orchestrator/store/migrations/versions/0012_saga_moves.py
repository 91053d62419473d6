"""Moving sagas in flight to another version of their definition.

`compensa_bulk_actions` gains the MOVE kind's target version and step
mappings (0 and none for the jobs of earlier releases); `compensa_saga_steps`
gains the name a renamed step's idempotency key was made with (NULL for every
step of earlier releases: its own name, as before).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("compensa_bulk_actions") as batch:
        batch.add_column(sa.Column("to_version", sa.Integer, nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("step_mappings", sa.Text, nullable=False, server_default=""))
    with op.batch_alter_table("compensa_saga_steps") as batch:
        batch.add_column(sa.Column("idempotency_name", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("compensa_saga_steps") as batch:
        batch.drop_column("idempotency_name")
    with op.batch_alter_table("compensa_bulk_actions") as batch:
        batch.drop_column("step_mappings")
        batch.drop_column("to_version")
