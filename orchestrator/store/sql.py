"""The SQL store: PostgreSQL for production, SQLite as the embedded default.

All of Compensa's SQL is here and in schema.py. Both engines share the
statements; the differences (insert-or-ignore, SKIP LOCKED, connection
set-up) are in the two small subclasses at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from compensa.v1 import definition_pb2, saga_pb2
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from orchestrator.errors import RejectedWrite, StoreUnavailable
from orchestrator.machine import (
    COMPENSATED,
    FAILED,
    FINAL_SAGA_STATES,
    RUNNING,
    SUCCEEDED,
    LogEvent,
    SagaRecord,
    StepRecord,
    takeover_event,
)
from orchestrator.store import migrations
from orchestrator.store.base import (
    Claimed,
    ParticipantAddress,
    PendingAlert,
    SagaStore,
    SagaWrite,
    StateSummary,
    StoredEvent,
    WriteResult,
)
from orchestrator.store.schema import (
    alert_outbox,
    definitions,
    log_head,
    participants,
    saga_events,
    saga_steps,
    sagas,
    secrets,
)
from participants.database import (
    DEFAULT_DATABASE_TIMEOUT,
    abort_when_late,
    bounded_transaction,
    cancelled_by_the_database,
    connect_bounded,
    engine_options,
)

log = logging.getLogger("compensa.store")

# Ids per IN list, well under the drivers' bound-parameter limits.
_ID_CHUNK = 900

ALERT_RAISED = saga_pb2.EVENT_TYPE_ALERT_RAISED

_ACTIVE_STATES = tuple(sorted({1, 2, 3, 4, 5} - FINAL_SAGA_STATES))


def open_store(url: str, *, notifier: str = "", timeout: float = DEFAULT_DATABASE_TIMEOUT) -> SqlSagaStore:
    """A store for a SQLAlchemy URL: postgresql+psycopg://... or sqlite+aiosqlite:///...

    `notifier` names this process in change notifications, so it can ignore
    its own. `timeout` bounds every wait on the database, in seconds."""
    if url.startswith("postgresql"):
        return PostgresSagaStore(url, notifier=notifier, timeout=timeout)
    if url.startswith("sqlite"):
        return SqliteSagaStore(url, timeout=timeout)
    raise ValueError(f"unsupported database URL {url!r}: use postgresql+psycopg:// or sqlite+aiosqlite://")


def _rejected(error: Exception) -> RejectedWrite:
    """A flush failure tied to the values written, not to the connection: the
    same flush without the offending write would land."""
    first_line = str(error).partition("\n")[0][:200]
    return RejectedWrite(f"the database refused a value of this change ({type(error).__name__}: {first_line})")


def _step_row(saga_id: str, position: int, step: StepRecord) -> dict[str, Any]:
    return {
        "saga_id": saga_id,
        "step_name": step.name,
        "position": position,
        "state": step.state,
        "attempts": step.attempts,
        "compensate_attempts": step.compensate_attempts,
        "output": step.output,
        "last_error": step.last_error,
        "effect_uncertain": step.effect_uncertain,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
        "next_attempt_at": step.next_attempt_at,
    }


def _event_row(saga: SagaRecord, event: LogEvent, position: int) -> dict[str, Any]:
    return {
        "saga_id": saga.saga_id,
        "sequence": event.sequence,
        "position": position,
        "type": event.type,
        "time": event.time,
        "saga_state": event.saga_state,
        "step_name": event.step_name,
        "step_state": event.step_state,
        "attempt": event.attempt,
        "message": event.message,
        "actor": event.actor,
        "definition_name": saga.definition_name,
    }


def _outbox_row(saga: SagaRecord, event: LogEvent, position: int) -> dict[str, Any]:
    return {
        "saga_id": saga.saga_id,
        "sequence": event.sequence,
        "position": position,
        "definition_name": saga.definition_name,
        "step_name": event.step_name,
        "message": event.message,
        "raised_at": event.time,
        "attempts": 0,
        "next_attempt_at": event.time,
        "last_error": "",
    }


def _stored_event(row: sa.Row[Any]) -> StoredEvent:
    return StoredEvent(
        saga_id=row.saga_id,
        definition_name=row.definition_name,
        position=row.position,
        event=LogEvent(
            sequence=row.sequence,
            type=row.type,
            time=row.time,
            saga_state=row.saga_state,
            step_name=row.step_name,
            step_state=row.step_state,
            attempt=row.attempt,
            message=row.message,
            actor=row.actor,
        ),
    )


def _saga_from_rows(row: sa.Row[Any], step_rows: Sequence[sa.Row[Any]]) -> SagaRecord:
    return SagaRecord(
        saga_id=row.saga_id,
        definition_name=row.definition_name,
        definition_version=row.definition_version,
        state=row.state,
        sequence=row.sequence,
        input=row.input,
        created_at=row.created_at,
        updated_at=row.updated_at,
        failure_reason=row.failure_reason,
        resolution_note=row.resolution_note,
        trace_parent=row.trace_parent,
        steps=tuple(
            StepRecord(
                name=step.step_name,
                state=step.state,
                attempts=step.attempts,
                compensate_attempts=step.compensate_attempts,
                output=step.output,
                last_error=step.last_error,
                effect_uncertain=step.effect_uncertain,
                started_at=step.started_at,
                finished_at=step.finished_at,
                next_attempt_at=step.next_attempt_at,
            )
            for step in sorted(step_rows, key=lambda s: s.position)
        ),
    )


_SAGA_COLUMNS = [
    sagas.c.saga_id,
    sagas.c.definition_name,
    sagas.c.definition_version,
    sagas.c.state,
    sagas.c.sequence,
    sagas.c.input,
    sagas.c.created_at,
    sagas.c.updated_at,
    sagas.c.failure_reason,
    sagas.c.resolution_note,
    sagas.c.trace_parent,
]


class SqlSagaStore(SagaStore):
    """SagaStore over SQLAlchemy 2 Core with an async driver."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_DATABASE_TIMEOUT, **options: Any) -> None:
        self.url = url
        #: The longest any one wait on the database may take, in seconds.
        self.timeout = timeout
        self.engine: AsyncEngine = create_async_engine(url, **options)

    # -- dialect hooks

    def _insert(self, table: sa.Table) -> Any:
        raise NotImplementedError

    def _skip_locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """Locks the selected rows, skipping those another transaction holds."""
        return query

    async def _index_only_planning(self, conn: AsyncConnection) -> None:
        """For the rest of the transaction, plans that read a whole table are
        out: the scheduler's claim runs every second, and a plan cached while
        the tables were small must not scan them once they are large."""

    # Reads the database's wall clock in seconds since the epoch.
    _CLOCK_QUERY: str

    # -- plumbing

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """One transaction, bounded by `timeout` (and so is getting its connection)."""
        try:
            async with bounded_transaction(self.engine, self.timeout) as conn:
                yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError, OSError) as error:
            if not cancelled_by_the_database(error):
                self._reached(error)
            raise StoreUnavailable(f"database unavailable: {error.__class__.__name__}: {error}") from error
        except sa.exc.DBAPIError as error:
            if error.connection_invalidated:
                self._reached(error)
                raise StoreUnavailable(f"database connection lost: {error}") from error
            raise
        self._reached(None)

    async def ensure_schema(self) -> None:
        database = make_url(self.url).render_as_string(hide_password=True)
        async with self._transaction() as conn:
            await conn.run_sync(functools.partial(migrations.ensure_current, database=database))

    async def upgrade_schema(self) -> tuple[str | None, str]:
        async with self._transaction() as conn:
            before = await conn.run_sync(migrations.upgrade)
        return before.revision, before.head

    async def has_schema(self) -> bool:
        async with self._transaction() as conn:
            return bool(await conn.run_sync(lambda sync: sa.inspect(sync).has_table(sagas.name)))

    async def secret(self, name: str) -> bytes:
        async with self._transaction() as conn:
            # Replicas starting together all try; the first insert wins.
            await conn.execute(
                self._insert(secrets).values(name=name, value=os.urandom(32)).on_conflict_do_nothing()
            )
            value = (await conn.execute(sa.select(secrets.c.value).where(secrets.c.name == name))).scalar_one()
        return bytes(value)

    async def clock(self) -> float:
        async with self._transaction() as conn:
            return float((await conn.execute(sa.text(self._CLOCK_QUERY))).scalar_one())

    async def ping(self) -> None:
        async with self._transaction() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def close(self) -> None:
        await self.engine.dispose()

    # -- definitions

    async def register_definition(
        self, definition: definition_pb2.SagaDefinition, fingerprint: str, now: float
    ) -> tuple[definition_pb2.SagaDefinition, bool]:
        async with self._transaction() as conn:
            existing = (
                await conn.execute(
                    sa.select(definitions.c.body).where(
                        definitions.c.name == definition.name, definitions.c.fingerprint == fingerprint
                    )
                )
            ).scalar_one_or_none()
            if existing is not None:
                return definition_pb2.SagaDefinition.FromString(existing), False
            latest = (
                await conn.execute(
                    sa.select(sa.func.max(definitions.c.version)).where(definitions.c.name == definition.name)
                )
            ).scalar_one_or_none()
            stored = definition_pb2.SagaDefinition()
            stored.CopyFrom(definition)
            stored.version = (latest or 0) + 1
            inserted = await conn.execute(
                self._insert(definitions)
                .values(
                    name=stored.name,
                    version=stored.version,
                    fingerprint=fingerprint,
                    body=stored.SerializeToString(deterministic=True),
                    created_at=now,
                )
                .on_conflict_do_nothing()
                .returning(definitions.c.version)
            )
            # RETURNING, not rowcount: psycopg's async rowcount is -1 for INSERT.
            if inserted.first() is None:
                # Another replica registered the same name at the same moment.
                raise StoreUnavailable(f"definition {definition.name!r} was registered concurrently; retry")
            return stored, True

    async def get_definition(self, name: str, version: int = 0) -> definition_pb2.SagaDefinition | None:
        query = sa.select(definitions.c.body).where(definitions.c.name == name)
        if version:
            query = query.where(definitions.c.version == version)
        else:
            query = query.order_by(definitions.c.version.desc()).limit(1)
        async with self._transaction() as conn:
            body = (await conn.execute(query)).scalar_one_or_none()
        return None if body is None else definition_pb2.SagaDefinition.FromString(body)

    async def list_definitions(self, page_size: int, after_name: str) -> list[definition_pb2.SagaDefinition]:
        latest = (
            sa.select(definitions.c.name, sa.func.max(definitions.c.version).label("version"))
            .where(definitions.c.name > after_name)
            .group_by(definitions.c.name)
            .subquery()
        )
        query = (
            sa.select(definitions.c.body)
            .join(latest, sa.and_(definitions.c.name == latest.c.name, definitions.c.version == latest.c.version))
            .order_by(definitions.c.name)
            .limit(page_size)
        )
        async with self._transaction() as conn:
            bodies = (await conn.execute(query)).scalars().all()
        return [definition_pb2.SagaDefinition.FromString(body) for body in bodies]

    # -- participants

    async def set_participant(self, name: str, address: str, *, updated_by: str, now: float) -> ParticipantAddress:
        values = {"address": address, "updated_at": now, "updated_by": updated_by}
        async with self._transaction() as conn:
            await conn.execute(
                self._insert(participants)
                .values(name=name, **values)
                .on_conflict_do_update(index_elements=[participants.c.name], set_=values)
            )
        return ParticipantAddress(name, address, now, updated_by)

    async def list_participants(self) -> list[ParticipantAddress]:
        async with self._transaction() as conn:
            rows = (await conn.execute(sa.select(participants).order_by(participants.c.name))).all()
        return [ParticipantAddress(row.name, row.address, row.updated_at, row.updated_by) for row in rows]

    # -- sagas

    async def create_saga(self, write: SagaWrite, request_fingerprint: str) -> tuple[SagaRecord, bool, str]:
        write = dataclasses.replace(write, request_fingerprint=request_fingerprint)
        (result,) = await self.commit([write])
        if result.ok:
            return write.saga, True, request_fingerprint
        existing = await self.load_start(write.saga.saga_id)
        if existing is None:  # deleted in between: impossible, sagas are never deleted
            raise StoreUnavailable(f"saga {write.saga.saga_id!r} vanished; retry")
        return existing[0], False, existing[1]

    async def load_start(self, saga_id: str) -> tuple[SagaRecord, str] | None:
        async with self._transaction() as conn:
            fingerprint = (
                await conn.execute(sa.select(sagas.c.request_fingerprint).where(sagas.c.saga_id == saga_id))
            ).scalar_one_or_none()
            if fingerprint is None:
                return None
            saga = await self._load(conn, saga_id)
            assert saga is not None
            return saga, fingerprint

    async def _load(self, conn: AsyncConnection, saga_id: str) -> SagaRecord | None:
        row = (await conn.execute(sa.select(*_SAGA_COLUMNS).where(sagas.c.saga_id == saga_id))).one_or_none()
        if row is None:
            return None
        steps = (await conn.execute(sa.select(saga_steps).where(saga_steps.c.saga_id == saga_id))).all()
        return _saga_from_rows(row, steps)

    async def _load_many(self, conn: AsyncConnection, rows: Sequence[sa.Row[Any]]) -> list[SagaRecord]:
        if not rows:
            return []
        ids = [row.saga_id for row in rows]
        step_rows = (await conn.execute(sa.select(saga_steps).where(saga_steps.c.saga_id.in_(ids)))).all()
        by_saga: dict[str, list[sa.Row[Any]]] = {saga_id: [] for saga_id in ids}
        for step in step_rows:
            by_saga[step.saga_id].append(step)
        return [_saga_from_rows(row, by_saga[row.saga_id]) for row in rows]

    async def load_saga(self, saga_id: str) -> SagaRecord | None:
        async with self._transaction() as conn:
            return await self._load(conn, saga_id)

    async def load_with_owner(self, saga_id: str) -> tuple[SagaRecord, str | None, float | None] | None:
        async with self._transaction() as conn:
            saga = await self._load(conn, saga_id)
            if saga is None:
                return None
            held = (
                await conn.execute(sa.select(sagas.c.owner, sagas.c.lease_until).where(sagas.c.saga_id == saga_id))
            ).one()
            return saga, held.owner, held.lease_until

    async def load_owned(self, saga_id: str, owner: str, epoch: int) -> SagaRecord | None:
        async with self._transaction() as conn:
            held = (
                await conn.execute(
                    sa.select(sagas.c.saga_id).where(
                        sagas.c.saga_id == saga_id, sagas.c.owner == owner, sagas.c.epoch == epoch
                    )
                )
            ).one_or_none()
            return None if held is None else await self._load(conn, saga_id)

    async def _announce(self, conn: AsyncConnection, saga_ids: Sequence[str]) -> None:
        """Tells other processes, on commit, which sagas changed."""

    async def commit(self, writes: Sequence[SagaWrite]) -> list[WriteResult]:
        """Writes every transition in one transaction; RejectedWrite when the
        database refuses a value (nothing is written then)."""
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
            raise _rejected(error) from error
        by_index = dict(zip(landed, positions))
        return [
            WriteResult(ok=True, epoch=epochs[index], positions=by_index[index]) if index in epochs
            else WriteResult(ok=False)
            for index in range(len(writes))
        ]

    async def _queue_alerts(
        self, conn: AsyncConnection, landed: Sequence[tuple[SagaRecord, tuple[LogEvent, ...], tuple[int, ...]]]
    ) -> None:
        """Puts the alerts among the landed events in the outbox (the flush
        of PostgreSQL does the same in its statement)."""
        rows = [
            _outbox_row(saga, event, position)
            for saga, events, positions in landed
            for event, position in zip(events, positions)
            if event.type == ALERT_RAISED
        ]
        if rows:
            await conn.execute(alert_outbox.insert(), rows)

    @staticmethod
    def _saga_values(write: SagaWrite) -> dict[str, Any]:
        saga = write.saga
        return {
            "state": saga.state,
            "sequence": saga.sequence,
            "updated_at": saga.updated_at,
            "failure_reason": saga.failure_reason,
            "resolution_note": saga.resolution_note,
            "due_at": write.due_at,
            "owner": None if write.release else write.owner,
            "lease_until": None if write.release else write.lease_until,
        }

    async def _insert_sagas(
        self, conn: AsyncConnection, creates: Sequence[tuple[int, SagaWrite]]
    ) -> dict[int, int]:
        """Inserts new sagas whose id is free, with their steps; returns
        {write index: epoch} of those inserted."""
        rows = [
            {
                **self._saga_values(write),
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
            for row, (_, write) in zip(rows, creates):
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
                    _step_row(write.saga.saga_id, position, step) for position, step in enumerate(write.saga.steps)
                ]
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
            values = self._saga_values(write)
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
                row = _step_row(write.saga.saga_id, positions[name], write.saga.step(name))
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

    async def _append_events(
        self, conn: AsyncConnection, batch: Sequence[tuple[SagaRecord, tuple[LogEvent, ...]]]
    ) -> list[tuple[int, ...]]:
        """Inserts events with global positions, last in the transaction.

        The log_head row lock is held from here to commit, so transactions
        take positions in the order they commit.
        """
        count = sum(len(events) for _, events in batch)
        if count == 0:
            return [() for _ in batch]
        end = (
            await conn.execute(
                sa.update(log_head)
                .where(log_head.c.id == 1)
                .values(position=log_head.c.position + count)
                .returning(log_head.c.position)
            )
        ).scalar_one()
        position = end - count
        rows: list[dict[str, Any]] = []
        out: list[tuple[int, ...]] = []
        for saga, events in batch:
            taken = []
            for event in events:
                position += 1
                taken.append(position)
                rows.append(_event_row(saga, event, position))
            out.append(tuple(taken))
        await conn.execute(saga_events.insert(), rows)
        return out

    @staticmethod
    def _claimable(now: float) -> sa.ColumnElement[bool]:
        return sa.and_(
            sagas.c.due_at <= now,
            sagas.c.state.in_(_ACTIVE_STATES),
            sa.or_(sagas.c.owner.is_(None), sagas.c.lease_until < now),
        )

    def claim_statement(self, now: float, limit: int) -> sa.Select[Any]:
        """The query that picks (and on PostgreSQL locks) up to `limit` due
        sagas for claim_due, with who held them and until when."""
        return self._skip_locked(
            sa.select(sagas.c.saga_id, sagas.c.owner, sagas.c.lease_until)
            .where(self._claimable(now))
            .order_by(sagas.c.due_at)
            .limit(limit)
        )

    async def claim_due(self, owner: str, now: float, lease_until: float, limit: int) -> list[Claimed]:
        # Two statements, not one UPDATE: the takeover event needs the previous
        # owner, which UPDATE ... RETURNING cannot give on SQLite. On
        # PostgreSQL the picked rows stay locked until the UPDATE.
        async with self._transaction() as conn:
            await self._index_only_planning(conn)
            due = (await conn.execute(self.claim_statement(now, limit))).all()
            if not due:
                return []
            held = {row.saga_id: (row.owner, row.lease_until) for row in due}
            taken = sa.and_(sagas.c.owner.is_not(None), sagas.c.owner != owner)
            rows = (
                await conn.execute(
                    sa.update(sagas)
                    .where(sagas.c.saga_id.in_(list(held)), self._claimable(now))
                    .values(
                        owner=owner, lease_until=lease_until, epoch=sagas.c.epoch + 1,
                        # A takeover is logged: its event takes the next sequence.
                        sequence=sagas.c.sequence + sa.case((taken, 1), else_=0),
                    )
                    .returning(*_SAGA_COLUMNS, sagas.c.epoch)
                )
            ).all()
            loaded = await self._load_many(conn, rows)
            takeovers: list[tuple[SagaRecord, tuple[LogEvent, ...]]] = []
            for saga in loaded:
                previous, expired_at = held[saga.saga_id]
                if previous is not None and previous != owner:
                    before = dataclasses.replace(saga, sequence=saga.sequence - 1)
                    why = f"its lease expired {max(0.0, now - (expired_at or now)):.1f}s ago"
                    takeovers.append((saga, (takeover_event(before, by=owner, previous=previous, why=why, now=now),)))
            positions = await self._append_events(conn, takeovers)
            await self._announce(conn, [saga.saga_id for saga, _ in takeovers])
        events = {
            saga.saga_id: tuple(
                StoredEvent(saga.saga_id, saga.definition_name, position, event)
                for event, position in zip(logged, taken_positions)
            )
            for (saga, logged), taken_positions in zip(takeovers, positions)
        }
        return [
            Claimed(
                saga=saga, epoch=row.epoch, events=events.get(saga.saga_id, ()),
                taken_from=held[saga.saga_id][0] if saga.saga_id in events else None,
            )
            for saga, row in zip(loaded, rows)
        ]

    async def renew_leases(self, owner: str, saga_ids: Sequence[str], lease_until: float) -> int:
        renewed = 0
        async with self._transaction() as conn:
            for start in range(0, len(saga_ids), _ID_CHUNK):
                # Rows a transition is writing right now are skipped, not
                # waited for: that write renews the lease itself, and waiting
                # could deadlock with it.
                held = (
                    self._skip_locked(
                        sa.select(sagas.c.saga_id).where(
                            sagas.c.owner == owner, sagas.c.saga_id.in_(saga_ids[start : start + _ID_CHUNK])
                        )
                    )
                    .cte("held")
                    .prefix_with("MATERIALIZED")
                )
                result = await conn.execute(
                    sa.update(sagas)
                    .where(sagas.c.saga_id == held.c.saga_id)
                    .values(lease_until=lease_until)
                    .returning(sagas.c.saga_id)
                )
                renewed += len(result.all())
        return renewed

    async def release_all(self, owner: str, now: float) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                sa.update(sagas).where(sagas.c.owner == owner).values(owner=None, lease_until=None)
            )

    async def purge_finished(self, *, finished_before: float, limit: int) -> int:
        done_with = sa.or_(
            sagas.c.state.in_((SUCCEEDED, COMPENSATED)),
            sa.and_(sagas.c.state == FAILED, sagas.c.resolution_note != ""),
        )
        victims = self._skip_locked(
            sa.select(sagas.c.saga_id).where(done_with, sagas.c.updated_at < finished_before).limit(limit)
        )
        async with self._transaction() as conn:
            saga_ids = [row[0] for row in (await conn.execute(victims)).all()]
            if saga_ids:
                await conn.execute(sa.delete(alert_outbox).where(alert_outbox.c.saga_id.in_(saga_ids)))
                await conn.execute(sa.delete(saga_events).where(saga_events.c.saga_id.in_(saga_ids)))
                await conn.execute(sa.delete(saga_steps).where(saga_steps.c.saga_id.in_(saga_ids)))
                await conn.execute(sa.delete(sagas).where(sagas.c.saga_id.in_(saga_ids)))
        return len(saga_ids)

    async def list_sagas(
        self,
        *,
        state: int,
        definition_name: str,
        updated_before: float | None,
        page_size: int,
        after: tuple[float, str] | None,
        id_contains: str = "",
    ) -> list[SagaRecord]:
        query = sa.select(*_SAGA_COLUMNS)
        if id_contains:
            query = query.where(sagas.c.saga_id.contains(id_contains, autoescape=True))
        if state:
            query = query.where(sagas.c.state == state)
        if definition_name:
            query = query.where(sagas.c.definition_name == definition_name)
        if updated_before is not None:
            query = query.where(sagas.c.updated_at < updated_before, sagas.c.state.in_(_ACTIVE_STATES))
        if after is not None:
            created_at, saga_id = after
            query = query.where(
                sa.or_(
                    sagas.c.created_at < created_at,
                    sa.and_(sagas.c.created_at == created_at, sagas.c.saga_id < saga_id),
                )
            )
        query = query.order_by(sagas.c.created_at.desc(), sagas.c.saga_id.desc()).limit(page_size)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).all()
            return await self._load_many(conn, rows)

    async def summarize_sagas(self, *, definition_name: str, stuck_before: float) -> list[StateSummary]:
        def how_many(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
            return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

        query = sa.select(
            sagas.c.definition_name,
            sagas.c.state,
            sa.func.count(),
            how_many(sa.and_(sagas.c.state.in_(_ACTIVE_STATES), sagas.c.updated_at < stuck_before)),
            how_many(sa.and_(sagas.c.state == FAILED, sagas.c.resolution_note == "")),
            sa.func.min(sagas.c.updated_at),
        ).group_by(sagas.c.definition_name, sagas.c.state).order_by(sagas.c.definition_name, sagas.c.state)
        if definition_name:
            query = query.where(sagas.c.definition_name == definition_name)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).all()
        return [StateSummary(name, state, count, int(stuck), int(unresolved), oldest)
                for name, state, count, stuck, unresolved, oldest in rows]

    async def find_stuck(self, *, stuck_before: float, now: float, limit: int) -> list[SagaRecord]:
        alerted = sa.exists().where(
            saga_events.c.saga_id == sagas.c.saga_id, saga_events.c.sequence == sagas.c.sequence,
            saga_events.c.type == ALERT_RAISED,
        )
        query = (
            sa.select(*_SAGA_COLUMNS)
            .where(
                sagas.c.state.in_(_ACTIVE_STATES), sagas.c.updated_at < stuck_before,
                sa.or_(sagas.c.owner.is_(None), sagas.c.lease_until < now), ~alerted,
            )
            .order_by(sagas.c.updated_at)
            .limit(limit)
        )
        async with self._transaction() as conn:
            return await self._load_many(conn, (await conn.execute(query)).all())

    # -- the alert outbox

    async def claim_alerts(self, now: float, claimed_until: float, limit: int) -> list[PendingAlert]:
        due = (
            self._skip_locked(
                sa.select(alert_outbox.c.saga_id, alert_outbox.c.sequence)
                .where(alert_outbox.c.next_attempt_at <= now)
                .order_by(alert_outbox.c.next_attempt_at)
                .limit(limit)
            )
            .cte("due")
            .prefix_with("MATERIALIZED")
        )
        claim = (
            sa.update(alert_outbox)
            .where(alert_outbox.c.saga_id == due.c.saga_id, alert_outbox.c.sequence == due.c.sequence)
            .values(next_attempt_at=claimed_until, attempts=alert_outbox.c.attempts + 1)
            .returning(*alert_outbox.c)
        )
        async with self._transaction() as conn:
            rows = (await conn.execute(claim)).all()
            traces: dict[str, str | None] = {}
            if rows:
                found = await conn.execute(
                    sa.select(sagas.c.saga_id, sagas.c.trace_parent).where(
                        sagas.c.saga_id.in_({row.saga_id for row in rows})
                    )
                )
                traces = {saga_id: trace_parent for saga_id, trace_parent in found.all()}
        return [
            PendingAlert(
                saga_id=row.saga_id, sequence=row.sequence, position=row.position,
                definition_name=row.definition_name, step_name=row.step_name, message=row.message,
                raised_at=row.raised_at, attempts=row.attempts, trace_parent=traces.get(row.saga_id),
            )
            for row in sorted(rows, key=lambda row: row.position)
        ]

    async def alert_delivered(self, saga_id: str, sequence: int) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                sa.delete(alert_outbox).where(alert_outbox.c.saga_id == saga_id, alert_outbox.c.sequence == sequence)
            )

    async def alert_not_delivered(
        self, saga_id: str, sequence: int, attempts: int, next_attempt_at: float, error: str
    ) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                sa.update(alert_outbox)
                .where(
                    alert_outbox.c.saga_id == saga_id, alert_outbox.c.sequence == sequence,
                    alert_outbox.c.attempts == attempts,
                )
                .values(next_attempt_at=next_attempt_at, last_error=error)
            )

    # -- the event log

    async def read_saga_events(self, saga_id: str, after_sequence: int, limit: int) -> list[StoredEvent]:
        query = (
            sa.select(saga_events)
            .where(saga_events.c.saga_id == saga_id, saga_events.c.sequence > after_sequence)
            .order_by(saga_events.c.sequence)
            .limit(limit)
        )
        async with self._transaction() as conn:
            return [_stored_event(row) for row in (await conn.execute(query)).all()]

    async def read_log(
        self, after_position: int, limit: int, *, definition_name: str = "", saga_state: int = 0
    ) -> list[StoredEvent]:
        query = sa.select(saga_events).where(saga_events.c.position > after_position)
        if definition_name:
            query = query.where(saga_events.c.definition_name == definition_name)
        if saga_state:
            query = query.where(saga_events.c.saga_state == saga_state)
        query = query.order_by(saga_events.c.position).limit(limit)
        async with self._transaction() as conn:
            return [_stored_event(row) for row in (await conn.execute(query)).all()]

    async def head_position(self) -> int:
        async with self._transaction() as conn:
            return int((await conn.execute(sa.select(log_head.c.position).where(log_head.c.id == 1))).scalar_one())


