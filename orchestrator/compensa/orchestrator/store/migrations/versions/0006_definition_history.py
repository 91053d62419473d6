"""A definition's history: which version is the latest, and who made it so.

`compensa_definitions.promotion` orders the versions of a name by when they
last became the latest (a registration or a promotion); it starts as the
version, so the latest stays the highest version. Every existing version
gets a "registered" entry in `compensa_definition_changes` (no actor: it was
not recorded).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("compensa_definitions") as batch:
        batch.add_column(sa.Column("promotion", sa.BigInteger, nullable=False, server_default=sa.text("0")))
    op.execute("UPDATE compensa_definitions SET promotion = version")
    with op.batch_alter_table("compensa_definitions") as batch:
        batch.alter_column("promotion", server_default=None)
    op.create_table(
        "compensa_definition_changes",
        sa.Column(
            "position", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("changed_at", sa.Float, nullable=False),
    )
    op.create_index(
        "compensa_definition_changes_name", "compensa_definition_changes", ["name", "position"]
    )
    op.execute(
        "INSERT INTO compensa_definition_changes (name, version, kind, actor, changed_at)"
        " SELECT name, version, 'registered', '', created_at FROM compensa_definitions ORDER BY created_at, version"
    )


def downgrade() -> None:
    op.drop_index("compensa_definition_changes_name", "compensa_definition_changes")
    op.drop_table("compensa_definition_changes")
    with op.batch_alter_table("compensa_definitions") as batch:
        batch.drop_column("promotion")
