"""PostgreSQL's log positions come from the writing transaction's id, not
from the `compensa_log_head` counter that every group commit of every
replica had to lock until it committed (see store/postgres.py); and
`compensa_log_holdups` records the open transactions that held the log's
readers back long enough to be alerted.

On PostgreSQL the counter goes. Its lock is taken first, so a writer of the
previous release that is between its position and its commit finishes
before; one still running after the upgrade fails its writes (the table is
gone) instead of writing positions below those of this release. Every
position written so far is below those to come (checked: the new ones start
at this transaction's id times 2^16), so a subscriber resumes from a
position of the old log and misses nothing. SQLite keeps its counter: one
process writes, one transaction at a time.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_RANK_BITS = 16  # as store/postgres.py's


def upgrade() -> None:
    op.create_table(
        "compensa_log_holdups",
        sa.Column("transaction", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("alerted_at", sa.Float, nullable=False),
    )
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE compensa_log_head IN ACCESS EXCLUSIVE MODE")
    first_new = f"(pg_current_xact_id()::text::bigint << {_RANK_BITS})"
    for table in ("compensa_saga_events", "compensa_alerts"):
        last = op.get_bind().execute(
            sa.text(f"SELECT coalesce(max(position), 0), {first_new} FROM {table}")
        ).one()
        if last[0] >= last[1]:
            raise RuntimeError(
                f"{table} has positions up to {last[0]}, past where this release's begin ({last[1]}):"
                " this database has written more events than it has run transactions, which Compensa never does"
            )
    op.drop_table("compensa_log_head")


def downgrade() -> None:
    raise NotImplementedError("Compensa's schema only moves forward; restore a backup to go back")
