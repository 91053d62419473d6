"""The schema as the releases before versioned migrations created it.

A database made by those releases (tables, no version table) is stamped at
this revision and upgraded from here. The tables are written out in full,
not taken from schema.py: a migration is frozen at the day it was written.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compensa_definitions",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("name", "fingerprint", name="compensa_definitions_content"),
    )
    op.create_table(
        "compensa_sagas",
        sa.Column("saga_id", sa.String(128), primary_key=True),
        sa.Column("definition_name", sa.String(64), nullable=False),
        sa.Column("definition_version", sa.Integer, nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("input", sa.LargeBinary, nullable=False),
        sa.Column("request_fingerprint", sa.String(64), nullable=False),
        sa.Column("failure_reason", sa.Text, nullable=False),
        sa.Column("resolution_note", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("due_at", sa.Float, nullable=True),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
    )
    op.create_index("compensa_sagas_due", "compensa_sagas", ["due_at"])
    op.create_index("compensa_sagas_list", "compensa_sagas", ["created_at", "saga_id"])
    op.create_index("compensa_sagas_owner", "compensa_sagas", ["owner"])
    op.create_table(
        "compensa_saga_steps",
        sa.Column("saga_id", sa.String(128), sa.ForeignKey("compensa_sagas.saga_id"), primary_key=True),
        sa.Column("step_name", sa.String(64), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("compensate_attempts", sa.Integer, nullable=False),
        sa.Column("output", sa.LargeBinary, nullable=True),
        sa.Column("last_error", sa.Text, nullable=False),
        sa.Column("effect_uncertain", sa.Boolean, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("next_attempt_at", sa.Float, nullable=True),
    )
    op.create_table(
        "compensa_saga_events",
        sa.Column("saga_id", sa.String(128), primary_key=True),
        sa.Column("sequence", sa.BigInteger, primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False, unique=True),
        sa.Column("type", sa.Integer, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("saga_state", sa.Integer, nullable=False),
        sa.Column("step_name", sa.String(64), nullable=False),
        sa.Column("step_state", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("definition_name", sa.String(64), nullable=False),
    )
    log_head = op.create_table(
        "compensa_log_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(log_head, [{"id": 1, "position": 0}])
    op.create_table(
        "compensa_secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("Compensa's schema only moves forward; restore a backup to go back")
