"""Flow control: calls to a participant wait for capacity within its limits
(calls in flight, calls per second) and while an operator holds it.

The limits are the deployment's: every replica takes its calls from one
budget in the database (store/capacity.py says how, and why there). Here,
per participant, one gate task per replica gathers the calls waiting for
capacity and exchanges with that budget for all of them at once, handing
what it got to the waiting calls best first (higher priority first; within
a priority, definitions take turns, and each one's oldest saga goes first);
calls that ended go back in the same exchange.

While the limits are far from reached, an exchange also hands the replica
a few spare calls (slots counted as its own, tokens taken from the bucket,
for up to half a second): calls that find one at hand, with none waiting
before them, go without an exchange, and a call that ends gives its slot
back to the spare. Spare slots go back to the budget at the next exchange,
or when they lapse. So limits that are never reached cost an exchange per
replica every few dozen calls, not one per call. And no call waits for
that exchange: it is made ahead (a refill), when half of the spare is
left or it is about to lapse, and calls go on taking what is left of the
spare while it runs.

A call that waits is not an attempt: nothing about it is written to the
saga, so no retry is used; the saga's view shows the wait (recorded by the
gate's exchanges) and the metrics count it. A participant with no limits
and no hold has no gate: its calls cost nothing more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

from compensa.orchestrator.engine.clock import SharedClock
from compensa.orchestrator.shared.errors import StoreUnavailable
from compensa.orchestrator.shared.metrics import Metrics
from compensa.orchestrator.store import DEFAULT_PRIORITY, CapacityWait, ParticipantAddress, SagaStore

log = logging.getLogger("compensa.flow")

#: Priorities of StartSaga: 1 goes first, 5 last.
HIGHEST_PRIORITY = 1
LOWEST_PRIORITY = 5

# How often a gate whose calls wait for other replicas' calls to end asks
# again (it hears of its own calls ending at once).
_RETRY_SECONDS = 0.05
# How often it asks while the participant is held: a release is seen within
# this (plus the exchange), well inside a second.
_HELD_RETRY_SECONDS = 0.25
# After the database failed an exchange.
_UNAVAILABLE_RETRY_SECONDS = 0.5
# Spare calls asked for: four times the calls made since the last
# exchange, within these bounds.
_SPARE_PER_CALL_MADE = 4
_MIN_SPARE = 2
_MAX_SPARE = 512
# A refill starts when this share of the spare granted is left (its calls
# carry on during the exchange), or this long (at most this share of its
# time) before it lapses.
_REFILL_SHARE = 2
_REFILL_AHEAD_SECONDS = 0.05


class CapacityWaitExpired(Exception):
    """A call's deadline passed while it waited for capacity: it was not made."""


@dataclass(frozen=True)
class CallWaiting:
    """Who waits for a call: the saga's step, its definition and its age."""

    saga_id: str
    step_name: str
    definition_name: str
    created_at: float


@dataclass
class _Waiting:
    call: CallWaiting
    # Its result: whether the call counts against the shared budget (False
    # when let through because the limits were lifted).
    admitted: asyncio.Future[bool]
    since: float  # the shared clock's
    recorded: bool = False
    # The saga's, read with the gate's next exchange (StartSaga's priority).
    priority: int = DEFAULT_PRIORITY


class _WaitingCalls:
    """Calls waiting at one gate: higher priority first; within a priority,
    definitions take turns (one's burst does not starve another), and each
    definition's calls go oldest saga first."""

    def __init__(self) -> None:
        self._levels: dict[int, dict[str, list[tuple[float, int, _Waiting]]]] = {}
        self._turns: dict[int, collections.deque[str]] = {}
        self._order = itertools.count()

    def push(self, waiting: _Waiting) -> None:
        call = waiting.call
        level = self._levels.setdefault(waiting.priority, {})
        queue = level.get(call.definition_name)
        if queue is None:
            queue = level[call.definition_name] = []
            self._turns.setdefault(waiting.priority, collections.deque()).append(call.definition_name)
        heapq.heappush(queue, (call.created_at, next(self._order), waiting))

    def pop(self) -> _Waiting | None:
        """The next call to let through (None: none waits)."""
        for priority in sorted(self._levels):
            level, turns = self._levels[priority], self._turns[priority]
            while turns:
                definition = turns[0]
                queue = level[definition]
                while queue and queue[0][2].admitted.done():
                    heapq.heappop(queue)
                if not queue:
                    turns.popleft()
                    del level[definition]
                    continue
                turns.rotate(-1)
                return heapq.heappop(queue)[2]
            del self._levels[priority], self._turns[priority]
        return None

    def live(self) -> list[_Waiting]:
        """The calls still waiting."""
        return [
            waiting for level in self._levels.values() for queue in level.values()
            for *_, waiting in queue if not waiting.admitted.done()
        ]

    def __bool__(self) -> bool:
        """Whether a call may be waiting (calls that gave up count until popped)."""
        return any(queue for level in self._levels.values() for queue in level.values())


