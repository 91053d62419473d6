"""A participant nobody can connect to: a call that never left the
orchestrator has nothing to undo, and an operator's retry after the
participant came back connects afresh instead of failing on the old error."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness import checkout_input, checkout_stack, poll_until
from tcp_proxy import TcpProxy

from compensa.orchestrator.definitions import definition_fingerprint, load_definition_file
from compensa.orchestrator.engine import machine
from compensa.orchestrator.shared import records
from compensa.orchestrator.store import SagaWrite, open_store
from compensa.participants.faults import FaultPlan
from compensa.v1 import orchestrator_pb2, saga_pb2

S = saga_pb2
COMPENSA = Path(sys.executable).parent / "compensa"

# charge_card gives up quickly; its compensation would retry for hours, as a
# participant's usually does, if the saga waited on it.
DEFINITION = """
name: checkout
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - {name: reserve_stock, participant: inventory, execute_timeout: 2s,
     compensate_retry: {max_attempts: 3, initial_backoff: 50ms, backoff_multiplier: 2, max_backoff: 100ms}}
  - name: charge_card
    participant: payment
    execute_timeout: 2s
    retry: {max_attempts: 3, initial_backoff: 50ms, backoff_multiplier: 2, max_backoff: 100ms}
    compensate_retry: {give_up_after: 24h, initial_backoff: 1s, backoff_multiplier: 2, max_backoff: 10m}
  - {name: ship_order, participant: shipping, kind: PIVOT, execute_timeout: 2s}
