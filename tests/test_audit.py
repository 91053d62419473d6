"""`compensa audit`: the saga log against the participants' own barrier rows,
with real participants and a real orchestrator on PostgreSQL, the audit run
as a real process.

Sagas run to their end; the audit finds them clean. Then each kind of
discrepancy is planted straight into a participant's database, and the audit
names each one, with both sides, and nothing else; each is alerted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from harness import Stack, checkout_input, checkout_stack, log_caught_up, poll_until, scrape
from processes import ProcessSet
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from webhook_receiver import WebhookReceiver

from compensa.checkout.v1 import checkout_pb2
from compensa.common.database import DEFAULT_DATABASE_TIMEOUT
from compensa.examples.server import start_participant
from compensa.orchestrator.store import AUDIT_ALERT, open_store
from compensa.orchestrator.store.schema import saga_steps as saga_steps_table
from compensa.orchestrator.store.schema import sagas as sagas_table
from compensa.participants.faults import FaultPlan
from compensa.participants.sdk import pack
from compensa.v1 import (
    barrier_audit_pb2,
    barrier_audit_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    participant_pb2,
    saga_pb2,
)

COMPENSA = Path(sys.executable).parent / "compensa"
COMMAND_TIMEOUT_SECONDS = 180.0

pytestmark = pytest.mark.postgres


@dataclass(frozen=True)
class _Completed:
    returncode: int
    stdout: str
    stderr: str


async def _compensa(*args: str) -> _Completed:
    """Runs `compensa` without blocking the loop that serves the in-process servers."""
    process = await asyncio.create_subprocess_exec(
        str(COMPENSA), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_SECONDS)
    assert process.returncode is not None
    return _Completed(process.returncode, stdout.decode(), stderr.decode())


async def _audit(stack: Stack, *args: str) -> tuple[int, dict[str, Any]]:
    """`compensa audit --json`'s exit status and report (the proto's JSON: fields at their default are left out)."""
    done = await _compensa("audit", "--address", stack.orchestrator.address, "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, report


def _participants(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {each["participant"]: each for each in report.get("participants", [])}


def _found(report: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    every = [
        *report.get("saga_discrepancies", []),
        *(f for each in report.get("participants", []) for f in each.get("discrepancies", [])),
    ]
    return {(f["kind"], f.get("participant", ""), f["saga_id"], f.get("step_name", "")) for f in every}


async def _run_to_end(stack: Stack, count: int, **input_values: Any) -> list[str]:
    saga_ids = [await stack.start(**input_values) for _ in range(count)]
    for saga_id in saga_ids:
        await stack.wait_final(saga_id, timeout=60.0)
    return saga_ids


def _barrier(stack: Stack, kind: str) -> sa.Table:
    return stack.participants[kind].participant.barrier


async def _change(stack: Stack, kind: str, statement: sa.Executable) -> None:
    async with stack.engine_of(kind).begin() as conn:
        await conn.execute(statement)


@contextlib.asynccontextmanager
async def open_store_engine(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the orchestrator's database, for writing what the engine would not."""
    engine = create_async_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _past_the_commit_lag() -> None:
    """Lets the sagas just run age past the audit's commit lag (the orchestrator's
    database timeout): only older ones are counted clean and allowed to be purged."""
    await asyncio.sleep(DEFAULT_DATABASE_TIMEOUT + 0.5)  # ok-sleep: a time to pass, not an event to wait for


