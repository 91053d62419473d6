"""The engine: drives sagas by running the machine's decisions against the
store and the participants.

Order of effects, which is what makes a crash at any instant recoverable:
a transition is committed (state + events, guarded by sequence and epoch)
before any call it asks for is made, and a call's answer is only acted on
after it is committed. A saga that waits with nothing in flight is released
(no owner, `due_at` set) and holds no memory; the scheduler claims it when it
is due, and claims the sagas of a replica whose lease expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import any_pb2

from compensa.common.contracts import ContractService
from compensa.common.health import DatabaseLoss
from compensa.common.retry import Backoff
from compensa.common.tracing import trace_id_of
from compensa.orchestrator.definitions import (
    ContractMismatch,
    check_against_contracts,
    contract_change_breaks,
    definition_diff,
    definition_fingerprint,
    forced_contract_message,
    key_value,
    read_contract,
    stored_contract,
    validate_definition,
)
from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.alerts import AlertDelivery, database_alert_body, stuck_alert
from compensa.orchestrator.engine.auditor import AuditOptions, audit_every
from compensa.orchestrator.engine.changes import ChangeSignal
from compensa.orchestrator.engine.clock import SharedClock
from compensa.orchestrator.engine.config import EngineConfig
from compensa.orchestrator.engine.contract_reflection import read_reflected_contract
from compensa.orchestrator.engine.flow import CallWaiting, CapacityWaitExpired, FlowControl
from compensa.orchestrator.engine.participant_client import ParticipantClient
from compensa.orchestrator.engine.participant_health import ParticipantHealthWatch
from compensa.orchestrator.engine.tokens import completion_token
from compensa.orchestrator.engine.tracing import SagaTracing
from compensa.orchestrator.engine.writer import TransitionWriter
from compensa.orchestrator.shared import logs, payloads, records
from compensa.orchestrator.shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreUnavailable,
    definition_not_registered,
    quote,
    saga_not_found,
)
from compensa.orchestrator.shared.metrics import Metrics
from compensa.orchestrator.shared.timestamps import timestamp
from compensa.orchestrator.store import (
    DEFAULT_PRIORITY,
    PARTICIPANT_UNHEALTHY,
    Claimed,
    ContractChange,
    LogHoldup,
    ParticipantAddress,
    ParticipantLimits,
    SagaFlow,
    SagaStore,
    SagaWrite,
    StoredAlert,
    StoredEvent,
    WriteResult,
)
from compensa.v1 import contract_pb2, definition_pb2, participant_pb2

log = logging.getLogger("compensa.engine")

#: An unfinished saga unchanged for this long counts as stuck (SummarizeSagas'
#: default, and the compensa_sagas_stuck gauge).
DEFAULT_STUCK_SECONDS = 600.0
# A scrape waits this long for the database's counts, then goes without them.
_COUNT_TIMEOUT_SECONDS = 5.0

# How often the scheduler looks for due sagas when nothing told it sooner.
_POLL_SECONDS = 1.0
_CLAIM_BATCH = 200
_LATEST_SECONDS = 1.0
# How often the offset to the database's clock is measured again.
_CLOCK_SYNC_SECONDS = 30.0
# How often the stored participant addresses are read again: an address set
# through another replica is used by this one after at most this long.
_PARTICIPANTS_SECONDS = 1.0
# Retention: how often expired sagas are looked for (at most), and how many
# are deleted per transaction.
_PURGE_SECONDS = 60.0
# Reading a participant's contract through its server reflection: a few
# small answers from a participant that is up; SetParticipant waits for them.
_REFLECTION_SECONDS = 10.0
_PURGE_BATCH = 500
# A transition the database did not confirm is written again after these waits.
_COMMIT_BACKOFF = Backoff(initial=0.05, cap=2.0)
# A saga waiting for its concurrency key's turn asks again after this long
# (longer when it is further back in the line).
_KEY_TURN_SECONDS = 0.5
# Stuck sagas are looked for at most this often (and four times per threshold).
_STUCK_CHECK_SECONDS = 30.0
# How often a replica asks whether an open transaction holds the log back.
_HOLDUP_CHECK_SECONDS = 1.0


async def purge_finished(store: SagaStore, finished_before: float) -> int:
    """Deletes every saga done for good whose last change is older than
    `finished_before`, one batch per transaction, and the delivered alerts
    raised before then; how many sagas were deleted."""
    total = 0
    while True:
        purged = await store.purge_finished(finished_before=finished_before, limit=_PURGE_BATCH)
        total += purged
        if purged < _PURGE_BATCH:
            break
    while await store.purge_alerts(raised_before=finished_before, limit=_PURGE_BATCH) == _PURGE_BATCH:
        pass
    return total


def _external_cause(event: machine.Event) -> str:
    """Why an operator action or a step completion took a saga over."""
    match event:
        case machine.CancelRequested(actor=actor):
            return f"CancelSaga by {actor or 'an operator'}"
        case machine.RetryRequested(actor=actor):
            return f"RetrySaga by {actor or 'an operator'}"
        case machine.ResolveRequested(actor=actor):
            return f"ResolveSaga by {actor or 'an operator'}"
        case machine.RetryNowRequested(actor=actor):
            return f"a retry now by {actor or 'an operator'}"
    return f"CompleteStep of step {getattr(event, 'step', '?')!r}"


@dataclass(frozen=True)
class Registration:
    """What registering a definition did (or, validate_only, would do)."""

    definition: definition_pb2.SagaDefinition
    created: bool
    #: The latest version before, if any.
    previous: definition_pb2.SagaDefinition | None

    @property
    def diff(self) -> str:
        """What changes from the previous latest version ("" when nothing does)."""
        return definition_diff(self.previous, self.definition) if self.created else ""


@dataclass(frozen=True)
class _NotCalled:
    """A call that was never made: its deadline passed while it waited for
    the participant's capacity (not an attempt; the deadline decides)."""

    step: str


