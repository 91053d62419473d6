"""The orchestrator's tables, as SQLAlchemy Core objects: the schema the code
reads and writes. Databases get it through the revisions in migrations/
(a test checks that both agree); a change here needs a new revision.

Times are seconds since the epoch (float): the same on PostgreSQL and SQLite,
compared as plain numbers in guards and due-time queries.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from compensa.orchestrator.shared.records import DELIVERY_POSSIBLE

metadata = MetaData()

definitions = Table(
    "compensa_definitions",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("body", LargeBinary, nullable=False),  # serialized SagaDefinition
    Column("created_at", Float, nullable=False),
    # Bumped (past every other version of the name) whenever this version
    # becomes the latest, by a registration or a promotion: the latest
    # version is the one with the highest.
    Column("promotion", BigInteger, nullable=False),
    UniqueConstraint("name", "fingerprint", name="compensa_definitions_content"),
)

#: Who made which version of a definition the latest, and how (in order).
definition_changes = Table(
    "compensa_definition_changes",
    metadata,
    Column("position", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # "registered" or "promoted"
    Column("actor", String(256), nullable=False),
    Column("changed_at", Float, nullable=False),
)
Index("compensa_definition_changes_name", definition_changes.c.name, definition_changes.c.position)

sagas = Table(
    "compensa_sagas",
    metadata,
    Column("saga_id", String(128), primary_key=True),
    Column("definition_name", String(64), nullable=False),
    Column("definition_version", Integer, nullable=False),
    Column("state", Integer, nullable=False),
    # Sequence number of the latest event: every transition is guarded on it.
    Column("sequence", BigInteger, nullable=False),
    Column("input", LargeBinary, nullable=False),  # serialized google.protobuf.Any
    # Identifies the StartSaga request, so a repeat is told from a conflict.
    Column("request_fingerprint", String(64), nullable=False),
    Column("failure_reason", Text, nullable=False, default=""),
    Column("resolution_note", Text, nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # When an unowned saga next needs a replica; NULL once final.
    Column("due_at", Float, nullable=True),
    # The replica driving the saga, until lease_until; epoch is bumped on
    # every takeover and fences writes of a replica that lost the saga.
    Column("owner", String(128), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("epoch", BigInteger, nullable=False, default=1),
    # W3C traceparent of the saga's trace (NULL: not traced): whichever
    # replica drives the saga puts its spans in this one trace.
    Column("trace_parent", String(128), nullable=True),
)
Index("compensa_sagas_due", sagas.c.due_at)
Index("compensa_sagas_list", sagas.c.created_at, sagas.c.saga_id)
Index("compensa_sagas_owner", sagas.c.owner)

saga_steps = Table(
    "compensa_saga_steps",
    metadata,
    Column("saga_id", String(128), ForeignKey("compensa_sagas.saga_id"), primary_key=True),
    Column("step_name", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("state", Integer, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("compensate_attempts", Integer, nullable=False),
    Column("output", LargeBinary, nullable=True),  # serialized google.protobuf.Any
    Column("last_error", Text, nullable=False),
    Column("effect_uncertain", Boolean, nullable=False),
    # records.DELIVERY_*: whether an Execute may have reached the participant;
    # by default "possibly" (rows of releases that did not know).
    Column("delivery", Integer, nullable=False, server_default=text(str(DELIVERY_POSSIBLE))),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("next_attempt_at", Float, nullable=True),
    # The name the step's idempotency key and completion token were made
    # with, when a move to another version renamed it (NULL: its own name).
    Column("idempotency_name", String(64), nullable=True),
)

saga_events = Table(
    "compensa_saga_events",
    metadata,
    Column("saga_id", String(128), primary_key=True),
    Column("sequence", BigInteger, primary_key=True),
    # Global position: a reader past position N never misses an event that
    # commits later (SQLite: a counter in compensa_log_head, in commit order;
    # PostgreSQL: from the writing transaction's id, see store/postgres.py).
    Column("position", BigInteger, nullable=False, unique=True),
    Column("type", Integer, nullable=False),
    Column("time", Float, nullable=False),
    Column("saga_state", Integer, nullable=False),
    Column("step_name", String(64), nullable=False),
    Column("step_state", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("message", Text, nullable=False),
    Column("actor", String(256), nullable=False),
    Column("definition_name", String(64), nullable=False),
)

#: The compensa_log_head rows: the saga event log's counter, and the alert
#: log's. SQLite's only: PostgreSQL's positions need no counter (migration
#: 0015 drops the table there).
EVENT_LOG = 1
ALERT_LOG = 2

log_head = Table(
    "compensa_log_head",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("position", BigInteger, nullable=False),
)

#: Where each named participant is served; replicas read it, operators change
#: it. The health columns are the deployment's view of an outage, changed by
#: guarded updates (see participant_health.py): `unhealthy_since` is set by
#: the first failed probe after a success and cleared by any replica's
#: successful probe; `alerted_at` is set by the one replica that raised the
#: outage's alert.
participants = Table(
    "compensa_participants",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("address", String(255), nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(256), nullable=False),
    Column("unhealthy_since", Float, nullable=True),
    Column("alerted_at", Float, nullable=True),
    # Flow control (flow.py): the deployment's limits (NULL: none), the
    # token bucket of the rate limit, and an operator's hold.
    Column("max_in_flight", Integer, nullable=True),
    Column("rate_per_second", Float, nullable=True),
    Column("burst", Integer, nullable=True),
    Column("tokens", Float, nullable=True),
    Column("tokens_at", Float, nullable=True),
    Column("held_reason", Text, nullable=True),
    Column("held_by", String(256), nullable=True),
    Column("held_at", Float, nullable=True),
)

#: Calls in flight to a participant, per replica: a replica's count is
#: counted against the participant's max_in_flight while its lease holds,
#: so a replica that dies gives its share back when its lease expires.
participant_grants = Table(
    "compensa_participant_grants",
    metadata,
    Column("participant", String(64), primary_key=True),
    Column("replica", String(128), primary_key=True),
    Column("in_flight", Integer, nullable=False),
    Column("lease_until", Float, nullable=False),
)

#: Every change of a participant's limits or hold, and every contract forced
#: on it though definitions do not fit it, with who made it.
participant_changes = Table(
    "compensa_participant_changes",
    metadata,
    Column("position", Integer, primary_key=True, autoincrement=True),
    Column("participant", String(64), nullable=False),
    Column("changed_at", Float, nullable=False),
    Column("changed_by", String(256), nullable=False),
    Column("change", Text, nullable=False),
)
Index("compensa_participant_changes_name", participant_changes.c.participant, participant_changes.c.position)

#: A saga's priority and concurrency key (StartSaga), written before the
#: saga itself only when either is set: a row whose saga was never created
#: joins no saga and so counts for nothing.
saga_flow = Table(
    "compensa_saga_flow",
    metadata,
    Column("saga_id", String(128), primary_key=True),
    Column("definition_name", String(64), nullable=False),
    Column("concurrency_key", String(255), nullable=True),
    Column("priority", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
)
Index("compensa_saga_flow_key", saga_flow.c.definition_name, saga_flow.c.concurrency_key, saga_flow.c.created_at)

#: Calls held back by a participant's limit or hold, and sagas waiting for
#: their key's turn (step_name "", owner ""),, for the saga's view:
#: shown while `owner` still drives the saga.
capacity_waits = Table(
    "compensa_capacity_waits",
    metadata,
    Column("saga_id", String(128), primary_key=True),
    Column("step_name", String(64), primary_key=True),
    Column("participant", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("since", Float, nullable=False),
    Column("owner", String(128), nullable=False),
)

#: Each participant's contract, when one is stored: a serialized
#: compensa.v1.ParticipantContract, checked against the definitions naming it.
participant_contracts = Table(
    "compensa_participant_contracts",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("service", String(255), nullable=False),
    Column("contract", LargeBinary, nullable=False),
    Column("updated_at", Float, nullable=False),
)

#: The alert log: every alert, of sagas (written with their ALERT_RAISED
#: event) and of participants, at a position taken as the event log's are
#: (a reader past N misses no later commit). `kind` is an AlertKind's name without its prefix (SAGA,
#: PARTICIPANT_UNHEALTHY, PARTICIPANT_RECOVERED, AUDIT, PARTICIPANT_CONTRACT_FORCED,
#: EVENT_LOG_HELD_BACK).
alerts = Table(
    "compensa_alerts",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(32), nullable=False),
    Column("raised_at", Float, nullable=False),
    Column("message", Text, nullable=False),
    Column("saga_id", String(128), nullable=False),
    Column("sequence", BigInteger, nullable=False),  # of the ALERT_RAISED event (0: none)
    Column("event_position", BigInteger, nullable=False),  # of that event in the saga log (0: none)
    Column("definition_name", String(64), nullable=False),
    Column("step_name", String(64), nullable=False),
    Column("participant", String(64), nullable=False),
    Column("address", String(255), nullable=False),
)
Index("compensa_alerts_raised", alerts.c.raised_at)
Index("compensa_alerts_saga", alerts.c.saga_id)

#: Open transactions that held the event log's readers back long enough to
#: be alerted (PostgreSQL): a row per transaction, so that every replica
#: that sees it raises the alert once between them.
log_holdups = Table(
    "compensa_log_holdups",
    metadata,
    Column("transaction", BigInteger, primary_key=True, autoincrement=False),
    Column("holder", Text, nullable=False),
    Column("alerted_at", Float, nullable=False),
)

#: Where each virtual partition of the sagas lives (a partitioned deployment:
#: docs/partitions.md), by the id the database gave itself; made at the first
#: start, and only in the home database.
partition_map = Table(
    "compensa_partition_map",
    metadata,
    Column("partition_no", Integer, primary_key=True, autoincrement=False),
    Column("database_id", String(64), nullable=False),
    # Bumped by every move of the partition (docs/partitions.md).
    Column("epoch", Integer, nullable=False, server_default="0"),
)

#: Alerts to deliver to the webhook: one row per alert of the log, written
#: in the transaction that writes the alert, deleted once delivered. A
#: replica claims a row by moving `next_attempt_at` past the delivery's
#: timeout, so a replica killed while delivering leaves it to another.
alert_outbox = Table(
    "compensa_alert_outbox",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),  # the alert's
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_error", Text, nullable=False),
)
Index("compensa_alert_outbox_due", alert_outbox.c.next_attempt_at)

#: Keys the replicas of one deployment share, each made at random on first use.
secrets = Table(
    "compensa_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

#: Bulk actions: durable jobs that apply one action to the sagas a filter
#: selected. A replica works on a job while it holds its lease (`owner`,
#: `lease_until`, and `epoch` bumped on every claim), as with sagas; the
#: counters move with the outcomes of its items.
bulk_actions = Table(
    "compensa_bulk_actions",
    metadata,
    Column("bulk_action_id", String(64), primary_key=True),
    Column("kind", Integer, nullable=False),  # a BulkActionKind
    Column("filter", Text, nullable=False),
    Column("selection", LargeBinary, nullable=False),  # serialized SagaFilter
    # The definition the filter names ("": any); scoped callers see only theirs.
    Column("definition_name", String(64), nullable=False),
    Column("note", Text, nullable=False),
    Column("started_by", String(256), nullable=False),
    Column("state", Integer, nullable=False),  # a BulkActionState
    Column("max_per_second", Float, nullable=False),
    Column("selected", BigInteger, nullable=False),
    Column("done", BigInteger, nullable=False),
    Column("skipped", BigInteger, nullable=False),
    Column("failed", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("owner", String(128), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("epoch", BigInteger, nullable=False),
    # MOVE: the version the sagas move to (0 for other kinds), and the steps
    # renamed on the way as a JSON list of [old, new] pairs.
    Column("to_version", Integer, nullable=False, server_default=text("0")),
    Column("step_mappings", Text, nullable=False, server_default=""),
)
Index("compensa_bulk_actions_list", bulk_actions.c.created_at, bulk_actions.c.bulk_action_id)

#: The sagas a bulk action selected, at the sequence they had then: the
#: action's write is guarded on it, so a saga that changed meanwhile is
#: skipped. `outcome` is a BulkItemOutcome, set once (PENDING -> another).
bulk_items = Table(
    "compensa_bulk_items",
    metadata,
    Column("bulk_action_id", String(64), primary_key=True),
    Column("saga_id", String(128), primary_key=True),
    Column("selected_sequence", BigInteger, nullable=False),
    Column("outcome", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("acted_at", Float, nullable=True),
)
# The pending sagas of a job, in the order they are worked through.
Index("compensa_bulk_items_outcome", bulk_items.c.bulk_action_id, bulk_items.c.outcome, bulk_items.c.saga_id)

#: Where each participant's audit stands (`compensa audit`, audit.py): every
#: saga created up to (clean_created_at, clean_saga_id), in creation order, is
#: final and was audited clean against that participant's barrier rows; the
#: next run resumes there. `purge_before` is the last purge watermark sent
#: to the participant (seconds since the epoch, on the participant's clock).
audit_progress = Table(
    "compensa_audit_progress",
    metadata,
    Column("participant", String(64), primary_key=True),
    Column("clean_created_at", Float, nullable=False),
    Column("clean_saga_id", String(128), nullable=False),
    Column("audited_at", Float, nullable=False),
    Column("purge_before", Float, nullable=True),
)

#: Audit runs as durable jobs (auditor.py), leased like bulk actions (owner,
#: lease_until, epoch): `request` is the AuditSagasRequest; `began` the run's
#: start (it audits the sagas created before); `report` the AuditSagasResponse
#: of the participants done; `cursor` (JSON) where the one in progress stands.
#: `running` is true while RUNNING and NULL after: unique, so at most one
#: audit runs at a time.
audit_jobs = Table(
    "compensa_audit_jobs",
    metadata,
    Column("audit_id", String(64), primary_key=True),
    Column("request", LargeBinary, nullable=False),
    Column("started_by", String(256), nullable=False),
    Column("state", Integer, nullable=False),
    Column("running", Boolean, nullable=True),
    Column("began", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("owner", String(128), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("epoch", BigInteger, nullable=False),
    Column("report", LargeBinary, nullable=False),
    Column("cursor", Text, nullable=False),
    UniqueConstraint("running", name="compensa_audit_jobs_one_running"),
)

#: Each discrepancy an audit found, once: a later run that finds it again
#: raises no second alert. `participant` and `step_name` are empty for a
#: discrepancy of the saga alone (in flight past its deadlines).
audit_findings = Table(
    "compensa_audit_findings",
    metadata,
    Column("participant", String(64), primary_key=True),
    Column("saga_id", String(128), primary_key=True),
    Column("step_name", String(64), primary_key=True),
    Column("kind", String(32), primary_key=True),
    Column("found_at", Float, nullable=False),
    Column("message", Text, nullable=False),
    Column("alert_position", BigInteger, nullable=False),
)