async def _waiting_on_review(stack: Stack) -> str:
    saga_id = await stack.start(card_token=f"review-{uuid.uuid4().hex[:6]}")

    async def waiting() -> bool:
        saga = (await stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
        return any(step.state == saga_pb2.STEP_STATE_WAITING for step in saga.steps)

    await poll_until(waiting, timeout=60.0)
    return saga_id


async def _bare_server() -> tuple[grpc.aio.Server, str]:
    """A gRPC server that serves nothing: a participant that is not built on the SDK."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_audit_names_each_planted_discrepancy_and_nothing_else(make_postgres_url: Callable[[], str]) -> None:
    legacy, legacy_address = await _bare_server()
    try:
        async with checkout_stack(make_postgres_url) as stack:
            await stack.stub.SetParticipant(
                orchestrator_pb2.SetParticipantRequest(name="legacy", address=legacy_address)
            )
            succeeded = await _run_to_end(stack, 6)
            compensated = await _run_to_end(stack, 4, card_token="flagged-card")
            pending = await _waiting_on_review(stack)
            await _past_the_commit_lag()

            status, clean = await _audit(stack)
            assert status == 0 and _found(clean) == set(), clean
            by_name = _participants(clean)
            assert not by_name["legacy"].get("audited") and "UNIMPLEMENTED" in by_name["legacy"]["not_audited_reason"]
            assert by_name["inventory"]["audited"] and by_name["inventory"]["sagas"] == 11
            assert by_name["inventory"]["audited_clean_through"] is not None

            # Plant one discrepancy of each kind, each in a saga of its own.
            inventory, payment, shipping = (_barrier(stack, kind) for kind in ("inventory", "payment", "shipping"))
            await _change(stack, "inventory", inventory.delete().where(
                inventory.c.saga_id == succeeded[0], inventory.c.operation == "execute"
            ))
            altered = participant_pb2.ExecuteResponse(
                result=participant_pb2.EXECUTE_RESULT_SUCCEEDED,
                output=pack(checkout_pb2.Charge(charge_id="ch-forged", amount_cents=1)),
            ).SerializeToString(deterministic=True)
            await _change(stack, "payment", payment.update().where(
                payment.c.saga_id == succeeded[1], payment.c.operation == "execute"
            ).values(response=altered))
            shipped = participant_pb2.ExecuteResponse(
                result=participant_pb2.EXECUTE_RESULT_SUCCEEDED,
                output=pack(checkout_pb2.Shipment(tracking_number="TRK-LATE")),
            ).SerializeToString(deterministic=True)
            await _change(stack, "shipping", shipping.insert().values(
                idempotency_key=f"{compensated[0]}/ship_order", operation="execute", saga_id=compensated[0],
                step_name="ship_order", outcome="succeeded", response=shipped,
                created_at=datetime.datetime.now(datetime.UTC),
            ))
            await _change(stack, "inventory", inventory.delete().where(
                inventory.c.saga_id == compensated[1], inventory.c.operation == "compensate"
            ))
            ghost = f"saga-ghost-{uuid.uuid4().hex[:8]}"
            await _change(stack, "payment", payment.insert().values(
                idempotency_key=f"{ghost}/charge_card", operation="execute", saga_id=ghost, step_name="charge_card",
                outcome="succeeded", response=altered, created_at=datetime.datetime.now(datetime.UTC),
            ))
            # Settled at the participant (as the SDK records it), never reported.
            participant = stack.participants["payment"].participant
            async with stack.engine_of("payment").begin() as conn:
                assert await participant.settle_pending(
                    conn, f"{pending}/charge_card", output=checkout_pb2.Charge(charge_id="ch-settled", amount_cents=1)
                )

            status, report = await _audit(stack, "--since", "1h", "--settle-grace", "0s")
            assert status == 1
            assert _found(report) == {
                ("EXECUTE_MISSING", "inventory", succeeded[0], "reserve_stock"),
                ("ANSWER_DIFFERS", "payment", succeeded[1], "charge_card"),
                ("HANGING_EXECUTE", "shipping", compensated[0], "ship_order"),
                ("COMPENSATE_MISSING", "inventory", compensated[1], "reserve_stock"),
                ("ORPHAN_ROW", "payment", ghost, "charge_card"),
                ("SETTLED_NOT_REPORTED", "payment", pending, "charge_card"),
            }, report
            messages = {f["kind"]: f["message"] for p in report["participants"] for f in p.get("discrepancies", [])}
            # Both sides quoted.
            assert "the log says: SUCCEEDED" in messages["EXECUTE_MISSING"]
            assert "the participant says: no rows" in messages["EXECUTE_MISSING"]
            assert "the log says: SUCCEEDED (sha256:" in messages["ANSWER_DIFFERS"]
            assert "Execute row succeeded (sha256:" in messages["ANSWER_DIFFERS"]
            assert "the log says: PENDING" in messages["HANGING_EXECUTE"]
            assert "Compensate" in messages["COMPENSATE_MISSING"]
            assert "does not know" in messages["ORPHAN_ROW"]
            assert "settled_succeeded" in messages["SETTLED_NOT_REPORTED"]

            # Each is alerted once (kind AUDIT): a second run raises none again.
            status, again = await _audit(stack, "--since", "1h", "--settle-grace", "0s")
            assert status == 1 and _found(again) == _found(report)
            store = open_store(stack.orchestrator_url)
            try:
                await log_caught_up(store)
                alerts = [alert for alert in await store.read_alerts(0, 1000) if alert.kind == AUDIT_ALERT]
            finally:
                await store.close()
            assert sorted(alert.saga_id for alert in alerts) == sorted(saga for _, _, saga, _ in _found(report))
            assert all(alert.alert_id == f"audit/{alert.position}" for alert in alerts)
            watched = stack.stub.WatchAlerts(orchestrator_pb2.WatchAlertsRequest())
            kinds = []
            async for answer in watched:
                kinds.append(answer.alert.kind)
                if kinds.count(orchestrator_pb2.ALERT_KIND_AUDIT) == len(alerts):
                    break
            watched.cancel()
    finally:
        await legacy.stop(None)


async def test_barrier_rows_are_purged_only_once_audited_clean(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        old = await _run_to_end(stack, 3)
        await _past_the_commit_lag()
        status, report = await _audit(stack, "--barrier-retention", "1ms", "--clock-skew-margin", "0s")
        assert status == 0, report
        assert _participants(report)["payment"]["purge_watermark"]

        young = await _run_to_end(stack, 2)
        # The next run resumes after the sagas found clean: it audits the young ones only.
        status, resumed = await _audit(stack)
        assert status == 0 and {name: p["sagas"] for name, p in _participants(resumed).items()} == {
            "inventory": 2, "payment": 2, "shipping": 2,
        }
        payment = stack.participants["payment"]
        purge = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "compensa.participants.purge", "--db", str(payment.engine.url.render_as_string(
                hide_password=False
            )), "--barrier-table", payment.participant.barrier_table_name, "--batch-size", "2",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(purge.communicate(), COMMAND_TIMEOUT_SECONDS)
        assert purge.returncode == 0, stderr.decode()
        assert "deleted 3 barrier row(s)" in stdout.decode()
        barrier = payment.participant.barrier
        async with payment.engine.connect() as conn:
            kept = {row.saga_id for row in (await conn.execute(sa.select(barrier.c.saga_id))).all()}
        assert kept == set(young)  # the young sagas were never audited: kept

        # A late duplicate Execute of a purged saga: refused, not applied again.
        late = participant_pb2.ExecuteRequest(
            context=participant_pb2.StepContext(
                saga_id=old[0], step_name="charge_card", idempotency_key=f"{old[0]}/charge_card", attempt=5,
                definition_name="checkout", definition_version=1,
            )
        )
        late.context.deadline.FromDatetime(datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1))
        async with grpc.aio.insecure_channel(payment.address) as channel:
            from compensa.v1 import participant_pb2_grpc

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await participant_pb2_grpc.ParticipantServiceStub(channel).Execute(late)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "purge watermark" in (refused.value.details() or "")
            listed = await barrier_audit_pb2_grpc.BarrierAuditServiceStub(channel).ListBarrierRows(
                barrier_audit_pb2.ListBarrierRowsRequest(saga_ids=[old[0]])
            )
            assert list(listed.rows) == []


async def test_serve_audits_every_interval_and_alerts(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url, audit_interval_seconds=0.5, metrics_listen="127.0.0.1:0") as stack:
        await _run_to_end(stack, 2)
        payment = _barrier(stack, "payment")
        ghost = f"saga-ghost-{uuid.uuid4().hex[:8]}"
        await _change(stack, "payment", payment.insert().values(
            idempotency_key=f"{ghost}/charge_card", operation="execute", saga_id=ghost, step_name="charge_card",
            outcome="succeeded", response=b"", created_at=datetime.datetime.now(datetime.UTC),
        ))
        watched = stack.stub.WatchAlerts(orchestrator_pb2.WatchAlertsRequest())
        try:
            async def audit_alert() -> orchestrator_pb2.Alert:
                async for answer in watched:
                    if answer.alert.kind == orchestrator_pb2.ALERT_KIND_AUDIT:
                        return answer.alert
                raise AssertionError("the alert stream ended")

            alert = await asyncio.wait_for(audit_alert(), 60.0)
        finally:
            watched.cancel()
        assert alert.saga_id == ghost and alert.participant == "payment" and alert.step_name == "charge_card"
        assert alert.message.startswith("ORPHAN_ROW: ")
        assert alert.alert_id == f"audit/{alert.position}"
        port = stack.orchestrator.metrics_port
        assert port is not None
        samples = await scrape(port)
        key = ("compensa_audit_discrepancies_total", frozenset({("participant", "payment"), ("kind", "ORPHAN_ROW")}))
        assert samples[key] == 1.0
        # The CLI's text report: a line per participant, then its discrepancies.
        printed = await _compensa("audit", "--address", stack.orchestrator.address)
        assert printed.returncode == 1, printed.stderr
        lines = printed.stdout.splitlines()
        assert any(line.startswith("inventory (") and line.endswith(": clean") for line in lines), lines
        assert any(line.startswith("payment (") and line.endswith(": 1 discrepancies") for line in lines), lines
        assert f"  ORPHAN_ROW: saga {ghost} step 'charge_card' at payment: a row for a saga the orchestrator does not"\
            " know; the log says: no such saga; the participant says: Execute row succeeded (sha256:" in printed.stdout


async def test_an_audit_alert_reaches_the_webhook_once(make_postgres_url: Callable[[], str]) -> None:
    with WebhookReceiver(script=["503"]).serving() as webhook:
        async with checkout_stack(
            make_postgres_url, alert_webhook=webhook.url, alert_webhook_timeout=1.0
        ) as stack:
            await _run_to_end(stack, 1)
            ghost = f"saga-ghost-{uuid.uuid4().hex[:8]}"
            await _change(stack, "payment", _barrier(stack, "payment").insert().values(
                idempotency_key=f"{ghost}/charge_card", operation="execute", saga_id=ghost,
                step_name="charge_card", outcome="succeeded", response=b"",
                created_at=datetime.datetime.now(datetime.UTC),
            ))
            status, report = await _audit(stack)
            assert status == 1 and _found(report) == {("ORPHAN_ROW", "payment", ghost, "charge_card")}, report
            # The first delivery is answered 503: the outbox sends it again.
            await poll_until(lambda: [d for d in webhook.of_kind("AUDIT") if d.status == 200], timeout=60.0)
    bodies = [delivery.body for delivery in webhook.of_kind("AUDIT")]
    assert [delivery.status for delivery in webhook.of_kind("AUDIT")] == [503, 200]
    (alert_id,) = {body["alert_id"] for body in bodies}
    assert str(alert_id).startswith("audit/")
    for delivery in webhook.of_kind("AUDIT"):
        body = delivery.body
        assert delivery.idempotency_key == alert_id
        assert body["type"] == "ALERT_RAISED" and body["saga_id"] == ghost and body["participant"] == "payment"
        assert str(body["message"]).startswith(f"ORPHAN_ROW: saga {ghost} step 'charge_card' at payment: ")


async def test_bad_requests_are_refused_in_one_line_and_change_nothing(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        address = stack.orchestrator.address
        unknown = await _compensa("audit", "--address", address, "--participant", "nobody")
        assert unknown.returncode == 2 and unknown.stdout == ""
        assert unknown.stderr.strip().splitlines() == [
            "error: INVALID_ARGUMENT: no participant named 'nobody' has a stored address (compensa participants list)"
        ]
        since = await _compensa("audit", "--address", address, "--since", "yesterday")
        assert since.returncode == 2 and "--since" in since.stderr
        retention = await _compensa("audit", "--address", address, "--barrier-retention", "0s")
        assert retention.returncode == 2 and "INVALID_ARGUMENT: barrier_retention" in retention.stderr
        store = open_store(stack.orchestrator_url)
        try:
            assert await store.audit_progress("payment") is None
        finally:
            await store.close()


async def test_lost_answers_and_retries_leave_nothing_to_report(make_postgres_url: Callable[[], str]) -> None:
    """Answers lost after commit and transient failures make duplicates and retries; the
    barrier keeps each step once, and the audit agrees with the log.

    Every first attempt fails before doing anything and half the effects lose
    their answer; a duplicate is answered from the barrier, so no step needs
    more than three of its four attempts. (Random failures could exhaust a
    pivot's retries with its effect applied: a true HANGING_EXECUTE the audit
    would rightly report, and a flaky test.)"""
    faults = {
        kind: FaultPlan(fail_after_commit_rate=0.5, unavailable_attempts=1, seed=index)
        for index, kind in enumerate(("inventory", "payment", "shipping"))
    }
    async with checkout_stack(make_postgres_url, faults=faults) as stack:
        await _run_to_end(stack, 6)
        await _run_to_end(stack, 3, card_token="flagged-card")
        status, report = await _audit(stack)
        assert status == 0 and _found(report) == set(), report
        assert all(p["audited"] and p["sagas"] == 9 for p in report["participants"])


async def test_a_run_audits_the_sagas_created_before_it_began(make_postgres_url: Callable[[], str]) -> None:
    """A paced run behind an engine that creates sagas faster would never end if
    it chased them: the sagas created after it began are the next run's."""
    async with checkout_stack(make_postgres_url) as stack:
        done = await _run_to_end(stack, 2)
        # A saga whose creation the run's clock has not reached (a copy of one
        # that ran, without barrier rows: audited, it would be EXECUTE_MISSING).
        later = f"{done[0]}-later"
        async with open_store_engine(stack.orchestrator_url) as engine, engine.begin() as conn:
            await conn.execute(sa.insert(sagas_table).from_select(
                [column.name for column in sagas_table.columns],
                sa.select(*(
                    sa.literal(later).label("saga_id") if column.name == "saga_id"
                    else (column + 3600).label("created_at") if column.name == "created_at" else column
                    for column in sagas_table.columns
                )).where(sagas_table.c.saga_id == done[0]),
            ))
            await conn.execute(sa.insert(saga_steps_table).from_select(
                [column.name for column in saga_steps_table.columns],
                sa.select(*(
                    sa.literal(later).label("saga_id") if column.name == "saga_id" else column
                    for column in saga_steps_table.columns
                )).where(saga_steps_table.c.saga_id == done[0]),
            ))
        status, report = await _audit(stack, "--since", "1h")
        assert status == 0 and _found(report) == set(), report
        assert all(p["sagas"] == 2 for p in report["participants"]), report


class _GatedAudit(barrier_audit_pb2_grpc.BarrierAuditServiceServicer):
    """A participant whose barrier listing waits until the test opens the gate."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.gate = asyncio.Event()
        self.calls = 0

    async def ListBarrierRows(
        self, request: barrier_audit_pb2.ListBarrierRowsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> barrier_audit_pb2.ListBarrierRowsResponse:
        self.calls += 1
        self.asked.set()
        await self.gate.wait()
        return barrier_audit_pb2.ListBarrierRowsResponse()

    async def SetPurgeWatermark(
        self, request: barrier_audit_pb2.SetPurgeWatermarkRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> barrier_audit_pb2.SetPurgeWatermarkResponse:
        return barrier_audit_pb2.SetPurgeWatermarkResponse(purge_watermark=request.purge_before)


async def test_the_watermark_stays_below_sagas_created_after_the_run_began(
    make_postgres_url: Callable[[], str],
) -> None:
    """A run audits the sagas created before it began; one created while it
    audits an earlier participant was never audited, and may be in flight:
    the later participant's purge watermark must stay below it."""
    gated = _GatedAudit()
    server = grpc.aio.server()
    barrier_audit_pb2_grpc.add_BarrierAuditServiceServicer_to_server(gated, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with checkout_stack(make_postgres_url) as stack:
            # Audited first (participants go by name).
            await stack.stub.SetParticipant(
                orchestrator_pb2.SetParticipantRequest(name="a-slow", address=f"127.0.0.1:{port}")
            )
            await _run_to_end(stack, 2)
            await _past_the_commit_lag()
            running = asyncio.create_task(
                _audit(stack, "--barrier-retention", "1ms", "--clock-skew-margin", "0s")
            )
            await asyncio.wait_for(gated.asked.wait(), 60.0)
            in_flight = await _waiting_on_review(stack)
            await _past_the_commit_lag()
            gated.gate.set()
            status, report = await running
            assert status == 0, report
            saga = (await stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=in_flight))).saga
            watermark = _participants(report)["payment"]["purge_watermark"]
            purge_before = datetime.datetime.fromisoformat(watermark.replace("Z", "+00:00"))
            assert purge_before < saga.create_time.ToDatetime(datetime.UTC), (watermark, saga.create_time)
    finally:
        gated.gate.set()
        await server.stop(None)