_CHANNEL = "compensa_changes"
# How long the change listener waits for a notification before it checks
# that its connection still answers.
_LISTENER_CHECK_SECONDS = 5.0
# NOTIFY payloads must stay under 8000 bytes; past this, say "anything".
_MAX_PAYLOAD = 7000


# The writer runs only the flush, whose plan PostgreSQL caches (a generic plan
# after five runs). Made while the tables were small, that plan read the whole
# sagas table on every flush, so flushes got slower as the table grew
# (measured: 0.62 -> 0.95 ms over 3,000 sagas; flat at 0.53-0.56 ms once every
# table is reached through its index). Every row the flush touches is found by
# its primary key; no sequential scan is ever the right plan here.
WRITER_OPTIONS = "-c enable_seqscan=off"


class PostgresSagaStore(SqlSagaStore):
    """The production store: several replicas share one PostgreSQL."""

    # clock_timestamp(), not now(): the time of the reading, not of the
    # transaction's start.
    _CLOCK_QUERY = "SELECT extract(epoch FROM clock_timestamp())::float8"

    def __init__(self, url: str, *, notifier: str = "", timeout: float = DEFAULT_DATABASE_TIMEOUT) -> None:
        # No pre-ping: it costs a round trip per transaction. A dead
        # connection fails its transaction, SQLAlchemy drops it from the pool,
        # and the caller retries (StoreUnavailable).
        super().__init__(url, timeout=timeout, pool_size=10, max_overflow=10, **engine_options(url, timeout))
        self.notifier = notifier
        self._conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        # Group commit has one connection of its own, outside SQLAlchemy's
        # pool: the hot path is two prepared statements and a COMMIT.
        self._writer: psycopg.AsyncConnection[Any] | None = None
        self._writer_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The group commit's connection, for one flush of at most `timeout`."""
        async with self._writer_lock:
            try:
                if self._writer is None or self._writer.closed:
                    self._writer = await connect_bounded(
                        self._conninfo, self.timeout, options=WRITER_OPTIONS, autocommit=True, prepare_threshold=0
                    )
                # A timer, not a round trip: the flush stays one statement.
                with abort_when_late(self._writer, self.timeout):
                    yield self._writer
            except (psycopg.OperationalError, OSError) as error:
                if self._writer is not None:
                    await self._writer.close()
                self._writer = None
                if not cancelled_by_the_database(error):
                    self._reached(error)
                raise StoreUnavailable(f"database unavailable: {error.__class__.__name__}: {error}") from error
        self._reached(None)

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        await super().close()

    async def _announce(self, conn: AsyncConnection, saga_ids: Sequence[str]) -> None:
        if not saga_ids:
            return
        payload = self.notifier + "|" + ",".join(saga_ids)
        if len(payload) > _MAX_PAYLOAD:
            payload = self.notifier + "|*"
        # Delivered at commit, never for a rolled-back transaction.
        await conn.execute(sa.select(sa.func.pg_notify(_CHANNEL, payload)))

    async def listen(self, on_change: Callable[[list[str] | None], None], *, ignore_from: str) -> None:
        conninfo = self._conninfo
        delay = 0.1
        lost = False
        while True:
            try:
                async with await connect_bounded(conninfo, self.timeout, autocommit=True) as conn:
                    with abort_when_late(conn, self.timeout):
                        await conn.execute(f"LISTEN {_CHANNEL}")
                    if lost:
                        log.info("change listener listening again")
                    delay, lost = 0.1, False
                    # Anything committed while we were not listening is found
                    # by re-reading: a lost notification costs latency only.
                    on_change(None)
                    while True:
                        async for notice in conn.notifies(timeout=_LISTENER_CHECK_SECONDS):
                            sender, _, ids = notice.payload.partition("|")
                            if sender == ignore_from:
                                continue
                            on_change(None if ids == "*" else ids.split(","))
                        # A silent network would leave this connection waiting
                        # forever for notifications that never come: ask.
                        with abort_when_late(conn, self.timeout):
                            await conn.execute("SELECT 1")
            except (psycopg.OperationalError, OSError) as error:
                # Once per outage: the loss of the database is logged by its health.
                level = logging.DEBUG if lost else logging.WARNING
                log.log(level, "change listener lost its connection (%s); reconnecting in %.1fs", error, delay)
                lost = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    async def commit(self, writes: Sequence[SagaWrite]) -> list[WriteResult]:
        """Group commit as ONE statement of fixed text (arrays + unnest, data-
        modifying CTEs), prepared once and run in autocommit: a flush of any
        size is one round trip and one atomic transaction."""
        creates: dict[str, int] = {}
        for index, write in enumerate(writes):
            if write.request_fingerprint is not None:
                creates.setdefault(write.saga.saga_id, index)  # a repeated id in one batch lands once
        updates = [index for index, write in enumerate(writes) if write.request_fingerprint is None]
        payload = self.notifier + "|" + ",".join(dict.fromkeys(write.saga.saga_id for write in writes))
        if len(payload) > _MAX_PAYLOAD:
            payload = self.notifier + "|*"
        try:
            params = _flush_params(writes, list(creates.values()), updates, payload)
            async with self._writing() as driver:
                async with driver.cursor() as cursor:
                    await cursor.execute(_FLUSH_SENT, [params[name] for name in _FLUSH_PARAMS])
                    rows = await cursor.fetchall()
        except (psycopg.DataError, psycopg.IntegrityError, orjson.JSONEncodeError) as error:
            raise _rejected(error) from error
        epochs = {row[0]: row[1] for row in rows}
        base = rows[0][2] if rows else 0
        results: list[WriteResult] = []
        for index, write in enumerate(writes):
            if index in epochs:
                positions = tuple(range(base + 1, base + 1 + len(write.events)))
                base += len(write.events)
                results.append(WriteResult(ok=True, epoch=epochs[index], positions=positions))
            else:
                results.append(WriteResult(ok=False))
        return results

    def _skip_locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query.with_for_update(skip_locked=True)

    async def _index_only_planning(self, conn: AsyncConnection) -> None:
        await conn.execute(sa.text("SET LOCAL enable_seqscan = off"))


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


