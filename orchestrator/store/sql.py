"""The SQL store: PostgreSQL for production, SQLite as the embedded default.

All of Compensa's SQL is here and in schema.py. Both engines share the
statements; the differences (insert-or-ignore, SKIP LOCKED, connection
set-up) are in the two small subclasses at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from compensa.v1 import definition_pb2
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from orchestrator.errors import StoreUnavailable
from orchestrator.machine import FINAL_SAGA_STATES, LogEvent, SagaRecord, StepRecord
from orchestrator.store.base import Claimed, SagaStore, SagaWrite, StoredEvent, WriteResult
from orchestrator.store.schema import definitions, log_head, metadata, saga_events, saga_steps, sagas

log = logging.getLogger("compensa.store")

# Ids per IN list, well under the drivers' bound-parameter limits.
_ID_CHUNK = 900

_ACTIVE_STATES = tuple(sorted({1, 2, 3, 4, 5} - FINAL_SAGA_STATES))


def open_store(url: str, *, notifier: str = "") -> SqlSagaStore:
    """A store for a SQLAlchemy URL: postgresql+psycopg://... or sqlite+aiosqlite:///...

    `notifier` names this process in change notifications, so it can ignore
    its own."""
    if url.startswith("postgresql"):
        return PostgresSagaStore(url, notifier=notifier)
    if url.startswith("sqlite"):
        return SqliteSagaStore(url)
    raise ValueError(f"unsupported database URL {url!r}: use postgresql+psycopg:// or sqlite+aiosqlite://")


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
]


class SqlSagaStore(SagaStore):
    """SagaStore over SQLAlchemy 2 Core with an async driver."""

    def __init__(self, url: str, **engine_options: Any) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(url, **engine_options)

    # -- dialect hooks

    def _insert(self, table: sa.Table) -> Any:
        raise NotImplementedError

    def _lock_due(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query

    # -- plumbing

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.begin() as conn:
                yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError, OSError) as error:
            raise StoreUnavailable(f"database unavailable: {error.__class__.__name__}: {error}") from error
        except sa.exc.DBAPIError as error:
            if error.connection_invalidated:
                raise StoreUnavailable(f"database connection lost: {error}") from error
            raise

    async def create_schema(self) -> None:
        async with self._transaction() as conn:
            await conn.run_sync(metadata.create_all)
            await conn.execute(self._insert(log_head).values(id=1, position=0).on_conflict_do_nothing())

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

    # -- sagas

    async def create_saga(self, write: SagaWrite, request_fingerprint: str) -> tuple[SagaRecord, bool, str]:
        saga = write.saga
        async with self._transaction() as conn:
            inserted = await conn.execute(
                self._insert(sagas)
                .values(
                    saga_id=saga.saga_id,
                    definition_name=saga.definition_name,
                    definition_version=saga.definition_version,
                    state=saga.state,
                    sequence=saga.sequence,
                    input=saga.input,
                    request_fingerprint=request_fingerprint,
                    failure_reason=saga.failure_reason,
                    resolution_note=saga.resolution_note,
                    created_at=saga.created_at,
                    updated_at=saga.updated_at,
                    due_at=write.due_at,
                    owner=None if write.release else write.owner,
                    lease_until=None if write.release else write.lease_until,
                    epoch=1,
                )
                .on_conflict_do_nothing()
                .returning(sagas.c.saga_id)
            )
            if inserted.first() is None:
                fingerprint = (
                    await conn.execute(
                        sa.select(sagas.c.request_fingerprint).where(sagas.c.saga_id == saga.saga_id)
                    )
                ).scalar_one()
                existing = await self._load(conn, saga.saga_id)
                assert existing is not None
                return existing, False, fingerprint
            await conn.execute(
                saga_steps.insert(),
                [_step_row(saga.saga_id, position, step) for position, step in enumerate(saga.steps)],
            )
            await self._append_events(conn, [(saga, write.events)])
            await self._announce(conn, [saga.saga_id])
        return saga, True, request_fingerprint

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
        results: list[WriteResult] = []
        landed: list[tuple[SagaRecord, tuple[LogEvent, ...]]] = []
        async with self._transaction() as conn:
            for write in writes:
                saga = write.saga
                guard = [sagas.c.saga_id == saga.saga_id, sagas.c.sequence == write.expected_sequence]
                values: dict[str, Any] = {
                    "state": saga.state,
                    "sequence": saga.sequence,
                    "updated_at": saga.updated_at,
                    "failure_reason": saga.failure_reason,
                    "resolution_note": saga.resolution_note,
                    "due_at": write.due_at,
                    "owner": None if write.release else write.owner,
                    "lease_until": None if write.release else write.lease_until,
                }
                if write.epoch is None:
                    values["epoch"] = sagas.c.epoch + 1
                else:
                    guard.append(sagas.c.epoch == write.epoch)
                epoch = (
                    await conn.execute(sa.update(sagas).where(*guard).values(**values).returning(sagas.c.epoch))
                ).scalar_one_or_none()
                if epoch is None:
                    results.append(WriteResult(ok=False))
                    continue
                results.append(WriteResult(ok=True, epoch=epoch))
                positions = {step.name: index for index, step in enumerate(saga.steps)}
                for name in write.changed_steps:
                    row = _step_row(saga.saga_id, positions[name], saga.step(name))
                    await conn.execute(
                        sa.update(saga_steps)
                        .where(saga_steps.c.saga_id == saga.saga_id, saga_steps.c.step_name == name)
                        .values(**{k: v for k, v in row.items() if k not in ("saga_id", "step_name")})
                    )
                landed.append((saga, write.events))
            positions_out = await self._append_events(conn, landed)
            await self._announce(conn, [saga.saga_id for saga, _ in landed])
        landed_index = 0
        for index, result in enumerate(results):
            if result.ok:
                results[index] = WriteResult(ok=True, epoch=result.epoch, positions=positions_out[landed_index])
                landed_index += 1
        return results

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

    async def claim_due(self, owner: str, now: float, lease_until: float, limit: int) -> list[Claimed]:
        claimable = sa.and_(
            sagas.c.due_at <= now,
            sagas.c.state.in_(_ACTIVE_STATES),
            sa.or_(sagas.c.owner.is_(None), sagas.c.lease_until < now),
        )
        due = self._lock_due(sa.select(sagas.c.saga_id).where(claimable).order_by(sagas.c.due_at).limit(limit))
        async with self._transaction() as conn:
            rows = (
                await conn.execute(
                    sa.update(sagas)
                    .where(sagas.c.saga_id.in_(due.scalar_subquery()), claimable)
                    .values(owner=owner, lease_until=lease_until, epoch=sagas.c.epoch + 1)
                    .returning(*_SAGA_COLUMNS, sagas.c.epoch)
                )
            ).all()
            loaded = await self._load_many(conn, rows)
        return [Claimed(saga=saga, epoch=row.epoch) for saga, row in zip(loaded, rows)]

    async def renew_leases(self, owner: str, saga_ids: Sequence[str], lease_until: float) -> int:
        renewed = 0
        async with self._transaction() as conn:
            for start in range(0, len(saga_ids), _ID_CHUNK):
                result = await conn.execute(
                    sa.update(sagas)
                    .where(sagas.c.owner == owner, sagas.c.saga_id.in_(saga_ids[start : start + _ID_CHUNK]))
                    .values(lease_until=lease_until)
                )
                renewed += int(result.rowcount)
        return renewed

    async def release_all(self, owner: str, now: float) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                sa.update(sagas).where(sagas.c.owner == owner).values(owner=None, lease_until=None)
            )

    async def list_sagas(
        self,
        *,
        state: int,
        definition_name: str,
        updated_before: float | None,
        page_size: int,
        after: tuple[float, str] | None,
    ) -> list[SagaRecord]:
        query = sa.select(*_SAGA_COLUMNS)
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
# NOTIFY payloads must stay under 8000 bytes; past this, say "anything".
_MAX_PAYLOAD = 7000


class PostgresSagaStore(SqlSagaStore):
    """The production store: several replicas share one PostgreSQL."""

    def __init__(self, url: str, *, notifier: str = "") -> None:
        super().__init__(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
        self.notifier = notifier

    async def _announce(self, conn: AsyncConnection, saga_ids: Sequence[str]) -> None:
        if not saga_ids:
            return
        payload = self.notifier + "|" + ",".join(saga_ids)
        if len(payload) > _MAX_PAYLOAD:
            payload = self.notifier + "|*"
        # Delivered at commit, never for a rolled-back transaction.
        await conn.execute(sa.select(sa.func.pg_notify(_CHANNEL, payload)))

    async def listen(self, on_change: Callable[[list[str] | None], None], *, ignore_from: str) -> None:
        conninfo = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {_CHANNEL}")
                    delay = 0.1
                    # Anything committed while we were not listening is found
                    # by re-reading: a lost notification costs latency only.
                    on_change(None)
                    async for notice in conn.notifies():
                        sender, _, ids = notice.payload.partition("|")
                        if sender == ignore_from:
                            continue
                        on_change(None if ids == "*" else ids.split(","))
            except (psycopg.OperationalError, OSError) as error:
                log.warning("change listener lost its connection (%s); reconnecting in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    def _lock_due(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query.with_for_update(skip_locked=True)


class SqliteSagaStore(SqlSagaStore):
    """The embedded default: one process, one file, WAL mode."""

    def __init__(self, url: str) -> None:
        super().__init__(url)

        @sa_event.listens_for(self.engine.sync_engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    def _insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)