@dataclass
class _Driving:
    epoch: int
    task: asyncio.Task[None]


@dataclass(frozen=True)
class StartedSaga:
    """What a StartSaga did: the saga (new, or the one its id already named),
    the plan of its definition version, and the fingerprint of the request
    that created it (this request's own when `created`)."""

    saga: records.SagaRecord
    plan: machine.Plan
    created: bool
    fingerprint: str
    #: The new saga's priority and concurrency key (None: it existed).
    flow: SagaFlow | None = None


class SagaEngine:
    """Owns sagas through leases and drives each one in its own task."""

    def __init__(self, store: SagaStore, config: EngineConfig) -> None:
        self.store = store
        self.config = config
        self.owner = config.replica_id
        # Every time this engine writes or compares is on the database's clock.
        self.clock = SharedClock()
        self.changes = ChangeSignal()
        self.metrics = Metrics()
        self.client = ParticipantClient(
            dict(config.participants), max_message_bytes=config.max_payload_bytes * 2, tls=config.participant_tls,
            metrics=self.metrics, max_output_bytes=config.max_payload_bytes,
        )
        self.flow = FlowControl(store, self.owner, self.clock, self.metrics, config.lease_seconds)
        self.writer = TransitionWriter(store, self._committed, self.metrics, timeout=config.database_timeout)
        # None when traces are off: then no span is made and no metadata sent.
        self.tracing = SagaTracing.from_environment(self.owner)
        self.alerts = (
            AlertDelivery(store, config.alert_webhook, self.clock, self.metrics, timeout=config.alert_webhook_timeout)
            if config.alert_webhook else None
        )
        #: Told whenever this replica raised an alert (watchers of the alert
        #: log re-read it); other replicas' are heard through `changes`.
        self.alert_signal = ChangeSignal()
        self.participant_health = ParticipantHealthWatch(
            store, self.client, self.clock, self.metrics, interval=config.participant_health_seconds,
            unhealthy_after=config.alert_participant_unhealthy_seconds, on_alert=self._participant_alert_raised,
        )
        self._plans: dict[tuple[str, int], machine.Plan] = {}
        self._latest: dict[str, tuple[int, float]] = {}
        self._driving: dict[str, _Driving] = {}
        self._scheduler_wake = asyncio.Event()
        self._next_due = float("inf")
        self._tasks: list[asyncio.Task[None]] = []
        self._probes: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._token_key: bytes | None = None
        self.metrics.drive_count(lambda: self.sagas_driven)
        self.metrics.count_for_people(self._people_counts)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle

    async def load_secrets(self) -> None:
        """Reads (or makes) the deployment's key for completion tokens."""
        self._token_key = await self.store.secret("completion_token")

    async def sync_clock(self) -> None:
        """Measures this replica's offset to the database's clock."""
        await self.clock.sync(self.store.clock)
        if abs(self.clock.offset) > 1.0:
            log.warning("this machine's clock is %.3fs off the database's; using the database's", -self.clock.offset)

    async def store_participants(self, addresses: Mapping[str, str], *, updated_by: str) -> None:
        """Stores these participant addresses (a replica's --participant flags)."""
        now = self.clock.now()
        for name, address in addresses.items():
            await self.store.set_participant(name, address, updated_by=updated_by, now=now)
        await self.refresh_participants()

    async def set_participant(
        self, name: str, address: str, *, updated_by: str,
        contract: contract_pb2.ParticipantContract | None = None, clear_contract: bool = False, force: bool = False,
    ) -> ParticipantAddress:
        """Stores where `name` is served; this replica calls it there at once,
        the others within `_PARTICIPANTS_SECONDS`. With `contract`, stores it
        too once every registered definition naming `name` fits it
        (ContractMismatch otherwise, and nothing is stored), or, with `force`,
        even though some do not: the change is then logged with what it breaks
        and alerted (PARTICIPANT_CONTRACT_FORCED). The check and the write are
        one transaction, so a definition registered meanwhile is either
        checked here or checked against this contract. `clear_contract`
        removes the stored one."""
        change = None
        forced: list[str] = []
        if contract is not None:
            chosen = read_contract(name, contract)
            kept = contract_pb2.ParticipantContract(service=chosen.full_name, types=contract.types)

            async def check(
                definitions: Sequence[definition_pb2.SagaDefinition], others: Mapping[str, bytes]
            ) -> str | None:
                contracts = {other: stored_contract(other, serialized) for other, serialized in others.items()}
                contracts[name] = chosen
                breaks = contract_change_breaks(definitions, contracts)
                if not breaks:
                    return None
                if not force:
                    mismatches = "; ".join(mismatch for _, _, mismatch in breaks)
                    raise ContractMismatch(
                        f"{mismatches}; to store the contract anyway, breaking them, set it with --force"
                        " (SetParticipantRequest.force)"
                    )
                forced[:] = [forced_contract_message(name, chosen.full_name, updated_by, breaks)]
                return forced[0]

            change = ContractChange(chosen.full_name, kept.SerializeToString(), check)
        elif clear_contract:
            change = ContractChange("", None)
        stored = await self.store.set_participant(
            name, address, updated_by=updated_by, now=self.clock.now(), contract=change
        )
        if forced:
            log.warning("ALERT participant %s at %s: %s", name, address, forced[0], extra={"participant": name})
            self._alert_committed()
        await self.refresh_participants()
        return stored

    async def reflected_contract(self, address: str, *, service: str = "") -> contract_pb2.ParticipantContract:
        """The contract the participant at `address` describes through its
        server reflection (its one contract service, or `service`), asked
        over the channel its calls use; FailedPrecondition when it cannot tell."""
        return await read_reflected_contract(
            self.client.channel(address), address, service=service, timeout=_REFLECTION_SECONDS
        )

    async def participant_contracts(self) -> dict[str, ContractService]:
        """The stored contracts, by participant name."""
        stored = await self.store.participant_contracts()
        return {name: stored_contract(name, serialized) for name, serialized in stored.items()}

    async def contract_services(self) -> dict[str, str]:
        """The full name of each stored contract's service, by participant name."""
        return {name: contract.full_name for name, contract in (await self.participant_contracts()).items()}

    async def refresh_participants(self) -> list[ParticipantAddress]:
        """Reads the stored participant addresses, limits and holds, and
        calls them accordingly from now on."""
        stored = await self.store.list_participants()
        self.client.use_addresses({participant.name: participant.address for participant in stored})
        self.flow.use(stored)
        return stored

    async def limit_participant(self, name: str, limits: ParticipantLimits, *, updated_by: str) -> ParticipantAddress:
        """Sets the limits of `name` for the whole deployment; every replica
        takes its calls within them from its next call on."""
        stored = await self.store.set_participant_limits(name, limits, updated_by=updated_by, now=self.clock.now())
        return await self._participant_changed(name, stored)

    async def hold_participant(self, name: str, reason: str | None, *, by: str) -> ParticipantAddress:
        """Holds `name` (no new calls from any replica; calls in flight
        finish), or releases it when `reason` is None."""
        stored = await self.store.hold_participant(name, reason=reason, by=by, now=self.clock.now())
        return await self._participant_changed(name, stored)

    async def _participant_changed(self, name: str, stored: ParticipantAddress | None) -> ParticipantAddress:
        if stored is None:
            raise NotFound(f"participant {name!r} not found: set its address first (`compensa participants set`)")
        await self.refresh_participants()
        return stored

    def unknown_participants(self, definition: definition_pb2.SagaDefinition) -> list[str]:
        """Participants `definition` names that have no address to call."""
        names = dict.fromkeys(step.participant for step in definition.steps)
        return [name for name in names if not self.client.knows(name)]

    @property
    def sagas_driven(self) -> int:
        """Sagas this replica drives now (a call in flight or due)."""
        return len(self._driving)

    @property
    def token_key(self) -> bytes:
        if self._token_key is None:
            raise StoreUnavailable("the orchestrator is starting: its database is not reachable yet")
        return self._token_key

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.writer.start()
        self._tasks = [
            asyncio.create_task(self._schedule(), name="compensa-scheduler"),
            asyncio.create_task(self._renew_leases(), name="compensa-leases"),
            asyncio.create_task(self._sync_clock(), name="compensa-clock"),
            asyncio.create_task(self._refresh_participants(), name="compensa-participants"),
            asyncio.create_task(
                self.store.listen(self.changes.notify, ignore_from=self.owner), name="compensa-listener"
            ),
        ]
        if self.alerts is not None:
            self._tasks.append(asyncio.create_task(self.alerts.run(), name="compensa-alerts"))
        self._tasks.append(asyncio.create_task(self.participant_health.run(), name="compensa-participant-health"))
        if self.store.log_can_be_held_back:
            self._tasks.append(asyncio.create_task(self._watch_log_holdups(), name="compensa-log-holdups"))
        if self.config.alert_stuck_seconds is not None:
            self._tasks.append(
                asyncio.create_task(self._alert_stuck(self.config.alert_stuck_seconds), name="compensa-stuck")
            )
        if self.config.retention_seconds is not None:
            self._tasks.append(
                asyncio.create_task(self._purge_expired(self.config.retention_seconds), name="compensa-retention")
            )
        if self.config.audit_interval_seconds is not None:
            audits = AuditOptions(
                barrier_retention=self.config.barrier_retention_seconds, participant_tls=self.config.participant_tls,
                commit_lag=self.config.database_timeout,
            )
            self._tasks.append(asyncio.create_task(
                audit_every(self.store, audits, self.config.audit_interval_seconds), name="compensa-audit"
            ))

    def _people_counts(self) -> tuple[int, int] | None:
        """FAILED sagas nobody resolved and stuck ones, counted in the
        database; called from the metrics server's thread at each scrape."""
        loop = self._loop
        if loop is None or self._stopping:
            return None
        future = asyncio.run_coroutine_threadsafe(
            self.store.summarize_sagas(definition_name="", stuck_before=self.clock.now() - DEFAULT_STUCK_SECONDS), loop
        )
        try:
            summaries = future.result(timeout=_COUNT_TIMEOUT_SECONDS)
        except Exception as error:  # the database is away: this scrape goes without
            future.cancel()
            log.debug("metrics: cannot count sagas (%s)", error)
            return None
        return sum(summary.unresolved for summary in summaries), sum(summary.stuck for summary in summaries)

    async def stop(self) -> None:
        """Stops driving and gives up every lease so others take over at once."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        drivers = [driving.task for driving in self._driving.values()]
        for task in drivers:
            task.cancel()
        await asyncio.gather(*self._tasks, *drivers, return_exceptions=True)
        await self.flow.stop()
        await self.writer.stop()
        with contextlib.suppress(StoreUnavailable):
            await self.store.release_all(self.owner, self.clock.now())
        await self.client.close()
        if self.tracing is not None:
            self.tracing.shutdown()

    def _committed(self, landed: list[tuple[SagaWrite, WriteResult]]) -> None:
        if not landed:
            return
        for write, _ in landed:
            saga = write.saga
            for event in write.events:
                self.metrics.committed(event.type, saga.definition_name, saga.created_at, event.time)
                if event.type == records.E.EVENT_TYPE_ALERT_RAISED:
                    self._alert_raised(saga, event)
        if not self.changes.wants_committed():
            self.changes.notify([write.saga.saga_id for write, _ in landed])
            return
        events = [
            StoredEvent(write.saga.saga_id, write.saga.definition_name, position, event)
            for write, result in landed
            for event, position in zip(write.events, result.positions, strict=True)
        ]
        events.sort(key=lambda stored: stored.position)
        # One flush is one transaction per database: what precedes it is
        # told only when every database's answer agrees (one database, or a
        # partition map over several).
        preceded = {result.preceded_by for _, result in landed}
        self.changes.committed(events, preceded.pop() if len(preceded) == 1 else None)

    def _alert_raised(self, saga: records.SagaRecord, event: records.LogEvent) -> None:
        """An ALERT_RAISED event committed here (its outbox row with it)."""
        log.error(
            "ALERT saga %s: %s", saga.saga_id, event.message,
            extra={
                "saga_id": saga.saga_id, "step": event.step_name or None, "trace_id": trace_id_of(saga.trace_parent)
            },
        )
        self._alert_committed()

    def _participant_alert_raised(self, alert: StoredAlert) -> None:
        """A participant's alert committed here (with its outbox row)."""
        fields = {"participant": alert.participant, "address": alert.address}
        if alert.kind == PARTICIPANT_UNHEALTHY:
            self.metrics.participant_alert()
            log.warning("ALERT participant %s at %s: %s", alert.participant, alert.address, alert.message, extra=fields)
        else:
            log.info("ALERT participant %s at %s: %s", alert.participant, alert.address, alert.message, extra=fields)
        self._alert_committed()

    def database_lost(self, loss: DatabaseLoss) -> None:
        """This replica lost its database, or the database began refusing
        writes: counted, and the latter alerted (log, metric, webhook). That
        alert is not in the alert log, which lives in the database."""
        self.metrics.database_outage(loss.reason, alerted=loss.refuses_writes)
        if not loss.refuses_writes:
            return
        message = f"the database of orchestrator {self.owner} refuses writes ({loss.reason}): {loss.detail}"
        log.error("ALERT %s", message)
        if self.alerts is not None:
            self.alerts.send_unstored(database_alert_body(self.owner, loss.reason, message, self.clock.now()))

    def _alert_committed(self) -> None:
        if self.alerts is not None:
            self.alerts.wake()
        self.alert_signal.notify(None)

    # -- plans

    async def plan_for(self, name: str, version: int) -> machine.Plan:
        """The plan of a registered version; versions never change, so it is cached."""
        plan = await self.find_plan(name, version)
        if plan is None:
            raise NotFound(f"definition {name!r} version {version} not found")
        return plan

    async def find_plan(self, name: str, version: int = 0) -> machine.Plan | None:
        """The plan of `name` at `version`, 0 meaning the latest; None if unknown.

        Which version is the latest is remembered for `_LATEST_SECONDS`: a
        version registered through another replica is used by this one after
        at most that long (at once when registered here).
        """
        if version == 0:
            known = self._latest.get(name)
            if known is not None and known[1] > time.monotonic():
                version = known[0]
        plan = self._plans.get((name, version)) if version else None
        if plan is None:
            definition = await self.store.get_definition(name, version)
            if definition is None:
                return None
            plan = self._plans[(name, definition.version)] = machine.Plan.of(definition)
            self.metrics.know_definition(name)
            if version == 0:
                self._latest[name] = (definition.version, time.monotonic() + _LATEST_SECONDS)
        return plan

    async def register_definition(
        self, definition: definition_pb2.SagaDefinition, *, source: str, actor: str = "", validate_only: bool = False,
    ) -> Registration:
        """Validates and stores a definition, which becomes the latest version
        here at once; identical content keeps its version. `validate_only`
        checks it and tells what registering would do, storing nothing.

        Every participant it names must have an address, and fit the contract
        stored for it, if any (FAILED_PRECONDITION).
        Validation runs in a worker thread: a large definition must not hold up
        the event loop (health checks, every other request)."""
        normalized = await asyncio.to_thread(validate_definition, definition, source=source)
        normalized.version = 0
        await self.refresh_participants()
        unknown = self.unknown_participants(normalized)
        if unknown:
            names = ", ".join(repr(name) for name in unknown)
            raise FailedPrecondition(
                f"{source}: definition {normalized.name!r} names participant(s) with no address: {names}."
                f" Set one with `compensa participants set NAME HOST:PORT` (or serve --participant NAME=HOST:PORT),"
                " or write the participant as HOST:PORT"
            )
        fingerprint = definition_fingerprint(normalized)
        previous = await self.store.get_definition(normalized.name)
        if validate_only:
            check_against_contracts(normalized, await self.participant_contracts())
            versions = await self.store.definition_fingerprints(normalized.name)
            normalized.version = versions.get(fingerprint, max(versions.values(), default=0) + 1)
            return Registration(normalized, fingerprint not in versions, previous)

        async def check(stored_contracts: Mapping[str, bytes]) -> None:
            # In the store's transaction: no contract changes until the definition is written.
            contracts = {name: stored_contract(name, serialized) for name, serialized in stored_contracts.items()}
            check_against_contracts(normalized, contracts)

        stored, created = await self.store.register_definition(
            normalized, fingerprint, self.clock.now(), actor=actor, check=check
        )
        if created:
            self._latest.pop(stored.name, None)
        self.metrics.know_definition(stored.name)
        return Registration(stored, created, previous)

    async def promote_definition(
        self, name: str, version: int, *, actor: str
    ) -> tuple[definition_pb2.SagaDefinition, bool]:
        """Makes a registered version the latest again (here at once, on other
        replicas within `_LATEST_SECONDS`); whether that changed anything."""
        promoted = await self.store.promote_definition(name, version, actor=actor, now=self.clock.now())
        if promoted is None:
            raise NotFound(f"definition {name!r} has no version {version}")
        self._latest.pop(name, None)
        return promoted

    # -- writes

    def _write_for(
        self, plan: machine.Plan, transition: machine.Transition, expected: int, epoch: int | None,
        in_flight: set[str], now: float,
    ) -> SagaWrite:
        """The guarded write of a transition; it releases the saga when it
        ends or waits with nothing in flight."""
        saga = transition.saga
        if saga.is_final:
            release, due_at = True, None
        elif in_flight or machine.due_calls(plan, saga, now):
            release, due_at = False, now
        else:
            release, due_at = True, machine.wake_at(plan, saga)
        return SagaWrite(
            saga=saga,
            events=transition.events,
            expected_sequence=expected,
            owner=self.owner,
            epoch=epoch,
            release=release,
            due_at=due_at,
            lease_until=now + self.config.lease_seconds,
            changed_steps=transition.changed_steps,
        )

    def logged_outside(self, events: Sequence[StoredEvent], due_at: float | None) -> None:
        """Events of a saga written outside the writer (a move to another
        version), committed: watchers and metrics hear of them, and the
        scheduler of the released saga's next due time."""
        for stored in events:
            self.metrics.committed(stored.event.type, stored.definition_name, stored.event.time, stored.event.time)
        self.changes.committed(list(events))
        self._wake_scheduler(due_at)

    def _wake_scheduler(self, due_at: float | None) -> None:
        """Tells the scheduler a saga this replica released is due at `due_at`."""
        if due_at is not None and due_at < self._next_due:
            self._next_due = due_at
            self._scheduler_wake.set()

    # -- starting and external events

    async def start_saga(
        self,
        definition_name: str,
        definition_version: int,
        saga_id: str,
        input: any_pb2.Any,
        request_fingerprint: str,
        *,
        caller_trace_parent: str | None = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> StartedSaga:
        """Starts a saga of `definition_name` at `definition_version` (0: the
        latest) with `input`, or finds the one `saga_id` already names. NotFound
        for a definition or version not registered (saying which versions
        are); InvalidArgument for an input the definition does not take."""
        plan = await self.find_plan(definition_name, definition_version)
        if plan is None:
            raise await self.definition_not_found(definition_name, definition_version)
        definition = plan.definition
        if not input.type_url:
            raise InvalidArgument(f"input is required: a google.protobuf.Any holding a {definition.input_type}")
        size = input.ByteSize()
        if size > self.config.max_payload_bytes:
            raise InvalidArgument(f"input is {size} bytes; the limit is {self.config.max_payload_bytes} bytes")
        given = payloads.type_name_of(input)
        if given != definition.input_type:
            raise InvalidArgument(f"input must be a {definition.input_type}, got {quote(given or input.type_url)}")
        saga_input = payloads.unpack(input, payloads.pool_of(definition), field="input")
        key = key_value(definition.concurrency_key, saga_input) if definition.concurrency_key else None
        saga, created, fingerprint = await self.create(
            plan, saga_id, input.SerializeToString(deterministic=True), request_fingerprint,
            caller_trace_parent=caller_trace_parent, priority=priority, concurrency_key=key,
        )
        return StartedSaga(saga, plan, created, fingerprint, SagaFlow(priority, key) if created else None)

    async def definition_not_found(self, name: str, version: int) -> NotFound:
        """What to say when `name` at `version` (0: the latest) is not registered:
        that the name is not, or which versions of it are."""
        latest = await self.store.get_definition(name, 0) if version else None
        if latest is None:
            return definition_not_registered(name)
        versions = "1" if latest.version == 1 else f"1 to {latest.version}"
        return NotFound(
            f"definition {quote(name)} has no version {version}; its versions: {versions} (latest {latest.version})"
        )

    async def create(
        self, plan: machine.Plan, saga_id: str, input: bytes, request_fingerprint: str,
        caller_trace_parent: str | None = None, *, priority: int = DEFAULT_PRIORITY, concurrency_key: str | None = None,
    ) -> tuple[records.SagaRecord, bool, str]:
        now = self.clock.now()
        if priority != DEFAULT_PRIORITY or concurrency_key is not None:
            # Before the saga: its driver reads them (a row whose saga never
            # comes to be counts for nothing).
            await self.store.record_saga_flow(
                saga_id, plan.definition.name, concurrency_key=concurrency_key, priority=priority, now=now
            )
        transition = machine.new_saga(plan, saga_id=saga_id, input=input, now=now)
        if self.tracing is not None:
            trace_parent = self.tracing.start_saga(transition.saga, caller_trace_parent)
            traced = dataclasses.replace(transition.saga, trace_parent=trace_parent)
            transition = dataclasses.replace(transition, saga=traced)
        write = dataclasses.replace(
            self._write_for(plan, transition, 0, 1, set(), now), request_fingerprint=request_fingerprint
        )
        result = await self.writer.submit(write)
        if not result.ok:
            existing = await self.store.load_start(saga_id)
            if existing is None:
                raise StoreUnavailable(f"saga {saga_id!r} could not be created; retry")
            return existing[0], False, existing[1]
        if write.release:
            self._wake_scheduler(write.due_at)
        else:
            self._drive(transition.saga, 1, machine.newly_sending(None, transition.saga))
        return transition.saga, True, request_fingerprint

    async def apply_external(self, saga_id: str, event: machine.Event) -> records.SagaRecord:
        """Applies an operator action or a step completion, taking the saga
        over from whichever replica held it (its writes are fenced)."""
        for _ in range(20):
            applied = await self.apply_external_once(saga_id, event)
            if applied is not None:
                return applied
        raise StoreUnavailable(f"saga {saga_id!r} kept changing while applying {type(event).__name__}; retry")

    async def apply_external_once(
        self, saga_id: str, event: machine.Event, *, expected_sequence: int | None = None, reconnect: bool = True,
        loaded: tuple[records.SagaRecord, str | None, float | None] | None = None,
    ) -> records.SagaRecord | None:
        """One try of `apply_external`: the saga after it (unchanged when the
        event changes nothing), or None when the saga changed first: its
        sequence was not `expected_sequence` (when given), or moved before the
        guarded write landed. `reconnect` False keeps the participants'
        connections on a retry (a bulk action retries many sagas at once).
        `loaded` is the saga with its holder as just read (`load_with_owner`;
        a bulk action reads a batch at once), else it is read here."""
        loaded = loaded or await self.store.load_with_owner(saga_id)
        if loaded is None:
            raise saga_not_found(saga_id)
        saga, holder, lease_until = loaded
        if expected_sequence is not None and saga.sequence != expected_sequence:
            return None
        plan = await self.plan_for(saga.definition_name, saga.definition_version)
        now = self.clock.now()
        try:
            transition = machine.decide(plan, saga, event, now)
        except machine.IllegalTransition as error:
            raise FailedPrecondition(str(error)) from error
        if not transition.changed:
            return saga
        # Read with the saga, not fenced by the write: a claim of a released
        # saga in between (it bumps no sequence) goes unnamed here. The
        # write itself is fenced as always; only the log's account may lag.
        if holder is not None and holder != self.owner:
            live = lease_until is not None and lease_until > now
            lease = "its lease was live" if live else "its lease had expired"
            transition = machine.taken_over(
                saga, transition, by=self.owner, previous=holder, why=f"{_external_cause(event)} ({lease})", now=now
            )
        if reconnect and isinstance(event, machine.RetryRequested):
            await self._reconnect(plan, transition)
        if await self._take_over(plan, saga, transition, now):
            return transition.saga
        return None

    async def _reconnect(self, plan: machine.Plan, transition: machine.Transition) -> None:
        """Fresh connections to the participants an operator's retry calls
        again, and their health probed anew (in the background)."""
        participants = {plan.steps[name].participant for name in transition.changed_steps}
        await self.client.reconnect(participants)
        probe = asyncio.create_task(self._probe_now(participants), name="compensa-probe-after-retry")
        self._probes.add(probe)
        probe.add_done_callback(self._probes.discard)

    async def _probe_now(self, participants: set[str]) -> None:
        try:
            await self.participant_health.probe_now(participants)
        except StoreUnavailable as error:
            log.debug("participant health after a retry: %s", error)

    async def _take_over(
        self, plan: machine.Plan, saga: records.SagaRecord, transition: machine.Transition, now: float
    ) -> bool:
        """Writes a transition of `saga` made outside its driver (bumping the
        epoch fences whichever replica held it) and drives the saga on if it
        has calls due; whether the write landed."""
        write = self._write_for(plan, transition, saga.sequence, None, set(), now)
        result = await self.writer.submit(write)
        if result.ok:
            if not write.release:
                self._drive(transition.saga, result.epoch, machine.newly_sending(saga, transition.saga))
            else:
                self._wake_scheduler(write.due_at)
        return result.ok

    async def _alert_stuck(self, stuck_after: float) -> None:
        """Raises an alert for each saga stuck longer than `stuck_after`, once
        per stall. Only sagas nobody holds are looked at, so no driver is
        fenced; replicas racing for one alert it once (the write is guarded)."""
        while True:
            await asyncio.sleep(min(_STUCK_CHECK_SECONDS, stuck_after / 4))
            try:
                now = self.clock.now()
                for saga in await self.store.find_stuck(stuck_before=now - stuck_after, now=now, limit=_CLAIM_BATCH):
                    plan = await self.plan_for(saga.definition_name, saga.definition_version)
                    now = self.clock.now()
                    await self._take_over(plan, saga, stuck_alert(saga, now), now)
            except StoreUnavailable as error:
                log.warning("stuck sagas: %s", error)

    async def _watch_log_holdups(self) -> None:
        """Says when committed events wait behind a transaction left open
        (the log's readers stop below the oldest open one): a metric of how
        long, a log line when it passes the threshold and another when it
        ends, and an alert raised once per transaction by all replicas."""
        threshold = self.config.alert_log_held_back_seconds
        held: LogHoldup | None = None
        since, alerted = 0.0, False
        while True:
            await asyncio.sleep(_HOLDUP_CHECK_SECONDS)
            try:
                holdup = await self.store.log_holdup()
                now = self.clock.now()
                if holdup is None or (held is not None and holdup.transaction != held.transaction):
                    if held is not None and alerted:
                        log.info("the event log's readers go on: transaction %d ended", held.transaction)
                    held, alerted = None, False
                if holdup is None:
                    self.metrics.log_held_back(0.0)
                    continue
                if held is None:
                    held, since = holdup, now
                self.metrics.log_held_back(now - since)
                if threshold is None or alerted or now - since < threshold:
                    continue
                message = (
                    f"committed events have waited {now - since:.0f}s behind transaction {holdup.transaction},"
                    f" still open ({holdup.holder}): watch streams and alerts deliver nothing past it until it ends"
                )
                log.warning("the event log's readers are held back: %s", message)
                alerted = True
                if await self.store.alert_log_holdup(holdup, now=now, message=message) is not None:
                    log.error("ALERT %s", message)
                    self._alert_committed()
            except StoreUnavailable as error:
                log.debug("log holdups: %s", error)

    # -- driving

    def _claimed(self, claimed: list[Claimed]) -> None:
        """Drives what the scheduler claimed, and tells watchers and metrics
        about the takeovers it logged."""
        events = sorted((stored for item in claimed for stored in item.events), key=lambda stored: stored.position)
        if events:
            for stored in events:
                self.metrics.committed(stored.event.type, stored.definition_name, stored.event.time, stored.event.time)
            previous = sorted({item.taken_from for item in claimed if item.taken_from is not None})
            log.info("took over %d sagas whose lease expired (held by %s)", len(events), ", ".join(previous))
            self.changes.committed(events)
        for item in claimed:
            self._drive(item.saga, item.epoch, set())

    def _drive(self, saga: records.SagaRecord, epoch: int, sending: set[str]) -> None:
        """Drives `saga` in a task of its own; `sending` are the steps whose
        SENDING this engine committed itself (machine.newly_sending)."""
        if self._stopping:
            return
        previous = self._driving.get(saga.saga_id)
        if previous is not None:
            # Our own older driver lost its lease (a stall): it is fenced
            # anyway, so stop it before it makes more calls.
            previous.task.cancel()
        task = asyncio.create_task(self._run_saga(saga, epoch, sending), name=f"saga-{saga.saga_id}")
        self._driving[saga.saga_id] = _Driving(epoch, task)

    async def _run_saga(self, saga: records.SagaRecord, epoch: int, sending: set[str]) -> None:
        in_flight: dict[str, asyncio.Task[None]] = {}
        answers: asyncio.Queue[machine.StepAnswer | _NotCalled] = asyncio.Queue()
        logs.bind(saga_id=saga.saga_id, trace_id=trace_id_of(saga.trace_parent))
        try:
            plan = await self.plan_for(saga.definition_name, saga.definition_version)
            if plan.definition.concurrency_key and not await self._key_turn(plan, saga, epoch):
                return
            while True:
                now = self.clock.now()
                deadline = machine.deadline_at(plan, saga)
                event: machine.Event | None = None
                if deadline is not None and deadline <= now:
                    event = machine.TimerFired()
                elif marks := machine.executes_to_mark(saga, machine.due_calls(plan, saga, now)):
                    event = machine.AttemptsSending(marks)
                else:
                    for call in machine.due_calls(plan, saga, now):
                        if call.step not in in_flight:
                            in_flight[call.step] = asyncio.create_task(self._call(plan, saga, call, answers))
                    if not in_flight:
                        return  # final or released: the last write said so
                    later = [
                        at for at in (deadline, *(step.next_attempt_at for step in saga.steps))
                        if at is not None and at > now
                    ]
                    try:
                        # asyncio.timeout, not wait_for: no task per wait.
                        async with asyncio.timeout(min(later) - now if later else None):
                            answer = await answers.get()
                    except TimeoutError:
                        continue
                    in_flight.pop(answer.step, None)
                    if isinstance(answer, _NotCalled):
                        continue  # its deadline passed: the next turn says so
                    event = answer
                    if event.step not in sending and isinstance(event, machine.ExecuteErrored):
                        # Sent after a SENDING some other driver committed:
                        # an earlier send of that attempt may have gone out.
                        event = dataclasses.replace(event, never_delivered=False)
                    sending.discard(event.step)
                transition = machine.decide(plan, saga, event, self.clock.now())
                if not transition.changed:
                    if isinstance(event, machine.TimerFired):
                        raise AssertionError(f"deadline {deadline} passed but changed nothing")
                    continue
                write = await self._commit(plan, saga, transition, epoch, set(in_flight))
                if write is None:
                    log.info("saga %s: lost ownership (epoch %d); another replica drives it", saga.saga_id, epoch)
                    return
                sending |= machine.newly_sending(saga, write.saga)
                saga = write.saga
                if write.release:
                    # Given up in the database: from now on the scheduler
                    # hands it out, and driving on would race that.
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("saga %s: driver crashed; it will be picked up again when its lease expires", saga.saga_id)
        finally:
            for task in in_flight.values():
                task.cancel()
            current = self._driving.get(saga.saga_id)
            if current is not None and current.epoch == epoch:
                del self._driving[saga.saga_id]

    async def _key_turn(self, plan: machine.Plan, saga: records.SagaRecord, epoch: int) -> bool:
        """Whether the saga may run now among the sagas of its concurrency
        key; if not, it is released until it asks again (durably waiting)."""
        try:
            retry_at = await self.store.take_key_turn(
                saga.saga_id, plan.definition.max_running_per_key, owner=self.owner, epoch=epoch,
                now=self.clock.now(), retry_seconds=_KEY_TURN_SECONDS,
            )
        except StoreUnavailable as error:
            log.debug("saga %s: its key's turn not known (%s); asked again when its lease expires", saga.saga_id, error)
            return False
        if retry_at is None:
            return True
        self._wake_scheduler(retry_at)
        return False

    async def _commit(
        self, plan: machine.Plan, saga: records.SagaRecord, transition: machine.Transition, epoch: int,
        in_flight: set[str],
    ) -> SagaWrite | None:
        """Persists a transition, retrying while the database is away; the
        write that landed, or None when the saga is no longer ours."""
        waits = _COMMIT_BACKOFF.waits()
        while True:
            now = self.clock.now()
            write = self._write_for(plan, transition, saga.sequence, epoch, in_flight, now)
            try:
                result = await self.writer.submit(write)
            except StoreUnavailable as error:
                # Not per saga at WARNING: the database's health logs the outage once.
                delay = waits.next()
                log.debug("saga %s: store unavailable (%s); retrying in %.2fs", saga.saga_id, error, delay)
                await asyncio.sleep(delay)
                continue
            if result.ok:
                if write.release:
                    self._wake_scheduler(write.due_at)
                return write
            # The guard failed. If an earlier try of this very write landed
            # (its commit's answer was lost), the saga is still ours.
            try:
                current = await self.store.load_owned(saga.saga_id, self.owner, epoch)
            except StoreUnavailable:
                await waits.sleep()
                continue
            if current is not None and current.sequence == transition.saga.sequence:
                return write
            return None

    async def _call(
        self, plan: machine.Plan, saga: records.SagaRecord, call: machine.Call,
        answers: asyncio.Queue[machine.StepAnswer | _NotCalled],
    ) -> None:
        step = plan.steps[call.step]
        logs.bind(step=call.step, attempt=call.attempt)
        waiting = CallWaiting(saga.saga_id, call.step, saga.definition_name, saga.created_at)
        try:
            async with self.flow.admitted(step.participant, waiting, machine.deadline_at(plan, saga)) as waited:
                if waited and step.HasField("step_timeout"):
                    call = dataclasses.replace(call, timeout=max(0.001, call.timeout - waited))
                answer = await self._make_call(plan, saga, call)
        except CapacityWaitExpired:
            await answers.put(_NotCalled(call.step))
            return
        await answers.put(answer)

    async def _make_call(self, plan: machine.Plan, saga: records.SagaRecord, call: machine.Call) -> machine.StepAnswer:
        step = plan.steps[call.step]
        context = participant_pb2.StepContext(
            saga_id=saga.saga_id,
            step_name=call.step,
            # A step renamed by a move keeps the key its participant knows it by.
            idempotency_key=f"{saga.saga_id}/{saga.step(call.step).key_name}",
            attempt=call.attempt,
            definition_name=saga.definition_name,
            definition_version=saga.definition_version,
            deadline=timestamp(self.clock.now() + call.timeout),
        )
        saga_input = any_pb2.Any.FromString(saga.input)
        outputs = {
            name: any_pb2.Any.FromString(record.output)
            for name in plan.ancestors[call.step]
            if (record := saga.step(name)).output is not None
        }
        request: participant_pb2.ExecuteRequest | participant_pb2.CompensateRequest
        if isinstance(call, machine.CallExecute):
            key_name = saga.step(call.step).key_name
            token = completion_token(self.token_key, saga.saga_id, key_name) if step.long_running else ""
            request = participant_pb2.ExecuteRequest(
                context=context, saga_input=saga_input, step_outputs=outputs, completion_token=token
            )
        else:
            own = saga.step(call.step).output
            request = participant_pb2.CompensateRequest(
                context=context, saga_input=saga_input, step_outputs=outputs, reason=saga.failure_reason,
            )
            if own is not None:
                request.execute_output.CopyFrom(any_pb2.Any.FromString(own))
        if self.tracing is None or saga.trace_parent is None:
            return await self._send(step.participant, request, call.timeout, None)
        with self.tracing.call(saga, call, step.participant) as span:
            answer = await self._send(step.participant, request, call.timeout, span.metadata)
            span.answered(answer)
        return answer

    async def _send(
        self, participant: str, request: participant_pb2.ExecuteRequest | participant_pb2.CompensateRequest,
        timeout: float, metadata: tuple[tuple[str, str], ...] | None,
    ) -> machine.StepAnswer:
        if isinstance(request, participant_pb2.ExecuteRequest):
            return await self.client.execute(participant, request, timeout, metadata)
        return await self.client.compensate(participant, request, timeout, metadata)

    # -- ownership

    async def _schedule(self) -> None:
        while True:
            try:
                now = self.clock.now()
                claimed = await self.store.claim_due(
                    self.owner, now, now + self.config.lease_seconds, _CLAIM_BATCH
                )
            except StoreUnavailable as error:
                # Logged once per outage by the database's health.
                log.debug("scheduler: %s", error)
                claimed = []
            self._claimed(claimed)
            if len(claimed) == _CLAIM_BATCH:
                continue
            if self._next_due <= now:
                self._next_due = float("inf")
            self._scheduler_wake.clear()
            wait = min(_POLL_SECONDS, max(0.0, self._next_due - self.clock.now()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._scheduler_wake.wait(), wait)
            # Woken for a later due time: sleep on until then.
            while (delay := self._next_due - self.clock.now()) > 0.001 and delay < _POLL_SECONDS:
                self._scheduler_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._scheduler_wake.wait(), delay)

    async def _sync_clock(self) -> None:
        while True:
            await asyncio.sleep(_CLOCK_SYNC_SECONDS)
            try:
                await self.sync_clock()
            except StoreUnavailable as error:
                log.warning("clock sync: %s", error)

    async def _refresh_participants(self) -> None:
        while True:
            await asyncio.sleep(_PARTICIPANTS_SECONDS)
            try:
                await self.refresh_participants()
            except StoreUnavailable as error:
                log.debug("participant addresses not refreshed: %s", error)

    async def _purge_expired(self, retention: float) -> None:
        """Deletes sagas done for good longer than `retention` ago. Replicas
        may all do it: each deletes rows the others have not locked."""
        while True:
            await asyncio.sleep(min(_PURGE_SECONDS, retention / 2))
            try:
                purged = await purge_finished(self.store, self.clock.now() - retention)
                if purged:
                    log.info("retention: deleted %d finished sagas with their events", purged)
            except StoreUnavailable as error:
                log.warning("retention: %s", error)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_seconds / 3)
            # Only sagas a live driver holds: a saga whose driver died lets
            # its lease lapse and is claimed again.
            driven = list(self._driving)
            if not driven:
                continue
            try:
                await self.flow.renew(self.clock.now() + self.config.lease_seconds)
                await self.store.renew_leases(self.owner, driven, self.clock.now() + self.config.lease_seconds)
            except StoreUnavailable as error:
                log.debug("lease renewal: %s", error)
