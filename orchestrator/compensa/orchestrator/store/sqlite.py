"""The SQLite store: the embedded default, one process on one file."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import sqlite

from compensa.common.database import DEFAULT_DATABASE_TIMEOUT
from compensa.orchestrator.store.sql import SqlSagaStore


class SqliteSagaStore(SqlSagaStore):
    """The embedded default: one process, one file, WAL mode."""

    _CLOCK_QUERY = "SELECT (julianday('now') - 2440587.5) * 86400.0"

    def __init__(self, url: str, *, timeout: float = DEFAULT_DATABASE_TIMEOUT) -> None:
        super().__init__(url, timeout=timeout)
        # The only wait on a local file: another connection's write lock.
        busy_milliseconds = max(1, round(timeout * 1000))

        @sa_event.listens_for(self.engine.sync_engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_milliseconds}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    def _insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)
