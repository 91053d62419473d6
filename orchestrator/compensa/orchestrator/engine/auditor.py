"""An audit run: every saga against each participant's barrier rows.

Where it runs: as a durable job (`compensa_audit_jobs`), leased like a bulk
action (jobs.py). AuditSagas (`compensa audit`), or `serve --audit-interval`,
stores the job; at most one audit is RUNNING at a time (the periodic one is
not enqueued while one runs). A replica's `AuditRunner` claims it and runs it;
if that replica dies, its lease lapses and another replica claims the job and
carries on where it stopped. For each participant
with a stored address it walks the sagas created before the job began (newer
ones are the next run's), in creation order, `batch_size` at a time at no
more than `max_sagas_per_second`, resting four times as long as each batch took
(`busy_fraction`) (one indexed read of the log and one ListBarrierRows
per batch, in transactions of their own, never the engine's), asks the participant for the
rows of the sagas whose definition gives it steps, and compares them
(audit.py). Rows created since the audit's start that belong to no known
saga or step are orphans.

What a job did is saved after each batch, guarded on its lease (owner,
epoch): the report of the participants done, and where the one in progress
stands (`_Cursor`: the last saga read, its counts and findings so far). A
replica that takes the job over skips the participants done and goes on
after the last saga saved: what is audited twice is at most the batch in
flight at the kill (and the orphan scan of that participant, and the
sagas' PAST_DEADLINE scan), harmless, since each discrepancy is recorded and
alerted once.

Progress is kept per participant (`AuditProgress`): every saga up to
`clean_through`, in creation order, is final and audited clean. A run
without `since` or `definition_name` resumes there and moves it forward after each batch,
written with the job's cursor (so only the job's holder moves it); a run with
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
import dataclasses
import datetime
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from compensa.common.tls import TlsFiles
from compensa.orchestrator.engine.audit import AuditedSaga, compare_saga, orphan_rows, past_deadline
from compensa.orchestrator.engine.jobs import keep_lease
from compensa.orchestrator.shared.errors import InvalidArgument, StoreUnavailable, quote
from compensa.orchestrator.shared.metrics import Metrics
from compensa.orchestrator.shared.records import SagaRecord
from compensa.orchestrator.shared.timestamps import timestamp
from compensa.orchestrator.store import (
    AUDIT_JOB_RUNNING,
    AuditFinding,
    AuditJob,
    AuditProgress,
    ParticipantAddress,
    SagaStore,
)
from compensa.v1 import barrier_audit_pb2, barrier_audit_pb2_grpc, definition_pb2

__all__ = [
    "AuditJobRun",
    "AuditOptions",
    "AuditReport",
    "AuditRunner",
    "ParticipantAudit",
    "audit_every",
    "check_participants",
    "enqueue_audit",
    "report_of",
    "run_audit",
]

log = logging.getLogger("compensa.audit")

_PAGE_SIZE = 1000
_CALL_TIMEOUT = 30.0
# Replicas look for an audit job to claim this often.
_POLL_SECONDS = 0.5
# The options a job keeps; the rest are the replica's that runs it.
_STORED_OPTIONS = (
    "since", "definition_name", "participants", "barrier_retention", "batch_size", "max_sagas_per_second",
    "busy_fraction", "deadline_grace", "settle_grace", "clock_skew_margin",
)


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


def _options_json(options: AuditOptions) -> bytes:
    return json.dumps({name: getattr(options, name) for name in _STORED_OPTIONS}).encode()


def _options_of(stored: bytes, *, participant_tls: TlsFiles | None, commit_lag: float) -> AuditOptions:
    values: dict[str, Any] = json.loads(stored)
    values["participants"] = tuple(values["participants"])
    return AuditOptions(**values, participant_tls=participant_tls, commit_lag=commit_lag)


def _participant_json(audit: ParticipantAudit) -> dict[str, Any]:
    return dataclasses.asdict(audit)


def _participant_of(values: dict[str, Any]) -> ParticipantAudit:
    return ParticipantAudit(**{
        **values,
        "findings": [AuditFinding(**found) for found in values["findings"]],
        "clean_through": tuple(values["clean_through"]) if values["clean_through"] is not None else None,
    })


def report_of(job: AuditJob) -> AuditReport:
    """What a job found so far (all of it, once COMPLETED)."""
    if not job.report:
        return AuditReport([], [])
    values = json.loads(job.report)
    return AuditReport(
        [_participant_of(each) for each in values["participants"]],
        [AuditFinding(**found) for found in values["saga_findings"]],
    )


def _report_json(report: AuditReport) -> bytes:
    return json.dumps({
        "participants": [_participant_json(each) for each in report.participants],
        "saga_findings": [dataclasses.asdict(found) for found in report.saga_findings],
    }).encode()


@dataclass
class _Cursor:
    """Where a participant's audit stands within a job: its counts so far,
    and the sagas walked up to `after` (all of them once `walked`)."""

    audit: ParticipantAudit
    after: tuple[float, str] | None
    #: Where its walk began: rows created since (less the clock-skew margin) are looked at for orphans.
    start: float
    first_unclean: float | None = None
    walked: bool = False

    def to_json(self) -> str:
        return json.dumps({
            "audit": _participant_json(self.audit), "after": self.after, "start": self.start,
            "first_unclean": self.first_unclean, "walked": self.walked,
        })

    @classmethod
    def of(cls, text: str) -> _Cursor | None:
        if not text:
            return None
        values = json.loads(text)
        after = tuple(values["after"]) if values["after"] is not None else None
        return cls(
            _participant_of(values["audit"]), after, values["start"], values["first_unclean"], values["walked"]
        )


class _LostJob(Exception):
    """Another replica holds the job now (this one's lease lapsed): stop, writing nothing more."""


class AuditJobRun:
    """A run as a job: where it began, what it did before a takeover, and its
    writes, each guarded on the lease (owner, epoch) it was claimed at."""

    def __init__(self, store: SagaStore, job: AuditJob, owner: str) -> None:
        self._store = store
        self.job = job
        self._owner = owner
        self.done = report_of(job).participants
        self.cursor = _Cursor.of(job.cursor)

    async def save(self, cursor: _Cursor | None, progress: AuditProgress | None = None) -> None:
        """Saves the participants done, where the one in progress stands, and its progress."""
        held = await self._store.save_audit_job(
            self.job.audit_id, self._owner, self.job.epoch, report=_report_json(AuditReport(self.done, [])),
            cursor=cursor.to_json() if cursor is not None else "", now=await self._store.clock(), progress=progress,
        )
        if not held:
            raise _LostJob(self.job.audit_id)

    async def complete(self, report: AuditReport) -> None:
        held = await self._store.save_audit_job(
            self.job.audit_id, self._owner, self.job.epoch, report=_report_json(report), cursor="",
            now=await self._store.clock(), complete=True,
        )
        if not held:
            raise _LostJob(self.job.audit_id)


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


async def check_participants(store: SagaStore, names: Sequence[str]) -> list[ParticipantAddress]:
    """The participants to audit (all with a stored address when `names` is
    empty); InvalidArgument naming any without one."""
    participants = await store.list_participants()
    if names:
        wanted = set(names)
        unknown = wanted - {p.name for p in participants}
        if unknown:
            raise InvalidArgument(
                f"no participant named {', '.join(quote(name) for name in sorted(unknown))} has a stored address"
                " (compensa participants list)"
            )
        participants = [p for p in participants if p.name in wanted]
    return participants


async def run_audit(
    store: SagaStore, options: AuditOptions, *, metrics: Metrics | None = None, job: AuditJobRun | None = None
) -> AuditReport:
    """Audits each participant (see the module docstring); records and alerts
    what it finds. As `job`: from where it stopped, saving as it goes, and
    completing it; without one, it reports only (no progress, no watermark)."""
    if job is None:
        participants = await check_participants(store, options.participants)
        gone: list[str] = []
    else:  # checked when it was enqueued; one removed since is not audited
        participants = await check_participants(store, ())
        stored = {p.name for p in participants}
        gone = [name for name in options.participants if name not in stored]
        participants = [p for p in participants if not options.participants or p.name in options.participants]
    definitions = _Definitions(store)
    report = AuditReport([], [])
    for name in gone:
        report.participants.append(ParticipantAudit(name, "", audited=False, reason="no stored address any more"))
    # The run audits the sagas created before it began, at every participant
    # alike: a paced run behind an engine that creates sagas faster would
    # otherwise never end; newer sagas are the next run's.
    began = job.job.began if job is not None else await store.clock()
    done = {audit.participant: audit for audit in job.done} if job is not None else {}
    if job is not None:
        job.done = report.participants
    for participant in participants:
        if participant.name in done:
            report.participants.append(done[participant.name])
            continue
        cursor = job.cursor if job is not None and job.cursor and job.cursor.audit.participant == participant.name \
            else None
        audit = await _audit_participant(store, options, participant, definitions, began, job, cursor)
        await _alert(store, audit.findings, metrics)
        report.participants.append(audit)
        if job is not None:
            await job.save(None)
    starts = [audit.clean_through for audit in report.participants]
    after: tuple[float, str] | None = (options.since, "") if options.since is not None else None
    if options.since is None and starts and all(start is not None for start in starts):
        after = min(start for start in starts if start is not None)
    report.saga_findings = await _sagas_past_deadline(store, options, definitions, after, began)
    await _alert(store, report.saga_findings, metrics)
    if job is not None:
        await job.complete(report)
    return report


async def enqueue_audit(
    store: SagaStore, options: AuditOptions, *, started_by: str, audit_id: str = ""
) -> tuple[AuditJob, bool]:
    """Stores an audit job for `options` (RUNNING: a replica's AuditRunner
    takes it); (it, True). (The job with that id, or the audit running now, False.)"""
    now = await store.clock()
    job = AuditJob(
        audit_id=audit_id or f"audit-{uuid.uuid4().hex[:16]}", request=_options_json(options),
        started_by=started_by, state=AUDIT_JOB_RUNNING, began=now, created_at=now, updated_at=now,
    )
    return await store.create_audit_job(job)


async def audit_every(store: SagaStore, options: AuditOptions, interval: float) -> None:
    """Enqueues an audit (resuming) every `interval` seconds unless one is
    running, until cancelled (`serve --audit-interval`); whichever replica's
    AuditRunner claims it runs it, so replicas never audit at once."""
    while True:
        await asyncio.sleep(interval)
        try:
            job, created = await enqueue_audit(store, options, started_by="serve --audit-interval")
        except StoreUnavailable as error:
            log.warning("audit: %s; trying again in %.0fs", error, interval)
            continue
        if created:
            log.debug("audit %s: enqueued", job.audit_id)


class AuditRunner:
    """Claims the RUNNING audit job if nobody holds it, and runs it (AuditJobRun)."""

    def __init__(
        self, store: SagaStore, owner: str, *, lease_seconds: float, participant_tls: TlsFiles | None,
        commit_lag: float, metrics: Metrics | None,
    ) -> None:
        self._store = store
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._participant_tls = participant_tls
        self._commit_lag = commit_lag
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._claim_jobs(), name="compensa-audit-jobs")

    async def stop(self) -> None:
        """Stops; a job held is released so another replica takes it at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _claim_jobs(self) -> None:
        while True:
            try:
                now = await self._store.clock()
                job = await self._store.claim_audit_job(self._owner, now, now + self._lease_seconds)
                if job is not None:
                    await self._work(job)
            except StoreUnavailable as error:
                log.debug("audit jobs: %s", error)
            await asyncio.sleep(_POLL_SECONDS)

    async def _work(self, job: AuditJob) -> None:
        log.info("audit %s: working on it", job.audit_id)
        held = asyncio.Event()
        held.set()

        async def renew() -> bool:
            return await self._store.renew_audit_job(
                job.audit_id, self._owner, job.epoch, await self._store.clock() + self._lease_seconds
            )

        what = f"audit {job.audit_id}"
        run = asyncio.create_task(self._run(job))
        renewing = asyncio.create_task(keep_lease(renew, self._lease_seconds, held, log, what))
        try:
            await asyncio.wait({run, renewing}, return_when=asyncio.FIRST_COMPLETED)
            if not run.done():  # the lease is lost: what it would write is refused anyway
                run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        except asyncio.CancelledError:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            try:
                await self._store.release_audit_job(job.audit_id, self._owner, job.epoch)
            except StoreUnavailable:
                pass
            raise
        finally:
            renewing.cancel()

    async def _run(self, job: AuditJob) -> None:
        options = _options_of(job.request, participant_tls=self._participant_tls, commit_lag=self._commit_lag)
        try:
            report = await run_audit(
                self._store, options, metrics=self._metrics, job=AuditJobRun(self._store, job, self._owner)
            )
        except _LostJob:
            log.info("audit %s: taken over by another replica", job.audit_id)
            return
        except StoreUnavailable as error:
            log.warning("audit %s: %s; another try after its lease", job.audit_id, error)
            return
        except Exception:
            log.exception("audit %s: crashed; it is picked up again when its lease expires", job.audit_id)
            return
        log.info(
            "audit %s: completed: %d participant(s) audited, %d discrepancies", job.audit_id,
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
    created_until: float, job: AuditJobRun | None, cursor: _Cursor | None,
) -> ParticipantAudit:
    """Audits the sagas created up to `created_until` at `participant` (from `cursor`, where a job stopped)."""
    now = await store.clock()
    # A saga created before this has committed: the prefix never passes one
    # whose creation may still be in flight (its created_at is taken before
    # its commit), and so never leaves it behind, unaudited. Capped at the
    # run's start: the sagas created since were never audited (this run reads
    # none of them) and may be in flight, so the watermark must stay below them.
    cutoff = min(now, created_until) - options.commit_lag
    progress = await store.audit_progress(participant.name)
    # A run over some sagas (since a time, of one definition) reports only:
    # the clean prefix is about every saga. So does a run outside a job (the
    # bench's flat-out audit): progress and watermarks are written only by a
    # job's holder, fenced on its lease.
    resuming = job is not None and options.since is None and not options.definition_name
    start: tuple[float, str] | None = (
        (progress.clean_through if progress is not None else None) if resuming else (options.since or 0.0, "")
    )
    if cursor is None:
        cursor = _Cursor(
            ParticipantAudit(participant.name, participant.address), start, start[0] if start is not None else 0.0
        )
        # Moves only while every saga so far is final and clean (and only when resuming).
        cursor.audit.clean_through = progress.clean_through if progress is not None and resuming else None
    audit = cursor.audit
    known: dict[str, AuditedSaga] = {}
    channel = _channel(participant.address, options.participant_tls)
    stub: barrier_audit_pb2_grpc.BarrierAuditServiceAsyncStub = barrier_audit_pb2_grpc.BarrierAuditServiceStub(
        channel
    )
    try:
        while not cursor.walked:
            began = time.monotonic()
            fetched = await store.sagas_in_creation_order(
                after=cursor.after, definition_name=options.definition_name, limit=options.batch_size
            )
            batch = [saga for saga in fetched if saga.created_at <= created_until]
            if batch:
                await _audit_batch(options, participant, definitions, cursor, batch, known, stub, now, cutoff, resuming)
            cursor.walked = not batch or len(batch) < len(fetched)
            moved = resuming and audit.clean_through is not None and (
                progress is None or audit.clean_through != progress.clean_through
            )
            saved = AuditProgress(
                participant.name, audit.clean_through, now, progress.purge_before if progress else None
            ) if moved and audit.clean_through is not None else None
            if job is not None:
                await job.save(cursor, saved)
            if saved is not None:
                progress = saved
            if batch:
                await _pace(len(batch), began, options)
        orphans_from = cursor.start - options.clock_skew_margin
        audit.findings += await _orphans(store, stub, known, participant, orphans_from, definitions)
        clean_through = audit.clean_through
        if resuming and clean_through is not None and not audit.findings and options.barrier_retention is not None:
            first_unclean = cursor.first_unclean
            limit = min(first_unclean, cutoff) if first_unclean is not None else cutoff
            purge_before = min(limit, now - options.barrier_retention) - options.clock_skew_margin
            audit.purge_before = await _tell_watermark(stub, participant.name, purge_before)
            if audit.purge_before is not None and job is not None:
                await job.save(cursor, AuditProgress(participant.name, clean_through, now, audit.purge_before))
    except _NotAudited as reason:
        audit.audited = False
        audit.reason = str(reason)
        log.warning("audit: %s at %s not audited: %s", participant.name, participant.address, reason)
    finally:
        await channel.close()
    return audit


async def _audit_batch(
    options: AuditOptions, participant: ParticipantAddress, definitions: _Definitions, cursor: _Cursor,
    batch: list[SagaRecord], known: dict[str, AuditedSaga], stub: barrier_audit_pb2_grpc.BarrierAuditServiceAsyncStub,
    now: float, cutoff: float, resuming: bool,
) -> None:
    """Compares one batch of sagas with the participant's rows of them, moving `cursor`."""
    audit = cursor.audit
    audited = [saga for saga in await definitions.audited(batch) if saga.steps_of(participant.name)]
    rows: dict[str, list[barrier_audit_pb2.BarrierRow]] = {}
    if audited:
        request = barrier_audit_pb2.ListBarrierRowsRequest(saga_ids=[a.saga.saga_id for a in audited])
        async for row in _rows(stub, request):
            rows.setdefault(row.saga_id, []).append(row)
            audit.rows += 1
    audit.sagas += len(audited)
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
    for saga in batch if resuming else ():  # the clean prefix, in creation order
        if cursor.first_unclean is not None:
            break
        if saga.saga_id in unclean or saga.created_at >= cutoff:
            cursor.first_unclean = saga.created_at
        else:
            audit.clean_through = (saga.created_at, saga.saga_id)
    cursor.after = (batch[-1].created_at, batch[-1].saga_id)


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

