"""Replay: every saga's log, fed back through the pure state machine, rebuilds
the saga as stored (`compensa replay`, `compensa get --history` and
compensa.testing's check of saved histories); and the classification of sagas
in flight against new definitions (`compensa plan`, PlanMigration)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import CHECKOUT, Stack, checkout_stack, poll_until

from compensa.orchestrator.history_checks import check_history, read_history_file
from compensa.participants.faults import FaultPlan
from compensa.testing import assert_histories_replay
from compensa.v1 import orchestrator_pb2, saga_pb2

pytestmark = pytest.mark.postgres

S = saga_pb2
API = orchestrator_pb2
COMPENSA = Path(sys.executable).parent / "compensa"
COMMAND_TIMEOUT_SECONDS = 120.0


async def _compensa(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs `compensa` without blocking the loop that serves the in-process servers."""
    process = await asyncio.create_subprocess_exec(
        str(COMPENSA), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_SECONDS)
    assert process.returncode is not None
    return subprocess.CompletedProcess(list(args), process.returncode, stdout.decode(), stderr.decode())


def _checkout() -> dict[str, Any]:
    loaded = yaml.safe_load(CHECKOUT.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _write(tmp_path: Path, name: str, definition: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(definition))
    return path


async def _state(stack: Stack, saga_id: str) -> saga_pb2.Saga:
    return (await stack.stub.GetSaga(API.GetSagaRequest(saga_id=saga_id))).saga


async def _until(stack: Stack, saga_id: str, check: Callable[[saga_pb2.Saga], bool]) -> saga_pb2.Saga:
    async def reached() -> saga_pb2.Saga | None:
        saga = await _state(stack, saga_id)
        return saga if check(saga) else None

    result: saga_pb2.Saga = await poll_until(reached, timeout=30)
    return result


def _final(saga: saga_pb2.Saga) -> bool:
    return saga.state in (S.SAGA_STATE_SUCCEEDED, S.SAGA_STATE_COMPENSATED, S.SAGA_STATE_FAILED)


def _waiting(saga: saga_pb2.Saga) -> bool:
    return any(step.name == "charge_card" and step.state == S.STEP_STATE_WAITING for step in saga.steps)


async def _history(stack: Stack, saga_id: str) -> orchestrator_pb2.SagaHistory:
    return (await stack.stub.GetSagaHistory(API.GetSagaHistoryRequest(saga_id=saga_id))).history


async def test_every_saga_of_a_mixed_run_replays_to_where_it_is(
    make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    """Succeeded after transient errors, compensated, failed on the first
    step, cancelled while waiting, held in flight, failed past the pivot and
    retried by an operator, then resolved: each log replays to the stored saga,
    through the API, the saved history file and compensa.testing."""
    fragile = _checkout()
    fragile["name"] = "checkout_fragile"
    fragile["steps"][2]["retry"]["max_attempts"] = 2
    fragile_path = _write(tmp_path, "fragile", fragile)
    faults = {"shipping": FaultPlan(unavailable_attempts=2), "inventory": FaultPlan(unavailable_attempts=1)}
    async with checkout_stack(make_postgres_url, faults=faults, definition_paths=(CHECKOUT, fragile_path)) as stack:
        ok = await stack.start()
        flagged = await stack.start(card_token="flagged-1")
        out_of_stock = await stack.start(quantity=10**6)
        cancelled = await stack.start(card_token="review-cancel")
        held = await stack.start(card_token="review-held")
        broken = await stack.start(definition="checkout_fragile")
        for saga_id in (ok, flagged, out_of_stock, broken):
            await _until(stack, saga_id, _final)
        await _until(stack, cancelled, _waiting)
        await stack.stub.CancelSaga(API.CancelSagaRequest(saga_id=cancelled, reason="customer left"))
        await _until(stack, cancelled, _final)
        await _until(stack, held, _waiting)
        assert (await _state(stack, broken)).state == S.SAGA_STATE_FAILED
        await stack.stub.RetrySaga(API.RetrySagaRequest(saga_id=broken, reason="try again"))
        await _until(stack, broken, lambda saga: _final(saga) and saga.sequence > 12)
        await stack.stub.ResolveSaga(API.ResolveSagaRequest(saga_id=broken, note="shipped by hand"))

        states = {saga_id: (await _state(stack, saga_id)).state for saga_id in (ok, flagged, out_of_stock, cancelled)}
        assert states == {
            ok: S.SAGA_STATE_SUCCEEDED, flagged: S.SAGA_STATE_COMPENSATED, out_of_stock: S.SAGA_STATE_COMPENSATED,
            cancelled: S.SAGA_STATE_COMPENSATED,
        }
        every = (ok, flagged, out_of_stock, cancelled, held, broken)
        histories = {saga_id: await _history(stack, saga_id) for saga_id in every}
        types = {event.type for history in histories.values() for event in history.events}
        assert {
            S.EVENT_TYPE_STEP_RETRY_SCHEDULED, S.EVENT_TYPE_STEP_WAITING, S.EVENT_TYPE_CANCEL_REQUESTED,
            S.EVENT_TYPE_OPERATOR_RETRIED, S.EVENT_TYPE_OPERATOR_RESOLVED, S.EVENT_TYPE_SAGA_FAILED,
            S.EVENT_TYPE_ALERT_RAISED,
        } <= types
        problems = [check.summary() for check in map(check_history, histories.values()) if not check.ok]
        assert not problems, "\n".join(problems)

        # The CLI: replay through the API, and saved histories checked offline.
        files = []
        for saga_id in every:
            replayed = await _compensa("--address", stack.orchestrator.address, "replay", saga_id)
            assert replayed.returncode == 0, replayed.stdout + replayed.stderr
            assert "replays to where it is" in replayed.stdout
            saved = await _compensa("--address", stack.orchestrator.address, "get", saga_id, "--history")
            assert saved.returncode == 0, saved.stderr
            path = tmp_path / f"{saga_id}.json"
            path.write_text(saved.stdout)
            files.append(path)
        assert read_history_file(files[0]) == histories[ok]
    assert_histories_replay(files[:5], CHECKOUT)
    assert_histories_replay(files[5:], fragile_path)
    assert_histories_replay(files)
