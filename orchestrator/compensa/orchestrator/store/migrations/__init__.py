"""Versioned schema migrations (Alembic), run by Compensa itself.

`compensa migrate` upgrades a database from any earlier schema to the one
this release knows; `compensa serve` creates the schema in an empty database
and refuses one at another revision. Either way the work is done in one
transaction that first takes a schema lock, so replicas started together on
an empty database create it once, one after the other.

A database made before migrations existed (Compensa's tables, no version
table) is taken to be at the first revision, which is that schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError

from compensa.orchestrator.shared.errors import SchemaMismatch

#: Compensa's own version table, so a database that also holds an
#: application's Alembic history keeps both apart.
VERSION_TABLE = "compensa_schema_version"
#: The revision a pre-migration Compensa database is at.
BASELINE = "0001"
# A table every Compensa schema has had.
_ANY_COMPENSA_TABLE = "compensa_sagas"
# pg_advisory_xact_lock key: held until the migrating transaction ends.
_SCHEMA_LOCK_KEY = 0x636F6D70656E7361  # "compensa"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The revision this release's code is written for."""
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands against this release."""

    #: None: no Compensa tables at all (an empty database).
    revision: str | None
    head: str

    @property
    def current(self) -> bool:
        return self.revision == self.head

    @property
    def known(self) -> bool:
        """Whether this release knows the revision (else the database was
        migrated by a newer release)."""
        if self.revision is None:
            return True
        try:
            return _scripts().get_revision(self.revision) is not None
        except (ResolutionError, CommandError):
            return False


def lock_schema(connection: sa.Connection) -> None:
    """Serializes schema work across processes until the transaction ends."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
    # SQLite: one writer at a time already; the first DDL statement takes the lock.


def schema_state(connection: sa.Connection) -> SchemaState:
    """The database's revision, read on `connection` (inside its transaction)."""
    revision = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()
    if revision is None and sa.inspect(connection).has_table(_ANY_COMPENSA_TABLE):
        revision = BASELINE
    return SchemaState(revision=revision, head=head())


def ensure_current(connection: sa.Connection, *, database: str) -> None:
    """What `serve` does at start-up, on `connection` inside its transaction:
    creates the schema in an empty database, accepts one at the head
    revision, and raises SchemaMismatch for any other (naming the command
    that fixes it)."""
    lock_schema(connection)
    state = schema_state(connection)
    if state.revision is None:
        _upgrade(connection, state)
    elif not state.known:
        raise SchemaMismatch(_too_new(state))
    elif not state.current:
        raise SchemaMismatch(
            f"the database's schema is at revision {state.revision} and this release runs on {state.head}:"
            f" upgrade it first with `compensa migrate --db {database}` (sagas in flight are carried over)"
        )


def upgrade(connection: sa.Connection) -> SchemaState:
    """Upgrades to the head revision on `connection`, inside its transaction
    (the caller commits); returns the state it started from."""
    lock_schema(connection)
    state = schema_state(connection)
    if not state.known:
        raise SchemaMismatch(_too_new(state))
    if not state.current:
        _upgrade(connection, state)
    return state


def _upgrade(connection: sa.Connection, state: SchemaState) -> None:
    config = _config()
    config.attributes["connection"] = connection
    if state.revision == BASELINE and not sa.inspect(connection).has_table(VERSION_TABLE):
        command.stamp(config, BASELINE)  # made before migrations existed
    command.upgrade(config, "head")


def _too_new(state: SchemaState) -> str:
    return (
        f"the database's schema is at revision {state.revision}, which this release of Compensa does not know"
        f" (it runs on {state.head}): it was upgraded by a newer release; run that release or a later one"
    )
