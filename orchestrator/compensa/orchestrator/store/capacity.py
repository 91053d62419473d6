"""Flow control's statements: participants' limits and holds, and the budget
of calls in flight and calls per second every replica takes from.

Why the budget lives in the database (DESIGN-NOTES 10, design b): a limit is
the deployment's, and only a shared row can hold it exactly while replicas
come and go. Each exchange locks the participant's row (FOR UPDATE on
PostgreSQL; SQLite has one writer anyway), counts the calls other replicas
have in flight under a live lease (`compensa_participant_grants`), takes
what is free and takes tokens from the row's bucket, all in one short
transaction. A replica exchanges for a whole batch of waiting calls at once
and gives back ended calls in the same transaction, so the cost is one
round trip per batch, not per call; a replica that dies stops counting when
its lease on its row expires, as its sagas do.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from compensa.orchestrator.shared.records import ACTIVE_SAGA_STATES
from compensa.orchestrator.store.base import (
    CapacityGrant,
    CapacityWait,
    ParticipantAddress,
    ParticipantHold,
    ParticipantLimits,
    SagaFlow,
)
from compensa.orchestrator.store.schema import (
    capacity_waits,
    participant_changes,
    participant_grants,
    participants,
    saga_flow,
    sagas,
)
from compensa.orchestrator.store.standby import lag_tolerant

# A saga waiting for its key's turn asks again at most this many
# retry_seconds later.
_MAX_TURN_BACKOFF = 10
# A fraction of a token this close to a whole one counts as whole (float sums).
_TOKEN_EPSILON = 1e-9
#: How much a call's trip from its grant to the participant may vary (the
#: replica's event loop, the network). A limit is promised where calls
#: arrive, and calls granted over 1 s plus this spread can all arrive within
#: one second; the bucket keeps that much back (`granting_bucket`).
DELIVERY_SPREAD_SECONDS = 0.1
#: The longest a replica holds spare calls (CapacityGrant.spare) before it
#: gives back what it did not make: a participant held by hand sees no new
#: call after this, plus an exchange.
MAX_SPARE_SECONDS = 0.5
# Spare calls are at most this fraction (1/N) of what the limits leave free,
# so that replicas holding spare never starve one another.
_SPARE_SHARE = 4


@dataclass(frozen=True)
class GrantingBucket:
    """How a participant's rate and burst are granted by."""

    rate: float
    burst: float
    #: How long spare tokens may be held (0: none are given).
    spare_seconds: float


def granting_bucket(rate: float, burst: float) -> GrantingBucket:
    """The rate and burst calls are granted by, and how long a spare token
    may wait, so that no more than `rate` + `burst` calls arrive at the
    participant in any one second while their trips vary by up to
    DELIVERY_SPREAD_SECONDS.

    A spare token used `spare_seconds` after its grant widens that spread.
    Grants in any window of 1 s + the spread are at most burst + rate x
    (1 s + spread), so the bucket keeps rate x spread back: out of the
    burst, of which a spare token's wait may take up to half the rest; or,
    when the burst is smaller than the trip's margin, out of the rate, with
    a burst of one call and no spare tokens."""
    spare_seconds = min(MAX_SPARE_SECONDS, max(0.0, burst / (2.0 * rate) - DELIVERY_SPREAD_SECONDS))
    margin = rate * (DELIVERY_SPREAD_SECONDS + spare_seconds)
    if burst - margin >= 1.0:
        return GrantingBucket(rate, burst - margin, spare_seconds)
    return GrantingBucket((rate + burst - 1.0) / (1.0 + DELIVERY_SPREAD_SECONDS), 1.0, 0.0)


def participant_from_row(row: sa.Row[Any]) -> ParticipantAddress:
    """A compensa_participants row as the store hands it out."""
    limits = ParticipantLimits(row.max_in_flight, row.rate_per_second, row.burst)
    hold = None
    if row.held_reason is not None:
        hold = ParticipantHold(row.held_reason, row.held_by or "", row.held_at or 0.0)
    return ParticipantAddress(
        row.name, row.address, row.updated_at, row.updated_by, row.unhealthy_since, row.alerted_at, limits, hold
    )


