"""The PostgreSQL store: several replicas share one database.

What PostgreSQL does its own way: group commit as one statement (data-
modifying CTEs over one JSON parameter per table) on a connection of its
own, with plans kept on the indexes; SKIP LOCKED for claims; LISTEN/NOTIFY
so that replicas hear of each other's commits (sent after a flush commits,
coalesced); every connection bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from compensa.common.database import (
    DEFAULT_DATABASE_TIMEOUT,
    abort_when_late,
    connect_bounded,
)
from compensa.common.retry import Backoff
from compensa.orchestrator.shared.records import RUNNING
from compensa.orchestrator.store.base import LOG_HELD_BACK, SAGA_ALERT, LogHoldup, SagaWrite, StoredAlert, WriteResult
from compensa.orchestrator.store.rows import ALERT_RAISED, event_row, rejected, saga_values, step_row
from compensa.orchestrator.store.schema import alerts, log_holdups, saga_events
from compensa.orchestrator.store.sql import SqlSagaStore, log_alerts
from compensa.orchestrator.store.standby import DEFAULT_MAX_LAG_SECONDS, ReadDatabase

log = logging.getLogger("compensa.store")

_CHANNEL = "compensa_changes"
# How long the change listener waits for a notification before it checks
# that its connection still answers.
_LISTENER_CHECK_SECONDS = 5.0
# NOTIFY payloads must stay under 8000 bytes; past this, say "anything".
_MAX_PAYLOAD = 7000
# The change listener reconnects after these waits.
_LISTENER_BACKOFF = Backoff(initial=0.1, cap=5.0)


# Other replicas hear of a flush's sagas by a NOTIFY sent after it commits,
# on a connection of its own, at most once per this many seconds. Inside the
# flush it made every commit take the notification queue's lock, and every
# listening backend read the queue in a transaction of its own, per flush:
# a one-statement commit read p50 0.25-0.32 ms with a NOTIFY against
# 0.19-0.21 ms without. A notice lost to a crash between a commit and its
# announcement costs other replicas' watchers latency only: their log tails
# re-read every `watch_reread_seconds` (and this replica's own watchers are
# handed its commits in process).
_ANNOUNCE_INTERVAL = 0.005


class _Announcer:
    """Sends the change notices of committed flushes, coalesced."""

    def __init__(self, conninfo: str, timeout: float, notice: Callable[[Sequence[str]], str]) -> None:
        self._conninfo = conninfo
        self._timeout = timeout
        self._notice = notice
        self._pending: dict[str, None] = {}
        self._task: asyncio.Task[None] | None = None
        self._connection: psycopg.AsyncConnection[Any] | None = None

    def announce(self, saga_ids: Iterable[str]) -> None:
        self._pending.update(dict.fromkeys(saga_ids))
        if self._pending and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="compensa-announcer")

    async def _run(self) -> None:
        while self._pending:
            saga_ids = list(self._pending)
            self._pending.clear()
            try:
                if self._connection is None or self._connection.closed:
                    self._connection = await connect_bounded(self._conninfo, self._timeout, autocommit=True)
                with abort_when_late(self._connection, self._timeout):
                    await self._connection.execute("SELECT pg_notify(%s, %s)", (_CHANNEL, self._notice(saga_ids)))
            except (psycopg.Error, OSError) as error:
                # The database's health logs an outage; re-reads cover the loss.
                log.debug("change notice not sent: %s", error)
                if self._connection is not None:
                    await self._connection.close()
                self._connection = None
            await asyncio.sleep(_ANNOUNCE_INTERVAL)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


# While the database is out of space, health comes back only once a write
# this large succeeds: a few pages free would let the probe pass while flushes
# (several tables and their indexes) still fail.
_PROBE_SPACE_BYTES = 1024 * 1024

# The writer runs only the flush, whose plan PostgreSQL caches (a generic plan
# after five runs). Made while the tables were small, that plan read the whole
# sagas table on every flush, so flushes got slower as the table grew. Every
# row the flush touches is found by its primary key; no sequential scan is
# ever the right plan here.
WRITER_OPTIONS = "-c enable_seqscan=off"


# pg_advisory_xact_lock key of participant contracts (see _hold_contracts).
_CONTRACTS_LOCK_KEY = 0x636F6E7472616374  # "contract"


class PostgresSagaStore(SqlSagaStore):
    """The production store: several replicas share one PostgreSQL."""

    # clock_timestamp(), not now(): the time of the reading, not of the
    # transaction's start.
    _CLOCK_QUERY = "SELECT extract(epoch FROM clock_timestamp())::float8"

    def __init__(
        self, url: str, *, notifier: str = "", timeout: float = DEFAULT_DATABASE_TIMEOUT,
        read_url: str | None = None, read_max_lag: float = DEFAULT_MAX_LAG_SECONDS,
    ) -> None:
        # No pre-ping: it costs a round trip per transaction. A dead
        # connection fails its transaction, SQLAlchemy drops it from the pool,
        # and the caller retries (StoreUnavailable).
        super().__init__(url, timeout=timeout, pool_size=10, max_overflow=10)
        if read_url is not None:
            self.read_database = ReadDatabase(read_url, self.engine, max_lag=read_max_lag, timeout=timeout)
        self.notifier = notifier
        assert self.database.conninfo is not None, "a PostgreSQL URL"
        self._conninfo = self.database.conninfo
        # Group commit has one connection of its own, outside SQLAlchemy's
        # pool: the hot path is one prepared statement in autocommit.
        self._writer: psycopg.AsyncConnection[Any] | None = None
        self._writer_lock = asyncio.Lock()
        self._announcer = _Announcer(self._conninfo, timeout, self._change_notice)

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The group commit's connection, for one flush of at most `timeout`."""
        began = time.monotonic()
        async with self._writer_lock:
            try:
                if self._writer is None or self._writer.closed:
                    self._writer = await connect_bounded(
                        self._conninfo, self.timeout, options=WRITER_OPTIONS, autocommit=True, prepare_threshold=0
                    )
                # A timer, not a round trip: the flush stays one statement.
                with abort_when_late(self._writer, self.timeout):
                    yield self._writer
            except (psycopg.Error, OSError) as error:
                refusal = await self._refusal(error, began)
                if refusal is None and isinstance(error, psycopg.Error) and not isinstance(
                    error, psycopg.OperationalError
                ):
                    raise  # the database refused this write's values: the caller decides
                if self._writer is not None:
                    await self._writer.close()
                self._writer = None
                raise (refusal or self._unreachable(error, began)) from error
        self._reached(None, began)

    async def close(self) -> None:
        await self._announcer.close()
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        await super().close()

    def _change_notice(self, saga_ids: Sequence[str]) -> str:
        """The NOTIFY payload telling which sagas changed, and who changed them."""
        payload = self.notifier + "|" + ",".join(saga_ids)
        return payload if len(payload) <= _MAX_PAYLOAD else self.notifier + "|*"

    async def _hold_contracts(self, conn: AsyncConnection, *, exclusive: bool) -> None:
        """One advisory lock for every contract: shared by definitions being
        registered (they go on side by side), exclusive for a contract change
        (rare: an operator's). Taken before the transaction reads anything,
        so in READ COMMITTED its reads see whatever committed before it."""
        lock = sa.func.pg_advisory_xact_lock if exclusive else sa.func.pg_advisory_xact_lock_shared
        await conn.execute(sa.select(lock(_CONTRACTS_LOCK_KEY)))

    async def _announce(self, conn: AsyncConnection, saga_ids: Sequence[str]) -> None:
        if saga_ids:
            # Delivered at commit, never for a rolled-back transaction.
            await conn.execute(sa.select(sa.func.pg_notify(_CHANNEL, self._change_notice(saga_ids))))

    async def listen(self, on_change: Callable[[list[str] | None], None], *, ignore_from: str) -> None:
        conninfo = self._conninfo
        waits = _LISTENER_BACKOFF.waits()
        lost = False
        while True:
            try:
                async with await connect_bounded(conninfo, self.timeout, autocommit=True) as conn:
                    with abort_when_late(conn, self.timeout):
                        await conn.execute(f"LISTEN {_CHANNEL}")
                    if lost:
                        log.info("change listener listening again")
                    waits.reset()
                    lost = False
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
                delay = waits.next()
                log.log(level, "change listener lost its connection (%s); reconnecting in %.1fs", error, delay)
                lost = True
                await asyncio.sleep(delay)

    def _insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    async def _probe_space(self, conn: AsyncConnection) -> None:
        # A temporary table lives in the database's default tablespace, and
        # each page it grows by is written at once: it fails while less than
        # _PROBE_SPACE_BYTES are free there (and is dropped at commit).
        await conn.execute(sa.text("CREATE TEMPORARY TABLE compensa_write_probe (filler text) ON COMMIT DROP"))
        await conn.execute(
            sa.text("INSERT INTO compensa_write_probe SELECT repeat('x', 1000) FROM generate_series(1, :rows)"),
            {"rows": _PROBE_SPACE_BYTES // 1000},
        )

    async def commit(self, writes: Sequence[SagaWrite]) -> list[WriteResult]:
        """Group commit as ONE statement of fixed text (arrays + unnest, data-
        modifying CTEs), prepared once and run in autocommit: a flush of any
        size is one round trip and one atomic transaction."""
        try:
            statement, arguments = flush_statement(writes)
            async with self._writing() as driver:
                async with driver.cursor() as cursor:
                    await cursor.execute(statement, arguments)
                    rows = await cursor.fetchall()
        except (psycopg.DataError, psycopg.IntegrityError, orjson.JSONEncodeError) as error:
            raise rejected(error) from error
        epochs = {row[0]: row[1] for row in rows}
        base, preceded_by = (rows[0][2], rows[0][3]) if rows else (0, None)
        results: list[WriteResult] = []
        for index, write in enumerate(writes):
            if index in epochs:
                positions = tuple(range(base + 1, base + 1 + len(write.events)))
                base += len(write.events)
                results.append(WriteResult(ok=True, epoch=epochs[index], positions=positions, preceded_by=preceded_by))
            else:
                results.append(WriteResult(ok=False))
        self._announcer.announce(writes[index].saga.saga_id for index in epochs)
        return results

    def _skip_locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query.with_for_update(skip_locked=True)

    # -- positions in the logs (see _RANK_BITS)

    async def _take_positions(self, conn: AsyncConnection, log: sa.Table, count: int) -> range:
        # What this transaction took already: its own rows, and (not written
        # yet) what it was handed before, kept with the connection.
        probe = sa.text(
            f"SELECT x.base, coalesce(max(t.position), x.base) FROM (SELECT {_TRANSACTION_BASE} AS base) x"
            f" LEFT JOIN {log.name} t ON t.position > x.base AND t.position < x.base + {_RANKS} GROUP BY x.base"
        )
        base, last = (await conn.execute(probe)).one()
        handed: dict[str, tuple[int, int]] = conn.info.setdefault("compensa_positions", {})
        taken_base, taken_last = handed.get(log.name, (base, base))
        if taken_base == base:
            last = max(last, taken_last)
        if last + count >= base + _RANKS:
            raise ValueError(f"more than {_RANKS - 1} positions of {log.name} in one transaction")
        handed[log.name] = (base, last + count)
        return range(last + 1, last + count + 1)

    def _outside_transactions(self, starts: Sequence[int]) -> sa.ColumnElement[bool]:
        transactions = sa.literal([start >> _RANK_BITS for start in starts], postgresql.ARRAY(sa.BigInteger))
        transaction = sa.literal_column(f"{saga_events.name}.position >> {_RANK_BITS}", sa.BigInteger)
        return transaction != sa.all_(transactions)

    def _readable_below(self) -> sa.ColumnElement[int]:
        return sa.literal_column(_READABLE_BELOW, sa.BigInteger)

    log_can_be_held_back = True

    def transaction_positions(self, position: int) -> range:
        first = position >> _RANK_BITS << _RANK_BITS
        return range(first, first + _RANKS)

    async def log_holdup(self) -> LogHoldup | None:
        async with self._transaction() as conn:
            row = (await conn.execute(_HOLDUP)).one()
        if not row.held:
            return None
        if row.holder is not None:
            holder = row.holder
        elif row.prepared:
            holder = "a prepared transaction (pg_prepared_xacts): COMMIT PREPARED or ROLLBACK PREPARED it"
        else:
            holder = "a session this role may not see (pg_read_all_stats shows it)"
        return LogHoldup(int(row.xmin), holder)

    async def alert_log_holdup(self, holdup: LogHoldup, *, now: float, message: str) -> StoredAlert | None:
        async with self._transaction() as conn:
            first = (
                await conn.execute(
                    postgresql.insert(log_holdups)
                    .values(transaction=holdup.transaction, holder=holdup.holder, alerted_at=now)
                    .on_conflict_do_nothing()
                    .returning(log_holdups.c.transaction)
                )
            ).first()
            if first is None:
                return None  # another replica raised it
            (position,) = await self._take_positions(conn, alerts, 1)
            alert = StoredAlert(position=position, kind=LOG_HELD_BACK, raised_at=now, message=message)
            await log_alerts(conn, [alert])
            await self._announce(conn, ["*"])
            return alert

    async def _index_only_planning(self, conn: AsyncConnection) -> None:
        await conn.execute(sa.text("SET LOCAL enable_seqscan = off"))

    async def _allow_statements_of(self, conn: AsyncConnection, seconds: float) -> None:
        milliseconds = max(1, round(seconds * 1000))
        await conn.execute(sa.text(f"SET LOCAL statement_timeout = {milliseconds}"))
        # A bulk action's batch holds its job's row while it acts: a replica
        # cut off mid-batch must not hold it past the bound.
        await conn.execute(sa.text(f"SET LOCAL idle_in_transaction_session_timeout = {milliseconds}"))



# --- the group-commit statement ----------------------------------------------

# Each table's rows travel as one JSON parameter read with json_to_recordset,
# not as an array per column: psycopg dumps arrays in Python, parameter by
# parameter, and about 50 of them cost more than the statement. Bytes go as
# base64, decoded here.
# The step columns a flush writes, as they arrive in its JSON (output: base64).
_STEP_COLUMNS = (
    ("position", "int"), ("state", "int"), ("attempts", "int"), ("compensate_attempts", "int"), ("output", "text"),
    ("last_error", "text"), ("effect_uncertain", "bool"), ("started_at", "float8"), ("finished_at", "float8"),
    ("next_attempt_at", "float8"), ("delivery", "int"),
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


# A position here is the id of the transaction that wrote the event (xid8)
# times 2^16, plus the event's rank in that transaction (1, 2, ...): taking
# one locks nothing. Ids are handed out as transactions first write, not as
# they commit, so a reader reads only below the oldest transaction still
# open (the snapshot's xmin): everything there has committed or never will.
# A long-open transaction therefore holds readers back (LogHoldup says who).
# 16 bits of rank hold a flush (at most 256 transitions); positions stay
# below 2^53 (exact in JSON's doubles) for the first 2^37 transaction ids.
_RANK_BITS = 16
_RANKS = 1 << _RANK_BITS
_TRANSACTION_BASE = f"(pg_current_xact_id()::text::bigint << {_RANK_BITS})"
_READABLE_BELOW = f"(pg_snapshot_xmin(pg_current_snapshot())::text::bigint << {_RANK_BITS})"

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
    -- Positions from this transaction's id (the flush is its transaction's
    -- only statement): no row that every flush of every replica must lock.
    -- When every transaction before this one had ended as it began, the
    -- last event below it is the last there will ever be (`preceded_by`).
    SELECT x.base, CASE WHEN x.ended_below >= x.base
        THEN coalesce((SELECT max(position) FROM compensa_saga_events WHERE position < x.base), 0) END AS preceded_by
    FROM (SELECT {_TRANSACTION_BASE} AS base, {_READABLE_BELOW} AS ended_below) x
), events AS (
    INSERT INTO compensa_saga_events (saga_id, sequence, position, type, time, saga_state, step_name, step_state,
        attempt, message, actor, definition_name)
    SELECT ev.saga_id, ev.sequence, head.base + ev.k, ev.type, ev.time, ev.saga_state, ev.step_name, ev.step_state,
        ev.attempt, ev.message, ev.actor, ev.definition_name
    FROM ev, head
), r AS (
    -- The ALERT_RAISED events, ranked in the transaction for the alert log.
    SELECT ev.*, head.base + ev.k AS p, row_number() OVER (ORDER BY ev.k) AS a
    FROM ev, head WHERE ev.type = {ALERT_RAISED}
), al AS (
    -- An alert commits with its event and its outbox row, or none does.
    -- Values in the tables' column order (see schema.py).
    INSERT INTO compensa_alerts SELECT head.base + r.a, '{SAGA_ALERT}', r.time, r.message, r.saga_id, r.sequence,
        r.p, r.definition_name, r.step_name, '', '' FROM r, head RETURNING position, raised_at
), ob AS (
    INSERT INTO compensa_alert_outbox SELECT position, 0, raised_at, '' FROM al
)
SELECT landed.idx, landed.epoch, head.base, head.preceded_by FROM landed, head
"""


# The oldest transaction still open, whether committed events wait behind it,
# and who holds it (backend_xid is the 32-bit form of a transaction's id).
_HOLDUP = sa.text(f"""
SELECT x.xmin, coalesce((SELECT max(position) FROM compensa_saga_events) >= x.xmin << {_RANK_BITS}, false) AS held,
    (SELECT format('pid %s, user %s, application %s, database %s, %s, open %ss', a.pid, a.usename,
            coalesce(nullif(a.application_name, ''), '-'), a.datname, a.state,
            round(extract(epoch FROM clock_timestamp() - a.xact_start)))
        FROM pg_stat_activity a WHERE a.backend_xid = x.xmin::text::xid8::xid LIMIT 1) AS holder,
    EXISTS (SELECT 1 FROM pg_prepared_xacts p WHERE p.transaction = x.xmin::text::xid8::xid) AS prepared
FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin) x
""")


def flush_statement(writes: Sequence[SagaWrite]) -> tuple[str, list[Any]]:
    """The group commit's statement for `writes` and its arguments: it
    answers a row (write index, epoch, position base) per write that landed.
    (Tests also run it inside transactions of their own.)"""
    creates: dict[str, int] = {}
    for index, write in enumerate(writes):
        if write.request_fingerprint is not None:
            creates.setdefault(write.saga.saga_id, index)  # a repeated id in one batch lands once
    updates = [index for index, write in enumerate(writes) if write.request_fingerprint is None]
    params = _flush_params(writes, list(creates.values()), updates)
    return _FLUSH_SENT, [params[name] for name in _FLUSH_PARAMS]


def _compact(query: str) -> tuple[str, tuple[str, ...]]:
    """The statement as sent, and its parameter names in placeholder order.

    psycopg parses a query's placeholders once and caches the result only
    for texts up to 4,096 bytes; the readable statement above is longer, and
    would be re-parsed on every flush. Without comments, runs of blanks and
    names in the placeholders it fits. (The blanks around , ( ) = go too: the
    statement holds no string literal where that would matter.)
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
    # standard encoder formats slowly. It writes NaN as null; the times here
    # come from the clock, never NaN.
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
            row = step_row(saga.saga_id, positions[name], saga.step(name))
            row["idx"] = index
            row["output"] = _base64(row["output"])
            rows.append(row)
    return rows


def _flush_params(writes: Sequence[SagaWrite], creates: Sequence[int], updates: Sequence[int]) -> dict[str, Any]:
    updated = [
        {"idx": index, "saga_id": writes[index].saga.saga_id, "expected": writes[index].expected_sequence,
         "epoch": writes[index].epoch, **saga_values(writes[index])}
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
            "trace_parent": saga.trace_parent, **saga_values(write),
        })
    events: list[dict[str, Any]] = []
    for index in sorted((*updates, *creates)):  # positions are handed out in write order
        saga = writes[index].saga
        for event in writes[index].events:
            row = event_row(saga, event, 0)
            row["idx"], row["n"] = index, len(events)
            del row["position"]
            events.append(row)
    if len(events) >= _RANKS:
        raise ValueError(f"{len(events)} events in one flush: a transaction ranks fewer than {_RANKS}")
    return {
        "updates": _json(updated), "creates": _json(created), "steps": _json(_step_rows(writes, updates, creates)),
        "events": _json(events),
    }
