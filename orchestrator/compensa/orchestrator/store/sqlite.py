"""The SQLite store: the embedded default, one process on one file."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from compensa.common.database import DEFAULT_DATABASE_TIMEOUT
from compensa.orchestrator.shared.records import DELIVERY_POSSIBLE, LogEvent, SagaRecord
from compensa.orchestrator.store.base import BulkBatchAction, BulkJob, SagaWrite, WriteResult
from compensa.orchestrator.store.rows import ALERT_RAISED, rejected, saga_alert, saga_values, step_row
from compensa.orchestrator.store.schema import alerts, participant_contracts, saga_steps, sagas
from compensa.orchestrator.store.sql import SqlSagaStore, log_alerts


class TableByTableCommit(SqlSagaStore):
    """The group commit as a few statements per table in one transaction,
    each naming only the columns its writes set: SQLite's. (Tests write
    PostgreSQL databases at earlier revisions through it, as the releases of
    those revisions did.)"""

    async def commit(self, writes: Sequence[SagaWrite]) -> list[WriteResult]:
        """Writes every transition in one transaction, a few statements per
        table; RejectedWrite when the database refuses a value (nothing is
        written then)."""
        creates = [(index, write) for index, write in enumerate(writes) if write.request_fingerprint is not None]
        updates = [(index, write) for index, write in enumerate(writes) if write.request_fingerprint is None]
        try:
            async with self._transaction() as conn:
                epochs = await self._insert_sagas(conn, creates) if creates else {}
                if updates:
                    updated = await self._update_sagas(conn, updates)
                    epochs.update(updated)
                    await self._update_steps(conn, [write for index, write in updates if index in updated])
                landed = sorted(epochs)
                positions = await self._append_events(conn, [(writes[i].saga, writes[i].events) for i in landed])
                await self._queue_alerts(
                    conn, [(writes[i].saga, writes[i].events, positions[n]) for n, i in enumerate(landed)]
                )
                await self._announce(conn, [writes[i].saga.saga_id for i in landed])
        except (sa.exc.DataError, sa.exc.IntegrityError, OverflowError) as error:
            raise rejected(error) from error
        by_index = dict(zip(landed, positions, strict=True))
        return [
            WriteResult(ok=True, epoch=epochs[index], positions=by_index[index]) if index in epochs
            else WriteResult(ok=False)
            for index in range(len(writes))
        ]

    async def _queue_alerts(
        self, conn: AsyncConnection, landed: Sequence[tuple[SagaRecord, tuple[LogEvent, ...], tuple[int, ...]]]
    ) -> None:
        """Puts the alerts among the landed events in the alert log and its
        outbox (the flush of PostgreSQL does the same in its statement)."""
        raised = [
            (saga, event, position)
            for saga, events, positions in landed
            for event, position in zip(events, positions, strict=True)
            if event.type == ALERT_RAISED
        ]
        if not raised:
            return
        taken = await self._take_positions(conn, alerts, len(raised))
        logged = [
            saga_alert(saga, event, event_position, position)
            for (saga, event, event_position), position in zip(raised, taken, strict=True)
        ]
        await log_alerts(conn, logged)

    async def _insert_sagas(
        self, conn: AsyncConnection, creates: Sequence[tuple[int, SagaWrite]]
    ) -> dict[int, int]:
        """Inserts new sagas whose id is free, with their steps; returns
        {write index: epoch} of those inserted."""
        rows = [
            {
                **saga_values(write),
                "saga_id": write.saga.saga_id,
                "definition_name": write.saga.definition_name,
                "definition_version": write.saga.definition_version,
                "input": write.saga.input,
                "request_fingerprint": write.request_fingerprint,
                "created_at": write.saga.created_at,
                "epoch": 1,
            }
            for _, write in creates
        ]
        # Named only when set, so that these statements also write a
        # database at a revision before traces (the migration tests do).
        if any(write.saga.trace_parent is not None for _, write in creates):
            for row, (_, write) in zip(rows, creates, strict=True):
                row["trace_parent"] = write.saga.trace_parent
        inserted = set(
            (
                await conn.execute(
                    self._insert(sagas).on_conflict_do_nothing().returning(sagas.c.saga_id), rows
                )
            ).scalars()
        )
        landed: dict[int, int] = {}
        step_rows: list[dict[str, Any]] = []
        for index, write in creates:
            if write.saga.saga_id in inserted:
                inserted.discard(write.saga.saga_id)  # a duplicate id within the batch lands once
                landed[index] = 1
                step_rows += [
                    step_row(write.saga.saga_id, position, step) for position, step in enumerate(write.saga.steps)
                ]
        # Named only when it differs from the column's default, like trace_parent:
        # a write names the columns it sets.
        if step_rows and all(row["delivery"] == DELIVERY_POSSIBLE for row in step_rows):
            for row in step_rows:
                del row["delivery"]
        if all(row["idempotency_name"] is None for row in step_rows):  # a new saga's: always
            for row in step_rows:
                del row["idempotency_name"]
        if step_rows:
            await conn.execute(saga_steps.insert(), step_rows)
        return landed

    async def _update_sagas(
        self, conn: AsyncConnection, updates: Sequence[tuple[int, SagaWrite]]
    ) -> dict[int, int]:
        """Guarded updates, one statement each; returns {write index: epoch}
        of those whose guard held."""
        landed: dict[int, int] = {}
        for index, write in updates:
            guard = [sagas.c.saga_id == write.saga.saga_id, sagas.c.sequence == write.expected_sequence]
            values = saga_values(write)
            if write.epoch is None:
                values["epoch"] = sagas.c.epoch + 1
            else:
                guard.append(sagas.c.epoch == write.epoch)
            epoch = (
                await conn.execute(sa.update(sagas).where(*guard).values(**values).returning(sagas.c.epoch))
            ).scalar_one_or_none()
            if epoch is not None:
                landed[index] = epoch
        return landed

    async def _update_steps(self, conn: AsyncConnection, writes: Sequence[SagaWrite]) -> None:
        rows = []
        for write in writes:
            positions = {step.name: index for index, step in enumerate(write.saga.steps)}
            for name in write.changed_steps:
                row = step_row(write.saga.saga_id, positions[name], write.saga.step(name))
                rows.append({"b_" + key: value for key, value in row.items()})
        if not rows:
            return
        await conn.execute(
            sa.update(saga_steps)
            .where(
                saga_steps.c.saga_id == sa.bindparam("b_saga_id"),
                saga_steps.c.step_name == sa.bindparam("b_step_name"),
            )
            .values(
                {
                    column: sa.bindparam("b_" + column.name)
                    for column in saga_steps.columns
                    if column.name not in ("saga_id", "step_name")
                }
            ),
            rows,
        )


class SqliteSagaStore(TableByTableCommit):
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

        # What the row lock of a job is on PostgreSQL: the process is the
        # only one on the file, and a transaction held across a batch would
        # hold the write lock the batch's own writes wait for.
        self._bulk_batches = asyncio.Lock()

    def _insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)

    async def run_bulk_batch(
        self, bulk_action_id: str, owner: str, epoch: int, limit: int, act: BulkBatchAction
    ) -> int | None:
        async with self._bulk_batches:
            async with self._transaction() as conn:
                if not await self._lock_held_bulk_job(conn, bulk_action_id, owner, epoch):
                    return None
                items = await self._pending_bulk_items(conn, bulk_action_id, limit)
            if items:
                outcomes, now = await act(items)
                async with self._transaction() as conn:
                    await self._record_bulk_outcomes(conn, bulk_action_id, owner, epoch, outcomes, now)
            return len(items)

    async def change_bulk_job_state(
        self, bulk_action_id: str, *, allowed_from: frozenset[int], to: int, now: float
    ) -> tuple[BulkJob | None, bool]:
        async with self._bulk_batches:
            return await super().change_bulk_job_state(bulk_action_id, allowed_from=allowed_from, to=to, now=now)

    async def _hold_contracts(self, conn: AsyncConnection, *, exclusive: bool) -> None:
        """The database's write lock, taken now by a write that matches no row
        rather than at the transaction's first real write: one writer at a
        time, and its reads come after every earlier commit."""
        await conn.execute(sa.update(participant_contracts).where(sa.false()).values(name=participant_contracts.c.name))
