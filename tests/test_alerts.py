"""Alerts delivered: ALERT_RAISED goes to `serve --alert-webhook URL` from
the durable outbox, at least once, even when the replica that raised it is
SIGKILLed before its delivery got an answer.

Real processes on PostgreSQL and a real HTTP receiver (http.server in a
thread of this test) that holds the first delivery until the test has killed
its sender, then fails the next two, then accepts.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from harness import checkout_input, poll_until
from processes import FAST_RECONNECT, ManagedProcess, ProcessSet
from scripted_participant import ScriptedParticipant, serve_scripted
from sqlalchemy.ext.asyncio import create_async_engine
from test_operations import FLOW

from compensa.orchestrator.alerts import DELIVERY_BACKOFF
from compensa.orchestrator.cli import main
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import start_orchestrator
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

S = saga_pb2
FINAL = {S.SAGA_STATE_SUCCEEDED, S.SAGA_STATE_COMPENSATED, S.SAGA_STATE_FAILED}


@dataclass
class Delivery:
    body: dict[str, object]
    idempotency_key: str
    status: int = 0  # what was answered; 0: held, no answer sent yet


@dataclass
class WebhookReceiver:
    """Answers deliveries in turn from `script`: "hold" (no answer until
    `release`), or a status code; after the script, 200."""

    script: list[str]
    deliveries: list[Delivery] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def serve(self) -> http.server.ThreadingHTTPServer:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                delivery = Delivery(body, self.headers.get("Idempotency-Key", ""))
                receiver.deliveries.append(delivery)
                turn = receiver.script[len(receiver.deliveries) - 1] if len(receiver.deliveries) <= len(
                    receiver.script) else "200"
                if turn == "hold":
                    receiver.release.wait(30)
                    return  # the sender is gone by now
                delivery.status = int(turn)
                self.send_response(delivery.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(script=["hold", "500", "503"])
    server = receiver.serve()
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()


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


async def test_an_alert_reaches_the_webhook_when_the_replica_that_raised_it_is_killed_while_delivering(
    tmp_path: Path, make_postgres_url: Callable[[], str], webhook: WebhookReceiver
) -> None:
    orchestrator_url = make_postgres_url()
    with ProcessSet(tmp_path) as processes:
        # Shipping, the pivot, never answers: the saga fails past its pivot
        # and raises an alert for a person.
        faults = {"shipping": "unavailable_attempts=100"}
        participants = {
            kind: processes.participant(kind, make_postgres_url(), faults=faults.get(kind, ""))
            for kind in ("inventory", "payment", "shipping")
        }
        addresses = {kind: process.address for kind, process in participants.items()}
        replicas = [processes.orchestrator(orchestrator_url, addresses, name=name) for name in ("raiser", "deliverer")]
        for replica in replicas:
            replica.args += [
                "--alert-webhook", webhook.url, "--alert-webhook-timeout", "1s", "--log-format", "json",
            ]
        raiser, deliverer = replicas
        for process in (*participants.values(), raiser):
            process.start()
        await asyncio.gather(*(process.wait_serving() for process in (*participants.values(), raiser)))

        await _start(raiser, "unshippable")
        state, events = await _final_state(raiser, "unshippable")
        assert state == S.SAGA_STATE_FAILED and events[-1].type == S.EVENT_TYPE_ALERT_RAISED, events[-1]
        await _wait_until(lambda: len(webhook.deliveries) == 1, "the first delivery arrives")

        # The webhook holds that delivery unanswered: the engine goes on
        # driving other sagas meanwhile.
        await _start(raiser, "declined", amount_cents=500_000)
        declined, _ = await _final_state(raiser, "declined")
        assert declined == S.SAGA_STATE_COMPENSATED

        raiser.kill()
        webhook.release.set()
        assert await _outbox_rows(orchestrator_url) == 1  # raised, not delivered
        await deliverer.start_serving()
        await _wait_until(lambda: any(d.status == 200 for d in webhook.deliveries), "a delivery answered 200")
        deadline = time.monotonic() + 10
        while await _outbox_rows(orchestrator_url):
            assert time.monotonic() < deadline, "the delivered alert is still in the outbox"
            await asyncio.sleep(0.05)  # ok-sleep: polling interval, bounded by the deadline
        alert_lines = [
            json.loads(line) for line in raiser.log_lines('"ALERT saga unshippable')
        ]

    bodies = [delivery.body for delivery in webhook.deliveries]
    assert [delivery.status for delivery in webhook.deliveries] == [0, 500, 503, 200]
    assert [body["delivery_attempt"] for body in bodies] == [1, 2, 3, 4]
    alert = events[-1]
    expected_id = f"unshippable/{alert.sequence}"
    for delivery in webhook.deliveries:
        assert delivery.idempotency_key == expected_id
        assert delivery.body["alert_id"] == expected_id
        assert delivery.body["saga_id"] == "unshippable"
        assert delivery.body["definition"] == "checkout"
        assert delivery.body["type"] == "ALERT_RAISED"
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