def describe_limits(limits: ParticipantLimits) -> str:
    """The limits as the change log and the CLI say them."""
    parts = []
    if limits.max_in_flight is not None:
        parts.append(f"at most {limits.max_in_flight} calls in flight")
    if limits.rate_per_second is not None:
        parts.append(f"{limits.rate_per_second:g} calls/s (burst {limits.burst})")
    return ", ".join(parts) if parts else "no limits"


async def log_participant_change(conn: AsyncConnection, name: str, *, by: str, now: float, change: str) -> None:
    """Logs a change of participant `name` by `by`, in the caller's transaction."""
    await conn.execute(
        sa.insert(participant_changes).values(participant=name, changed_at=now, changed_by=by, change=change)
    )


class CapacityStatements(abc.ABC):
    """The flow-control half of the SQL store (mixed into SqlSagaStore)."""

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]: ...

    @abc.abstractmethod
    def _insert(self, table: sa.Table) -> Any: ...

    # The database's clock (seconds since the epoch), as the store reads it.
    _CLOCK_QUERY: str

    async def _change(
        self, name: str, values: dict[str, Any], *, by: str, now: float, change: str
    ) -> ParticipantAddress | None:
        """Updates participant `name` and logs the change, in one
        transaction; the changed participant, None when there is none."""
        async with self._transaction() as conn:
            row = (
                await conn.execute(
                    sa.update(participants).where(participants.c.name == name).values(**values)
                    .returning(*participants.c)
                )
            ).one_or_none()
            if row is None:
                return None
            await log_participant_change(conn, name, by=by, now=now, change=change)
        return participant_from_row(row)

    async def set_participant_limits(
        self, name: str, limits: ParticipantLimits, *, updated_by: str, now: float
    ) -> ParticipantAddress | None:
        values = {
            "max_in_flight": limits.max_in_flight, "rate_per_second": limits.rate_per_second, "burst": limits.burst,
            "tokens": float(limits.burst) if limits.burst is not None else None, "tokens_at": now,
        }
        return await self._change(name, values, by=updated_by, now=now, change=f"limits: {describe_limits(limits)}")

    async def hold_participant(
        self, name: str, *, reason: str | None, by: str, now: float
    ) -> ParticipantAddress | None:
        values: dict[str, Any] = {"held_reason": reason, "held_by": by, "held_at": now}
        change = f"held: {reason}" if reason is not None else "released"
        if reason is None:
            values = dict.fromkeys(values)
        return await self._change(name, values, by=by, now=now, change=change)

    async def exchange_capacity(
        self, participant: str, replica: str, *, returned: int, wanted: int, now: float, lease_until: float,
        waits_started: Sequence[CapacityWait] = (), waits_ended: Sequence[tuple[str, str]] = (),
        priorities_of: Sequence[str] = (), spare: int = 0,
    ) -> CapacityGrant:
        grants = participant_grants.c
        others = (
            sa.select(sa.func.coalesce(sa.func.sum(grants.in_flight), 0))
            .where(grants.participant == participant, grants.replica != replica, grants.lease_until > now)
            .scalar_subquery()
        )
        mine = sa.select(grants.in_flight).where(grants.participant == participant, grants.replica == replica)
        async with self._transaction() as conn:
            # The lock first, the counts in a statement of their own: its
            # snapshot, taken once the lock is held, sees the grants the
            # exchange before this one committed (one statement would read
            # them as of before it waited for the lock).
            locked = await conn.execute(
                sa.select(participants.c.name).where(participants.c.name == participant).with_for_update()
            )
            row = None if locked.one_or_none() is None else (
                await conn.execute(
                    sa.select(
                        participants.c.max_in_flight, participants.c.rate_per_second, participants.c.burst,
                        participants.c.tokens, participants.c.tokens_at, participants.c.held_reason,
                        participants.c.held_by, others.label("others"), mine.scalar_subquery().label("mine"),
                        sa.literal_column(self._CLOCK_QUERY.removeprefix("SELECT ")).label("clock"),
                    ).where(participants.c.name == participant)
                )
            ).one()
            if row is not None:
                # Tokens are counted at the time the lock is held, on the
                # database's clock: a replica's `now`, taken before it waited
                # for the lock, would date its grants earlier than they are.
                now = max(now, float(row.clock))
            if row is None:  # not stored, so not limited
                grant = CapacityGrant(wanted)
                in_flight = 0
            else:
                mine_now = max(0, (row.mine or 0) - returned)
                grant, tokens_left = capacity_grant(participant, row, mine_now, wanted, now, spare)
                in_flight = mine_now + grant.granted + grant.spare
                if tokens_left is not None:
                    await conn.execute(
                        sa.update(participants).where(participants.c.name == participant)
                        .values(tokens=tokens_left, tokens_at=max(now, row.tokens_at or now))
                    )
            if row is not None and (row.mine is not None or in_flight):
                values = {"in_flight": in_flight, "lease_until": lease_until}
                await conn.execute(
                    self._insert(participant_grants).values(participant=participant, replica=replica, **values)
                    .on_conflict_do_update(index_elements=[grants.participant, grants.replica], set_=values)
                )
            await self._record_waits(conn, replica, waits_started, waits_ended)
            if priorities_of:
                rows = await conn.execute(
                    sa.select(saga_flow.c.saga_id, saga_flow.c.priority).where(
                        saga_flow.c.saga_id.in_(list(priorities_of))
                    )
                )
                grant = dataclasses.replace(grant, priorities={row.saga_id: row.priority for row in rows})
        return grant

    async def _record_waits(
        self, conn: AsyncConnection, replica: str, started: Sequence[CapacityWait], ended: Sequence[tuple[str, str]]
    ) -> None:
        if ended:
            await conn.execute(
                sa.delete(capacity_waits).where(
                    sa.tuple_(capacity_waits.c.saga_id, capacity_waits.c.step_name).in_(list(ended))
                )
            )
        if started:
            rows = [
                {"saga_id": wait.saga_id, "step_name": wait.step_name, "participant": wait.participant,
                 "reason": wait.reason, "since": wait.since, "owner": replica}
                for wait in started
            ]
            insert = self._insert(capacity_waits)
            await conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[capacity_waits.c.saga_id, capacity_waits.c.step_name],
                    set_={name: insert.excluded[name] for name in ("participant", "reason", "since", "owner")},
                ),
                rows,
            )

    async def renew_capacity(self, replica: str, lease_until: float) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                sa.update(participant_grants).where(participant_grants.c.replica == replica)
                .values(lease_until=lease_until)
            )

    async def forget_capacity(self, replica: str) -> None:
        async with self._transaction() as conn:
            await conn.execute(sa.delete(participant_grants).where(participant_grants.c.replica == replica))
            await conn.execute(sa.delete(capacity_waits).where(capacity_waits.c.owner == replica))

    async def record_saga_flow(
        self, saga_id: str, definition_name: str, *, concurrency_key: str | None, priority: int, now: float
    ) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                self._insert(saga_flow).values(
                    saga_id=saga_id, definition_name=definition_name, concurrency_key=concurrency_key,
                    priority=priority, created_at=now,
                ).on_conflict_do_nothing()
            )

    @lag_tolerant
    async def flow_of(self, saga_id: str, *, with_waits: bool = True) -> SagaFlow:
        async with self._transaction() as conn:
            row = (
                await conn.execute(
                    sa.select(saga_flow.c.priority, saga_flow.c.concurrency_key).where(saga_flow.c.saga_id == saga_id)
                )
            ).one_or_none()
            rows = [] if not with_waits else (
                await conn.execute(
                    sa.select(capacity_waits)
                    .join(sagas, sagas.c.saga_id == capacity_waits.c.saga_id)
                    .where(
                        capacity_waits.c.saga_id == saga_id,
                        sa.or_(capacity_waits.c.owner == sagas.c.owner, capacity_waits.c.step_name == ""),
                    )
                    .order_by(capacity_waits.c.since)
                )
            ).all()
        waits = tuple(CapacityWait(r.saga_id, r.step_name, r.participant, r.reason, r.since) for r in rows)
        if row is None:
            return SagaFlow(waits=waits)
        return SagaFlow(row.priority, row.concurrency_key, waits)

    async def take_key_turn(
        self, saga_id: str, max_running: int, *, owner: str, epoch: int, now: float, retry_seconds: float
    ) -> float | None:
        mine = saga_flow.alias("mine")
        ahead = (
            sa.select(sa.func.count())
            .select_from(saga_flow.join(sagas, sagas.c.saga_id == saga_flow.c.saga_id))
            .where(
                mine.c.saga_id == saga_id,
                saga_flow.c.definition_name == mine.c.definition_name,
                saga_flow.c.concurrency_key == mine.c.concurrency_key,
                sagas.c.state.in_(sorted(ACTIVE_SAGA_STATES)),
                sa.tuple_(saga_flow.c.created_at, saga_flow.c.saga_id) < sa.tuple_(mine.c.created_at, mine.c.saga_id),
            )
            .scalar_subquery()
        )
        its_wait = sa.and_(capacity_waits.c.saga_id == saga_id, capacity_waits.c.step_name == "")
        async with self._transaction() as conn:
            row = (
                await conn.execute(
                    sa.select(mine.c.concurrency_key, ahead.label("ahead"))
                    .where(mine.c.saga_id == saga_id, mine.c.concurrency_key.is_not(None))
                )
            ).one_or_none()
            if row is None:
                return None
            if row.ahead < max_running:
                await conn.execute(sa.delete(capacity_waits).where(its_wait))
                return None
            # Sagas far back in the line ask less often.
            retry_at: float = now + retry_seconds * min(_MAX_TURN_BACKOFF, int(row.ahead) - max_running + 1)
            await conn.execute(
                sa.update(sagas).where(sagas.c.saga_id == saga_id, sagas.c.owner == owner, sagas.c.epoch == epoch)
                .values(owner=None, lease_until=None, due_at=retry_at)
            )
            reason = (
                f"its key's turn: {row.ahead} saga(s) with concurrency key {row.concurrency_key!r} started before"
                f" it are unfinished (at most {max_running} at once)"
            )
            await self._record_waits(conn, "", [CapacityWait(saga_id, "", "", reason, now)], [])
        return retry_at


