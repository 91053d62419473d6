"""The store interface the engine and the API depend on."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from compensa.orchestrator.shared.records import LogEvent, SagaRecord
from compensa.orchestrator.shared.selection import SagaSelection
from compensa.v1 import definition_pb2


@dataclass(frozen=True)
class StoredEvent:
    """A log entry as read back, with its saga and global position."""

    saga_id: str
    definition_name: str
    position: int
    event: LogEvent


@dataclass(frozen=True)
class LogPage:
    """One read of the global log."""

    events: list[StoredEvent]
    #: Every event that will ever have a position below this one has been
    #: read (it is in `events`, or at or before the read's `after_position`):
    #: a reader that resumes from here misses nothing.
    horizon: int
    #: Committed events past `horizon` were not read because a transaction
    #: that began before them is still open (PostgreSQL): read again soon.
    held_back: bool = False


@dataclass(frozen=True)
class LogHoldup:
    """What keeps the global log's readers from its newest events: the
    oldest open transaction that writes (any of the database's, not only
    Compensa's), while committed events wait behind it."""

    #: The transaction's id (xid8), the same for every replica that looks.
    transaction: int
    #: Who holds it, as PostgreSQL tells (pid, user, application, state, how
    #: long open), or why it cannot ("a prepared transaction", "not visible").
    holder: str


@dataclass(frozen=True)
class DefinitionChange:
    """A version of a definition became the latest: "registered" or "promoted"."""

    name: str
    version: int
    kind: str
    actor: str
    changed_at: float


@dataclass(frozen=True)
class SagaWrite:
    """One transition to persist, guarded by the saga's sequence (and epoch).

    `epoch` None means an operator write that takes the saga over: it bumps
    the epoch and makes `owner` the owner. `release` gives the saga up until
    `due_at` (a wait with nothing in flight), so no replica holds it in memory.
    """

    saga: SagaRecord
    events: tuple[LogEvent, ...]
    expected_sequence: int
    owner: str
    epoch: int | None
    release: bool
    due_at: float | None
    lease_until: float
    changed_steps: tuple[str, ...]
    # Set for the first write of a new saga: it inserts instead of updating,
    # and lands only if the id is free.
    request_fingerprint: str | None = None


@dataclass(frozen=True)
class SagaMove:
    """A saga moved to another version of its definition: its row (the new
    version and sequence) and every step rewritten (renamed, added, in the
    new version's order) with the move's event, guarded by the sequence and
    by no replica holding the saga. It stays released, due at `due_at`; its
    epoch is bumped, which fences any driver that still thinks it holds it."""

    saga: SagaRecord
    event: LogEvent
    expected_sequence: int
    due_at: float | None


@dataclass(frozen=True)
class WriteResult:
    """Whether a guarded write landed, and the epoch the writer now holds."""

    ok: bool
    epoch: int = 0
    positions: tuple[int, ...] = ()
    #: When known: every event ever to have a lower position than this
    #: write's transaction's is at or below this one (0: there is none).
    preceded_by: int | None = None


@dataclass(frozen=True)
class Claimed:
    """A saga claimed by the scheduler, at the epoch the claim gave it.

    When another replica held the saga (its lease had expired), `taken_from`
    names it and `events` is the TAKEN_OVER entry written with the claim.
    """

    saga: SagaRecord
    epoch: int
    taken_from: str | None = None
    events: tuple[StoredEvent, ...] = ()


@dataclass(frozen=True)
class StateSummary:
    """The sagas of one definition in one state (SummarizeSagas)."""

    definition_name: str
    state: int
    count: int
    stuck: int
    unresolved: int
    oldest_updated_at: float


@dataclass(frozen=True)
class ParticipantLimits:
    """A participant's limits for the whole deployment (None: no limit)."""

    max_in_flight: int | None = None
    rate_per_second: float | None = None
    #: Calls the rate lets through at once after a quiet spell (with a rate only).
    burst: int | None = None

    @property
    def limited(self) -> bool:
        return self.max_in_flight is not None or self.rate_per_second is not None


@dataclass(frozen=True)
class ParticipantHold:
    """An operator's hold: no new calls to the participant until released."""

    reason: str
    by: str
    at: float


@dataclass(frozen=True)
class CapacityGrant:
    """What one exchange with the shared budget gave a replica."""

    granted: int
    #: Why the rest still wait ("" when all were granted).
    why_not: str = ""
    #: The participant is held: nothing is granted until it is released.
    held: bool = False
    #: The priorities of the sagas asked about that have one stored (the
    #: others have the default).
    priorities: Mapping[str, int] = field(default_factory=dict)
    #: Seconds until the rate lets the next call through (None: it is a
    #: call in flight ending, or the hold's release, that lets one through).
    retry_after: float | None = None
    #: Calls granted beyond `granted`, for the replica to make without
    #: asking again: slots counted as its own and tokens taken from the
    #: bucket, given only while the limits are far from reached.
    spare: int = 0
    #: How long the replica may hold them.
    spare_seconds: float = 0.0


@dataclass(frozen=True)
class CapacityWait:
    """A call held back by a participant's limit or hold."""

    saga_id: str
    step_name: str
    participant: str
    reason: str
    since: float


#: StartSaga's default priority (1 highest to 5).
DEFAULT_PRIORITY = 3


@dataclass(frozen=True)
class SagaFlow:
    """A saga's priority and concurrency key, and what it waits for now."""

    priority: int = DEFAULT_PRIORITY
    concurrency_key: str | None = None
    #: Its calls held back for capacity (a step name each), and its wait for
    #: its key's turn (step name "").
    waits: tuple[CapacityWait, ...] = ()


#: Checks a definition being registered against the stored contracts of the
#: participants it names (serialized ParticipantContract, by participant name);
#: raises to refuse it.
DefinitionCheck = Callable[[Mapping[str, bytes]], Awaitable[None]]
#: Checks a participant's new contract against every registered version of
#: every definition naming the participant, given every other stored contract;
#: raises to refuse it. Returns None when it breaks nothing, or, for a change
#: forced though it breaks some, what it breaks: the change is then logged
#: with that and raised as a PARTICIPANT_CONTRACT_FORCED alert.
ContractCheck = Callable[
    [Sequence[definition_pb2.SagaDefinition], Mapping[str, bytes]], Awaitable[str | None]
]


@dataclass(frozen=True)
class ContractChange:
    """A participant's contract, stored with its address once `check` accepts
    it (see ContractCheck); `contract` None removes the stored one (which
    breaks no definition)."""

    service: str
    contract: bytes | None
    check: ContractCheck | None = None


@dataclass(frozen=True)
class ParticipantAddress:
    """Where a named participant is served, and who said so; with the
    deployment's shared view of its health (see participant_health.py)."""

    name: str
    address: str
    updated_at: float
    updated_by: str
    #: Since when no replica's probe has succeeded; None while one does.
    unhealthy_since: float | None = None
    #: When this outage's alert was raised; None when not alerted.
    alerted_at: float | None = None
    limits: ParticipantLimits = ParticipantLimits()
    hold: ParticipantHold | None = None


#: StoredAlert.kind values: AlertKind names without their prefix.
SAGA_ALERT = "SAGA"
PARTICIPANT_UNHEALTHY = "PARTICIPANT_UNHEALTHY"
PARTICIPANT_RECOVERED = "PARTICIPANT_RECOVERED"
AUDIT_ALERT = "AUDIT"
CONTRACT_FORCED = "PARTICIPANT_CONTRACT_FORCED"
LOG_HELD_BACK = "EVENT_LOG_HELD_BACK"


@dataclass(frozen=True)
class StoredAlert:
    """An entry of the alert log."""

    position: int  # in the alert log
    kind: str
    raised_at: float
    message: str
    saga_id: str = ""
    sequence: int = 0  # of the saga's ALERT_RAISED event
    event_position: int = 0  # of that event in the saga log
    definition_name: str = ""
    step_name: str = ""
    participant: str = ""
    address: str = ""

    @property
    def alert_id(self) -> str:
        """Stable across deliveries: `<saga_id>/<sequence>` (a saga id has no
        '/'), `audit/<position>`, `log/<position>`, or `participant/<name>/<position>`."""
        if self.kind == SAGA_ALERT:
            return f"{self.saga_id}/{self.sequence}"
        if self.kind == AUDIT_ALERT:
            return f"audit/{self.position}"
        if self.kind == LOG_HELD_BACK:
            return f"log/{self.position}"
        return f"participant/{self.participant}/{self.position}"


@dataclass(frozen=True)
class PendingAlert:
    """An alert in the outbox, claimed for one delivery attempt."""

    alert: StoredAlert
    #: Delivery attempts so far, this one included.
    attempts: int
    #: The saga's trace context (None: no saga, or untraced).
    trace_parent: str | None


@dataclass(frozen=True)
class BulkJob:
    """A bulk action as stored (see BulkAction in bulk.proto); `kind`,
    `state` and the outcomes are the proto's enum values."""

    bulk_action_id: str
    kind: int
    filter: str
    selection: bytes  # serialized SagaFilter
    definition_name: str
    note: str
    started_by: str
    state: int
    max_per_second: float
    created_at: float
    updated_at: float
    selected: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    owner: str | None = None
    lease_until: float | None = None
    epoch: int = 0
    #: MOVE: the version the sagas move to, and the steps renamed on the way
    #: (a JSON list of [old, new] pairs; see `renames`).
    to_version: int = 0
    step_mappings: str = ""

    @property
    def renames(self) -> dict[str, str]:
        """MOVE's step mappings, old name -> new name."""
        return {old: new for old, new in json.loads(self.step_mappings)} if self.step_mappings else {}

    @property
    def pending(self) -> int:
        return self.selected - self.done - self.skipped - self.failed


@dataclass(frozen=True)
class BulkItem:
    """One saga a bulk action selected, at the sequence it had then."""

    saga_id: str
    selected_sequence: int
    outcome: int
    reason: str = ""
    acted_at: float | None = None


#: What a batch of a bulk action does with its items: (saga id, outcome,
#: reason) of those it settled (an item left out stays pending), and the time.
BulkBatchAction = Callable[[list[BulkItem]], Awaitable[tuple[Sequence[tuple[str, int, str]], float]]]


@dataclass(frozen=True)
class AuditProgress:
    """Where a participant's audit stands: every saga created up to `clean_through`
    ((created_at, saga_id), in creation order) is final and audited clean."""

    participant: str
    clean_through: tuple[float, str]
    #: When the run that got there ran (the database's clock).
    audited_at: float
    #: The purge watermark last sent (the participant's clock), if any.
    purge_before: float | None = None


#: An audit job's states (compensa_audit_jobs.state).
AUDIT_JOB_RUNNING = 1
AUDIT_JOB_COMPLETED = 2


@dataclass(frozen=True)
class AuditJob:
    """An audit run as a durable job, leased like a bulk action (auditor.py)."""

    audit_id: str
    request: bytes  # serialized AuditSagasRequest
    started_by: str
    state: int
    #: The run's start (the database's clock): it audits the sagas created before.
    began: float
    created_at: float
    updated_at: float
    #: Serialized AuditSagasResponse: the participants done so far (all, once COMPLETED).
    report: bytes = b""
    #: JSON: where the participant in progress stands ("" : none yet).
    cursor: str = ""
    owner: str | None = None
    lease_until: float | None = None
    epoch: int = 0


@dataclass(frozen=True)
class AuditFinding:
    """A discrepancy an audit found between the log and a participant's rows."""

    participant: str
    saga_id: str
    step_name: str
    kind: str
    message: str
    definition_name: str = ""
    address: str = ""


@dataclass(frozen=True)
class RecordedAuditFinding:
    """A discrepancy as recorded: when an audit first found it, and the
    position of its AUDIT alert in the alert log."""

    participant: str
    saga_id: str
    step_name: str
    kind: str
    message: str
    found_at: float
    alert_position: int


#: Told the outcome of a database wait and when it began (time.monotonic()):
#: None when the database answered, a DatabaseRefusesWrites when it answered
#: but refused to write, the error when it could not be reached.
ReachabilityListener = Callable[[BaseException | None, float], None]


class SagaStore(abc.ABC):
    """Durable state of sagas, definitions and the event log.

    Every method is one transaction. Implementations keep all SQL, bound
    every wait on the database, and tell `subscribe_reachability` listeners
    whether it answered.
    """

    _reachability_listeners: tuple[ReachabilityListener, ...] = ()

    def tolerating_lag(self) -> contextlib.AbstractContextManager[None]:
        """Within the block, the reads marked lag-tolerant (`lag_tolerant`
        in standby.py) may be answered by a read database: a streaming standby
        at most its lag bound behind the primary (`serve --read-db`), never
        older than a read before it in the same block. Other calls, writes
        among them, go to the primary as always. The default, for a store
        without a read database, changes nothing.

        Only for what a person or a client looks at (lists, counts, the
        history a watch stream replays), never for what a caller acts on.
        The block must not span a `yield` (a context variable carries it)."""
        return contextlib.nullcontext()

    def check_read_database(self) -> None:
        """Starts checking the read database's lag in the background, if there
        is one (else does nothing); from a running event loop. Otherwise the
        checks start with the first `tolerating_lag` block."""
        return None

    def read_database_status(self) -> tuple[bool, float] | None:
        """Whether `tolerating_lag` reads go to the read database now, and its
        lag last measured in seconds (NaN: unknown); None without one."""
        return None

    def subscribe_reachability(self, listener: ReachabilityListener) -> None:
        """Calls `listener` after every database wait: with None when the
        database answered, with a DatabaseRefusesWrites when it refused to
        write, with the error when it could not be reached (not for other
        errors the database itself answered, nor for a wait for a pooled
        connection that others held: that says nothing of the database)."""
        self._reachability_listeners += (listener,)

    def _reached(self, error: BaseException | None, began: float) -> None:
        for listener in self._reachability_listeners:
            listener(error, began)

    @abc.abstractmethod
    async def ensure_schema(self) -> None:
        """What every start-up does: creates the schema in an empty database,
        accepts one at this release's revision, and raises SchemaMismatch
        for any other. Replicas starting together take turns."""

    @abc.abstractmethod
    async def upgrade_schema(self) -> tuple[str | None, str]:
        """Upgrades the schema from any earlier revision to this release's
        (`compensa migrate`); the revisions before and after (None: empty)."""

    @abc.abstractmethod
    async def has_schema(self) -> bool:
        """Whether the tables exist (commands other than serve and migrate
        must not create them in a database they were pointed at by mistake)."""

    @abc.abstractmethod
    async def secret(self, name: str) -> bytes:
        """The deployment's secret `name`: 32 random bytes made on first use,
        the same for every replica and across restarts."""

    @abc.abstractmethod
    async def clock(self) -> float:
        """The database's wall clock, in seconds since the epoch: the time
        base every replica reads leases and due times on."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raises StoreUnavailable unless the database answers."""

    @abc.abstractmethod
    async def probe_writes(self) -> None:
        """Raises DatabaseRefusesWrites (or StoreUnavailable) unless the
        database takes a write now; leaves nothing behind."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Closes every connection; the store is not used afterwards."""

    # Definitions

    @abc.abstractmethod
    async def register_definition(
        self, definition: definition_pb2.SagaDefinition, fingerprint: str, now: float, *, actor: str = "",
        check: DefinitionCheck | None = None,
    ) -> tuple[definition_pb2.SagaDefinition, bool]:
        """Stores a new version, the latest from now on (recorded with
        `actor`), unless identical content exists (then nothing changes);
        returns the stored definition (with its version) and whether it was created.

        With `check`, in the same transaction and first, awaits `check` with
        the stored contracts of the participants the definition names, which
        no one can change until the definition is stored (or refused): what
        `check` raises refuses the definition, and nothing is written."""

    @abc.abstractmethod
    async def definition_fingerprints(self, name: str) -> dict[str, int]:
        """The versions of a definition by their content's fingerprint."""

    @abc.abstractmethod
    async def promote_definition(
        self, name: str, version: int, *, actor: str, now: float
    ) -> tuple[definition_pb2.SagaDefinition, bool] | None:
        """Makes a version the latest (recorded with `actor` unless it already
        was); the version and whether that changed anything, None if unknown."""

    @abc.abstractmethod
    async def definition_history(self, name: str) -> list[DefinitionChange]:
        """Who made which version of `name` the latest, oldest first."""

    @abc.abstractmethod
    async def get_definition(self, name: str, version: int = 0) -> definition_pb2.SagaDefinition | None:
        """A version of a definition; 0 means the latest."""

    @abc.abstractmethod
    async def list_definitions(
        self, page_size: int, after_name: str
    ) -> list[definition_pb2.SagaDefinition]:
        """Latest version of each definition, by name, after `after_name`."""

    @abc.abstractmethod
    async def definition_participants(self) -> dict[str, frozenset[str]]:
        """The participants each definition's steps name, over all its versions."""

    # Participants

    @abc.abstractmethod
    async def set_participant(
        self, name: str, address: str, *, updated_by: str, now: float, contract: ContractChange | None = None
    ) -> ParticipantAddress:
        """Stores (or changes) where participant `name` is served, and with
        `contract` its contract, in one transaction. The contract's check is
        awaited first in that transaction, with every registered definition
        naming `name` and every other stored contract, none of which can
        change until the transaction ends: what it raises refuses the
        change, and nothing is written. What a forced change breaks (the
        check's answer) is logged as a change by `updated_by` and raised as
        a PARTICIPANT_CONTRACT_FORCED alert, in the same transaction."""

    @abc.abstractmethod
    async def list_participants(self) -> list[ParticipantAddress]:
        """Every stored participant address, by name."""

    # Flow control: participants' limits and holds, shared by replicas

    @abc.abstractmethod
    async def set_participant_limits(
        self, name: str, limits: ParticipantLimits, *, updated_by: str, now: float
    ) -> ParticipantAddress | None:
        """Sets the limits of participant `name` (a fresh token bucket, full),
        logged as a change; None when there is no such participant."""

    @abc.abstractmethod
    async def hold_participant(
        self, name: str, *, reason: str | None, by: str, now: float
    ) -> ParticipantAddress | None:
        """Holds participant `name` for `reason` (None: releases it), logged
        as a change by `by`; None when there is no such participant."""

    @abc.abstractmethod
    async def exchange_capacity(
        self, participant: str, replica: str, *, returned: int, wanted: int, now: float, lease_until: float,
        waits_started: Sequence[CapacityWait] = (), waits_ended: Sequence[tuple[str, str]] = (),
        priorities_of: Sequence[str] = (), spare: int = 0,
    ) -> CapacityGrant:
        """In one transaction: gives back `returned` calls of `replica` that
        ended (or that it held spare), takes up to `wanted` new ones within
        the participant's limits and hold (counting other replicas' calls
        while their lease holds) and, when all are granted and the limits
        are far from reached, up to `spare` more, records which of
        `replica`'s calls started or stopped waiting, and reads the
        priorities of the sagas `priorities_of`."""

    @abc.abstractmethod
    async def renew_capacity(self, replica: str, lease_until: float) -> None:
        """Extends the lease on `replica`'s calls in flight to every participant."""

    @abc.abstractmethod
    async def forget_capacity(self, replica: str) -> None:
        """`replica` has no call in flight and none waiting (it starts, or stops)."""

    @abc.abstractmethod
    async def record_saga_flow(
        self, saga_id: str, definition_name: str, *, concurrency_key: str | None, priority: int, now: float
    ) -> None:
        """Stores a saga's priority and concurrency key, before the saga is
        created (a repeated StartSaga keeps the first)."""

    @abc.abstractmethod
    async def flow_of(self, saga_id: str, *, with_waits: bool = True) -> SagaFlow:
        """The saga's priority and key (the defaults when none was stored),
        and what it waits for now: its calls held back by the replica that
        drives it, and its key's turn."""

    @abc.abstractmethod
    async def take_key_turn(
        self, saga_id: str, max_running: int, *, owner: str, epoch: int, now: float, retry_seconds: float
    ) -> float | None:
        """Whether `saga_id` may run now: None when fewer than `max_running`
        unfinished sagas with the same definition and concurrency key were
        started before it (its recorded wait, if any, is removed). Else, in
        the same transaction, the saga is released by `owner` (at `epoch`)
        until the time returned, `retry_seconds` from now for each saga
        beyond its turn (at most ten), and its wait is recorded for its view."""

    @abc.abstractmethod
    async def participant_contracts(self) -> dict[str, bytes]:
        """Every stored contract (serialized ParticipantContract), by participant name."""

    # Sagas

    @abc.abstractmethod
    async def load_saga(self, saga_id: str) -> SagaRecord | None:
        """The saga with its steps; None if there is no such saga."""

    @abc.abstractmethod
    async def load_start(self, saga_id: str) -> tuple[SagaRecord, str] | None:
        """The saga and the fingerprint of the StartSaga request that made it."""

    @abc.abstractmethod
    async def load_with_owner(self, saga_id: str) -> tuple[SagaRecord, str | None, float | None] | None:
        """The saga with the replica that holds it and its lease's end (None,
        None when released), read together; None if there is no such saga."""

    @abc.abstractmethod
    async def load_many_with_owner(
        self, saga_ids: Sequence[str]
    ) -> dict[str, tuple[SagaRecord, str | None, float | None]]:
        """`load_with_owner` of many sagas in one transaction, by id (an id
        with no saga is left out)."""

    @abc.abstractmethod
    async def move_sagas(self, moves: Sequence[SagaMove]) -> list[StoredEvent | None]:
        """Writes the moves in one transaction, each only if its saga is at
        its `expected_sequence` and no replica holds it; for each, its event
        as logged, or None (nothing of it written) when that guard failed."""

    @abc.abstractmethod
    async def read_saga_logs(self, saga_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        """The whole log of each of these sagas, by sequence, in one
        transaction (an id with no events is left out)."""

    @abc.abstractmethod
    async def load_owned(self, saga_id: str, owner: str, epoch: int) -> SagaRecord | None:
        """The saga if `owner` still holds it at `epoch`, else None."""

    @abc.abstractmethod
    async def commit(self, writes: Sequence[SagaWrite]) -> list[WriteResult]:
        """Persists many transitions in one transaction (group commit).

        Each write lands only if its guard holds; the others are skipped. A
        write with a `request_fingerprint` creates its saga, and lands only if
        the id is free. The events of the writes that land take the next
        positions of the log, in the order of `writes`; ALERT_RAISED events
        put their alert in the outbox in the same transaction.
        Raises RejectedWrite, having written nothing, when the database refuses
        a value of some write (StoreUnavailable when it cannot be reached).
        """

    def commit_groups(self, writes: Sequence[SagaWrite]) -> list[list[int]]:
        """The indexes of `writes` by the transaction `commit` would put them
        in: each group lands, or fails, apart from the others, so a group
        commit is best made one `commit` per group. One group, unless the
        sagas are spread over several databases."""
        return [list(range(len(writes)))]

    @abc.abstractmethod
    async def claim_due(self, owner: str, now: float, lease_until: float, limit: int) -> list[Claimed]:
        """Takes over sagas that are due and not held under a live lease. A
        saga another replica held (its lease expired) gets a TAKEN_OVER event
        in the same transaction, saying from whom and why."""

    @abc.abstractmethod
    async def renew_leases(self, owner: str, saga_ids: Sequence[str], lease_until: float) -> int:
        """Extends `owner`'s lease on these sagas (those it still holds)."""

    @abc.abstractmethod
    async def release_all(self, owner: str, now: float) -> None:
        """Gives up every saga `owner` holds (clean shutdown)."""

    @abc.abstractmethod
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
        """Sagas newest first, filtered; `after` is (created_at, saga_id) of
        the last saga of the previous page; `id_contains` keeps sagas whose
        id contains that text (a search, with the database's LIKE rules);
        `selection` keeps those a bulk-action filter selects at `now`."""

    @abc.abstractmethod
    async def purge_finished(self, *, finished_before: float, limit: int) -> int:
        """Deletes up to `limit` sagas that are done for good (SUCCEEDED,
        COMPENSATED, or FAILED and resolved by a person) and unchanged since
        before `finished_before`, with their steps and events; how many."""

    @abc.abstractmethod
    async def summarize_sagas(self, *, definition_name: str, stuck_before: float) -> list[StateSummary]:
        """Counts by definition and state, by definition name then state;
        unfinished sagas last changed before `stuck_before` count as stuck."""

    @abc.abstractmethod
    async def find_stuck(self, *, stuck_before: float, now: float, limit: int) -> list[SagaRecord]:
        """Unfinished sagas unchanged since before `stuck_before`, that no
        replica holds under a live lease and whose last event is not an
        ALERT_RAISED (not alerted since they last moved); oldest first."""

    # The alert log and its outbox (saga alerts are written by `commit`
    # with their ALERT_RAISED events)

    @abc.abstractmethod
    async def read_alerts(self, after_position: int, limit: int) -> list[StoredAlert]:
        """Up to `limit` alerts after `after_position`, in log order."""

    @abc.abstractmethod
    async def purge_alerts(self, *, raised_before: float, limit: int) -> int:
        """Deletes up to `limit` delivered alerts (no longer in the outbox)
        raised before `raised_before`; how many."""

    @abc.abstractmethod
    async def claim_alerts(self, now: float, claimed_until: float, limit: int) -> list[PendingAlert]:
        """Takes up to `limit` alerts due for delivery, oldest first, skipping
        those another replica is claiming; each is held until `claimed_until`
        (then due again, should this replica die while delivering it)."""

    @abc.abstractmethod
    async def alert_delivered(self, position: int) -> None:
        """Removes a delivered alert from the outbox."""

    @abc.abstractmethod
    async def alert_not_delivered(self, position: int, attempts: int, next_attempt_at: float, error: str) -> None:
        """Schedules the next attempt of an alert whose delivery failed,
        unless another replica has claimed it since (`attempts` moved on)."""

    # Participants' health: guarded updates, so that of several replicas
    # exactly one raises each alert.

    @abc.abstractmethod
    async def participant_failing(self, name: str, now: float) -> None:
        """A probe of `name` failed: its outage starts now unless one has
        started already."""

    @abc.abstractmethod
    async def alert_participant_unhealthy(
        self, name: str, *, unhealthy_before: float, now: float, message: str
    ) -> StoredAlert | None:
        """Raises the PARTICIPANT_UNHEALTHY alert of `name`'s outage if it
        started before `unhealthy_before` and nobody alerted it yet (the
        alert with its outbox row, in one transaction); the alert, or None
        when there is nothing to raise or another replica raised it."""

    @abc.abstractmethod
    async def participant_serving(self, name: str, *, now: float, message: str) -> StoredAlert | None:
        """A probe of `name` succeeded: its outage, if any, ends; one that
        was alerted raises PARTICIPANT_RECOVERED (returned; None otherwise,
        or when another replica ended it first)."""

    # Bulk actions

    @abc.abstractmethod
    async def count_selection(
        self, selection: SagaSelection, *, now: float, sample_size: int
    ) -> tuple[int, list[SagaRecord]]:
        """How many sagas `selection` selects now, and up to `sample_size` of them."""

    @abc.abstractmethod
    async def create_bulk_job(self, job: BulkJob, selection: SagaSelection) -> tuple[BulkJob | None, bool]:
        """Stores `job` with the sagas `selection` selects at `job.created_at`
        as its pending items (each at its current sequence), in one
        transaction; (the stored job, True). When the id is taken: (that
        job, False). When nothing is selected: (None, False), nothing stored."""

    @abc.abstractmethod
    async def get_bulk_job(self, bulk_action_id: str) -> BulkJob | None:
        """The job, or None."""

    @abc.abstractmethod
    async def list_bulk_jobs(self, page_size: int, after: tuple[float, str] | None) -> list[BulkJob]:
        """Jobs newest first; `after` is (created_at, id) of the previous page's last."""

    @abc.abstractmethod
    async def change_bulk_job_state(
        self, bulk_action_id: str, *, allowed_from: frozenset[int], to: int, now: float
    ) -> tuple[BulkJob | None, bool]:
        """Moves the job to state `to` if it is in one of `allowed_from`
        (guarded); (the job after, whether it moved); (None, False) if unknown.
        Leaving RUNNING gives up its lease."""

    @abc.abstractmethod
    async def claim_bulk_job(self, owner: str, now: float, lease_until: float) -> BulkJob | None:
        """Takes one RUNNING job that no replica holds under a live lease
        (oldest first), bumping its epoch; None when there is none."""

    @abc.abstractmethod
    async def renew_bulk_job(self, bulk_action_id: str, owner: str, epoch: int, lease_until: float) -> bool:
        """Extends `owner`'s lease of a RUNNING job held at `epoch`; False
        when it no longer holds it or the job is no longer RUNNING."""

    @abc.abstractmethod
    async def release_bulk_job(self, bulk_action_id: str, owner: str, epoch: int) -> None:
        """Gives up `owner`'s lease of the job, if it still holds it."""

    @abc.abstractmethod
    async def run_bulk_batch(
        self, bulk_action_id: str, owner: str, epoch: int, limit: int, act: BulkBatchAction
    ) -> int | None:
        """One batch of the job, if `owner` holds it at `epoch` and it is
        RUNNING: `act` on up to `limit` items not acted on yet (by saga id),
        then their outcomes set on the items still PENDING and counted in the
        job's counters (an item set before, by another replica, is not counted
        again). A pause, cancel or takeover of the job waits for a batch in
        flight and stops the next one: once it has returned, nothing more is
        acted on. How many items the batch had (0: none left); None when the
        job is not (or no longer) `owner`'s to run."""

    @abc.abstractmethod
    async def complete_bulk_job(self, bulk_action_id: str, owner: str, epoch: int, now: float) -> bool:
        """RUNNING -> COMPLETED if `owner` holds it at `epoch` and no item is
        pending; whether it did."""

    @abc.abstractmethod
    async def bulk_problems(self, bulk_action_id: str, limit: int) -> list[BulkItem]:
        """Up to `limit` items skipped or failed, most recent first."""

    # The audit (audit.py)

    @abc.abstractmethod
    async def sagas_in_creation_order(
        self, *, after: tuple[float, str] | None, definition_name: str, limit: int
    ) -> list[SagaRecord]:
        """Up to `limit` sagas, oldest first by (created_at, saga_id), after `after`."""

    @abc.abstractmethod
    async def load_sagas(self, saga_ids: Sequence[str]) -> list[SagaRecord]:
        """The sagas with these ids that exist, in no particular order."""

    @abc.abstractmethod
    async def audit_progress(self, participant: str) -> AuditProgress | None:
        """Where `participant`'s audit stands; None before its first clean saga."""

    @abc.abstractmethod
    async def save_audit_progress(self, progress: AuditProgress) -> None:
        """Stores where a participant's audit stands (replacing what was),
        unfenced: for tools and tests; an audit job writes with save_audit_job."""

    @abc.abstractmethod
    async def create_audit_job(self, job: AuditJob) -> tuple[AuditJob, bool]:
        """Stores `job` as RUNNING; (it, True). When its id is taken: (that
        job, False); when another audit is RUNNING: (that one, False)."""

    @abc.abstractmethod
    async def get_audit_job(self, audit_id: str) -> AuditJob | None:
        """The job, or None."""

    @abc.abstractmethod
    async def claim_audit_job(self, owner: str, now: float, lease_until: float) -> AuditJob | None:
        """Takes the RUNNING audit job if no replica holds it under a live
        lease, bumping its epoch; None when there is none to take."""

    @abc.abstractmethod
    async def renew_audit_job(self, audit_id: str, owner: str, epoch: int, lease_until: float) -> bool:
        """Extends `owner`'s lease of the RUNNING job held at `epoch`; False when it lost it."""

    @abc.abstractmethod
    async def release_audit_job(self, audit_id: str, owner: str, epoch: int) -> None:
        """Gives up `owner`'s lease of the job, if it still holds it."""

    @abc.abstractmethod
    async def save_audit_job(
        self, audit_id: str, owner: str, epoch: int, *, report: bytes, cursor: str, now: float,
        progress: AuditProgress | None = None, complete: bool = False,
    ) -> bool:
        """If `owner` still holds the RUNNING job at `epoch`: stores its report
        and cursor, and `progress` (a participant's, replacing what was), in
        one transaction; with `complete`, COMPLETED and released. Whether it
        held it (when not, nothing is written)."""

    @abc.abstractmethod
    async def record_audit_findings(self, findings: Sequence[AuditFinding], now: float) -> list[StoredAlert]:
        """Records the findings not recorded before, each with an AUDIT alert
        (and its outbox row) in the same transaction; the alerts raised."""

    @abc.abstractmethod
    async def list_audit_progress(self) -> list[AuditProgress]:
        """Where each participant's audit stands, by participant name."""

    @abc.abstractmethod
    async def list_audit_findings(self, limit: int, *, participant: str | None = None) -> list[RecordedAuditFinding]:
        """Up to `limit` recorded discrepancies (of `participant` only, when
        given; "" is a saga's own), the most recently found first."""

    @abc.abstractmethod
    async def count_audit_findings(self) -> dict[str, int]:
        """How many discrepancies are recorded, by participant ("" for sagas' own)."""

    # The event log

    @abc.abstractmethod
    async def read_saga_events(self, saga_id: str, after_sequence: int, limit: int) -> list[StoredEvent]:
        """Up to `limit` events of one saga after `after_sequence`, in order."""

    @abc.abstractmethod
    async def read_events(self, keys: Sequence[tuple[str, int]]) -> list[StoredEvent]:
        """The events at these (saga id, sequence) keys that exist, in no particular order."""

    async def read_log(
        self, after_position: int, limit: int, *, definition_name: str = "", saga_state: int = 0
    ) -> list[StoredEvent]:
        """Up to `limit` events of every saga after `after_position`, in log
        order; the filters keep the events of one definition, or those that
        left their saga in `saga_state`. An event never appears after a read
        that went past its position (see `read_log_page`)."""
        page = await self.read_log_page(
            after_position, limit, definition_name=definition_name, saga_state=saga_state
        )
        return page.events

    @abc.abstractmethod
    async def read_log_page(
        self, after_position: int, limit: int, *, definition_name: str = "", saga_state: int = 0,
        past_open_transactions: bool = False, skipping: Sequence[int] = (),
    ) -> LogPage:
        """`read_log`, with how far the read proves the log known; or, past
        open transactions, every committed event after `after_position`: the
        order of each saga's events holds there, not that of the log (a
        transaction still open may commit events below them later), and the
        horizon proves nothing. The events of the transactions whose
        positions begin at `skipping` (see `transaction_positions`) may be
        left out: the reader has them."""

    @abc.abstractmethod
    async def head_position(self) -> int:
        """A position to follow the log from "now": no event that becomes
        visible later has a position at or below it (0 when empty)."""

    def transaction_positions(self, position: int) -> range:
        """The positions the transaction that took `position` could have
        taken: the log's own commits are handed over a transaction at a time
        (the default: positions are handed out one after another)."""
        return range(position, position + 1)

    #: Whether an open transaction can hold committed events back from the
    #: log's readers (then `log_holdup` says when one does).
    log_can_be_held_back = False

    async def log_holdup(self) -> LogHoldup | None:
        """The open transaction holding committed events back from the log's
        readers, if one does (never, by default: writes are serial)."""
        return None

    async def alert_log_holdup(self, holdup: LogHoldup, *, now: float, message: str) -> StoredAlert | None:
        """Raises an EVENT_LOG_HELD_BACK alert for `holdup`, once per holding
        transaction across every replica; None when already raised."""
        raise NotImplementedError("the log is never held back here")

    async def listen(self, on_change: Callable[[list[str] | None], None], *, ignore_from: str) -> None:
        """Calls `on_change(saga_ids)` whenever another process commits events
        (None: anything may have changed, re-read everything). Runs until
        cancelled. The default, for a single-process store, never calls it."""
        await asyncio.Event().wait()