@dataclass
class _Gate:
    """One participant's waiting calls on this replica, and its calls in flight."""

    name: str
    waiting: _WaitingCalls = field(default_factory=_WaitingCalls)
    # Calls that came since the last exchange: their priority is not known yet.
    unranked: list[_Waiting] = field(default_factory=list)
    returned: int = 0
    # Spare calls (CapacityGrant.spare): slots counted as this replica's but
    # not in use, and tokens taken but not used, both until `spare_until`
    # (monotonic); and the calls made since the last exchange.
    slots_free: int = 0
    tokens: int = 0
    spare_until: float = 0.0
    made: int = 0
    # Spare left when a refill is asked for; whether one was asked since the last exchange.
    refill_below: int = 0
    refill_ahead: float = 0.0
    refill: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    waits_started: dict[tuple[str, str], CapacityWait] = field(default_factory=dict)
    waits_ended: set[tuple[str, str]] = field(default_factory=set)
    task: asyncio.Task[None] | None = None

    def live(self) -> list[_Waiting]:
        """The calls still waiting."""
        return self.waiting.live() + [waiting for waiting in self.unranked if not waiting.admitted.done()]

    def queued(self) -> int:
        return len(self.live())

    def take_spare(self, *, their_turn: bool = False) -> bool:
        """Takes a spare call if one is at hand and no call waits before it
        (`their_turn`: for the first of the calls that came since the last
        exchange, which do not count as waiting before it then)."""
        if self.tokens < 1 or self.slots_free < 1 or self.waiting or (self.unranked and not their_turn):
            return False
        if time.monotonic() >= self.spare_until:
            return False
        self.tokens -= 1
        self.slots_free -= 1
        self.made += 1
        # Tokens only: slots come back as calls end, and the calls in
        # flight hold as many as the pace needs.
        if not self.refill and self.tokens < self.refill_below:
            self.refill = True
            self.wake.set()
        return True

    def end_call(self) -> None:
        """A counted call ended: its slot is spare until the next exchange,
        which gives it back; wakes the gate if a call waits for it or the
        spare has lapsed."""
        self.slots_free += 1
        if self.unranked or self.waiting or time.monotonic() >= self.spare_until:
            self.wake.set()

    def rank(self, calls: Iterable[_Waiting], priorities: Mapping[str, int]) -> None:
        """Puts calls that came since an exchange in line, with their sagas'
        priorities (the default when none is in `priorities`)."""
        for waiting in calls:
            waiting.priority = priorities.get(waiting.call.saga_id, DEFAULT_PRIORITY)
            self.waiting.push(waiting)


