"""compensa.orchestrator.client.SagaClient against real orchestrators: start and wait,
safe retries, and a wait that survives the orchestrator restarting."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from harness import checkout_stack, poll_until
from scripted_participant import ScriptedParticipant, serve_scripted

from compensa.checkout.v1 import checkout_pb2
from compensa.orchestrator.client import SagaClient
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import RunningOrchestrator, start_orchestrator
from compensa.participants.faults import FaultPlan
from compensa.v1 import saga_pb2

S = saga_pb2

FLOW = """
name: flow
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: reserve
    participant: scripted
    execute_timeout: 1s
  - name: hold
    participant: scripted
    long_running: true
    execute_timeout: 1s
    step_timeout: 30m
"""


def _order(order_id: str, card_token: str = "tok_visa") -> checkout_pb2.CheckoutInput:
    return checkout_pb2.CheckoutInput(
        order_id=order_id, sku="sku-client", quantity=1, amount_cents=100, card_token=card_token,
        shipping_address="1 Saga Street",
    )


async def test_execute_returns_the_ended_saga_and_a_retried_start_finds_the_first(
    make_postgres_url: Callable[[], str],
) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        async with SagaClient(stack.orchestrator.address) as client:
            done = await client.execute("checkout", _order("client-1"), saga_id="client-1")
            assert done.state == S.SAGA_STATE_SUCCEEDED
            declined = await client.execute("checkout", _order("client-2", card_token="flagged-card"))
            assert declined.state == S.SAGA_STATE_COMPENSATED
            # The same start again, as after a lost answer: the saga that exists.
            again = await client.start("checkout", _order("client-1"), saga_id="client-1")
            assert (again.saga_id, again.state) == ("client-1", S.SAGA_STATE_SUCCEEDED)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.start("no-such-flow", _order("client-3"))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_stops_a_running_saga_and_may_be_repeated(make_postgres_url: Callable[[], str]) -> None:
    faults = {"payment": FaultPlan(delay_seconds=1.5)}  # the saga is still charging when cancelled
    async with checkout_stack(make_postgres_url, faults=faults) as stack:
        async with SagaClient(stack.orchestrator.address) as client:
            started = await client.start("checkout", _order("client-cancel"), saga_id="client-cancel")
            assert started.state == S.SAGA_STATE_RUNNING
            cancelled = await client.cancel("client-cancel", reason="customer called", actor="support")
            assert cancelled.state == S.SAGA_STATE_COMPENSATING
            assert (await client.result("client-cancel")).state == S.SAGA_STATE_COMPENSATED
            again = await client.cancel("client-cancel", reason="customer called", actor="support")
            assert again.state == S.SAGA_STATE_COMPENSATED
            cancels = [e for e in await stack.events("client-cancel") if e.type == S.EVENT_TYPE_CANCEL_REQUESTED]
            assert [(e.actor, e.message) for e in cancels] == [("support", "customer called")]

            done = await client.execute("checkout", _order("client-done"), saga_id="client-done")
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.cancel(done.saga_id)
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_wait_survives_the_orchestrator_restarting(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    participant = ScriptedParticipant()
    participant_server, participant_address = await serve_scripted(participant)
    definition = tmp_path / "flow.yaml"
    definition.write_text(FLOW)
    config = ServerConfig(
        listen=f"127.0.0.1:{_free_port()}",
        database_url=make_postgres_url(),
        definition_paths=(definition,),
        participants={"scripted": participant_address},
    )
    orchestrator: RunningOrchestrator | None = await start_orchestrator(config)
    try:
        async with SagaClient(config.listen) as client:
            participant.script("execute", "hold", "pending")
            saga = await client.start("flow", _order("restart-1"))
            waiting = asyncio.create_task(_collect(client, saga.saga_id))
            await poll_until(lambda: participant.of("execute", "hold"))
            token = participant.of("execute", "hold")[0].token

            assert orchestrator is not None
            await orchestrator.stop(0)
            orchestrator = None
            await asyncio.sleep(0.5)  # ok-sleep: the client's stream is broken and retrying meanwhile
            assert not waiting.done()
            orchestrator = await start_orchestrator(config)

            # Retried until the new orchestrator answers.
            await client.complete_step(token, output=checkout_pb2.CheckoutInput(order_id="approved"))
            events = await asyncio.wait_for(waiting, 30)
            final = await client.get(saga.saga_id)
    finally:
        if orchestrator is not None:
            await orchestrator.stop(0)
        await participant_server.stop(0)
    assert final.state == S.SAGA_STATE_SUCCEEDED
    # Every event once, in order, across the restart.
    assert [event.sequence for event in events] == list(range(1, final.sequence + 1))
    assert events[-1].type == S.EVENT_TYPE_SAGA_SUCCEEDED


async def _collect(client: SagaClient, saga_id: str) -> list[saga_pb2.SagaEvent]:
    return [event async for event in client.events(saga_id)]