"""


def _step(saga: saga_pb2.Saga, name: str) -> saga_pb2.Step:
    return next(step for step in saga.steps if step.name == name)


async def test_a_step_never_delivered_is_not_compensated(tmp_path: Path, make_postgres_url: Callable[[], str]) -> None:
    definition = tmp_path / "checkout.yaml"
    definition.write_text(DEFINITION)
    async with checkout_stack(
        make_postgres_url, definition_paths=(definition,), participant_proxies=("payment",)
    ) as stack:
        payment: TcpProxy = stack.extra["proxies"]["payment"]
        await payment.cut()  # connecting is refused: no call reaches payment
        saga_id = await stack.start()
        saga = await stack.wait_final(saga_id, timeout=60)
        assert saga.state == S.SAGA_STATE_COMPENSATED, saga.failure_reason
        charge = _step(saga, "charge_card")
        assert charge.state == S.STEP_STATE_FAILED
        assert charge.compensate_attempts == 0
        assert _step(saga, "reserve_stock").state == S.STEP_STATE_COMPENSATED
        events = await stack.events(saga_id)
        skipped = [e for e in events if e.type == S.EVENT_TYPE_STEP_COMPENSATION_SKIPPED]
        assert [(e.step_name, "never delivered" in e.message) for e in skipped] == [("charge_card", True)]
        sending = [(e.step_name, e.attempt) for e in events if e.type == S.EVENT_TYPE_STEP_ATTEMPT_SENDING]
        assert sending == [("charge_card", 2), ("charge_card", 3)]
        assert not [e for e in events if e.type == S.EVENT_TYPE_STEP_COMPENSATING and e.step_name == "charge_card"]


async def test_a_step_whose_call_may_have_arrived_is_still_compensated(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    """Connected, then cut while the call was in flight: the outcome is
    unknown, so the step is compensated once payment is back."""
    definition = tmp_path / "checkout.yaml"
    definition.write_text(
        DEFINITION.replace("give_up_after: 24h, initial_backoff: 1s", "max_attempts: 50, initial_backoff: 50ms")
    )
    async with checkout_stack(
        make_postgres_url, definition_paths=(definition,), participant_proxies=("payment",)
    ) as stack:
        payment: TcpProxy = stack.extra["proxies"]["payment"]
        payment.blackhole()  # connects, but nothing comes back: the call may have arrived
        saga_id = await stack.start()

        async def charge_retried() -> bool:
            return bool(_step(await stack.get(saga_id), "charge_card").last_error)

        await poll_until(charge_retried, timeout=30)
        await payment.cut()  # the later attempts are refused, never delivered

        async def charge_failed() -> bool:
            return _step(await stack.get(saga_id), "charge_card").state != S.STEP_STATE_RUNNING

        await poll_until(charge_failed, timeout=30)
        await payment.heal()
        saga = await stack.wait_final(saga_id, timeout=60)
        assert saga.state == S.SAGA_STATE_COMPENSATED, saga.failure_reason
        assert _step(saga, "charge_card").state == S.STEP_STATE_COMPENSATED
        events = await stack.events(saga_id)
        assert not [e for e in events if e.type == S.EVENT_TYPE_STEP_COMPENSATION_SKIPPED]


async def test_operator_retry_after_the_participant_came_back_connects_afresh(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    definition = tmp_path / "checkout.yaml"
    definition.write_text(DEFINITION)
    async with checkout_stack(
        make_postgres_url, definition_paths=(definition,), participant_proxies=("inventory",),
        participant_health_seconds=0.2,
        # Payment's first answer comes after its deadline: time to cut inventory off before it is undone.
        faults={"payment": FaultPlan(delay_seconds=3.0, delay_attempts=1)},
    ) as stack:
        inventory: TcpProxy = stack.extra["proxies"]["inventory"]
        stack_input = checkout_input(card_token="flagged-card")
        started = await stack.stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(definition_name="checkout", saga_id="back-1", input=stack_input)
        )
        saga_id = started.saga.saga_id

        async def reserved() -> bool:
            return _step(await stack.get(saga_id), "reserve_stock").state == S.STEP_STATE_SUCCEEDED

        await poll_until(reserved, timeout=30)
        await inventory.cut()
        saga = await stack.wait_final(saga_id, timeout=60)
        assert saga.state == S.SAGA_STATE_FAILED
        assert "Connection refused" in _step(saga, "reserve_stock").last_error

        async def seen_failing() -> bool:
            listed = await stack.stub.ListParticipants(orchestrator_pb2.ListParticipantsRequest())
            inventory_view = next(p for p in listed.participants if p.name == "inventory")
            return inventory_view.health == orchestrator_pb2.PARTICIPANT_HEALTH_FAILING

        await poll_until(seen_failing, timeout=30)
        await inventory.heal()
        await stack.stub.RetrySaga(orchestrator_pb2.RetrySagaRequest(saga_id=saga_id, actor="bob"))
        saga = await stack.wait_final(saga_id, timeout=60)
        events = await stack.events(saga_id)
        retried_at = next(e.sequence for e in events if e.type == S.EVENT_TYPE_OPERATOR_RETRIED)
        after = [(S.EventType.Name(e.type), e.message) for e in events if e.sequence > retried_at]
        assert saga.state == S.SAGA_STATE_COMPENSATED, after
        assert not [kind for kind, _ in after if kind == "EVENT_TYPE_STEP_COMPENSATE_RETRY_SCHEDULED"], after


async def test_start_wait_says_what_a_quiet_saga_waits_for(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    definition = tmp_path / "checkout.yaml"
    definition.write_text(DEFINITION.replace(
        "retry: {max_attempts: 3, initial_backoff: 50ms, backoff_multiplier: 2, max_backoff: 100ms}",
        "retry: {max_attempts: 2, initial_backoff: 6s}",
    ))
    async with checkout_stack(
        make_postgres_url, definition_paths=(definition,), participant_proxies=("payment",)
    ) as stack:
        await stack.extra["proxies"]["payment"].cut()
        saga_input = {
            "order_id": "order-quiet", "sku": "sku-quiet", "quantity": 1, "amount_cents": 100,
            "card_token": "card-ok", "shipping_address": "1 Saga Street",
        }
        process = await asyncio.create_subprocess_exec(
            str(COMPENSA), "--address", stack.orchestrator.address, "start", "checkout",
            "--input", json.dumps(saga_input), "--saga-id", "quiet-1", "--wait",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 1, stdout.decode() + stderr.decode()
        told = [line for line in stderr.decode().splitlines() if line.startswith("saga quiet-1: ")]
        # Then perhaps a line for the next attempt in flight: told once per change, not every second.
        assert 1 <= len(told) <= 2 and len(set(told)) == len(told), stderr.decode()
        assert told[0].startswith(
            "saga quiet-1: step charge_card retrying (attempt 1: never delivered: UNAVAILABLE: "
        ), told
        assert "next attempt in " in told[0]


async def test_a_send_cut_short_by_a_crash_counts_as_possibly_delivered(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    """A replica committed charge_card's first attempt as SENDING and died
    before recording an answer: whether the call went out is unknown, so
    even though every later attempt is refused, charge_card is compensated."""
    definition_file = tmp_path / "checkout.yaml"
    definition_file.write_text(
        DEFINITION.replace("give_up_after: 24h, initial_backoff: 1s", "max_attempts: 50, initial_backoff: 50ms")
    )
    url = make_postgres_url()
    store = open_store(url)
    now = time.time()
    try:
        await store.upgrade_schema()
        definition = load_definition_file(definition_file)
        stored, _ = await store.register_definition(definition, definition_fingerprint(definition), now)
        plan = machine.Plan.of(stored)
        started = machine.new_saga(plan, saga_id="crashed-1", input=checkout_input().SerializeToString(), now=now)
        reserved = machine.decide(plan, started.saga, machine.ExecuteSucceeded("reserve_stock", None), now)
        assert reserved.saga.step("charge_card").delivery == records.DELIVERY_SENDING
        dead = "replica-that-died"
        logged = machine.Transition(reserved.saga, (*started.events, *reserved.events))
        (result,) = await store.commit([SagaWrite(
            saga=logged.saga, events=logged.events, expected_sequence=0, owner=dead, epoch=1, release=False,
            due_at=now, lease_until=now - 1, changed_steps=(), request_fingerprint="crashed-1",
        )])
        assert result.ok
    finally:
        await store.close()
    async with checkout_stack(
        make_postgres_url, definition_paths=(definition_file,), participant_proxies=("payment",), orchestrator_url=url,
    ) as stack:
        payment: TcpProxy = stack.extra["proxies"]["payment"]
        await payment.cut()

        async def charge_failed() -> bool:
            return _step(await stack.get("crashed-1"), "charge_card").state != S.STEP_STATE_RUNNING

        await poll_until(charge_failed, timeout=60)
        await payment.heal()
        saga = await stack.wait_final("crashed-1", timeout=60)
        assert saga.state == S.SAGA_STATE_COMPENSATED, saga.failure_reason
        assert _step(saga, "charge_card").state == S.STEP_STATE_COMPENSATED
        events = await stack.events("crashed-1")
        assert not [e for e in events if e.type == S.EVENT_TYPE_STEP_COMPENSATION_SKIPPED]
