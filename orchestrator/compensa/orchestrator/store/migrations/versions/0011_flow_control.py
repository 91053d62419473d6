"""Flow control: participants' limits and holds, shared by replicas.

`compensa_participants` gains its limits (calls in flight, calls per second
with a burst), the token bucket of the rate, and an operator's hold. New
tables: `compensa_participant_grants` (each replica's calls in flight to a
participant, under a lease), `compensa_participant_changes` (who changed a
participant's limits or hold, and when) and `compensa_capacity_waits` (calls
held back, for the saga's view). Every new column is nullable and every new
table starts empty: sagas in flight go on unchanged, with no limits.
`compensa_saga_flow` holds a saga's priority and concurrency key, when
StartSaga set either (sagas in flight have the default priority and no key).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("compensa_participants") as batch:
        batch.add_column(sa.Column("max_in_flight", sa.Integer, nullable=True))
        batch.add_column(sa.Column("rate_per_second", sa.Float, nullable=True))
        batch.add_column(sa.Column("burst", sa.Integer, nullable=True))
        batch.add_column(sa.Column("tokens", sa.Float, nullable=True))
        batch.add_column(sa.Column("tokens_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("held_reason", sa.Text, nullable=True))
        batch.add_column(sa.Column("held_by", sa.String(256), nullable=True))
        batch.add_column(sa.Column("held_at", sa.Float, nullable=True))
    op.create_table(
        "compensa_participant_grants",
        sa.Column("participant", sa.String(64), primary_key=True),
        sa.Column("replica", sa.String(128), primary_key=True),
        sa.Column("in_flight", sa.Integer, nullable=False),
        sa.Column("lease_until", sa.Float, nullable=False),
    )
    op.create_table(
        "compensa_participant_changes",
        sa.Column("position", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("participant", sa.String(64), nullable=False),
        sa.Column("changed_at", sa.Float, nullable=False),
        sa.Column("changed_by", sa.String(256), nullable=False),
        sa.Column("change", sa.Text, nullable=False),
    )
    op.create_index(
        "compensa_participant_changes_name", "compensa_participant_changes", ["participant", "position"]
    )
    op.create_table(
        "compensa_saga_flow",
        sa.Column("saga_id", sa.String(128), primary_key=True),
        sa.Column("definition_name", sa.String(64), nullable=False),
        sa.Column("concurrency_key", sa.String(255), nullable=True),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index(
        "compensa_saga_flow_key", "compensa_saga_flow", ["definition_name", "concurrency_key", "created_at"]
    )
    op.create_table(
        "compensa_capacity_waits",
        sa.Column("saga_id", sa.String(128), primary_key=True),
        sa.Column("step_name", sa.String(64), primary_key=True),
        sa.Column("participant", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("compensa_capacity_waits")
    op.drop_index("compensa_saga_flow_key", "compensa_saga_flow")
    op.drop_table("compensa_saga_flow")
    op.drop_index("compensa_participant_changes_name", "compensa_participant_changes")
    op.drop_table("compensa_participant_changes")
    op.drop_table("compensa_participant_grants")
    with op.batch_alter_table("compensa_participants") as batch:
        for column in (
            "held_at", "held_by", "held_reason", "tokens_at", "tokens", "burst", "rate_per_second", "max_in_flight"
        ):
            batch.drop_column(column)
