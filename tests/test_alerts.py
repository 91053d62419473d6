"""Alerts delivered: a saga's ALERT_RAISED and a participant failing its
health checks go to `serve --alert-webhook URL` from the durable outbox, at
least once, even when the replica that raised them is SIGKILLed before a
delivery got an answer; each is raised once however many replicas watch,
and is on the alert log (WatchAlerts).

Real processes (or in-process replicas) on PostgreSQL, a real HTTP receiver
(http.server in a thread of this test) that holds or fails the first
deliveries, and a real grpc.health.v1 server switched to NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from harness import checkout_input, poll_until
from processes import FAST_RECONNECT, ManagedProcess, ProcessSet
from scripted_participant import ScriptedParticipant, serve_scripted
from sqlalchemy.ext.asyncio import create_async_engine
from tcp_proxy import TcpProxy
from test_operations import FLOW
from webhook_receiver import WebhookReceiver, health_server

from compensa.orchestrator.cli import main
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.engine.alerts import DELIVERY_BACKOFF
from compensa.orchestrator.server import start_orchestrator
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

S = saga_pb2
FINAL = {S.SAGA_STATE_SUCCEEDED, S.SAGA_STATE_COMPENSATED, S.SAGA_STATE_FAILED}


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    # The saga's alert: held until its sender is killed, then failed twice.
    # The participant's: held for as long as its sender lives.
    with WebhookReceiver(script=["hold", "500", "503"], scripts={"PARTICIPANT_UNHEALTHY": ["held"] * 100}).serving(
    ) as receiver:
        yield receiver


async def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)  # ok-sleep: polling interval, bounded by the deadline


async def _final_state(process: ManagedProcess, saga_id: str) -> tuple[int, list[saga_pb2.SagaEvent]]:
    async with grpc.aio.insecure_channel(process.address, options=FAST_RECONNECT) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        events: list[saga_pb2.SagaEvent] = []
        async for response in stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True)):
            events.append(response.event)
            if response.event.saga_state in FINAL and response.event.type != S.EVENT_TYPE_SAGA_FAILED:
                break
            if response.event.type == S.EVENT_TYPE_ALERT_RAISED:
                break
        return events[-1].saga_state, events


async def _start(process: ManagedProcess, saga_id: str, **values: object) -> None:
    async with grpc.aio.insecure_channel(process.address, options=FAST_RECONNECT) as channel:
        await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).StartSaga(orchestrator_pb2.StartSagaRequest(
            saga_id=saga_id, definition_name="checkout", input=checkout_input(**values)
        ))


async def _outbox_rows(database_url: str) -> int:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(sa.text("SELECT count(*) FROM compensa_alert_outbox"))).scalar_one())
    finally:
        await engine.dispose()


# Two replica processes: one at a time (make test's --dist loadgroup).
@pytest.mark.xdist_group("heavy")
async def test_an_alert_reaches_the_webhook_when_the_replica_that_raised_it_is_killed_while_delivering(
    tmp_path: Path, make_postgres_url: Callable[[], str], webhook: WebhookReceiver
) -> None:
    orchestrator_url = make_postgres_url()
    async with health_server(serving=False) as watched:
        await _kill_while_delivering(tmp_path, make_postgres_url, webhook, orchestrator_url, watched.address)


async def _kill_while_delivering(
    tmp_path: Path, make_postgres_url: Callable[[], str], webhook: WebhookReceiver, orchestrator_url: str,
    watched: str,
) -> None:
    with ProcessSet(tmp_path) as processes:
        # Shipping, the pivot, never answers: the saga fails past its pivot
        # and raises an alert for a person.
        faults = {"shipping": "unavailable_attempts=100"}
        participants = {
            kind: processes.participant(kind, make_postgres_url(), faults=faults.get(kind, ""))
            for kind in ("inventory", "payment", "shipping")
        }
        # A participant that fails its health checks from the start: the
        # raiser alerts it a second after it starts.
        addresses = {kind: process.address for kind, process in participants.items()} | {"watched": watched}
        replicas = [processes.orchestrator(orchestrator_url, addresses, name=name) for name in ("raiser", "deliverer")]
        for replica in replicas:
            replica.args += [
                "--alert-webhook", webhook.url, "--alert-webhook-timeout", "1s", "--log-format", "json",
                "--participant-health-interval", "200ms", "--alert-participant-unhealthy-after", "1s",
            ]
        raiser, deliverer = replicas
        for process in (*participants.values(), raiser):
            process.start()
        await asyncio.gather(*(process.wait_serving() for process in (*participants.values(), raiser)))

        await _start(raiser, "unshippable")
        state, events = await _final_state(raiser, "unshippable")
        assert state == S.SAGA_STATE_FAILED and events[-1].type == S.EVENT_TYPE_ALERT_RAISED, events[-1]
        await _wait_until(lambda: len(webhook.of_kind("SAGA")) == 1, "the first delivery arrives")
        await _wait_until(lambda: webhook.of_kind("PARTICIPANT_UNHEALTHY"), "the participant's alert is sent")

        # The webhook holds that delivery unanswered: the engine goes on
        # driving other sagas meanwhile.
        await _start(raiser, "declined", amount_cents=500_000)
        declined, _ = await _final_state(raiser, "declined")
        assert declined == S.SAGA_STATE_COMPENSATED

        raiser.kill()
        webhook.release.set()
        assert await _outbox_rows(orchestrator_url) == 2  # raised, not delivered
        await deliverer.start_serving()
        await _wait_until(lambda: len(webhook.delivered()) == 2, "both alerts answered 200")
        deadline = time.monotonic() + 10
        while await _outbox_rows(orchestrator_url):
            assert time.monotonic() < deadline, "the delivered alert is still in the outbox"
            await asyncio.sleep(0.05)  # ok-sleep: polling interval, bounded by the deadline
        alert_lines = [
            json.loads(line) for line in raiser.log_lines('"ALERT saga unshippable')
        ]
        participant_lines = [json.loads(line) for line in raiser.log_lines('"ALERT participant watched')]
        # The deliverer sees the same outage, already alerted: it raises nothing.
        assert deliverer.log_lines("ALERT participant") == []

    # The participant's alert: raised once, by the raiser, delivered by the deliverer.
    (unhealthy,) = {delivery.body["alert_id"] for delivery in webhook.of_kind("PARTICIPANT_UNHEALTHY")}
    assert [d.status for d in webhook.of_kind("PARTICIPANT_UNHEALTHY") if d.status] == [200]
    for delivery in webhook.of_kind("PARTICIPANT_UNHEALTHY"):
        assert delivery.idempotency_key == unhealthy and str(unhealthy).startswith("participant/watched/")
        assert delivery.body["participant"] == "watched" and delivery.body["address"] == watched
        assert delivery.body["saga_id"] is None and delivery.body["type"] == "ALERT_RAISED"
    assert len(participant_lines) == 1 and participant_lines[0]["level"] == "WARNING"
    assert participant_lines[0]["participant"] == "watched" and participant_lines[0]["address"] == watched

    bodies = [delivery.body for delivery in webhook.of_kind("SAGA")]
    assert [delivery.status for delivery in webhook.of_kind("SAGA")] == [0, 500, 503, 200]
    assert [body["delivery_attempt"] for body in bodies] == [1, 2, 3, 4]
    alert = events[-1]
    expected_id = f"unshippable/{alert.sequence}"
    for delivery in webhook.of_kind("SAGA"):
        assert delivery.idempotency_key == expected_id
        assert delivery.body["alert_id"] == expected_id
        assert delivery.body["saga_id"] == "unshippable"
        assert delivery.body["definition"] == "checkout"
        assert delivery.body["type"] == "ALERT_RAISED" and delivery.body["kind"] == "SAGA"
        assert delivery.body["message"] == alert.message
        assert delivery.body["sequence"] == alert.sequence
        assert isinstance(delivery.body["raised_at"], str) and delivery.body["raised_at"].endswith("+00:00")
    # Each alert once on the stream; the compensated saga raised none.
    assert [event.type for event in events].count(S.EVENT_TYPE_ALERT_RAISED) == 1
    # The log line of the replica that raised it, as JSON with the saga's id.
    assert len(alert_lines) == 1 and alert_lines[0]["level"] == "ERROR"
    assert alert_lines[0]["saga_id"] == "unshippable"


def test_delivery_backoff_doubles_from_half_a_second_up_to_five_minutes() -> None:
    assert [DELIVERY_BACKOFF.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert DELIVERY_BACKOFF.delay(12) == 300.0 and DELIVERY_BACKOFF.delay(10_000) == 300.0


@pytest.mark.parametrize("url", ["ftp://example/alerts", "hooks.example/alerts", "http://"])
def test_a_webhook_that_is_not_an_http_url_is_refused(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--alert-webhook", url]) == 2
    assert "is not an http:// or https:// URL" in capsys.readouterr().err


def test_a_webhook_timeout_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--alert-webhook", "http://127.0.0.1:9/a", "--alert-webhook-timeout", "0s"]) == 2
    assert "--alert-webhook-timeout must be positive" in capsys.readouterr().err


async def test_a_saga_stuck_past_the_threshold_raises_one_alert_per_stall(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    participant = ScriptedParticipant()
    server, address = await serve_scripted(participant)
    definition = tmp_path / "flow.yaml"
    definition.write_text(FLOW.format(hold_timeout="30m", saga_timeout=""))
    database_url = make_postgres_url()
    orchestrator = await start_orchestrator(ServerConfig(
        listen="127.0.0.1:0", database_url=database_url, definition_paths=(definition,),
        participants={"scripted": address}, alert_stuck_seconds=0.4,
    ))
    try:
        async with grpc.aio.insecure_channel(orchestrator.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

            async def events() -> list[saga_pb2.SagaEvent]:
                """The log so far (a watch follows a saga until it ends)."""
                saga = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="stalled"))).saga
                read: list[saga_pb2.SagaEvent] = []
                stream = stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id="stalled", replay_history=True))
                async for response in stream:
                    read.append(response.event)
                    if response.event.sequence >= saga.sequence:
                        stream.cancel()
                        break
                return read

            async def alerts() -> list[saga_pb2.SagaEvent]:
                return [event for event in await events() if event.type == S.EVENT_TYPE_ALERT_RAISED]

            participant.script("execute", "hold", "pending")  # waits for a report that never comes
            await stub.StartSaga(orchestrator_pb2.StartSagaRequest(
                saga_id="stalled", definition_name="flow", input=checkout_input()
            ))
            (alert,) = await poll_until(alerts, timeout=10)
            assert alert.message.startswith("stuck: RUNNING with no change for ")
            saga = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="stalled"))).saga
            # Still stuck as far as anyone can see: the alert did not touch updated_at.
            assert saga.update_time.ToMilliseconds() < alert.time.ToMilliseconds()
            assert await _outbox_rows(database_url) == 1
            # Several more checks (every 0.1 s) while it stays stuck: no second alert.
            await asyncio.sleep(0.6)  # ok-sleep: proving that nothing more happens
            assert len(await alerts()) == 1

            # It moves on and ends: no further alert.
            (call,) = participant.of("execute", "hold")
            await stub.CompleteStep(orchestrator_pb2.CompleteStepRequest(
                completion_token=call.token, result=orchestrator_pb2.COMPLETION_RESULT_SUCCEEDED
            ))
            await poll_until(lambda: _ended(events), timeout=10)
            assert len(await alerts()) == 1
    finally:
        await orchestrator.stop(0)
        await server.stop(0)


async def _ended(events: Callable[[], Any]) -> bool:
    return any(event.type == S.EVENT_TYPE_SAGA_SUCCEEDED for event in await events())


def _sample(running: Any, name: str, **labels: str) -> float | None:
    value = running.engine.metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


async def _alert_log(address: str, after: int, count: int) -> list[orchestrator_pb2.Alert]:
    """The first `count` alerts after `after`, from WatchAlerts."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).WatchAlerts(
            orchestrator_pb2.WatchAlertsRequest(after_position=after)
        )
        read = [(await stream.read()).alert for _ in range(count)]
        stream.cancel()
        return read


