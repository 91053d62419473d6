"""Alembic's environment for Compensa's schema.

Compensa runs migrations itself (compensa.orchestrator.store.migrations): it hands
Alembic a connection already inside a transaction that holds the schema lock,
so this file only configures the context on that connection.
"""

from __future__ import annotations

from alembic import context

from compensa.orchestrator.store.migrations import VERSION_TABLE
from compensa.orchestrator.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things: batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