class FlowControl:
    """The gates of this replica's calls to limited or held participants."""

    def __init__(self, store: SagaStore, replica: str, clock: SharedClock, metrics: Metrics, lease_seconds: float):
        self._store = store
        self._replica = replica
        self._clock = clock
        self._metrics = metrics
        self._lease_seconds = lease_seconds
        self._gated: set[str] = set()
        self._gates: dict[str, _Gate] = {}
        self._stopping = False

    def use(self, stored: Iterable[ParticipantAddress]) -> None:
        """Calls from now on wait at the participants that have limits or a hold."""
        self._gated = {participant.name for participant in stored if participant.limits.limited or participant.hold}
        for name in self._gated:
            self._gate(name)
        for gate in self._gates.values():
            gate.wake.set()

    def gates(self, participant: str) -> bool:
        """Whether calls to `participant` wait for capacity (it has limits or a hold)."""
        return participant in self._gated

    @contextlib.asynccontextmanager
    async def admitted(self, participant: str, call: CallWaiting, until: float | None) -> AsyncIterator[float]:
        """Holds a call until the participant has capacity for it, and
        gives that back when the call ends; yields the seconds it waited.
        Raises CapacityWaitExpired when `until` (shared clock) passes first."""
        if participant not in self._gated:
            yield 0.0
            return
        gate = self._gate(participant)
        if gate.take_spare():
            try:
                yield 0.0
            finally:
                gate.end_call()
            return
        waiting = _Waiting(call, asyncio.get_running_loop().create_future(), self._clock.now())
        gate.unranked.append(waiting)
        gate.wake.set()
        granted = False
        began = time.monotonic()
        try:
            timeout = None if until is None else max(0.0, until - self._clock.now())
            await asyncio.wait([waiting.admitted], timeout=timeout)
            granted = waiting.admitted.done() and not waiting.admitted.cancelled()
        finally:
            if not granted:
                if waiting.admitted.done() and not waiting.admitted.cancelled() and waiting.admitted.result():
                    gate.returned += 1  # granted as it was given up
                waiting.admitted.cancel()
                self._stop_waiting(gate, waiting)
                gate.wake.set()
        if not granted:
            raise CapacityWaitExpired(f"no capacity at participant {participant!r} before the step's deadline")
        waited = time.monotonic() - began
        self._metrics.throttled(participant, waited)
        try:
            yield waited
        finally:
            if waiting.admitted.result():
                gate.end_call()

    async def renew(self, lease_until: float) -> None:
        """Extends the lease on this replica's calls in flight."""
        if self._gates:
            await self._store.renew_capacity(self._replica, lease_until)

    async def stop(self) -> None:
        """Stops the gates; this replica's calls stop counting at once."""
        self._stopping = True
        tasks = [gate.task for gate in self._gates.values() if gate.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._gates:
            with contextlib.suppress(StoreUnavailable):
                await self._store.forget_capacity(self._replica)

    def _gate(self, name: str) -> _Gate:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = _Gate(name)
            self._metrics.waiting_for_capacity(name, gate.queued)
            if not self._stopping:
                gate.task = asyncio.create_task(self._run(gate), name=f"compensa-gate-{name}")
        return gate

    def _stop_waiting(self, gate: _Gate, waiting: _Waiting) -> None:
        key = (waiting.call.saga_id, waiting.call.step_name)
        if waiting.recorded and gate.waits_started.pop(key, None) is None:
            gate.waits_ended.add(key)

    async def _run(self, gate: _Gate) -> None:
        retry_in: float | None = None
        first = True
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry_in):
                    await gate.wake.wait()
            gate.wake.clear()
            wanted = gate.queued()
            lapsed = gate.slots_free > 0 and time.monotonic() >= gate.spare_until
            # Calls are being made on a spare that runs low or is about to
            # lapse: the next one is asked for while they go on using it.
            refill = gate.made > 0 and gate.tokens > 0 and (
                gate.refill or time.monotonic() >= gate.spare_until - gate.refill_ahead
            )
            gate.refill = False
            if not (wanted or gate.returned or lapsed or refill or gate.waits_started or gate.waits_ended or first):
                retry_in = self._spare_timer(gate)
                continue
            if gate.name not in self._gated:
                # Limits and hold were lifted: let everything through. Calls
                # admitted under the limits still give their capacity back.
                gate.rank(gate.unranked, {})
                gate.unranked = []
                self._admit(gate, wanted, counted=False)
                retry_in = None
                if not (gate.returned or gate.slots_free or gate.waits_ended):
                    continue
                wanted = 0
            # Spare slots go back with the calls that ended; unused tokens
            # lapse. But for a refill with no call waiting: calls meanwhile go
            # on using what is left of the spare (its slots, its tokens, until
            # the grant replaces them).
            kept = min(gate.slots_free, gate.tokens) if refill and not wanted and not lapsed else 0
            returned, gate.returned = gate.returned + gate.slots_free - kept, 0
            gate.slots_free = kept
            if not kept:
                gate.tokens = 0
            # None asked for when no call came since the last exchange: an
            # idle gate then stops exchanging.
            demand = gate.made + wanted
            spare = 0
            if demand and gate.name in self._gated:
                spare = min(_MAX_SPARE, max(_MIN_SPARE, _SPARE_PER_CALL_MADE * demand))
            gate.made = 0
            started, ended = list(gate.waits_started.values()), list(gate.waits_ended)
            gate.waits_started, gate.waits_ended = {}, set()
            ranking, gate.unranked = gate.unranked, []
            now = self._clock.now()
            try:
                if first:
                    # Whatever this replica's earlier run counted is gone with it.
                    await self._store.exchange_capacity(
                        gate.name, self._replica, returned=2**31, wanted=0, now=now,
                        lease_until=now + self._lease_seconds,
                    )
                    first = False
                grant = await self._store.exchange_capacity(
                    gate.name, self._replica, returned=returned, wanted=wanted, now=now,
                    lease_until=now + self._lease_seconds, waits_started=started, waits_ended=ended,
                    priorities_of=[waiting.call.saga_id for waiting in ranking if not waiting.admitted.done()],
                    spare=spare,
                )
            except StoreUnavailable as error:
                log.debug("participant %s: capacity not exchanged (%s)", gate.name, error)
                gate.returned += returned
                gate.waits_started.update({(wait.saga_id, wait.step_name): wait for wait in started})
                gate.waits_ended.update(ended)
                gate.unranked = ranking + gate.unranked
                retry_in = _UNAVAILABLE_RETRY_SECONDS
                continue
            gate.rank(ranking, grant.priorities)
            # Calls that ended during the exchange gave their slots to
            # slots_free already; the tokens kept for a refill lapse now.
            gate.slots_free += grant.spare
            gate.tokens = grant.spare
            gate.spare_until = time.monotonic() + grant.spare_seconds
            gate.refill_below = grant.spare // _REFILL_SHARE
            gate.refill_ahead = min(_REFILL_AHEAD_SECONDS, grant.spare_seconds / _REFILL_SHARE)
            gate.returned += self._admit(gate, grant.granted, counted=True)
            if not gate.waiting:
                # Calls that came during the exchange go on the new spare, in turn.
                while gate.unranked:
                    waiting = gate.unranked[0]
                    if not waiting.admitted.done():
                        if not gate.take_spare(their_turn=True):
                            break
                        waiting.admitted.set_result(True)
                    gate.unranked.pop(0)
            still = gate.waiting.live()
            for waiting in still if grant.why_not else ():
                if not waiting.recorded:
                    waiting.recorded = True
                    key = (waiting.call.saga_id, waiting.call.step_name)
                    gate.waits_ended.discard(key)
                    gate.waits_started[key] = CapacityWait(*key, gate.name, grant.why_not, waiting.since)
            if gate.returned:
                retry_in = 0.0
            elif still and grant.why_not:
                retry_in = grant.retry_after if grant.retry_after is not None else (
                    _HELD_RETRY_SECONDS if grant.held else _RETRY_SECONDS
                )
            else:
                retry_in = 0.0 if still else None
            if gate.waits_started or gate.waits_ended:
                retry_in = min(retry_in, _RETRY_SECONDS) if retry_in is not None else _RETRY_SECONDS
            spare_timer = self._spare_timer(gate)
            if spare_timer is not None:
                retry_in = min(retry_in, spare_timer) if retry_in is not None else spare_timer

    @staticmethod
    def _spare_timer(gate: _Gate) -> float | None:
        """When the gate must look at its spare again: shortly before it lapses
        while calls use it (a refill), when it lapses otherwise (its slots go
        back); None when it holds none."""
        if not gate.slots_free:
            return None
        ahead = gate.refill_ahead if gate.made and gate.tokens else 0.0
        return max(0.0, gate.spare_until - ahead - time.monotonic())

    def _admit(self, gate: _Gate, granted: int, *, counted: bool) -> int:
        """Hands `granted` calls' capacity to the best waiting calls; how
        many were left over (their callers gave up meanwhile)."""
        left_over = granted
        while left_over and (waiting := gate.waiting.pop()) is not None:
            waiting.admitted.set_result(counted)
            self._stop_waiting(gate, waiting)
            left_over -= 1
        return left_over