# --- the PostgreSQL group-commit statements --------------------------------

# Each table's rows travel as one JSON parameter read with json_to_recordset.
# It was one array per column (about 50 parameters), which psycopg dumps in
# Python: measured on one-transition flushes, params + dump + execute + commit
# went from 1.13-1.17 ms to 0.65-0.85 ms. Bytes go as base64, decoded here.
# The step columns a flush writes, as they arrive in its JSON (output: base64).
_STEP_COLUMNS = (
    ("position", "int"), ("state", "int"), ("attempts", "int"), ("compensate_attempts", "int"), ("output", "text"),
    ("last_error", "text"), ("effect_uncertain", "bool"), ("started_at", "float8"), ("finished_at", "float8"),
    ("next_attempt_at", "float8"),
)
_RECORDS = {
    "v": "idx int, saga_id text, expected bigint, epoch bigint, state int, sequence bigint, updated_at float8,"
         " failure_reason text, resolution_note text, due_at float8, owner text, lease_until float8",
    "c": "idx int, saga_id text, definition_name text, definition_version int, state int, sequence bigint,"
         " input text, request_fingerprint text, created_at float8, due_at float8, owner text, lease_until float8,"
         " trace_parent text",
    "w": "idx int, saga_id text, step_name text, " + ", ".join(f"{name} {kind}" for name, kind in _STEP_COLUMNS),
    "e": "idx int, n int, saga_id text, sequence bigint, type int, time float8, saga_state int, step_name text,"
         " step_state int, attempt int, message text, actor text, definition_name text",
}