async def test_an_audit_job_survives_the_kill_of_the_replica_running_it(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    """Two replicas as processes; the one that claimed the audit job is
    SIGKILLed while it audits the second participant. The other takes the job
    over when the lease lapses and finishes it from its last saved batch: the
    participant done before the kill is not audited again (its counts are the
    saved ones), the one in progress goes on after the sagas it had walked;
    only its orphan scan is asked again (harmless: each discrepancy is
    recorded and alerted once). A call with the job's id on the survivor
    follows it to its report."""
    gated = _GatedAudit()
    gate_server = grpc.aio.server()
    barrier_audit_pb2_grpc.add_BarrierAuditServiceServicer_to_server(gated, gate_server)
    gate_port = gate_server.add_insecure_port("127.0.0.1:0")
    await gate_server.start()
    participants = {
        kind: await start_participant(kind, make_postgres_url()) for kind in ("inventory", "payment", "shipping")
    }
    database_url = make_postgres_url()
    channels: list[grpc.aio.Channel] = []
    try:
        with ProcessSet(tmp_path) as processes:
            replicas = await processes.replicas(
                database_url, {kind: p.address for kind, p in participants.items()}, ("a", "b")
            )
            stubs = {}
            for name, replica in replicas.items():
                channels.append(channel := grpc.aio.insecure_channel(replica.address))
                stubs[name] = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            # Audited in name order: inventory, then the gated one, then payment and shipping.
            await stubs["a"].SetParticipant(
                orchestrator_pb2.SetParticipantRequest(name="p-gated", address=f"127.0.0.1:{gate_port}")
            )
            saga_ids = [f"checkout-{n}" for n in range(6)]
            for saga_id in saga_ids:
                await stubs["a"].StartSaga(orchestrator_pb2.StartSagaRequest(
                    saga_id=saga_id, definition_name="checkout", input=checkout_input()
                ))

            async def all_final() -> bool:
                for saga_id in saga_ids:
                    saga = (await stubs["a"].GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
                    if saga.state != saga_pb2.SAGA_STATE_SUCCEEDED:
                        return False
                return True

            await poll_until(all_final, timeout=60.0)
            await _past_the_commit_lag()
            audit_id = "audit-killed"
            first_call = stubs["a"].AuditSagas(orchestrator_pb2.AuditSagasRequest(audit_id=audit_id), timeout=120)
            await asyncio.wait_for(gated.asked.wait(), 60.0)
            async with open_store_engine(database_url) as engine, engine.connect() as conn:
                job = (await conn.execute(sa.text(
                    "SELECT owner, report FROM compensa_audit_jobs WHERE audit_id = :id"
                ), {"id": audit_id})).one()
            victim = job.owner
            saved = json.loads(job.report)
            assert [(p["participant"], p["sagas"]) for p in saved["participants"]] == [("inventory", 6)]
            replicas[victim].kill()
            gated.gate.set()
            survivor = "b" if victim == "a" else "a"
            report = await stubs[survivor].AuditSagas(
                orchestrator_pb2.AuditSagasRequest(audit_id=audit_id), timeout=120
            )
            if victim == "a":  # the call was cut off with its replica
                with pytest.raises(grpc.aio.AioRpcError):
                    await first_call
            else:  # its replica took the job over, and answers it
                assert await first_call == report
            assert report.audit_id == audit_id
            counts = {
                each.participant: (each.audited, each.sagas, len(each.discrepancies)) for each in report.participants
            }
            assert counts == {
                "inventory": (True, 6, 0), "p-gated": (True, 0, 0), "payment": (True, 6, 0), "shipping": (True, 6, 0),
            }, report
            assert not report.saga_discrepancies
            assert replicas[survivor].log_lines(f"audit {audit_id}: working on it")
            assert replicas[survivor].log_lines(f"audit {audit_id}: completed")
            # Asked once by the victim, once more by the survivor (that scan is redone).
            assert gated.calls == 2
    finally:
        for channel in channels:
            await channel.close()
        gated.gate.set()
        await gate_server.stop(None)
        for participant in participants.values():
            await participant.stop(0)


async def _at_most(count: Any, most: int) -> bool:
    return int(await count) <= most


async def test_a_purging_participant_keeps_its_barrier_size_bounded(make_postgres_url: Callable[[], str]) -> None:
    """Not only the rows: the barrier table's size on disk (heap, indexes and
    TOAST, after a plain VACUUM as autovacuum would run) stops growing once
    the audit moves the watermark and the participant purges each round; it
    would grow with every round's rows otherwise."""
    async with checkout_stack(make_postgres_url, participant_purge_interval=0.2) as stack:
        barrier = _barrier(stack, "inventory")
        engine = stack.engine_of("inventory")

        async def rows() -> int:
            async with engine.connect() as conn:
                return int((await conn.execute(sa.select(sa.func.count()).select_from(barrier))).scalar_one())

        async def size_after_vacuum() -> int:
            async with engine.connect() as conn:
                autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await autocommit.execute(sa.text(f"VACUUM {barrier.name}"))
                return int((await autocommit.execute(
                    sa.text("SELECT pg_total_relation_size(:table)"), {"table": barrier.name}
                )).scalar_one())

        sizes: list[int] = []
        peak_rows = 0
        for _round in range(ROUNDS):
            await _run_to_end(stack, SAGAS_PER_ROUND)
            peak_rows = max(peak_rows, await rows())
            await _past_the_commit_lag()
            status, report = await _audit(stack, "--barrier-retention", "1ms", "--clock-skew-margin", "0s")
            assert status == 0, report
            assert await poll_until(lambda: _at_most(rows(), 0), timeout=30.0)
            sizes.append(await size_after_vacuum())
        # Every round wrote as many rows; what the table holds on disk stays
        # within what the first rounds needed (the space freed is used again).
        assert peak_rows >= SAGAS_PER_ROUND
        assert max(sizes[ROUNDS // 2:]) <= max(sizes[:2]), sizes


ROUNDS = 6
SAGAS_PER_ROUND = 40
