"""A saga's trace context, and the outbox alerts are delivered from.

`compensa_sagas.trace_parent` is the W3C traceparent of the saga's trace
(NULL: not traced), so the replica that resumes a saga continues its trace.
`compensa_alert_outbox` holds one row per ALERT_RAISED event, written in the
transaction that writes the event, until a replica has delivered it.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("compensa_sagas") as batch:
        batch.add_column(sa.Column("trace_parent", sa.String(128), nullable=True))
    op.create_table(
        "compensa_alert_outbox",
        sa.Column("saga_id", sa.String(128), primary_key=True),
        sa.Column("sequence", sa.BigInteger, primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("definition_name", sa.String(64), nullable=False),
        sa.Column("step_name", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("raised_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("last_error", sa.Text, nullable=False),
    )
    op.create_index("compensa_alert_outbox_due", "compensa_alert_outbox", ["next_attempt_at"])


def downgrade() -> None:
    raise NotImplementedError("Compensa's schema only moves forward; restore a backup to go back")