def _step_value(name: str) -> str:
    return "decode(w.output, 'base64')" if name == "output" else f"w.{name}"


_FLUSH = f"""
WITH v AS (
    SELECT * FROM json_to_recordset(%(updates)b::json) AS v({_RECORDS["v"]})
), c AS (
    SELECT * FROM json_to_recordset(%(creates)b::json) AS c({_RECORDS["c"]})
), w AS (
    -- Changed steps of updated sagas and all steps of created ones: an idx
    -- is one or the other, so each row joins exactly one of the two below.
    SELECT * FROM json_to_recordset(%(steps)b::json) AS w({_RECORDS["w"]})
), updated AS (
    UPDATE compensa_sagas AS s SET
        state = v.state, sequence = v.sequence, updated_at = v.updated_at, failure_reason = v.failure_reason,
        resolution_note = v.resolution_note, due_at = v.due_at, owner = v.owner, lease_until = v.lease_until,
        epoch = CASE WHEN v.epoch IS NULL THEN s.epoch + 1 ELSE s.epoch END
    FROM v
    -- The ANY lets the index find the batch's rows whatever the statistics said
    -- when the plan was cached (a join alone was planned as a full scan).
    WHERE s.saga_id = ANY(ARRAY(SELECT saga_id FROM v)) AND s.saga_id = v.saga_id
        AND s.sequence = v.expected AND (v.epoch IS NULL OR s.epoch = v.epoch)
    RETURNING v.idx, s.epoch
), inserted AS (
    INSERT INTO compensa_sagas (saga_id, definition_name, definition_version, state, sequence, input,
        request_fingerprint, failure_reason, resolution_note, created_at, updated_at, due_at, owner, lease_until, epoch,
        trace_parent)
    -- A saga starts RUNNING: no failure, no resolution, updated when created.
    SELECT saga_id, definition_name, definition_version, state, sequence, decode(input, 'base64'), request_fingerprint,
        '', '', created_at, created_at, due_at, owner, lease_until, 1, trace_parent
    FROM c
    ON CONFLICT (saga_id) DO NOTHING
    RETURNING saga_id
), created AS (
    SELECT c.idx, 1::bigint AS epoch FROM c JOIN inserted ON inserted.saga_id = c.saga_id
), landed AS (
    SELECT idx, epoch FROM updated UNION ALL SELECT idx, epoch FROM created
), step_updates AS (
    UPDATE compensa_saga_steps AS t SET {", ".join(f"{name} = {_step_value(name)}" for name, _ in _STEP_COLUMNS)}
    FROM w JOIN updated ON updated.idx = w.idx
    WHERE t.saga_id = w.saga_id AND t.step_name = w.step_name
), step_inserts AS (
    INSERT INTO compensa_saga_steps (saga_id, step_name, {", ".join(name for name, _ in _STEP_COLUMNS)})
    SELECT w.saga_id, w.step_name, {", ".join(_step_value(name) for name, _ in _STEP_COLUMNS)}
    FROM w JOIN created ON created.idx = w.idx
), ev AS (
    SELECT e.*, row_number() OVER (ORDER BY e.n) AS k
    FROM json_to_recordset(%(events)b::json) AS e({_RECORDS["e"]})
    JOIN landed ON landed.idx = e.idx
), head AS (
    -- The log_head row lock is held to commit: positions follow commit order.
    UPDATE compensa_log_head SET position = position + (SELECT count(*) FROM ev) WHERE id = 1
    RETURNING position - (SELECT count(*) FROM ev) AS base
), events AS (
    INSERT INTO compensa_saga_events (saga_id, sequence, position, type, time, saga_state, step_name, step_state,
        attempt, message, actor, definition_name)
    SELECT ev.saga_id, ev.sequence, head.base + ev.k, ev.type, ev.time, ev.saga_state, ev.step_name, ev.step_state,
        ev.attempt, ev.message, ev.actor, ev.definition_name
    FROM ev, head
), alerts AS (
    -- The outbox row of an alert commits with its event, or neither does.
    INSERT INTO compensa_alert_outbox (saga_id, sequence, position, definition_name, step_name, message, raised_at,
        attempts, next_attempt_at, last_error)
    SELECT ev.saga_id, ev.sequence, head.base + ev.k, ev.definition_name, ev.step_name, ev.message, ev.time,
        0, ev.time, ''
    FROM ev, head WHERE ev.type = {ALERT_RAISED}
)
-- NOTIFY is delivered at commit, never for a failed statement.
SELECT landed.idx, landed.epoch, head.base, pg_notify('{_CHANNEL}', %(payload)b::text) FROM landed, head
"""