def capacity_grant(
    participant: str, row: Any, mine: int, wanted: int, now: float, spare: int = 0
) -> tuple[CapacityGrant, float | None]:
    """How many of `wanted` calls the participant's row lets through now
    (this replica has `mine` in flight), how many of `spare` more it may
    make without asking (a quarter at most of what is left, and only when
    all `wanted` are granted), and the tokens its bucket keeps (None: no
    rate)."""
    if row.held_reason is not None:
        why_not = f"participant {participant!r} is held by {row.held_by}: {row.held_reason}"
        return CapacityGrant(0, why_not, held=True), None
    granted, why_not, retry_after, tokens_left, available = wanted, "", None, None, 0.0
    spare_seconds = MAX_SPARE_SECONDS
    if row.max_in_flight is not None:
        free = max(0, row.max_in_flight - row.others - mine)
        if free < granted:
            granted = free
            why_not = f"participant {participant!r} is at its limit of {row.max_in_flight} calls in flight"
    if row.rate_per_second is not None:
        bucket = granting_bucket(row.rate_per_second, float(row.burst))
        rate, burst, spare_seconds = bucket.rate, bucket.burst, bucket.spare_seconds
        elapsed = max(0.0, now - (row.tokens_at if row.tokens_at is not None else now))
        available = min(burst, (row.tokens if row.tokens is not None else burst) + elapsed * rate)
        whole = math.floor(available + _TOKEN_EPSILON)
        if whole < granted:
            granted = whole
            why_not = why_not or f"participant {participant!r} is at its rate of {row.rate_per_second:g} calls/s"
            retry_after = max(0.0, (whole + 1 - available) / rate)
    spare_granted = 0
    if granted == wanted and spare > 0 and spare_seconds > 0:
        spare_granted = spare
        if row.max_in_flight is not None:
            spare_granted = min(spare_granted, (row.max_in_flight - row.others - mine - granted) // _SPARE_SHARE)
        if row.rate_per_second is not None:
            spare_granted = min(spare_granted, math.floor(available - granted + _TOKEN_EPSILON) // _SPARE_SHARE)
        spare_granted = max(0, spare_granted)
    if row.rate_per_second is not None:
        tokens_left = max(0.0, available - granted - spare_granted)
    grant = CapacityGrant(
        granted, why_not, retry_after=retry_after, spare=spare_granted, spare_seconds=spare_seconds
    )
    return grant, tokens_left
