"""The SQL store's shared part: SqlSagaStore, over SQLAlchemy 2 Core.

Every statement both databases run is here (schema.py declares the tables).
What differs lives in a module per database, as hooks this class calls:
postgres.py (one-statement group commit, SKIP LOCKED, LISTEN/NOTIFY, plan
guards, bounded connections) and sqlite.py (the embedded file's settings).
The group commit is each database's own: a few statements per table in
sqlite.py, one statement in postgres.py; the rows both build are in rows.py.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from compensa.common.database import (
    DEFAULT_DATABASE_TIMEOUT,
    bounded_transaction,
    cancelled_by_the_database,
    database_error_text,
    engine_options,
    parse_database_url,
)
from compensa.orchestrator.shared.errors import (
    DatabaseFull,
    DatabasePermissionDenied,
    DatabaseReadOnly,
    DatabaseRefusesWrites,
    StoreUnavailable,
)
from compensa.orchestrator.shared.records import (
    ACTIVE_SAGA_STATES,
    FAILED,
    FINAL_SAGA_STATES,
    STEP_COMPENSATING,
    STEP_RUNNING,
    LogEvent,
    SagaRecord,
    takeover_event,
)
from compensa.orchestrator.shared.selection import SagaSelection
from compensa.orchestrator.store import migrations
from compensa.orchestrator.store.base import (
    AUDIT_ALERT,
    AUDIT_JOB_COMPLETED,
    AUDIT_JOB_RUNNING,
    CONTRACT_FORCED,
    PARTICIPANT_RECOVERED,
    PARTICIPANT_UNHEALTHY,
    AuditFinding,
    AuditJob,
    AuditProgress,
    BulkBatchAction,
    BulkItem,
    BulkJob,
    Claimed,
    ContractChange,
    DefinitionChange,
    DefinitionCheck,
    LogPage,
    ParticipantAddress,
    PendingAlert,
    RecordedAuditFinding,
    SagaMove,
    SagaStore,
    StateSummary,
    StoredAlert,
    StoredEvent,
)
from compensa.orchestrator.store.capacity import CapacityStatements, log_participant_change, participant_from_row
from compensa.orchestrator.store.rows import (
    ALERT_RAISED,
    alert_row,
    event_row,
    outbox_row,
    saga_from_rows,
    step_row,
    stored_alert,
    stored_event,
)
from compensa.orchestrator.store.schema import (
    ALERT_LOG,
    EVENT_LOG,
    alert_outbox,
    alerts,
    audit_findings,
    audit_jobs,
    audit_progress,
    bulk_actions,
    bulk_items,
    capacity_waits,
    definition_changes,
    definitions,
    log_head,
    participant_contracts,
    participants,
    saga_events,
    saga_flow,
    saga_steps,
    sagas,
    secrets,
)
from compensa.orchestrator.store.standby import LagTolerance, ReadDatabase, lag_tolerant, lag_tolerated, reading_on
from compensa.v1 import bulk_pb2, definition_pb2

# Ids per IN list, well under the drivers' bound-parameter limits.
_ID_CHUNK = 900
# A bulk action's selection is one transaction however many sagas its filter
# selects (its items are the sagas as they were at one moment): 100,000 take
# seconds on a loaded database, past the bound of every other transaction.
_SELECTION_SECONDS = 120.0
# Sagas per guarded UPDATE of a batch of moves (a few parameters each).
_MOVE_CHUNK = 150
# A batch of a bulk action holds its job this long at most (a pause waits for
# it): a second's worth of sagas acted on, far less on a database that answers.
_BULK_BATCH_SECONDS = 30.0


_ACTIVE_STATES = tuple(sorted(ACTIVE_SAGA_STATES))
_FINAL_STATES = tuple(sorted(FINAL_SAGA_STATES))
# records.awaits_a_person, in SQL.
_AWAITS_A_PERSON = sa.and_(sagas.c.state == FAILED, sagas.c.resolution_note == "")


_PENDING = bulk_pb2.BULK_ITEM_OUTCOME_PENDING
#: The job's counter of each outcome.
_OUTCOME_COUNTERS: dict[int, str] = {
    bulk_pb2.BULK_ITEM_OUTCOME_DONE: "done",
    bulk_pb2.BULK_ITEM_OUTCOME_SKIPPED: "skipped",
    bulk_pb2.BULK_ITEM_OUTCOME_FAILED: "failed",
}


def _selected(selection: SagaSelection, now: float) -> list[sa.ColumnElement[bool]]:
    """`selection` as conditions on compensa_sagas (SagaSelection's meaning, in SQL)."""
    conditions: list[sa.ColumnElement[bool]] = []
    if selection.definition_name:
        conditions.append(sagas.c.definition_name == selection.definition_name)
    if selection.definition_version:
        conditions.append(sagas.c.definition_version == selection.definition_version)
    if selection.states:
        conditions.append(sagas.c.state.in_(sorted(selection.states)))
    if selection.unresolved:
        conditions.append(sagas.c.resolution_note == "")
    a_step = saga_steps.c.saga_id == sagas.c.saga_id
    if selection.step_name or selection.step_state:
        step = [a_step]
        if selection.step_name:
            step.append(saga_steps.c.step_name == selection.step_name)
        if selection.step_state:
            step.append(saga_steps.c.state == selection.step_state)
        conditions.append(sa.exists().where(*step))
    if selection.reason_contains:
        text = selection.reason_contains
        conditions.append(sa.or_(
            sagas.c.failure_reason.contains(text, autoescape=True),
            sa.exists().where(a_step, saga_steps.c.last_error.contains(text, autoescape=True)),
        ))
    for column, low, high in (
        (sagas.c.created_at, selection.created_from, selection.created_to),
        (sagas.c.updated_at, selection.updated_from, selection.updated_to),
    ):
        if low is not None:
            conditions.append(column >= low)
        if high is not None:
            conditions.append(column < high)
    if selection.saga_id_prefix:
        conditions.append(sagas.c.saga_id.startswith(selection.saga_id_prefix, autoescape=True))
    if selection.saga_ids:
        conditions.append(sagas.c.saga_id.in_(selection.saga_ids))
    if selection.in_backoff:
        conditions.append(sa.exists().where(
            a_step, saga_steps.c.next_attempt_at > now, saga_steps.c.state.in_((STEP_RUNNING, STEP_COMPENSATING))
        ))
    return conditions


def _by_saga(chunk: dict[str, SagaMove], value: Callable[[SagaMove], Any], column: sa.Column[Any]) -> sa.Case[Any]:
    """`column` set, in one UPDATE of the chunk's sagas, to each one's value."""
    return sa.case({saga_id: value(move) for saga_id, move in chunk.items()}, value=sagas.c.saga_id, else_=column)


@dataclass(frozen=True)
class _LeasedJobs:
    """A table of jobs leased to one replica at a time (owner, lease_until,
    epoch, created_at columns), `key` its id, `running` the jobs one may hold."""

    table: sa.Table
    key: sa.Column[str]
    running: sa.ColumnElement[bool]

    def held(self, key: str, owner: str, epoch: int) -> list[sa.ColumnElement[bool]]:
        """The job `key`, still RUNNING and held by `owner` at `epoch`."""
        return [self.key == key, self.table.c.owner == owner, self.table.c.epoch == epoch, self.running]


_BULK_JOBS = _LeasedJobs(
    bulk_actions, bulk_actions.c.bulk_action_id, bulk_actions.c.state == bulk_pb2.BULK_ACTION_STATE_RUNNING
)
_AUDIT_JOBS = _LeasedJobs(audit_jobs, audit_jobs.c.audit_id, audit_jobs.c.state == AUDIT_JOB_RUNNING)


def _audit_job(row: sa.Row[Any]) -> AuditJob:
    return AuditJob(**{field.name: getattr(row, field.name) for field in dataclasses.fields(AuditJob)})


def _bulk_job(row: sa.Row[Any]) -> BulkJob:
    return BulkJob(**{field.name: getattr(row, field.name) for field in dataclasses.fields(BulkJob)})


def _bulk_item(row: sa.Row[Any]) -> BulkItem:
    return BulkItem(row.saga_id, row.selected_sequence, row.outcome, row.reason, row.acted_at)


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


#: A saga's columns with who holds it and until when.
_SAGA_COLUMNS_HELD = [*_SAGA_COLUMNS, sagas.c.owner, sagas.c.lease_until]


_REFUSALS: dict[str, tuple[type[DatabaseRefusesWrites], str]] = {
    DatabaseFull.sqlstate: (
        DatabaseFull,
        "the orchestrator's database is out of space: nothing can be stored until space is freed;"
        " retry later",
    ),
    DatabaseReadOnly.sqlstate: (
        DatabaseReadOnly,
        "the orchestrator's database is read-only (a standby? the URL should lead to the primary:"
        " target_session_attrs=read-write); retry later",
    ),
    DatabasePermissionDenied.sqlstate: (
        DatabasePermissionDenied,
        "the orchestrator's database user may not write its tables (permission denied); retry later",
    ),
}


def refused_write(error: BaseException) -> DatabaseRefusesWrites | None:
    """The DatabaseRefusesWrites that `error` (a driver's, or SQLAlchemy's
    wrapping one) means, by its SQLSTATE; None for any other error. The
    database's own message is left out: it names internal files."""
    sqlstate = getattr(getattr(error, "orig", error), "sqlstate", None)
    if sqlstate not in _REFUSALS:
        return None
    kind, message = _REFUSALS[sqlstate]
    return kind(f"{message} (SQLSTATE {sqlstate})")


class SqlSagaStore(CapacityStatements, SagaStore):
    """SagaStore over SQLAlchemy 2 Core with an async driver."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_DATABASE_TIMEOUT, **options: Any) -> None:
        self.url = url
        #: The URL read once (DatabaseMisconfigured if it cannot be).
        self.database = parse_database_url(url)
        #: The longest any one wait on the database may take, in seconds.
        self.timeout = timeout
        self.engine: AsyncEngine = create_async_engine(
            self.database.engine_url, **engine_options(self.database, timeout), **options
        )
        #: Where `lag_tolerant` reads go in a `tolerating_lag` block while it
        #: keeps up (PostgreSQL's `--read-db`); None: every read on the primary.
        self.read_database: ReadDatabase | None = None

    @contextlib.contextmanager
    def tolerating_lag(self) -> Iterator[None]:
        if self.read_database is None or lag_tolerated.get() is not None:
            yield  # no read database, or an enclosing block decides
            return
        self.read_database.start()
        block = lag_tolerated.set(LagTolerance(self.read_database if self.read_database.in_use else None))
        try:
            yield
        finally:
            lag_tolerated.reset(block)

    def check_read_database(self) -> None:
        if self.read_database is not None:
            self.read_database.start()

    def read_database_status(self) -> tuple[bool, float] | None:
        return None if self.read_database is None else (self.read_database.in_use, self.read_database.lag)

    # -- dialect hooks

    @abc.abstractmethod
    def _insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT, which has ON CONFLICT DO NOTHING / DO UPDATE."""

    @abc.abstractmethod
    async def _hold_contracts(self, conn: AsyncConnection, *, exclusive: bool) -> None:
        """Until `conn`'s transaction ends, no participant contract changes
        (exclusive: nor is a definition registered with a contract check), and
        what the transaction reads from here on includes whatever committed
        before: a contract check and the write it allows are one step."""

    def _skip_locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """Locks the selected rows, skipping those another transaction holds."""
        return query

    async def _allow_statements_of(self, conn: AsyncConnection, seconds: float) -> None:
        """Lets the statements of this transaction run up to `seconds` each
        (a database that bounds each statement by `timeout`), and no longer
        its waits for the client between them."""

    async def _index_only_planning(self, conn: AsyncConnection) -> None:
        """For the rest of the transaction, plans that read a whole table are
        out: the scheduler's claim runs every second, and a plan cached while
        the tables were small must not scan them once they are large."""

    async def _take_positions(self, conn: AsyncConnection, log: sa.Table, count: int) -> range:
        """The next `count` positions of `log` (saga_events or alerts) for a
        write in `conn`'s transaction. Here, a counter row of compensa_log_head
        whose lock is held to commit: positions follow commit order, and a
        reader past position N never misses a late commit. (PostgreSQL's
        replicas would all queue on that row: it takes positions from the
        transaction's id instead.)"""
        end = (
            await conn.execute(
                sa.update(log_head)
                .where(log_head.c.id == (EVENT_LOG if log is saga_events else ALERT_LOG))
                .values(position=log_head.c.position + count)
                .returning(log_head.c.position)
            )
        ).scalar_one()
        return range(end - count + 1, end + 1)

    def _outside_transactions(self, starts: Sequence[int]) -> sa.ColumnElement[bool] | None:
        """Leaves out the events of the transactions whose positions begin at
        `starts` (None: this database cannot tell a transaction's events)."""
        return None

    def _readable_below(self) -> sa.ColumnElement[int] | None:
        """In a reading statement, the position below which every event that
        will ever be visible already is (None: every committed one is)."""
        return None

    # Reads the database's wall clock in seconds since the epoch.
    _CLOCK_QUERY: str

    # -- plumbing

    @contextlib.asynccontextmanager
    async def _transaction(self, long: float | None = None) -> AsyncIterator[AsyncConnection]:
        """One transaction, bounded by `timeout` (and so is getting its
        connection), or by `long` seconds for one whose statements are known
        to take long (a bulk action's selection of many sagas).

        On the read database for a `lag_tolerant` read routed there: its
        failures are not the primary's, so they are told to no reachability
        listener, and the read is made again on the primary."""
        read_database = reading_on.get()
        if read_database is not None:
            async with bounded_transaction(read_database.engine, self.timeout) as conn:
                yield conn
            return
        began = time.monotonic()
        try:
            async with bounded_transaction(self.engine, long or self.timeout) as conn:
                if long is not None:
                    await self._allow_statements_of(conn, long)
                yield conn
        except sa.exc.TimeoutError as error:
            # Every pooled connection was busy for the whole wait: a fact about
            # this replica's load, not about the database.
            raise StoreUnavailable(
                f"database unavailable: no pooled connection came free within {self.timeout:g}s; retry"
            ) from error
        except sa.exc.DBAPIError as error:
            refusal = await self._refusal(error, began)
            if refusal is not None:
                raise refusal from error
            if isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError)):
                raise self._unreachable(error, began) from error
            if error.connection_invalidated:
                self._reached(error, began)
                raise StoreUnavailable(f"database connection lost: {database_error_text(error)}") from error
            raise
        except OSError as error:
            raise self._unreachable(error, began) from error
        self._reached(None, began)

    def _unreachable(self, error: BaseException, began: float) -> StoreUnavailable:
        """Reports a wait that could not reach the database (unless the
        database itself cancelled the statement); what its caller raises."""
        if not cancelled_by_the_database(error):
            self._reached(error, began)
        return StoreUnavailable.of(error)

    async def _refusal(self, error: BaseException, began: float) -> DatabaseRefusesWrites | None:
        """The refusal of writes `error` is, reported, or None. After a
        read-only answer the pool's connections are dropped: new ones go
        where the URL leads now (a promoted primary, with
        target_session_attrs=read-write)."""
        refusal = refused_write(error)
        if refusal is None:
            return None
        self._reached(refusal, began)
        if isinstance(refusal, DatabaseReadOnly):
            await self.engine.dispose()
        return refusal

    async def ensure_schema(self) -> None:
        database = self.database.shown
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

    async def probe_writes(self) -> None:
        async with self._transaction() as conn:
            # Matches no row, but is checked like any write: a read-only
            # transaction or a missing privilege refuses it.
            await conn.execute(sa.update(sagas).where(sa.false()).values(updated_at=sagas.c.updated_at))
            await self._probe_space(conn)

    async def _probe_space(self, conn: AsyncConnection) -> None:
        """Fails (out of space) unless the database can grow its files now."""

    async def close(self) -> None:
        if self.read_database is not None:
            await self.read_database.close()
        await self.engine.dispose()

    # -- definitions

    async def register_definition(
        self, definition: definition_pb2.SagaDefinition, fingerprint: str, now: float, *, actor: str = "",
        check: DefinitionCheck | None = None,
    ) -> tuple[definition_pb2.SagaDefinition, bool]:
        async with self._transaction() as conn:
            if check is not None:
                await self._hold_contracts(conn, exclusive=False)
                named = sorted({step.participant for step in definition.steps})
                await check(await self._contracts(conn, named))
            existing = (
                await conn.execute(
                    sa.select(definitions.c.body).where(
                        definitions.c.name == definition.name, definitions.c.fingerprint == fingerprint
                    )
                )
            ).one_or_none()
            if existing is not None:
                # Not made the latest again: a replica starting with old files
                # must not undo an operator's promotion (PromoteDefinition does that).
                return definition_pb2.SagaDefinition.FromString(existing.body), False
            highest = (
                await conn.execute(
                    sa.select(sa.func.max(definitions.c.version), sa.func.max(definitions.c.promotion)).where(
                        definitions.c.name == definition.name
                    )
                )
            ).one()
            stored = definition_pb2.SagaDefinition()
            stored.CopyFrom(definition)
            stored.version = (highest[0] or 0) + 1
            inserted = await conn.execute(
                self._insert(definitions)
                .values(
                    name=stored.name,
                    version=stored.version,
                    fingerprint=fingerprint,
                    body=stored.SerializeToString(deterministic=True),
                    created_at=now,
                    promotion=(highest[1] or 0) + 1,
                )
                .on_conflict_do_nothing()
                .returning(definitions.c.version)
            )
            # RETURNING, not rowcount: psycopg's async rowcount is -1 for INSERT.
            if inserted.first() is None:
                # Another replica registered the same name at the same moment.
                raise StoreUnavailable(f"definition {definition.name!r} was registered concurrently; retry")
            await self._record_change(conn, stored.name, stored.version, "registered", actor, now)
            return stored, True

    async def definition_fingerprints(self, name: str) -> dict[str, int]:
        async with self._transaction() as conn:
            rows = (
                await conn.execute(
                    sa.select(definitions.c.fingerprint, definitions.c.version).where(definitions.c.name == name)
                )
            ).all()
        return {row.fingerprint: row.version for row in rows}

    async def promote_definition(
        self, name: str, version: int, *, actor: str, now: float
    ) -> tuple[definition_pb2.SagaDefinition, bool] | None:
        async with self._transaction() as conn:
            body = (
                await conn.execute(
                    sa.select(definitions.c.body).where(definitions.c.name == name, definitions.c.version == version)
                )
            ).scalar_one_or_none()
            if body is None:
                return None
            changed = await self._make_latest(conn, name, version, "promoted", actor, now)
        return definition_pb2.SagaDefinition.FromString(body), changed

    async def definition_history(self, name: str) -> list[DefinitionChange]:
        async with self._transaction() as conn:
            rows = (
                await conn.execute(
                    sa.select(definition_changes)
                    .where(definition_changes.c.name == name)
                    .order_by(definition_changes.c.position)
                )
            ).all()
        return [DefinitionChange(row.name, row.version, row.kind, row.actor, row.changed_at) for row in rows]

    async def _make_latest(
        self, conn: AsyncConnection, name: str, version: int, kind: str, actor: str, now: float
    ) -> bool:
        """Makes `version` the latest of `name` unless it is; whether it changed."""
        latest = (await conn.execute(self._latest_version(name))).scalar_one_or_none()
        if latest == version:
            return False
        highest = sa.select(sa.func.max(definitions.c.promotion)).where(definitions.c.name == name).scalar_subquery()
        await conn.execute(
            sa.update(definitions)
            .where(definitions.c.name == name, definitions.c.version == version)
            .values(promotion=highest + 1)
        )
        await self._record_change(conn, name, version, kind, actor, now)
        return True

    @staticmethod
    def _latest_version(name: str) -> sa.Select[Any]:
        return (
            sa.select(definitions.c.version)
            .where(definitions.c.name == name)
            .order_by(definitions.c.promotion.desc(), definitions.c.version.desc())
            .limit(1)
        )

    @staticmethod
    async def _record_change(
        conn: AsyncConnection, name: str, version: int, kind: str, actor: str, now: float
    ) -> None:
        await conn.execute(
            sa.insert(definition_changes).values(name=name, version=version, kind=kind, actor=actor, changed_at=now)
        )

    async def get_definition(self, name: str, version: int = 0) -> definition_pb2.SagaDefinition | None:
        query = sa.select(definitions.c.body).where(definitions.c.name == name)
        if version:
            query = query.where(definitions.c.version == version)
        else:
            query = query.where(definitions.c.version == self._latest_version(name).scalar_subquery())
        async with self._transaction() as conn:
            body = (await conn.execute(query)).scalar_one_or_none()
        return None if body is None else definition_pb2.SagaDefinition.FromString(body)

    @lag_tolerant
    async def list_definitions(self, page_size: int, after_name: str) -> list[definition_pb2.SagaDefinition]:
        latest = (
            sa.select(definitions.c.name, sa.func.max(definitions.c.promotion).label("promotion"))
            .where(definitions.c.name > after_name)
            .group_by(definitions.c.name)
            .subquery()
        )
        query = (
            sa.select(definitions.c.body)
            .join(
                latest,
                sa.and_(definitions.c.name == latest.c.name, definitions.c.promotion == latest.c.promotion),
            )
            .order_by(definitions.c.name, definitions.c.version.desc())
        )
        async with self._transaction() as conn:
            bodies = (await conn.execute(query.limit(page_size))).scalars().all()
        return [definition_pb2.SagaDefinition.FromString(body) for body in bodies]

    async def definition_participants(self) -> dict[str, frozenset[str]]:
        async with self._transaction() as conn:
            rows = (await conn.execute(sa.select(definitions.c.name, definitions.c.body))).all()
        named: dict[str, set[str]] = {}
        for name, body in rows:
            steps = definition_pb2.SagaDefinition.FromString(body).steps
            named.setdefault(name, set()).update(step.participant for step in steps)
        return {name: frozenset(participants) for name, participants in named.items()}

    # -- participants

    async def set_participant(
        self, name: str, address: str, *, updated_by: str, now: float, contract: ContractChange | None = None
    ) -> ParticipantAddress:
        values = {"address": address, "updated_at": now, "updated_by": updated_by}
        async with self._transaction() as conn:
            breaks = None
            if contract is not None and contract.check is not None:
                await self._hold_contracts(conn, exclusive=True)
                others = {key: value for key, value in (await self._contracts(conn)).items() if key != name}
                breaks = await contract.check(await self._definitions_naming(conn, name), others)
            row = (
                await conn.execute(
                    self._insert(participants)
                    .values(name=name, **values)
                    .on_conflict_do_update(index_elements=[participants.c.name], set_=values)
                    .returning(*participants.c)
                )
            ).one()
            if contract is not None:
                await self._store_contract(conn, name, contract, now)
            if breaks is not None:
                await log_participant_change(conn, name, by=updated_by, now=now, change=breaks)
                await self._raise_participant_alert(conn, CONTRACT_FORCED, name, address, now, breaks)
        return participant_from_row(row)

    async def _store_contract(self, conn: AsyncConnection, name: str, change: ContractChange, now: float) -> None:
        if change.contract is None:
            await conn.execute(sa.delete(participant_contracts).where(participant_contracts.c.name == name))
            return
        values = {"service": change.service, "contract": change.contract, "updated_at": now}
        await conn.execute(
            self._insert(participant_contracts)
            .values(name=name, **values)
            .on_conflict_do_update(index_elements=[participant_contracts.c.name], set_=values)
        )

    @lag_tolerant
    async def list_participants(self) -> list[ParticipantAddress]:
        async with self._transaction() as conn:
            rows = (await conn.execute(sa.select(participants).order_by(participants.c.name))).all()
        return [participant_from_row(row) for row in rows]

    async def participant_contracts(self) -> dict[str, bytes]:
        async with self._transaction() as conn:
            return await self._contracts(conn)

    @staticmethod
    async def _contracts(conn: AsyncConnection, names: Sequence[str] | None = None) -> dict[str, bytes]:
        """The stored contracts (of `names` only, when given), by participant name."""
        query = sa.select(participant_contracts.c.name, participant_contracts.c.contract)
        if names is not None:
            query = query.where(participant_contracts.c.name.in_(names))
        rows = (await conn.execute(query)).all()
        return {name: bytes(contract) for name, contract in rows}

    @staticmethod
    async def _definitions_naming(conn: AsyncConnection, participant: str) -> list[definition_pb2.SagaDefinition]:
        """Every registered version of every definition with a step on `participant`."""
        query = sa.select(definitions.c.body).order_by(definitions.c.name, definitions.c.version)
        bodies = (await conn.execute(query)).scalars().all()
        found = [definition_pb2.SagaDefinition.FromString(body) for body in bodies]
        return [definition for definition in found if any(step.participant == participant for step in definition.steps)]

    async def participant_failing(self, name: str, now: float) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                sa.update(participants)
                .where(participants.c.name == name, participants.c.unhealthy_since.is_(None))
                .values(unhealthy_since=now)
            )

    async def alert_participant_unhealthy(
        self, name: str, *, unhealthy_before: float, now: float, message: str
    ) -> StoredAlert | None:
        async with self._transaction() as conn:
            # Of replicas racing here, the first takes the row; the others
            # find alerted_at set when they get it, and raise nothing.
            address = (
                await conn.execute(
                    sa.update(participants)
                    .where(
                        participants.c.name == name, participants.c.alerted_at.is_(None),
                        participants.c.unhealthy_since.is_not(None), participants.c.unhealthy_since <= unhealthy_before,
                    )
                    .values(alerted_at=now)
                    .returning(participants.c.address)
                )
            ).scalar_one_or_none()
            if address is None:
                return None
            return await self._raise_participant_alert(conn, PARTICIPANT_UNHEALTHY, name, address, now, message)

    async def participant_serving(self, name: str, *, now: float, message: str) -> StoredAlert | None:
        async with self._transaction() as conn:
            address = (
                await conn.execute(
                    sa.update(participants)
                    .where(participants.c.name == name, participants.c.alerted_at.is_not(None))
                    .values(unhealthy_since=None, alerted_at=None)
                    .returning(participants.c.address)
                )
            ).scalar_one_or_none()
            if address is not None:
                return await self._raise_participant_alert(conn, PARTICIPANT_RECOVERED, name, address, now, message)
            await conn.execute(
                sa.update(participants)
                .where(participants.c.name == name, participants.c.unhealthy_since.is_not(None))
                .values(unhealthy_since=None)
            )
            return None

    async def _raise_participant_alert(
        self, conn: AsyncConnection, kind: str, name: str, address: str, now: float, message: str
    ) -> StoredAlert:
        (position,) = await self._take_positions(conn, alerts, 1)
        alert = StoredAlert(
            position=position, kind=kind, raised_at=now, message=message, participant=name, address=address
        )
        await log_alerts(conn, [alert])
        # Wakes the other replicas' alert watchers (as a change of anything).
        await self._announce(conn, ["*"])
        return alert

    # -- sagas

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
        return saga_from_rows(row, steps)

    async def _load_many(self, conn: AsyncConnection, rows: Sequence[sa.Row[Any]]) -> list[SagaRecord]:
        if not rows:
            return []
        ids = [row.saga_id for row in rows]
        step_rows = (await conn.execute(sa.select(saga_steps).where(saga_steps.c.saga_id.in_(ids)))).all()
        by_saga: dict[str, list[sa.Row[Any]]] = {saga_id: [] for saga_id in ids}
        for step in step_rows:
            by_saga[step.saga_id].append(step)
        return [saga_from_rows(row, by_saga[row.saga_id]) for row in rows]

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

    async def load_many_with_owner(
        self, saga_ids: Sequence[str]
    ) -> dict[str, tuple[SagaRecord, str | None, float | None]]:
        found: dict[str, tuple[SagaRecord, str | None, float | None]] = {}
        async with self._transaction() as conn:
            for start in range(0, len(saga_ids), _ID_CHUNK):
                chunk = list(saga_ids[start:start + _ID_CHUNK])
                held = sa.select(*_SAGA_COLUMNS_HELD).where(sagas.c.saga_id.in_(chunk))
                rows = (await conn.execute(held)).all()
                for row, saga in zip(rows, await self._load_many(conn, rows), strict=True):
                    found[saga.saga_id] = (saga, row.owner, row.lease_until)
        return found

    async def move_sagas(self, moves: Sequence[SagaMove]) -> list[StoredEvent | None]:
        landed: list[SagaMove] = []
        async with self._transaction() as conn:
            for start in range(0, len(moves), _MOVE_CHUNK):
                chunk = {move.saga.saga_id: move for move in moves[start : start + _MOVE_CHUNK]}
                each = functools.partial(_by_saga, chunk)
                # One guarded UPDATE for the chunk: each saga at its expected
                # sequence, and held by no replica.
                moved = await conn.execute(
                    sa.update(sagas)
                    .where(
                        sa.tuple_(sagas.c.saga_id, sagas.c.sequence).in_(
                            [(saga_id, move.expected_sequence) for saga_id, move in chunk.items()]
                        ),
                        sagas.c.owner.is_(None),
                    )
                    .values(
                        definition_version=each(lambda move: move.saga.definition_version, sagas.c.definition_version),
                        sequence=each(lambda move: move.saga.sequence, sagas.c.sequence),
                        updated_at=each(lambda move: move.saga.updated_at, sagas.c.updated_at),
                        due_at=each(lambda move: move.due_at, sagas.c.due_at),
                        epoch=sagas.c.epoch + 1,
                    )
                    .returning(sagas.c.saga_id)
                )
                landed += [chunk[saga_id] for saga_id in moved.scalars()]
            if landed:
                moved_ids = [move.saga.saga_id for move in landed]
                await conn.execute(sa.delete(saga_steps).where(saga_steps.c.saga_id.in_(moved_ids)))
                rows = [
                    step_row(move.saga.saga_id, position, step)
                    for move in landed
                    for position, step in enumerate(move.saga.steps)
                ]
                await conn.execute(saga_steps.insert(), rows)
                positions = await self._append_events(conn, [(move.saga, (move.event,)) for move in landed])
                await self._announce(conn, moved_ids)
        logged = {
            move.saga.saga_id: StoredEvent(move.saga.saga_id, move.saga.definition_name, taken[0], move.event)
            for move, taken in zip(landed, positions, strict=True)
        } if landed else {}
        return [logged.get(move.saga.saga_id) for move in moves]

    async def read_saga_logs(self, saga_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        logs: dict[str, list[StoredEvent]] = {}
        async with self._transaction() as conn:
            for start in range(0, len(saga_ids), _ID_CHUNK):
                query = (
                    sa.select(saga_events)
                    .where(saga_events.c.saga_id.in_(list(saga_ids[start:start + _ID_CHUNK])))
                    .order_by(saga_events.c.saga_id, saga_events.c.sequence)
                )
                for row in (await conn.execute(query)).all():
                    logs.setdefault(row.saga_id, []).append(stored_event(row))
        return logs

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
        """Tells other processes, on commit, which sagas changed (a database
        only one process uses has no one to tell)."""

    async def _append_events(
        self, conn: AsyncConnection, batch: Sequence[tuple[SagaRecord, tuple[LogEvent, ...]]]
    ) -> list[tuple[int, ...]]:
        """Inserts events with global positions, last in the transaction
        (a counter's lock, where positions take one, is held from here to
        commit)."""
        count = sum(len(events) for _, events in batch)
        if count == 0:
            return [() for _ in batch]
        position = (await self._take_positions(conn, saga_events, count)).start - 1
        rows: list[dict[str, Any]] = []
        out: list[tuple[int, ...]] = []
        for saga, events in batch:
            taken = []
            for event in events:
                position += 1
                taken.append(position)
                rows.append(event_row(saga, event, position))
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
                for event, position in zip(logged, taken_positions, strict=True)
            )
            for (saga, logged), taken_positions in zip(takeovers, positions, strict=True)
        }
        return [
            Claimed(
                saga=saga, epoch=row.epoch, events=events.get(saga.saga_id, ()),
                taken_from=held[saga.saga_id][0] if saga.saga_id in events else None,
            )
            for saga, row in zip(loaded, rows, strict=True)
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
        # records.done_for_good, in SQL.
        done_with = sa.and_(sagas.c.state.in_(_FINAL_STATES), sa.not_(_AWAITS_A_PERSON))
        victims = self._skip_locked(
            sa.select(sagas.c.saga_id).where(done_with, sagas.c.updated_at < finished_before).limit(limit)
        )
        async with self._transaction() as conn:
            saga_ids = [row[0] for row in (await conn.execute(victims)).all()]
            if saga_ids:
                # Alerts nobody delivered go with their saga; the log keeps
                # them until they are older than the retention (purge_alerts).
                await conn.execute(
                    sa.delete(alert_outbox).where(
                        alert_outbox.c.position.in_(sa.select(alerts.c.position).where(alerts.c.saga_id.in_(saga_ids)))
                    )
                )
                await conn.execute(sa.delete(saga_events).where(saga_events.c.saga_id.in_(saga_ids)))
                await conn.execute(sa.delete(capacity_waits).where(capacity_waits.c.saga_id.in_(saga_ids)))
                await conn.execute(sa.delete(saga_flow).where(saga_flow.c.saga_id.in_(saga_ids)))
                await conn.execute(sa.delete(saga_steps).where(saga_steps.c.saga_id.in_(saga_ids)))
                await conn.execute(sa.delete(sagas).where(sagas.c.saga_id.in_(saga_ids)))
        return len(saga_ids)

    @lag_tolerant
    async def list_sagas(
        self,
        *,
        state: int,
        definition_name: str,
        updated_before: float | None,
        page_size: int,
        after: tuple[float, str] | None,
        id_contains: str = "",
        selection: SagaSelection | None = None,
        now: float = 0.0,
    ) -> list[SagaRecord]:
        query = sa.select(*_SAGA_COLUMNS)
        if selection is not None:
            query = query.where(*_selected(selection, now))
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

    async def sagas_in_creation_order(
        self, *, after: tuple[float, str] | None, definition_name: str, limit: int
    ) -> list[SagaRecord]:
        query = sa.select(*_SAGA_COLUMNS)
        if definition_name:
            query = query.where(sagas.c.definition_name == definition_name)
        if after is not None:
            created_at, saga_id = after
            query = query.where(
                sa.or_(
                    sagas.c.created_at > created_at,
                    sa.and_(sagas.c.created_at == created_at, sagas.c.saga_id > saga_id),
                )
            )
        query = query.order_by(sagas.c.created_at, sagas.c.saga_id).limit(limit)
        async with self._transaction() as conn:
            return await self._load_many(conn, (await conn.execute(query)).all())

    async def load_sagas(self, saga_ids: Sequence[str]) -> list[SagaRecord]:
        found: list[SagaRecord] = []
        async with self._transaction() as conn:
            for start in range(0, len(saga_ids), _ID_CHUNK):
                chunk = list(saga_ids[start:start + _ID_CHUNK])
                rows = (await conn.execute(sa.select(*_SAGA_COLUMNS).where(sagas.c.saga_id.in_(chunk)))).all()
                found += await self._load_many(conn, rows)
        return found

    async def audit_progress(self, participant: str) -> AuditProgress | None:
        async with self._transaction() as conn:
            row = (
                await conn.execute(sa.select(audit_progress).where(audit_progress.c.participant == participant))
            ).one_or_none()
        return None if row is None else _audit_progress_of(row)

    async def save_audit_progress(self, progress: AuditProgress) -> None:
        async with self._transaction() as conn:
            await self._save_audit_progress(conn, progress)

    async def _save_audit_progress(self, conn: AsyncConnection, progress: AuditProgress) -> None:
        created_at, saga_id = progress.clean_through
        values = {
            "clean_created_at": created_at, "clean_saga_id": saga_id, "audited_at": progress.audited_at,
            "purge_before": progress.purge_before,
        }
        await conn.execute(
            self._insert(audit_progress)
            .values(participant=progress.participant, **values)
            .on_conflict_do_update(index_elements=[audit_progress.c.participant], set_=values)
        )

    async def create_audit_job(self, job: AuditJob) -> tuple[AuditJob, bool]:
        values = {field.name: getattr(job, field.name) for field in dataclasses.fields(AuditJob)}
        async with self._transaction() as conn:
            # The id, then the one RUNNING audit (`running` is unique): either conflict keeps the one stored.
            inserted = (
                await conn.execute(
                    self._insert(audit_jobs).values(**values, running=True).on_conflict_do_nothing()
                    .returning(*audit_jobs.c)
                )
            ).one_or_none()
            if inserted is not None:
                return _audit_job(inserted), True
            existing = (
                await conn.execute(
                    sa.select(audit_jobs).where(
                        sa.or_(audit_jobs.c.audit_id == job.audit_id, audit_jobs.c.running.is_(True))
                    ).order_by((audit_jobs.c.audit_id == job.audit_id).desc()).limit(1)
                )
            ).one_or_none()
        if existing is None:  # the running one ended meanwhile
            return await self.create_audit_job(job)
        return _audit_job(existing), False

    async def get_audit_job(self, audit_id: str) -> AuditJob | None:
        async with self._transaction() as conn:
            row = (await conn.execute(sa.select(audit_jobs).where(audit_jobs.c.audit_id == audit_id))).one_or_none()
        return None if row is None else _audit_job(row)

    async def claim_audit_job(self, owner: str, now: float, lease_until: float) -> AuditJob | None:
        row = await self._claim_leased(_AUDIT_JOBS, owner, now, lease_until)
        return None if row is None else _audit_job(row)

    async def renew_audit_job(self, audit_id: str, owner: str, epoch: int, lease_until: float) -> bool:
        return await self._renew_leased(_AUDIT_JOBS, audit_id, owner, epoch, lease_until)

    async def release_audit_job(self, audit_id: str, owner: str, epoch: int) -> None:
        await self._release_leased(_AUDIT_JOBS, audit_id, owner, epoch)

    async def save_audit_job(
        self, audit_id: str, owner: str, epoch: int, *, report: bytes, cursor: str, now: float,
        progress: AuditProgress | None = None, complete: bool = False,
    ) -> bool:
        values: dict[str, Any] = {"report": report, "cursor": cursor, "updated_at": now}
        if complete:
            values.update(state=AUDIT_JOB_COMPLETED, running=None, owner=None, lease_until=None)
        async with self._transaction() as conn:
            saved = await conn.execute(
                sa.update(audit_jobs).where(*_AUDIT_JOBS.held(audit_id, owner, epoch))
                .values(**values).returning(audit_jobs.c.audit_id)
            )
            if saved.first() is None:
                return False
            if progress is not None:
                await self._save_audit_progress(conn, progress)
        return True

    async def record_audit_findings(self, findings: Sequence[AuditFinding], now: float) -> list[StoredAlert]:
        raised: list[StoredAlert] = []
        async with self._transaction() as conn:
            for finding in findings:
                key = (finding.participant, finding.saga_id, finding.step_name, finding.kind)
                inserted = (
                    await conn.execute(
                        self._insert(audit_findings)
                        .values(
                            participant=finding.participant, saga_id=finding.saga_id, step_name=finding.step_name,
                            kind=finding.kind, found_at=now, message=finding.message, alert_position=0,
                        )
                        .on_conflict_do_nothing()
                        .returning(audit_findings.c.kind)
                    )
                ).first()
                if inserted is None:
                    continue  # found (and alerted) by an earlier run
                (position,) = await self._take_positions(conn, alerts, 1)
                raised.append(
                    StoredAlert(
                        position=position, kind=AUDIT_ALERT, raised_at=now, message=finding.message,
                        saga_id=finding.saga_id, definition_name=finding.definition_name,
                        step_name=finding.step_name, participant=finding.participant, address=finding.address,
                    )
                )
                await conn.execute(
                    sa.update(audit_findings)
                    .where(*(column == value for column, value in zip(audit_findings.primary_key.columns, key,
                                                                      strict=True)))
                    .values(alert_position=position)
                )
            if raised:
                await log_alerts(conn, raised)
                await self._announce(conn, ["*"])
        return raised

    @lag_tolerant
    async def list_audit_progress(self) -> list[AuditProgress]:
        async with self._transaction() as conn:
            rows = (await conn.execute(sa.select(audit_progress).order_by(audit_progress.c.participant))).all()
        return [_audit_progress_of(row) for row in rows]

    @lag_tolerant
    async def list_audit_findings(self, limit: int, *, participant: str | None = None) -> list[RecordedAuditFinding]:
        query = sa.select(audit_findings).order_by(audit_findings.c.alert_position.desc()).limit(limit)
        if participant is not None:
            query = query.where(audit_findings.c.participant == participant)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).all()
        return [
            RecordedAuditFinding(
                row.participant, row.saga_id, row.step_name, row.kind, row.message, row.found_at, row.alert_position
            )
            for row in rows
        ]

    @lag_tolerant
    async def count_audit_findings(self) -> dict[str, int]:
        query = sa.select(audit_findings.c.participant, sa.func.count()).group_by(audit_findings.c.participant)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).all()
        return {participant: count for participant, count in rows}

    @lag_tolerant
    async def summarize_sagas(self, *, definition_name: str, stuck_before: float) -> list[StateSummary]:
        def how_many(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
            return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

        query = sa.select(
            sagas.c.definition_name,
            sagas.c.state,
            sa.func.count(),
            how_many(sa.and_(sagas.c.state.in_(_ACTIVE_STATES), sagas.c.updated_at < stuck_before)),
            how_many(_AWAITS_A_PERSON),
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

    # -- the alert log and its outbox

    @lag_tolerant
    async def read_alerts(self, after_position: int, limit: int) -> list[StoredAlert]:
        query = sa.select(alerts).where(alerts.c.position > after_position)
        below = self._readable_below()
        if below is not None:
            query = query.where(alerts.c.position < below)
        query = query.order_by(alerts.c.position).limit(limit)
        async with self._transaction() as conn:
            return [stored_alert(row) for row in (await conn.execute(query)).all()]

    async def purge_alerts(self, *, raised_before: float, limit: int) -> int:
        delivered = ~sa.exists().where(alert_outbox.c.position == alerts.c.position)
        victims = self._skip_locked(
            sa.select(alerts.c.position).where(alerts.c.raised_at < raised_before, delivered)
            .order_by(alerts.c.raised_at).limit(limit)
        )
        async with self._transaction() as conn:
            positions = [row[0] for row in (await conn.execute(victims)).all()]
            if positions:
                await conn.execute(sa.delete(alerts).where(alerts.c.position.in_(positions)))
        return len(positions)

    async def claim_alerts(self, now: float, claimed_until: float, limit: int) -> list[PendingAlert]:
        due = (
            self._skip_locked(
                sa.select(alert_outbox.c.position)
                .where(alert_outbox.c.next_attempt_at <= now)
                .order_by(alert_outbox.c.next_attempt_at)
                .limit(limit)
            )
            .cte("due")
            .prefix_with("MATERIALIZED")
        )
        claim = (
            sa.update(alert_outbox)
            .where(alert_outbox.c.position == due.c.position)
            .values(next_attempt_at=claimed_until, attempts=alert_outbox.c.attempts + 1)
            .returning(alert_outbox.c.position, alert_outbox.c.attempts)
        )
        async with self._transaction() as conn:
            attempts: dict[int, int] = {position: tries for position, tries in (await conn.execute(claim)).all()}
            if not attempts:
                return []
            rows = (await conn.execute(sa.select(alerts).where(alerts.c.position.in_(list(attempts))))).all()
            claimed = [stored_alert(row) for row in rows]
            saga_ids = {alert.saga_id for alert in claimed if alert.saga_id}
            traces: dict[str, str | None] = {}
            if saga_ids:
                found = await conn.execute(
                    sa.select(sagas.c.saga_id, sagas.c.trace_parent).where(sagas.c.saga_id.in_(saga_ids))
                )
                traces = {saga_id: trace_parent for saga_id, trace_parent in found.all()}
        return [
            PendingAlert(alert, attempts[alert.position], traces.get(alert.saga_id))
            for alert in sorted(claimed, key=lambda alert: alert.position)
        ]

    async def alert_delivered(self, position: int) -> None:
        async with self._transaction() as conn:
            await conn.execute(sa.delete(alert_outbox).where(alert_outbox.c.position == position))

    async def alert_not_delivered(self, position: int, attempts: int, next_attempt_at: float, error: str) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                sa.update(alert_outbox)
                .where(alert_outbox.c.position == position, alert_outbox.c.attempts == attempts)
                .values(next_attempt_at=next_attempt_at, last_error=error)
            )

    # -- bulk actions

    async def count_selection(
        self, selection: SagaSelection, *, now: float, sample_size: int
    ) -> tuple[int, list[SagaRecord]]:
        conditions = _selected(selection, now)
        async with self._transaction(long=_SELECTION_SECONDS) as conn:
            count = (await conn.execute(sa.select(sa.func.count()).select_from(sagas).where(*conditions))).scalar_one()
            rows = (
                await conn.execute(
                    sa.select(*_SAGA_COLUMNS).where(*conditions).order_by(sagas.c.saga_id).limit(sample_size)
                )
            ).all()
            return int(count), await self._load_many(conn, rows)

    async def selected_sagas(self, selection: SagaSelection, now: float) -> list[tuple[str, int]]:
        """(saga id, sequence) of every saga `selection` selects at `now`:
        a bulk action's items among this database's sagas, when its job is
        stored in another (sagas partitioned over several databases)."""
        async with self._transaction(long=_SELECTION_SECONDS) as conn:
            rows = await conn.execute(sa.select(sagas.c.saga_id, sagas.c.sequence).where(*_selected(selection, now)))
            return [(row.saga_id, row.sequence) for row in rows]

    async def create_bulk_job(
        self, job: BulkJob, selection: SagaSelection, *, selected_elsewhere: Sequence[tuple[str, int]] = ()
    ) -> tuple[BulkJob | None, bool]:
        """With `selected_elsewhere`, (saga id, sequence) of sagas another
        database's `selected_sagas` chose, which are items of the job too."""
        values = {field.name: getattr(job, field.name) for field in dataclasses.fields(BulkJob)}
        async with self._transaction(long=_SELECTION_SECONDS) as conn:
            inserted = (
                await conn.execute(
                    self._insert(bulk_actions).values(**values).on_conflict_do_nothing()
                    .returning(bulk_actions.c.bulk_action_id)
                )
            ).first()
            if inserted is None:
                existing = await conn.execute(
                    sa.select(bulk_actions).where(bulk_actions.c.bulk_action_id == job.bulk_action_id)
                )
                return _bulk_job(existing.one()), False
            chosen = sa.select(
                sa.literal(job.bulk_action_id), sagas.c.saga_id, sagas.c.sequence, sa.literal(_PENDING), sa.literal("")
            ).where(*_selected(selection, job.created_at))
            await conn.execute(
                bulk_items.insert().from_select(
                    ["bulk_action_id", "saga_id", "selected_sequence", "outcome", "reason"], chosen
                )
            )
            if selected_elsewhere:
                await conn.execute(bulk_items.insert(), [
                    {"bulk_action_id": job.bulk_action_id, "saga_id": saga_id, "selected_sequence": sequence,
                     "outcome": _PENDING, "reason": ""}
                    for saga_id, sequence in selected_elsewhere
                ])
            selected = (
                await conn.execute(
                    sa.select(sa.func.count()).select_from(bulk_items)
                    .where(bulk_items.c.bulk_action_id == job.bulk_action_id)
                )
            ).scalar_one()
            if not selected:
                await conn.execute(sa.delete(bulk_actions).where(bulk_actions.c.bulk_action_id == job.bulk_action_id))
                return None, False
            await conn.execute(
                sa.update(bulk_actions).where(bulk_actions.c.bulk_action_id == job.bulk_action_id)
                .values(selected=selected)
            )
        return dataclasses.replace(job, selected=int(selected)), True

    async def get_bulk_job(self, bulk_action_id: str) -> BulkJob | None:
        async with self._transaction() as conn:
            row = (
                await conn.execute(sa.select(bulk_actions).where(bulk_actions.c.bulk_action_id == bulk_action_id))
            ).one_or_none()
        return None if row is None else _bulk_job(row)

    @lag_tolerant
    async def list_bulk_jobs(self, page_size: int, after: tuple[float, str] | None) -> list[BulkJob]:
        query = sa.select(bulk_actions)
        if after is not None:
            created_at, bulk_action_id = after
            query = query.where(sa.or_(
                bulk_actions.c.created_at < created_at,
                sa.and_(bulk_actions.c.created_at == created_at, bulk_actions.c.bulk_action_id < bulk_action_id),
            ))
        query = query.order_by(bulk_actions.c.created_at.desc(), bulk_actions.c.bulk_action_id.desc()).limit(page_size)
        async with self._transaction() as conn:
            return [_bulk_job(row) for row in (await conn.execute(query)).all()]

    async def change_bulk_job_state(
        self, bulk_action_id: str, *, allowed_from: frozenset[int], to: int, now: float
    ) -> tuple[BulkJob | None, bool]:
        values: dict[str, Any] = {"state": to, "updated_at": now}
        if to != bulk_pb2.BULK_ACTION_STATE_RUNNING:
            values.update(owner=None, lease_until=None)
        async with self._transaction(long=_BULK_BATCH_SECONDS) as conn:
            moved = (
                await conn.execute(
                    sa.update(bulk_actions)
                    .where(bulk_actions.c.bulk_action_id == bulk_action_id, bulk_actions.c.state.in_(allowed_from))
                    .values(**values).returning(*bulk_actions.c)
                )
            ).one_or_none()
            if moved is not None:
                return _bulk_job(moved), True
            row = (
                await conn.execute(sa.select(bulk_actions).where(bulk_actions.c.bulk_action_id == bulk_action_id))
            ).one_or_none()
        return (None if row is None else _bulk_job(row)), False

    async def claim_bulk_job(self, owner: str, now: float, lease_until: float) -> BulkJob | None:
        row = await self._claim_leased(_BULK_JOBS, owner, now, lease_until)
        return None if row is None else _bulk_job(row)

    async def renew_bulk_job(self, bulk_action_id: str, owner: str, epoch: int, lease_until: float) -> bool:
        return await self._renew_leased(_BULK_JOBS, bulk_action_id, owner, epoch, lease_until)

    async def release_bulk_job(self, bulk_action_id: str, owner: str, epoch: int) -> None:
        await self._release_leased(_BULK_JOBS, bulk_action_id, owner, epoch)

    # -- leased jobs (bulk actions, audits): one replica works on a job at a
    # time, under a lease; each claim bumps the epoch, and every write of the
    # holder is guarded on (owner, epoch), so a replica that lost the job
    # writes nothing.

    async def _claim_leased(self, jobs: _LeasedJobs, owner: str, now: float, lease_until: float) -> sa.Row[Any] | None:
        table = jobs.table
        free = self._skip_locked(
            sa.select(jobs.key)
            .where(jobs.running, sa.or_(table.c.owner.is_(None), table.c.lease_until < now))
            .order_by(table.c.created_at)
            .limit(1)
        )
        async with self._transaction() as conn:
            key = (await conn.execute(free)).scalar_one_or_none()
            if key is None:
                return None
            return (
                await conn.execute(
                    sa.update(table).where(jobs.key == key)
                    .values(owner=owner, lease_until=lease_until, epoch=table.c.epoch + 1)
                    .returning(*table.c)
                )
            ).one()

    async def _renew_leased(self, jobs: _LeasedJobs, key: str, owner: str, epoch: int, lease_until: float) -> bool:
        async with self._transaction() as conn:
            renewed = await conn.execute(
                sa.update(jobs.table).where(*jobs.held(key, owner, epoch))
                .values(lease_until=lease_until).returning(jobs.key)
            )
            return renewed.first() is not None

    async def _release_leased(self, jobs: _LeasedJobs, key: str, owner: str, epoch: int) -> None:
        table = jobs.table
        async with self._transaction() as conn:
            await conn.execute(
                sa.update(table)
                .where(jobs.key == key, table.c.owner == owner, table.c.epoch == epoch)
                .values(owner=None, lease_until=None)
            )

    async def run_bulk_batch(
        self, bulk_action_id: str, owner: str, epoch: int, limit: int, act: BulkBatchAction
    ) -> int | None:
        # The job's row stays locked while the batch acts: a pause (an UPDATE
        # of it) waits for the batch, and the next batch finds it paused.
        async with self._transaction(long=_BULK_BATCH_SECONDS) as conn:
            if not await self._lock_held_bulk_job(conn, bulk_action_id, owner, epoch):
                return None
            items = await self._pending_bulk_items(conn, bulk_action_id, limit)
            if items:
                outcomes, now = await act(items)
                await self._record_bulk_outcomes(conn, bulk_action_id, owner, epoch, outcomes, now)
        return len(items)

    async def _lock_held_bulk_job(self, conn: AsyncConnection, bulk_action_id: str, owner: str, epoch: int) -> bool:
        held = sa.select(bulk_actions.c.bulk_action_id).where(*_BULK_JOBS.held(bulk_action_id, owner, epoch))
        return (await conn.execute(held.with_for_update(key_share=True))).first() is not None

    async def _pending_bulk_items(self, conn: AsyncConnection, bulk_action_id: str, limit: int) -> list[BulkItem]:
        query = (
            sa.select(bulk_items)
            .where(bulk_items.c.bulk_action_id == bulk_action_id, bulk_items.c.outcome == _PENDING)
            .order_by(bulk_items.c.saga_id)
            .limit(limit)
        )
        return [_bulk_item(row) for row in (await conn.execute(query)).all()]

    async def _record_bulk_outcomes(
        self, conn: AsyncConnection, bulk_action_id: str, owner: str, epoch: int,
        outcomes: Sequence[tuple[str, int, str]], now: float,
    ) -> None:
        """Sets the outcomes if `owner` still holds the job at `epoch` (else
        nothing: whoever holds it now learns them from the sagas' logs)."""
        held = await conn.execute(
            sa.update(bulk_actions).where(*_BULK_JOBS.held(bulk_action_id, owner, epoch))
            .values(updated_at=now).returning(bulk_actions.c.bulk_action_id)
        )
        if held.first() is None:
            return
        counted = dict.fromkeys(_OUTCOME_COUNTERS.values(), 0)
        # One statement per (outcome, reason): a batch is mostly "done", alike.
        alike: dict[tuple[int, str], list[str]] = {}
        for saga_id, outcome, reason in outcomes:
            alike.setdefault((outcome, reason), []).append(saga_id)
        for (outcome, reason), saga_ids in alike.items():
            landed = await conn.execute(
                sa.update(bulk_items)
                .where(
                    bulk_items.c.bulk_action_id == bulk_action_id, bulk_items.c.saga_id.in_(saga_ids),
                    bulk_items.c.outcome == _PENDING,
                )
                .values(outcome=outcome, reason=reason, acted_at=now)
                .returning(bulk_items.c.saga_id)
            )
            counted[_OUTCOME_COUNTERS[outcome]] += len(landed.all())
        if any(counted.values()):
            await conn.execute(
                sa.update(bulk_actions).where(bulk_actions.c.bulk_action_id == bulk_action_id)
                .values(**{name: bulk_actions.c[name] + n for name, n in counted.items()})
            )

    async def complete_bulk_job(self, bulk_action_id: str, owner: str, epoch: int, now: float) -> bool:
        pending = sa.exists().where(bulk_items.c.bulk_action_id == bulk_action_id, bulk_items.c.outcome == _PENDING)
        async with self._transaction() as conn:
            completed = await conn.execute(
                sa.update(bulk_actions).where(*_BULK_JOBS.held(bulk_action_id, owner, epoch), ~pending)
                .values(state=bulk_pb2.BULK_ACTION_STATE_COMPLETED, updated_at=now, owner=None, lease_until=None)
                .returning(bulk_actions.c.bulk_action_id)
            )
            return completed.first() is not None

    @lag_tolerant
    async def bulk_problems(self, bulk_action_id: str, limit: int) -> list[BulkItem]:
        query = (
            sa.select(bulk_items)
            .where(
                bulk_items.c.bulk_action_id == bulk_action_id,
                bulk_items.c.outcome.in_((bulk_pb2.BULK_ITEM_OUTCOME_SKIPPED, bulk_pb2.BULK_ITEM_OUTCOME_FAILED)),
            )
            .order_by(bulk_items.c.acted_at.desc(), bulk_items.c.saga_id)
            .limit(limit)
        )
        async with self._transaction() as conn:
            return [_bulk_item(row) for row in (await conn.execute(query)).all()]

    # -- the event log

    @lag_tolerant
    async def read_saga_events(self, saga_id: str, after_sequence: int, limit: int) -> list[StoredEvent]:
        query = (
            sa.select(saga_events)
            .where(saga_events.c.saga_id == saga_id, saga_events.c.sequence > after_sequence)
            .order_by(saga_events.c.sequence)
            .limit(limit)
        )
        async with self._transaction() as conn:
            return [stored_event(row) for row in (await conn.execute(query)).all()]

    @lag_tolerant
    async def read_events(self, keys: Sequence[tuple[str, int]]) -> list[StoredEvent]:
        if not keys:
            return []
        query = sa.select(saga_events).where(sa.tuple_(saga_events.c.saga_id, saga_events.c.sequence).in_(keys))
        async with self._transaction() as conn:
            return [stored_event(row) for row in (await conn.execute(query)).all()]

    @lag_tolerant
    async def read_log_page(
        self, after_position: int, limit: int, *, definition_name: str = "", saga_state: int = 0,
        past_open_transactions: bool = False, skipping: Sequence[int] = (),
    ) -> LogPage:
        page = sa.select(saga_events).where(saga_events.c.position > after_position)
        outside = self._outside_transactions(skipping) if skipping else None
        if outside is not None:
            page = page.where(outside)
        if definition_name:
            page = page.where(saga_events.c.definition_name == definition_name)
        if saga_state:
            page = page.where(saga_events.c.saga_state == saga_state)
        below = None if past_open_transactions else self._readable_below()
        if below is None:
            query = page.order_by(saga_events.c.position).limit(limit)
            async with self._transaction() as conn:
                events = [stored_event(row) for row in (await conn.execute(query)).all()]
            return LogPage(events, (events[-1].position if events else after_position) + 1)
        # One statement, so that the bound and the rows are of one snapshot,
        # with a row for the bound even when no event is there.
        bound = sa.select(
            below.label("below"), sa.select(sa.func.max(saga_events.c.position)).scalar_subquery().label("last")
        ).subquery("bound")
        rows = (
            page.where(saga_events.c.position < bound.c.below)
            .order_by(saga_events.c.position).limit(limit).lateral("page")
        )
        query = sa.select(bound.c.below, bound.c.last, rows).select_from(bound.outerjoin(rows, sa.true()))
        async with self._transaction() as conn:
            found = (await conn.execute(query)).all()
        events = [stored_event(row) for row in found if row.position is not None]
        if len(events) == limit:
            return LogPage(events, events[-1].position + 1)
        readable, last = int(found[0].below), found[0].last or 0
        return LogPage(events, max(readable, after_position + 1), held_back=last >= readable)

    @lag_tolerant
    async def head_position(self) -> int:
        below = self._readable_below()
        async with self._transaction() as conn:
            if below is None:
                head = sa.select(log_head.c.position).where(log_head.c.id == EVENT_LOG)
                return int((await conn.execute(head)).scalar_one())
            return int((await conn.execute(sa.select(below))).scalar_one()) - 1



async def log_alerts(conn: AsyncConnection, logged: Sequence[StoredAlert]) -> None:
    """Writes alerts to the log with their outbox rows, in the caller's
    transaction: an alert is delivered if and only if it was raised."""
    await conn.execute(alerts.insert(), [alert_row(alert) for alert in logged])
    await conn.execute(alert_outbox.insert(), [outbox_row(alert) for alert in logged])


def _audit_progress_of(row: sa.Row[Any]) -> AuditProgress:
    return AuditProgress(row.participant, (row.clean_created_at, row.clean_saga_id), row.audited_at, row.purge_before)