def _compact(query: str) -> tuple[str, tuple[str, ...]]:
    """The statement as sent, and its parameter names in placeholder order.

    psycopg parses a query's placeholders once and caches the result only
    for texts up to 4,096 bytes; the readable statement above is longer, and
    re-parsing it cost about 0.1 ms of CPU per flush. Without comments, runs of
    blanks and names in the placeholders it fits. (The blanks around , ( ) =
    go too: the statement holds no string literal where that would matter.)
    """
    text = " ".join(re.sub(r"--[^\n]*", "", query).split())
    text = re.sub(r"\s*([,()=])\s*", r"\1", text)
    names = tuple(re.findall(r"%\((\w+)\)b", text))
    return re.sub(r"%\((\w+)\)b", "%b", text), names


_FLUSH_SENT, _FLUSH_PARAMS = _compact(_FLUSH)


def _base64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode("ascii")


def _json(rows: list[dict[str, Any]]) -> str:
    # orjson, not json: a flush's rows are mostly floats (times), which the
    # standard encoder formats slowly; measured at c=256, -0.07 ms CPU per saga.
    # It writes NaN as null; the times here come from the clock, never NaN.
    return orjson.dumps(rows).decode()


def _step_rows(writes: Sequence[SagaWrite], updates: Sequence[int], creates: Sequence[int]) -> list[dict[str, Any]]:
    """The changed steps of updated sagas and every step of created ones."""
    rows: list[dict[str, Any]] = []
    chosen = [(index, False) for index in updates] + [(index, True) for index in creates]
    for index, all_steps in chosen:
        saga = writes[index].saga
        names = [step.name for step in saga.steps] if all_steps else writes[index].changed_steps
        positions = {step.name: position for position, step in enumerate(saga.steps)}
        for name in names:
            row = _step_row(saga.saga_id, positions[name], saga.step(name))
            row["idx"] = index
            row["output"] = _base64(row["output"])
            rows.append(row)
    return rows


