"""The audit of the log against participants' barrier rows.

`compensa_audit_progress` keeps, per participant, how far the audit found
every saga final and clean (where the next run resumes) and the purge
watermark last sent; `compensa_audit_findings` keeps each discrepancy found,
so that it is alerted once.

Revision ID: 0010
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compensa_audit_progress",
        sa.Column("participant", sa.String(64), primary_key=True),
        sa.Column("clean_created_at", sa.Float, nullable=False),
        sa.Column("clean_saga_id", sa.String(128), nullable=False),
        sa.Column("audited_at", sa.Float, nullable=False),
        sa.Column("purge_before", sa.Float, nullable=True),
    )
    op.create_table(
        "compensa_audit_findings",
        sa.Column("participant", sa.String(64), primary_key=True),
        sa.Column("saga_id", sa.String(128), primary_key=True),
        sa.Column("step_name", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("found_at", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("alert_position", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("compensa_audit_findings")
    op.drop_table("compensa_audit_progress")
