"""A SagaStore over several databases, each holding some partitions of the
sagas (docs/partitions.md).

Saga-keyed calls go to the database of the saga's partition; calls about
every saga ask every database and merge; everything else is the home
database's (partitioned_home.py). A replica serves every partition.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from typing import TypeVar

from compensa.orchestrator.shared.errors import StoreUnavailable
from compensa.orchestrator.shared.records import SagaRecord
from compensa.orchestrator.shared.selection import SagaSelection
from compensa.orchestrator.store.base import (
    AuditFinding,
    BulkJob,
    CapacityGrant,
    CapacityWait,
    Claimed,
    LogHoldup,
    PendingAlert,
    ReachabilityListener,
    SagaFlow,
    SagaMove,
    SagaWrite,
    StateSummary,
    StoredAlert,
    StoredEvent,
    WriteResult,
)
from compensa.orchestrator.store.partition_map import PartitionMap, database_id, load_partition_map
from compensa.orchestrator.store.partitioned_home import HomeDatabaseCalls
from compensa.orchestrator.store.sql import SqlSagaStore

#: Alert positions are (position in its database) x this + the database's
#: index: a saga's alert is in its database's outbox, and its position must
#: say which one to tell of its delivery. The most databases a store takes.
ALERT_POSITION_SLOTS = 64

log = logging.getLogger("compensa.store")

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class PartitionedStore(HomeDatabaseCalls):
    """Sagas spread over `databases` by partition; the first is home (it
    holds the map, definitions, participants and jobs, and partitions too).

    Usable once `ensure_schema` has read (or made) the partition map."""

    def __init__(self, databases: Sequence[SqlSagaStore]) -> None:
        if not 2 <= len(databases) <= ALERT_POSITION_SLOTS:
            raise ValueError(f"a partitioned store takes the home database and 1 to {ALERT_POSITION_SLOTS - 1} more")
        self.databases: tuple[SqlSagaStore, ...] = tuple(databases)
        self._home: SqlSagaStore = self.databases[0]
        self._map: PartitionMap | None = None
        self._first_claimed = itertools.cycle(range(len(self.databases)))
        self._first_alerted = itertools.cycle(range(len(self.databases)))
        self.log_can_be_held_back = any(database.log_can_be_held_back for database in self.databases)
        # The database of each holdup `log_holdup` last found.
        self._held_back_in: dict[LogHoldup, int] = {}

    @property
    def partition_map(self) -> PartitionMap:
        if self._map is None:
            # A call that came before the start-up read the map: like a
            # database not reached yet, the client retries.
            raise StoreUnavailable("database unavailable: the partition map is not read yet (starting); retry")
        return self._map

    def database_index(self, saga_id: str) -> int:
        """The index in `databases` of the database holding the saga."""
        return self.partition_map.database_of(saga_id)

    def database_of(self, saga_id: str) -> SqlSagaStore:
        return self.databases[self.database_index(saga_id)]

    def _by_database(self, items: Iterable[_Item], saga_id: Callable[[_Item], str]) -> dict[int, list[int]]:
        """The indexes of `items` by the database of their saga."""
        groups: dict[int, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(self.database_index(saga_id(item)), []).append(index)
        return groups

    async def _each(self, call: Callable[[SqlSagaStore], Awaitable[_Result]]) -> list[_Result]:
        """`call` on every database at once, results in database order."""
        return list(await asyncio.gather(*(call(database) for database in self.databases)))

    async def _routed(
        self, items: Sequence[_Item], saga_id: Callable[[_Item], str],
        call: Callable[[SqlSagaStore, list[_Item]], Awaitable[list[_Result]]],
    ) -> list[_Result]:
        """`call` on each database with its share of `items` (one transaction
        each, at once), the answers put back in the order of `items`."""
        groups = self._by_database(items, saga_id)
        answers = await asyncio.gather(
            *(call(self.databases[db], [items[i] for i in indexes]) for db, indexes in groups.items())
        )
        results: list[_Result | None] = [None] * len(items)
        for indexes, answer in zip(groups.values(), answers, strict=True):
            for index, result in zip(indexes, answer, strict=True):
                results[index] = result
        return results  # type: ignore[return-value]  # every index was filled

    async def _in_turn(
        self, first: int, limit: int, take: Callable[[int, int], Awaitable[list[_Item]]]
    ) -> list[_Item]:
        """Up to `limit` items taken from the databases one after another
        (`take(index, how_many)`, one transaction each), from `first` on: the
        database asked first takes turns, so a busy one does not starve the
        others of the limit."""
        taken: list[_Item] = []
        for offset in range(len(self.databases)):
            if len(taken) >= limit:
                break
            taken += await take((first + offset) % len(self.databases), limit - len(taken))
        return taken

    async def _purged(self, limit: int, purge: Callable[[SqlSagaStore, int], Awaitable[int]]) -> int:
        """Up to `limit` deleted by `purge(database, how_many)`, database after database."""
        purged = 0
        for database in self.databases:
            if purged >= limit:
                break
            purged += await purge(database, limit - purged)
        return purged

    # -- the databases themselves

    def subscribe_reachability(self, listener: ReachabilityListener) -> None:
        """`listener` hears of every database's failures, and of an answer
        only while no other database is failing: the deployment answers when
        all its databases do (else one database's answers would hide
        another's outage, flapping the health between them)."""
        failing: dict[int, float] = {}  # database index -> when its failing wait began

        def of_database(index: int) -> ReachabilityListener:
            def told(error: BaseException | None, began: float) -> None:
                if error is not None:
                    failing[index] = began
                elif began >= failing.get(index, began):
                    failing.pop(index, None)
                if error is not None or not failing:
                    listener(error, began)

            return told

        for index, database in enumerate(self.databases):
            database.subscribe_reachability(of_database(index))

    # One database at a time: Alembic's `op` and `context` are process-wide.
    async def ensure_schema(self) -> None:
        for database in self.databases:
            await database.ensure_schema()
        ids = await self._each(database_id)
        self._map = await load_partition_map(self._home, ids)

    async def upgrade_schema(self) -> tuple[str | None, str]:
        revisions = [await database.upgrade_schema() for database in self.databases]
        return revisions[0]

    async def ping(self) -> None:
        await self._each(lambda database: database.ping())

    async def probe_writes(self) -> None:
        await self._each(lambda database: database.probe_writes())

    async def close(self) -> None:
        await self._each(lambda database: database.close())

    async def listen(self, on_change: Callable[[list[str] | None], None], *, ignore_from: str) -> None:
        await self._each(lambda database: database.listen(on_change, ignore_from=ignore_from))

    # -- one saga: its database

    async def record_saga_flow(
        self, saga_id: str, definition_name: str, *, concurrency_key: str | None, priority: int, now: float
    ) -> None:
        await self.database_of(saga_id).record_saga_flow(
            saga_id, definition_name, concurrency_key=concurrency_key, priority=priority, now=now
        )

    async def flow_of(self, saga_id: str, *, with_waits: bool = True) -> SagaFlow:
        return await self.database_of(saga_id).flow_of(saga_id, with_waits=with_waits)

    async def take_key_turn(
        self, saga_id: str, max_running: int, *, owner: str, epoch: int, now: float, retry_seconds: float
    ) -> float | None:
        return await self.database_of(saga_id).take_key_turn(
            saga_id, max_running, owner=owner, epoch=epoch, now=now, retry_seconds=retry_seconds
        )

    async def exchange_capacity(
        self, participant: str, replica: str, *, returned: int, wanted: int, now: float, lease_until: float,
        waits_started: Sequence[CapacityWait] = (), waits_ended: Sequence[tuple[str, str]] = (),
        priorities_of: Sequence[str] = (), spare: int = 0,
    ) -> CapacityGrant:
        """The budget is home's; the sagas' waits and priorities are in their
        databases. Every other database is asked for nothing (the participant
        is not stored there, so nothing is granted or counted): its exchange
        records its sagas' waits and reads their priorities. Those are for
        views and ordering only: when one fails the grant still stands (its
        sagas keep the default priority), as home has counted it."""
        started = self._by_database(waits_started, lambda wait: wait.saga_id)
        ended = self._by_database(waits_ended, lambda key: key[0])
        prioritized = self._by_database(priorities_of, lambda saga_id: saga_id)

        def exchange(index: int) -> Awaitable[CapacityGrant]:
            home = index == 0
            return self.databases[index].exchange_capacity(
                participant, replica, returned=returned if home else 0, wanted=wanted if home else 0, now=now,
                lease_until=lease_until, spare=spare if home else 0,
                waits_started=[waits_started[i] for i in started.get(index, ())],
                waits_ended=[waits_ended[i] for i in ended.get(index, ())],
                priorities_of=[priorities_of[i] for i in prioritized.get(index, ())],
            )

        others = sorted((set(started) | set(ended) | set(prioritized)) - {0})
        grant, *sagas_sides = await asyncio.gather(
            exchange(0), *(exchange(index) for index in others), return_exceptions=True
        )
        if isinstance(grant, BaseException):
            raise grant
        priorities = dict(grant.priorities)
        for side in sagas_sides:
            if isinstance(side, BaseException):
                log.debug("capacity exchange: a partition database did not answer: %s", side)
            else:
                priorities.update(side.priorities)
        return replace(grant, priorities=priorities)

    async def forget_capacity(self, replica: str) -> None:
        await self._each(lambda database: database.forget_capacity(replica))

    async def load_saga(self, saga_id: str) -> SagaRecord | None:
        return await self.database_of(saga_id).load_saga(saga_id)

    async def load_start(self, saga_id: str) -> tuple[SagaRecord, str] | None:
        return await self.database_of(saga_id).load_start(saga_id)

    async def load_with_owner(self, saga_id: str) -> tuple[SagaRecord, str | None, float | None] | None:
        return await self.database_of(saga_id).load_with_owner(saga_id)

    async def load_owned(self, saga_id: str, owner: str, epoch: int) -> SagaRecord | None:
        return await self.database_of(saga_id).load_owned(saga_id, owner, epoch)

    async def read_saga_events(self, saga_id: str, after_sequence: int, limit: int) -> list[StoredEvent]:
        return await self.database_of(saga_id).read_saga_events(saga_id, after_sequence, limit)

    # -- many sagas: each database its share, in one transaction each

    def commit_groups(self, writes: Sequence[SagaWrite]) -> list[list[int]]:
        return list(self._by_database(writes, lambda write: write.saga.saga_id).values())

    async def commit(self, writes: Sequence[SagaWrite]) -> list[WriteResult]:
        """One transaction per database holding some of the writes; each
        saga's write lands (or not) atomically in its own database. (The
        writer commits each database's share on its own, see commit_groups,
        so that one database's failure fails only its writes.)"""
        return await self._routed(writes, lambda write: write.saga.saga_id, lambda db, share: db.commit(share))

    async def move_sagas(self, moves: Sequence[SagaMove]) -> list[StoredEvent | None]:
        return await self._routed(moves, lambda move: move.saga.saga_id, lambda db, share: db.move_sagas(share))

    async def load_many_with_owner(
        self, saga_ids: Sequence[str]
    ) -> dict[str, tuple[SagaRecord, str | None, float | None]]:
        found: dict[str, tuple[SagaRecord, str | None, float | None]] = {}
        for share in await self._shares(saga_ids, lambda db, ids: db.load_many_with_owner(ids)):
            found.update(share)
        return found

    async def read_saga_logs(self, saga_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        logs: dict[str, list[StoredEvent]] = {}
        for share in await self._shares(saga_ids, lambda db, ids: db.read_saga_logs(ids)):
            logs.update(share)
        return logs

    async def load_sagas(self, saga_ids: Sequence[str]) -> list[SagaRecord]:
        shares = await self._shares(saga_ids, lambda db, ids: db.load_sagas(ids))
        return [saga for share in shares for saga in share]

    async def read_events(self, keys: Sequence[tuple[str, int]]) -> list[StoredEvent]:
        groups = self._by_database(keys, lambda key: key[0])
        shares = await asyncio.gather(
            *(self.databases[db].read_events([keys[i] for i in indexes]) for db, indexes in groups.items())
        )
        return [event for share in shares for event in share]

    async def renew_leases(self, owner: str, saga_ids: Sequence[str], lease_until: float) -> int:
        return sum(await self._shares(saga_ids, lambda db, ids: db.renew_leases(owner, ids, lease_until)))

    async def _shares(
        self, saga_ids: Sequence[str], call: Callable[[SqlSagaStore, list[str]], Awaitable[_Result]]
    ) -> list[_Result]:
        groups = self._by_database(saga_ids, lambda saga_id: saga_id)
        return list(await asyncio.gather(
            *(call(self.databases[db], [saga_ids[i] for i in indexes]) for db, indexes in groups.items())
        ))

    async def create_bulk_job(self, job: BulkJob, selection: SagaSelection) -> tuple[BulkJob | None, bool]:
        """The job and its items in home, in one transaction: home's sagas
        selected there, the other databases' read from each beforehand (each
        at the job's time, as home's are). Its batches act on each saga
        through its own database."""
        elsewhere = await asyncio.gather(
            *(database.selected_sagas(selection, job.created_at) for database in self.databases[1:])
        )
        return await self._home.create_bulk_job(
            job, selection, selected_elsewhere=[item for items in elsewhere for item in items]
        )

    # -- alerts: each saga's in its database's outbox (it commits with its
    # event); the others, of participants and audits, in home's

    @staticmethod
    def _alert_in(index: int, alert: StoredAlert) -> StoredAlert:
        return replace(alert, position=alert.position * ALERT_POSITION_SLOTS + index)

    def _alert_at(self, position: int) -> tuple[SqlSagaStore, int]:
        """The database of an alert's position, and its position there."""
        index, local = position % ALERT_POSITION_SLOTS, position // ALERT_POSITION_SLOTS
        if index >= len(self.databases):
            raise ValueError(f"alert position {position} names no database of this deployment")
        return self.databases[index], local

    async def claim_alerts(self, now: float, claimed_until: float, limit: int) -> list[PendingAlert]:
        async def claim(index: int, wanted: int) -> list[PendingAlert]:
            pending = await self.databases[index].claim_alerts(now, claimed_until, wanted)
            return [replace(each, alert=self._alert_in(index, each.alert)) for each in pending]

        return await self._in_turn(next(self._first_alerted), limit, claim)

    async def alert_delivered(self, position: int) -> None:
        database, local = self._alert_at(position)
        await database.alert_delivered(local)

    async def alert_not_delivered(self, position: int, attempts: int, next_attempt_at: float, error: str) -> None:
        database, local = self._alert_at(position)
        await database.alert_not_delivered(local, attempts, next_attempt_at, error)

    async def purge_alerts(self, *, raised_before: float, limit: int) -> int:
        return await self._purged(limit, lambda database, left: database.purge_alerts(
            raised_before=raised_before, limit=left
        ))

    async def read_alerts(self, after_position: int, limit: int) -> list[StoredAlert]:
        """Home's alert log only: one position cannot say where several
        databases' alert logs stand (WatchAlerts reads each with
        `read_alerts_of`)."""
        return await self.read_alerts_of(0, after_position // ALERT_POSITION_SLOTS, limit)

    async def read_alerts_of(self, index: int, after_position: int, limit: int) -> list[StoredAlert]:
        """Up to `limit` alerts of database `index`'s alert log after its own
        `after_position`, in its log order; each alert's `position` is the
        deployment's (see ALERT_POSITION_SLOTS)."""
        alerts = await self.databases[index].read_alerts(after_position, limit)
        return [self._alert_in(index, alert) for alert in alerts]

    @staticmethod
    def position_in_database(position: int) -> int:
        """An alert's position in its own database's alert log."""
        return position // ALERT_POSITION_SLOTS

    async def alert_participant_unhealthy(
        self, name: str, *, unhealthy_before: float, now: float, message: str
    ) -> StoredAlert | None:
        alert = await self._home.alert_participant_unhealthy(
            name, unhealthy_before=unhealthy_before, now=now, message=message
        )
        return None if alert is None else self._alert_in(0, alert)

    async def participant_serving(self, name: str, *, now: float, message: str) -> StoredAlert | None:
        alert = await self._home.participant_serving(name, now=now, message=message)
        return None if alert is None else self._alert_in(0, alert)

    async def record_audit_findings(self, findings: Sequence[AuditFinding], now: float) -> list[StoredAlert]:
        return [self._alert_in(0, alert) for alert in await self._home.record_audit_findings(findings, now)]

    # -- open transactions holding a database's log back (each has its own)

    async def log_holdup(self) -> LogHoldup | None:
        holdups = await self._each(lambda database: database.log_holdup())
        self._held_back_in = {holdup: index for index, holdup in enumerate(holdups) if holdup is not None}
        return next(iter(self._held_back_in), None)

    async def alert_log_holdup(self, holdup: LogHoldup, *, now: float, message: str) -> StoredAlert | None:
        """Raised in the database whose log is held back, where the holding
        transaction's id means something."""
        index = self._held_back_in.get(holdup, 0)
        alert = await self.databases[index].alert_log_holdup(holdup, now=now, message=message)
        return None if alert is None else self._alert_in(index, alert)

    # -- every saga: every database

    async def claim_due(self, owner: str, now: float, lease_until: float, limit: int) -> list[Claimed]:
        """Due sagas from every database, up to `limit` in all."""
        return await self._in_turn(
            next(self._first_claimed), limit,
            lambda index, wanted: self.databases[index].claim_due(owner, now, lease_until, wanted),
        )

    async def release_all(self, owner: str, now: float) -> None:
        await self._each(lambda database: database.release_all(owner, now))

    async def purge_finished(self, *, finished_before: float, limit: int) -> int:
        return await self._purged(limit, lambda database, left: database.purge_finished(
            finished_before=finished_before, limit=left
        ))

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
        """A merge of every database's page: (created_at, saga_id) orders
        every saga, so the cursor `after` means the same in each of them."""
        pages = await self._each(lambda database: database.list_sagas(
            state=state, definition_name=definition_name, updated_before=updated_before, page_size=page_size,
            after=after, id_contains=id_contains, selection=selection, now=now,
        ))
        newest_first = heapq.merge(*pages, key=lambda saga: (saga.created_at, saga.saga_id), reverse=True)
        return list(itertools.islice(newest_first, page_size))

    async def sagas_in_creation_order(
        self, *, after: tuple[float, str] | None, definition_name: str, limit: int
    ) -> list[SagaRecord]:
        pages = await self._each(lambda database: database.sagas_in_creation_order(
            after=after, definition_name=definition_name, limit=limit
        ))
        oldest_first = heapq.merge(*pages, key=lambda saga: (saga.created_at, saga.saga_id))
        return list(itertools.islice(oldest_first, limit))

    async def find_stuck(self, *, stuck_before: float, now: float, limit: int) -> list[SagaRecord]:
        found = await self._each(lambda database: database.find_stuck(stuck_before=stuck_before, now=now, limit=limit))
        oldest_first = heapq.merge(*found, key=lambda saga: saga.updated_at)
        return list(itertools.islice(oldest_first, limit))

    async def summarize_sagas(self, *, definition_name: str, stuck_before: float) -> list[StateSummary]:
        answers = await self._each(lambda database: database.summarize_sagas(
            definition_name=definition_name, stuck_before=stuck_before
        ))
        totals: dict[tuple[str, int], StateSummary] = {}
        for summary in (summary for answer in answers for summary in answer):
            key = (summary.definition_name, summary.state)
            seen = totals.get(key)
            totals[key] = summary if seen is None else replace(
                seen, count=seen.count + summary.count, stuck=seen.stuck + summary.stuck,
                unresolved=seen.unresolved + summary.unresolved,
                oldest_updated_at=min(seen.oldest_updated_at, summary.oldest_updated_at),
            )
        return [totals[key] for key in sorted(totals)]

    async def count_selection(
        self, selection: SagaSelection, *, now: float, sample_size: int
    ) -> tuple[int, list[SagaRecord]]:
        answers = await self._each(lambda database: database.count_selection(
            selection, now=now, sample_size=sample_size
        ))
        by_id = heapq.merge(*(sample for _, sample in answers), key=lambda saga: saga.saga_id)
        return sum(count for count, _ in answers), list(itertools.islice(by_id, sample_size))