# Two replica processes: one at a time (make test's --dist loadgroup).
@pytest.mark.xdist_group("heavy")
async def test_a_participant_failing_its_health_checks_is_alerted_once_by_two_replicas_and_once_recovered(
    make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="compensa")
    database_url = make_postgres_url()
    with WebhookReceiver(script=["500", "503"], scripts={"PARTICIPANT_RECOVERED": ["500"]}).serving() as webhook:
        async with health_server() as payments:
            replicas = []
            try:
                for name in ("one", "two"):
                    replicas.append(await start_orchestrator(ServerConfig(
                        listen="127.0.0.1:0", database_url=database_url, replica_id=name,
                        participants={"payments": payments.address}, participant_health_seconds=0.2,
                        alert_participant_unhealthy_seconds=1.0, alert_webhook=webhook.url, alert_webhook_timeout=1.0,
                    )))
                one, two = replicas

                def serving_for_both() -> bool:
                    return all(_sample(r, "compensa_participant_serving", participant="payments") == 1
                               for r in replicas)

                await _wait_until(serving_for_both, "both replicas see the participant serving")
                assert webhook.deliveries == []

                await payments.set(False)
                await _wait_until(
                    lambda: any(d.body["kind"] == "PARTICIPANT_UNHEALTHY" for d in webhook.delivered()),
                    "the unhealthy alert is delivered",
                )
                async with grpc.aio.insecure_channel(one.address) as channel:
                    listed = (await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).ListParticipants(
                        orchestrator_pb2.ListParticipantsRequest()
                    )).participants
                (shown,) = listed
                assert shown.health == orchestrator_pb2.PARTICIPANT_HEALTH_FAILING
                assert "NOT_SERVING" in shown.health_detail
                assert shown.HasField("unhealthy_since") and shown.HasField("alert_time")
                assert all(_sample(r, "compensa_participant_serving", participant="payments") == 0 for r in replicas)
                # Several more probes by both replicas while it stays down: no second alert.
                await asyncio.sleep(1.0)  # ok-sleep: proving that nothing more happens

                await payments.set(True)
                await _wait_until(
                    lambda: any(d.body["kind"] == "PARTICIPANT_RECOVERED" for d in webhook.delivered()),
                    "the recovered alert is delivered",
                )
                await asyncio.sleep(1.0)  # ok-sleep: proving that nothing more happens
                (unhealthy, recovered) = await _alert_log(two.address, 0, 2)
                # Resumed from a position: the next one, then nothing more.
                (resumed,) = await _alert_log(one.address, unhealthy.position, 1)
                raised_counts = [
                    _sample(r, "compensa_alerts_total", definition="", reason="participant_unhealthy") for r in replicas
                ]
            finally:
                for replica in replicas:
                    await replica.stop(0)

    assert (unhealthy.kind, recovered.kind) == (
        orchestrator_pb2.ALERT_KIND_PARTICIPANT_UNHEALTHY, orchestrator_pb2.ALERT_KIND_PARTICIPANT_RECOVERED
    )
    assert resumed == recovered and recovered.position > unhealthy.position
    assert (unhealthy.participant, unhealthy.address) == ("payments", payments.address)
    assert "has failed its health checks for" in unhealthy.message and "NOT_SERVING" in unhealthy.message
    # Exactly one of each was delivered (by alert id), after the failures the receiver answered.
    assert sorted(d.body["alert_id"] for d in webhook.delivered()) == sorted([unhealthy.alert_id, recovered.alert_id])
    assert {d.body["alert_id"] for d in webhook.deliveries} == {unhealthy.alert_id, recovered.alert_id}
    assert [d.status for d in webhook.of_kind("PARTICIPANT_UNHEALTHY")] == [500, 503, 200]
    assert [d.status for d in webhook.of_kind("PARTICIPANT_RECOVERED")] == [500, 200]
    body = webhook.delivered()[0].body
    assert body["alert_position"] == unhealthy.position and body["position"] is None
    assert body["participant"] == "payments" and body["address"] == payments.address
    # Raised by one replica: one count, one warning.
    assert sorted(raised_counts) == [0.0, 1.0]
    warnings = [r for r in caplog.records if r.getMessage().startswith("ALERT participant payments")]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.INFO]
    assert getattr(warnings[0], "participant", None) == "payments"


