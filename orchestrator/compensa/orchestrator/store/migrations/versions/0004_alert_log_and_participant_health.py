"""The alert log, and participants' health.

`compensa_alerts` holds every alert (a saga's ALERT_RAISED, a participant
unhealthy or recovered) at a position of its own log, counted by a second
row of `compensa_log_head`. The outbox now names an alert by that position;
the alerts waiting in the old outbox are moved into the log (in the order of
their events) with their delivery state, so alerts in flight are delivered
after the upgrade. `compensa_participants` gains the shared state of an
outage: `unhealthy_since` and `alerted_at`.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ALERT_LOG = 2


def upgrade() -> None:
    with op.batch_alter_table("compensa_participants") as batch:
        batch.add_column(sa.Column("unhealthy_since", sa.Float, nullable=True))
        batch.add_column(sa.Column("alerted_at", sa.Float, nullable=True))
    alerts = op.create_table(
        "compensa_alerts",
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("raised_at", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("saga_id", sa.String(128), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("event_position", sa.BigInteger, nullable=False),
        sa.Column("definition_name", sa.String(64), nullable=False),
        sa.Column("step_name", sa.String(64), nullable=False),
        sa.Column("participant", sa.String(64), nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
    )
    op.create_index("compensa_alerts_raised", "compensa_alerts", ["raised_at"])
    op.create_index("compensa_alerts_saga", "compensa_alerts", ["saga_id"])

    connection = op.get_bind()
    waiting = connection.execute(sa.text(
        "SELECT saga_id, sequence, position, definition_name, step_name, message, raised_at, attempts,"
        " next_attempt_at, last_error FROM compensa_alert_outbox ORDER BY position"
    )).all()
    op.drop_index("compensa_alert_outbox_due", "compensa_alert_outbox")
    op.drop_table("compensa_alert_outbox")
    outbox = op.create_table(
        "compensa_alert_outbox",
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("last_error", sa.Text, nullable=False),
    )
    op.create_index("compensa_alert_outbox_due", "compensa_alert_outbox", ["next_attempt_at"])
    moved = list(enumerate(waiting, start=1))
    if moved:
        op.bulk_insert(alerts, [
            {
                "position": position, "kind": "SAGA", "raised_at": row.raised_at, "message": row.message,
                "saga_id": row.saga_id, "sequence": row.sequence, "event_position": row.position,
                "definition_name": row.definition_name, "step_name": row.step_name, "participant": "",
                "address": "",
            }
            for position, row in moved
        ])
        op.bulk_insert(outbox, [
            {
                "position": position, "attempts": row.attempts, "next_attempt_at": row.next_attempt_at,
                "last_error": row.last_error,
            }
            for position, row in moved
        ])
    log_head = sa.table("compensa_log_head", sa.column("id", sa.Integer), sa.column("position", sa.BigInteger))
    op.bulk_insert(log_head, [{"id": _ALERT_LOG, "position": len(moved)}])


def downgrade() -> None:
    raise NotImplementedError("Compensa's schema only moves forward; restore a backup to go back")