def _flush_params(
    writes: Sequence[SagaWrite], creates: Sequence[int], updates: Sequence[int], payload: str
) -> dict[str, Any]:
    updated = [
        {"idx": index, "saga_id": writes[index].saga.saga_id, "expected": writes[index].expected_sequence,
         "epoch": writes[index].epoch, **SqlSagaStore._saga_values(writes[index])}
        for index in updates
    ]
    created: list[dict[str, Any]] = []
    for index in creates:
        write, saga = writes[index], writes[index].saga
        if saga.state != RUNNING or saga.failure_reason or saga.resolution_note or saga.updated_at != saga.created_at:
            raise ValueError(f"saga {saga.saga_id!r}: a new saga is RUNNING, unchanged since created")
        created.append({
            "idx": index, "saga_id": saga.saga_id, "definition_name": saga.definition_name,
            "definition_version": saga.definition_version, "input": _base64(saga.input),
            "request_fingerprint": write.request_fingerprint, "created_at": saga.created_at,
            "trace_parent": saga.trace_parent, **SqlSagaStore._saga_values(write),
        })
    events: list[dict[str, Any]] = []
    for index in sorted((*updates, *creates)):  # positions are handed out in write order
        saga = writes[index].saga
        for event in writes[index].events:
            row = _event_row(saga, event, 0)
            row["idx"], row["n"] = index, len(events)
            del row["position"]
            events.append(row)
    return {
        "updates": _json(updated), "creates": _json(created), "steps": _json(_step_rows(writes, updates, creates)),
        "events": _json(events), "payload": payload,
    }
