"""The audit as a durable job: `compensa_audit_jobs`, leased like bulk actions
(owner, lease_until, epoch), with the run's start, its report so far and
where the participant in progress stands; at most one RUNNING at a time.

Revision ID: 0014
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compensa_audit_jobs",
        sa.Column("audit_id", sa.String(64), primary_key=True),
        sa.Column("request", sa.LargeBinary, nullable=False),
        sa.Column("started_by", sa.String(256), nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("running", sa.Boolean, nullable=True),
        sa.Column("began", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("report", sa.LargeBinary, nullable=False),
        sa.Column("cursor", sa.Text, nullable=False),
        sa.UniqueConstraint("running", name="compensa_audit_jobs_one_running"),
    )


def downgrade() -> None:
    raise NotImplementedError("Compensa's schema only moves forward; restore a backup to go back")