async def test_a_participant_without_the_health_service_is_unknown_and_never_alerted(
    make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="compensa")
    bare = grpc.aio.server()  # serves nothing at all: every call is UNIMPLEMENTED
    port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()
    running = await start_orchestrator(ServerConfig(
        listen="127.0.0.1:0", database_url=make_postgres_url(), participants={"legacy": f"127.0.0.1:{port}"},
        participant_health_seconds=0.1, alert_participant_unhealthy_seconds=0.2,
    ))
    try:
        await _wait_until(
            lambda: running.engine.participant_health.seen("legacy", f"127.0.0.1:{port}") is not None, "probed"
        )
        await asyncio.sleep(0.6)  # ok-sleep: proving that nothing more happens
        assert await running.engine.store.read_alerts(0, 10) == []
        (stored,) = await running.engine.store.list_participants()
        assert stored.unhealthy_since is None
        assert _sample(running, "compensa_participant_serving", participant="legacy") is None
    finally:
        await running.stop(0)
        await bare.stop(0)
    unknown = [r.getMessage() for r in caplog.records if "health unknown" in r.getMessage()]
    assert len(unknown) == 1 and "does not serve grpc.health.v1" in unknown[0]


async def test_a_participant_without_the_health_service_is_not_alerted_for_two_short_outages_far_apart(
    make_postgres_url: Callable[[], str]
) -> None:
    # Seen on main: its answer UNIMPLEMENTED did not end the outage the first
    # cut started, so the second cut, past the threshold, raised "has failed
    # its health checks for <time since the first cut>".
    bare = grpc.aio.server()  # serves nothing at all: every call is UNIMPLEMENTED
    port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()
    link = await TcpProxy.to(f"127.0.0.1:{port}")
    # Longer than an outage lasts here (the channel reconnects within its backoff, 1-2.5 s).
    threshold = 4.0
    running = await start_orchestrator(ServerConfig(
        listen="127.0.0.1:0", database_url=make_postgres_url(), participants={"legacy": link.address},
        participant_health_seconds=0.1, alert_participant_unhealthy_seconds=threshold,
    ))
    watch = running.engine.participant_health

    def seen(health: int) -> Callable[[], bool]:
        def check() -> bool:
            outcome = watch.seen("legacy", link.address)
            return outcome is not None and outcome.health == health
        return check

    try:
        await _wait_until(seen(orchestrator_pb2.PARTICIPANT_HEALTH_UNKNOWN), "probed: unknown")
        for outage in (1, 2):
            await link.cut()
            await _wait_until(seen(orchestrator_pb2.PARTICIPANT_HEALTH_FAILING), f"outage {outage} seen")
            await link.heal()
            await _wait_until(seen(orchestrator_pb2.PARTICIPANT_HEALTH_UNKNOWN), f"answering after outage {outage}")
            if outage == 1:
                await asyncio.sleep(threshold + 0.5)  # ok-sleep: the outages are further apart than the threshold
        assert await running.engine.store.read_alerts(0, 10) == []
        (stored,) = await running.engine.store.list_participants()
        assert stored.unhealthy_since is None, "its answer ended neither outage"
    finally:
        await running.stop(0)
        await link.close()
        await bare.stop(0)
