"""An audit run: every saga against each participant's barrier rows.

Where it runs: in an orchestrator replica, called by the AuditSagas RPC
(`compensa audit`) or every `serve --audit-interval`; what it learns is in
the database, so any replica can run the next one. For each participant
with a stored address it walks the sagas created before the run began (newer
ones are the next run's), in creation order, `batch_size` at a time at no
more than `max_sagas_per_second`, resting four times as long as each batch took
(`busy_fraction`) (one indexed read of the log and one ListBarrierRows
per batch, in transactions of their own, never the engine's), asks the participant for the
rows of the sagas whose definition gives it steps, and compares them
(audit.py). Rows created since the audit's start that belong to no known
saga or step are orphans.

Progress is kept per participant (`AuditProgress`): every saga up to
`clean_through`, in creation order, is final and audited clean. A run
without `since` or `definition_name` resumes there and moves it forward after each batch, so a
run killed halfway (a replica killed) loses at most one batch; a run with
`since` re-audits from that time and reports, leaving progress and purge
watermarks alone (so does one of a single definition). Each discrepancy is recorded once and alerted once (kind
AUDIT: alert log, webhook, metric).

Barrier retention: with `barrier_retention`, the participant is told that
its rows created before
  min(creation time of the first saga not clean, run start - commit_lag, now - barrier_retention)
  - clock_skew_margin
may be deleted: every row older than that belongs to a saga that is final,
audited clean and created longer ago than the retention (a saga's rows are
written after it is created; the margin covers the participant's clock
being ahead).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from compensa.common.tls import TlsFiles
from compensa.orchestrator.engine.audit import AuditedSaga, compare_saga, orphan_rows, past_deadline
from compensa.orchestrator.shared.errors import InvalidArgument, StoreUnavailable, quote
from compensa.orchestrator.shared.metrics import Metrics
from compensa.orchestrator.shared.records import SagaRecord
from compensa.orchestrator.shared.timestamps import timestamp
from compensa.orchestrator.store import AuditFinding, AuditProgress, ParticipantAddress, SagaStore
from compensa.v1 import barrier_audit_pb2, barrier_audit_pb2_grpc, definition_pb2

__all__ = ["AuditOptions", "AuditReport", "ParticipantAudit", "audit_every", "run_audit"]

log = logging.getLogger("compensa.audit")

_PAGE_SIZE = 1000
_CALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class AuditOptions:
    """What one run audits, and how fast."""

    #: Audit sagas created at or after this time (the database's clock) and
    #: report, leaving progress alone; None: resume where the last run stopped.
    since: float | None = None
    #: Only this definition's sagas (and report only, as with `since`).
    definition_name: str = ""
    #: Participants to audit by name; empty: every participant with a stored address.
    participants: tuple[str, ...] = ()
    #: Seconds; set: tell participants their purge watermark (module docstring).
    barrier_retention: float | None = None
    batch_size: int = 200
    max_sagas_per_second: float = 2000.0
    #: The share of the time the audit works: after each batch it rests for
    #: the rest, so that the engine it shares a process and a database with
    #: keeps its pace.
    busy_fraction: float = 0.2
    #: A saga in flight this long after all its deadlines (audit.past_deadline) is PAST_DEADLINE.
    deadline_grace: float = 60.0
    #: A step settled at the participant and still waiting in a saga unchanged this long is reported.
    settle_grace: float = 60.0
    clock_skew_margin: float = 60.0
    #: The longest a saga's creation may take to commit (the orchestrator's
    #: database_timeout): younger sagas are audited, but not yet counted clean.
    commit_lag: float = 3.0
    participant_tls: TlsFiles | None = None


@dataclass
class ParticipantAudit:
    """What a run found at one participant."""

    participant: str
    address: str
    #: False: not audited (`reason` says why); never taken as wrong.
    audited: bool = True
    reason: str = ""
    sagas: int = 0
    rows: int = 0
    findings: list[AuditFinding] = field(default_factory=list)
    clean_through: tuple[float, str] | None = None
    purge_before: float | None = None


@dataclass
class AuditReport:
    """A run's outcome: per participant, and the sagas' own discrepancies."""

    participants: list[ParticipantAudit]
    saga_findings: list[AuditFinding]

    @property
    def findings(self) -> list[AuditFinding]:
        """Every discrepancy found."""
        return [*self.saga_findings, *(f for audit in self.participants for f in audit.findings)]


class _NotAudited(Exception):
    """The participant cannot be audited now (no audit service, unreachable)."""


class _Definitions:
    """Definitions by (name, version), read once per run."""

    def __init__(self, store: SagaStore) -> None:
        self._store = store
        self._known: dict[tuple[str, int], definition_pb2.SagaDefinition | None] = {}

    async def audited(self, saga_records: Sequence[SagaRecord]) -> list[AuditedSaga]:
        """Each saga with its definition."""
        result: list[AuditedSaga] = []
        for saga in saga_records:
            key = (saga.definition_name, saga.definition_version)
            if key not in self._known:
                self._known[key] = await self._store.get_definition(*key)
            result.append(AuditedSaga(saga, self._known[key]))
        return result


async def run_audit(store: SagaStore, options: AuditOptions, *, metrics: Metrics | None = None) -> AuditReport:
    """Audits each participant (see the module docstring); records and alerts what it finds."""
    participants = await store.list_participants()
    if options.participants:
        wanted = set(options.participants)
        unknown = wanted - {p.name for p in participants}
        if unknown:
            raise InvalidArgument(
                f"no participant named {', '.join(quote(name) for name in sorted(unknown))} has a stored address"
                " (compensa participants list)"
            )
        participants = [p for p in participants if p.name in wanted]
    definitions = _Definitions(store)
    report = AuditReport([], [])
    # The run audits the sagas created before it began, at every participant
    # alike: a paced run behind an engine that creates sagas faster would
    # otherwise never end; newer sagas are the next run's.
    began = await store.clock()
    for participant in participants:
        audit = await _audit_participant(store, options, participant, definitions, began)
        report.participants.append(audit)
        await _alert(store, audit.findings, metrics)
    starts = [audit.clean_through for audit in report.participants]
    after: tuple[float, str] | None = (options.since, "") if options.since is not None else None
    if options.since is None and starts and all(start is not None for start in starts):
        after = min(start for start in starts if start is not None)
    report.saga_findings = await _sagas_past_deadline(store, options, definitions, after, began)
    await _alert(store, report.saga_findings, metrics)
    return report


async def audit_every(store: SagaStore, options: AuditOptions, interval: float, metrics: Metrics) -> None:
    """Runs an audit (resuming) every `interval` seconds, until cancelled
    (`serve --audit-interval`); a run that fails is logged and tried again
    at the next interval."""
    while True:
        await asyncio.sleep(interval)
        try:
            report = await run_audit(store, options, metrics=metrics)
        except StoreUnavailable as error:
            log.warning("audit: %s; trying again in %.0fs", error, interval)
            continue
        except Exception:
            log.exception("audit: the run failed; trying again in %.0fs", interval)
            continue
        log.info(
            "audit: %d participant(s) audited, %d discrepancies",
            sum(audit.audited for audit in report.participants), len(report.findings),
        )


async def _alert(store: SagaStore, findings: list[AuditFinding], metrics: Metrics | None) -> None:
    if not findings:
        return
    raised = await store.record_audit_findings(findings, await store.clock())
    by_message = {found.message: found for found in findings}
    for alert in raised:
        log.warning("audit: %s", alert.message)
        if metrics is not None:
            metrics.audit_discrepancy(alert.participant, by_message[alert.message].kind)


def _channel(address: str, tls: TlsFiles | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, tls.channel_credentials)


async def _rows(
    stub: barrier_audit_pb2_grpc.BarrierAuditServiceAsyncStub, request: barrier_audit_pb2.ListBarrierRowsRequest
) -> AsyncIterator[barrier_audit_pb2.BarrierRow]:
    """Every row the request selects, page by page; _NotAudited when the participant cannot answer."""
    request.page_size = _PAGE_SIZE
    while True:
        try:
            page = await stub.ListBarrierRows(request, timeout=_CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise _NotAudited("it does not serve compensa.v1.BarrierAuditService (UNIMPLEMENTED)") from None
            raise _NotAudited(f"ListBarrierRows answered {error.code().name}: {error.details()}") from None
        for row in page.rows:
            yield row
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token


async def _audit_participant(
    store: SagaStore, options: AuditOptions, participant: ParticipantAddress, definitions: _Definitions,
    created_until: float,
) -> ParticipantAudit:
    """Audits the sagas created up to `created_until` at `participant`."""
    audit = ParticipantAudit(participant.name, participant.address)
    now = await store.clock()
    # A saga created before this has committed: the prefix never passes one
    # whose creation may still be in flight (its created_at is taken before
    # its commit), and so never leaves it behind, unaudited. Capped at the
    # run's start: the sagas created since were never audited (this run reads
    # none of them) and may be in flight, so the watermark must stay below them.
    cutoff = min(now, created_until) - options.commit_lag
    progress = await store.audit_progress(participant.name)
    # A run over some sagas (since a time, of one definition) reports only:
    # the clean prefix is about every saga.
    resuming = options.since is None and not options.definition_name
    start: tuple[float, str] | None = (
        (progress.clean_through if progress is not None else None) if resuming else (options.since or 0.0, "")
    )
    # Moves only while every saga so far is final and clean (and only when resuming).
    clean_through = progress.clean_through if progress is not None and resuming else None
    first_unclean: float | None = None
    known: dict[str, AuditedSaga] = {}
    channel = _channel(participant.address, options.participant_tls)
    stub: barrier_audit_pb2_grpc.BarrierAuditServiceAsyncStub = barrier_audit_pb2_grpc.BarrierAuditServiceStub(
        channel
    )
    try:
        after = start
        while True:
            began = time.monotonic()
            fetched = await store.sagas_in_creation_order(
                after=after, definition_name=options.definition_name, limit=options.batch_size
            )
            batch = [saga for saga in fetched if saga.created_at <= created_until]
            if not batch:
                break
            after = (batch[-1].created_at, batch[-1].saga_id)
            audited = [saga for saga in await definitions.audited(batch) if saga.steps_of(participant.name)]
            audit.sagas += len(audited)
            rows: dict[str, list[barrier_audit_pb2.BarrierRow]] = {}
            if audited:
                request = barrier_audit_pb2.ListBarrierRowsRequest(saga_ids=[a.saga.saga_id for a in audited])
                async for row in _rows(stub, request):
                    rows.setdefault(row.saga_id, []).append(row)
                    audit.rows += 1
            unclean: set[str] = set()
            for each in audited:
                known[each.saga.saga_id] = each
                found = compare_saga(
                    each, participant.name, participant.address, rows.get(each.saga.saga_id, ()),
                    settle_grace_before=now - options.settle_grace,
                )
                audit.findings += found
                if found or not each.saga.is_final:
                    unclean.add(each.saga.saga_id)
            before = clean_through
            for saga in batch if resuming else ():  # the clean prefix, in creation order
                if first_unclean is not None:
                    break
                if saga.saga_id in unclean or saga.created_at >= cutoff:
                    first_unclean = saga.created_at
                else:
                    clean_through = (saga.created_at, saga.saga_id)
            if resuming and clean_through is not None and clean_through != before:
                await store.save_audit_progress(
                    AuditProgress(
                        participant.name, clean_through, now, progress.purge_before if progress else None
                    )
                )
            await _pace(len(batch), began, options)
            if len(batch) < len(fetched):
                break
        orphans_from = (start[0] if start is not None else 0.0) - options.clock_skew_margin
        audit.findings += await _orphans(store, stub, known, participant, orphans_from, definitions)
        audit.clean_through = clean_through
        if resuming and clean_through is not None and not audit.findings and options.barrier_retention is not None:
            limit = min(first_unclean, cutoff) if first_unclean is not None else cutoff
            purge_before = min(limit, now - options.barrier_retention) - options.clock_skew_margin
            audit.purge_before = await _tell_watermark(stub, participant.name, purge_before)
            if audit.purge_before is not None:
                await store.save_audit_progress(
                    AuditProgress(participant.name, clean_through, now, audit.purge_before)
                )
    except _NotAudited as reason:
        audit.audited = False
        audit.reason = str(reason)
        log.warning("audit: %s at %s not audited: %s", participant.name, participant.address, reason)
    finally:
        await channel.close()
    return audit


async def _orphans(
    store: SagaStore, stub: barrier_audit_pb2_grpc.BarrierAuditServiceAsyncStub, known: dict[str, AuditedSaga],
    participant: ParticipantAddress, created_from: float, definitions: _Definitions,
) -> list[AuditFinding]:
    """ORPHAN_ROW findings among the rows created since `created_from`."""
    oldest = await store.sagas_in_creation_order(after=None, definition_name="", limit=1)
    if oldest:
        # Rows of sagas the orchestrator's own retention deleted are not orphans.
        created_from = max(created_from, oldest[0].created_at)
    request = barrier_audit_pb2.ListBarrierRowsRequest(create_time_from=timestamp(max(created_from, 0.0)))
    rows = [row async for row in _rows(stub, request)]
    unknown = sorted({row.saga_id for row in rows} - known.keys())
    for each in await definitions.audited(await store.load_sagas(unknown)):
        known[each.saga.saga_id] = each
    return orphan_rows(rows, known, participant.name, participant.address)


async def _tell_watermark(
    stub: barrier_audit_pb2_grpc.BarrierAuditServiceAsyncStub, participant: str, purge_before: float
) -> float | None:
    """Sends the purge watermark (module docstring); the one in force at the participant."""
    if purge_before <= 0:
        return None
    try:
        answer = await stub.SetPurgeWatermark(
            barrier_audit_pb2.SetPurgeWatermarkRequest(purge_before=timestamp(purge_before)), timeout=_CALL_TIMEOUT
        )
    except grpc.aio.AioRpcError as error:
        log.warning("audit: %s: SetPurgeWatermark answered %s: %s", participant, error.code().name, error.details())
        return None
    return answer.purge_watermark.ToDatetime(datetime.UTC).timestamp()


async def _sagas_past_deadline(
    store: SagaStore, options: AuditOptions, definitions: _Definitions, after: tuple[float, str] | None,
    created_until: float,
) -> list[AuditFinding]:
    """PAST_DEADLINE for the sagas after `after` still in flight past all their deadlines (the
    sagas before every participant's clean prefix are final)."""
    now = await store.clock()
    findings: list[AuditFinding] = []
    while True:
        began = time.monotonic()
        fetched = await store.sagas_in_creation_order(
            after=after, definition_name=options.definition_name, limit=options.batch_size
        )
        batch = [saga for saga in fetched if saga.created_at <= created_until]
        if not batch:
            return findings
        after = (batch[-1].created_at, batch[-1].saga_id)
        for each in await definitions.audited([saga for saga in batch if not saga.is_final]):
            found = past_deadline(each, now, options.deadline_grace)
            if found is not None:
                findings.append(found)
        await _pace(len(batch), began, options)
        if len(batch) < len(fetched):
            return findings


async def _pace(count: int, began: float, options: AuditOptions) -> None:
    """Waits so that `count` sagas since `began` stay under the rate, and the
    audit works at most `busy_fraction` of the time (the rest is the engine's)."""
    worked = time.monotonic() - began
    rest = max(count / options.max_sagas_per_second - worked, worked * (1 / options.busy_fraction - 1))
    if rest > 0:
        await asyncio.sleep(rest)

