"""Replay: every saga's log, fed back through the pure state machine, rebuilds
the saga as stored (`compensa replay`, `compensa get --history` and
compensa.testing's check of saved histories); and the classification of sagas
in flight against new definitions (`compensa plan`, PlanMigration)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from dashboard_rig import bearer, dashboard_rig
from harness import CHECKOUT, Stack, checkout_stack, poll_until

from compensa.orchestrator.api.history_checks import check_history, read_history_file
from compensa.orchestrator.definitions import load_definition_file
from compensa.participants.faults import FaultPlan
from compensa.testing import assert_histories_replay, replay_saved_history
from compensa.v1 import bulk_pb2, orchestrator_pb2, saga_pb2

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
        for saga_id in (cancelled, broken):
            replayed = await _compensa("--address", stack.orchestrator.address, "replay", saga_id)
            assert replayed.returncode == 0, replayed.stdout + replayed.stderr
            assert "replays to where it is" in replayed.stdout
        for saga_id in every:
            saved = await _compensa("--address", stack.orchestrator.address, "get", saga_id, "--history")
            assert saved.returncode == 0, saved.stderr
            path = tmp_path / f"{saga_id}.json"
            path.write_text(saved.stdout)
            files.append(path)
        assert read_history_file(files[0]) == histories[ok]
    assert_histories_replay(files[:5], CHECKOUT)
    assert_histories_replay(files[5:], fragile_path)
    assert_histories_replay(files)

    # A definition change that the past sagas would not have followed fails,
    # naming each saga, its first diverging event and why.
    versions = _versions(tmp_path)
    with pytest.raises(AssertionError) as failure:
        assert_histories_replay(files[:2], versions["order"])
    said = str(failure.value)
    assert said.startswith(f"2 of 2 saved histories do not replay under {versions['order']}:\n"), said
    for path, saga_id in zip(files[:2], (ok, flagged), strict=True):
        assert (
            f"{path}: saga {saga_id} ({len(histories[saga_id].events)} events, version 1): diverges at event 2:"
            " the log has STEP_STARTED of step 'reserve_stock' (attempt 1); the definition would have written"
            " STEP_STARTED of step 'charge_card' (attempt 1)"
        ) in said, said
    check = replay_saved_history(files[0], versions["order"])
    assert (check.ok, check.saga_id, check.divergence and check.divergence.sequence) == (False, ok, 2)
    # A renamed step diverges until it is mapped.
    with pytest.raises(AssertionError, match="step 'reserve_stock' is not in the definition"):
        assert_histories_replay(files[:1], versions["renamed"])
    assert_histories_replay(files[:1], versions["renamed"], renames={"reserve_stock": "hold_stock"})


def _versions(tmp_path: Path) -> dict[str, Path]:
    """Definition files for the checkout's next version: one compatible with
    sagas waiting on charge_card, one compatible once a step is renamed, and
    one per way of being incompatible."""

    def edited(name: str, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> Path:
        definition = _checkout()
        definition["description"] = f"checkout, {name}"
        definition["steps"] = change(definition["steps"])
        return _write(tmp_path, name, definition)

    def step(steps: list[dict[str, Any]], name: str) -> dict[str, Any]:
        return next(item for item in steps if item["name"] == name)

    def compatible(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        step(steps, "ship_order")["retry"]["max_attempts"] = 6
        return steps

    def renamed(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        step(steps, "reserve_stock")["name"] = "hold_stock"
        return steps

    def participant(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        step(steps, "reserve_stock")["participant"] = "warehouse"
        return steps

    def retriable(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        reserve = step(steps, "reserve_stock")
        reserve["kind"] = "RETRIABLE"
        del reserve["compensate_timeout"], reserve["compensate_retry"]
        return steps

    def pivot_first(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for item in steps[:2]:
            item["kind"] = "RETRIABLE"
            del item["compensate_timeout"], item["compensate_retry"]
        return [steps[2], *steps[:2]]

    def screened(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        screen = {"name": "screen_order", "participant": "fraud", "execute_timeout": "2s"}
        return [steps[0], screen, *steps[1:]]

    return {
        "compatible": edited("compatible", compatible),
        "renamed": edited("renamed", renamed),
        "removed": edited("removed", lambda steps: steps[1:]),
        "participant": edited("participant", participant),
        "compensability": edited("compensability", retriable),
        "pivot_first": edited("pivot_first", pivot_first),
        "dependency": edited("dependency", screened),
        "order": edited("order", lambda steps: [steps[1], steps[0], steps[2]]),
    }


async def _plan(stack: Stack, path: Path, *options: str) -> list[dict[str, Any]]:
    planned = await _compensa("--address", stack.orchestrator.address, "plan", str(path), "--json", *options)
    assert planned.returncode == 0, planned.stderr
    return [json.loads(line) for line in planned.stdout.splitlines()]


async def test_sagas_in_flight_classified_against_new_versions(
    make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    """Three checkouts wait on a held charge (reserve_stock done, charge_card
    WAITING) and one has finished: `compensa plan` classifies the three
    against each version, with the first diverging event and the reason, and
    changes nothing."""
    versions = _versions(tmp_path)
    async with checkout_stack(make_postgres_url) as stack:
        held = [await stack.start(card_token=f"review-{n}") for n in range(3)]
        done = await stack.start()
        await _until(stack, done, _final)
        for saga_id in held:
            await _until(stack, saga_id, _waiting)
        before = {saga_id: await _state(stack, saga_id) for saga_id in (*held, done)}

        expected_reasons = {
            "removed": (2, "step 'reserve_stock' is not in the definition (if it was renamed, map it to its new name)"),
            "renamed": (2, "step 'reserve_stock' is not in the definition (if it was renamed, map it to its new name)"),
            "participant": (2, "step 'reserve_stock' ran on participant 'inventory'; the definition gives it to"
                               " 'warehouse'"),
            "compensability": (2, "step 'reserve_stock' ran as COMPENSABLE; the definition makes it RETRIABLE"),
            "pivot_first": (2, "the log has STEP_STARTED of step 'reserve_stock' (attempt 1); the definition would"
                               " have written STEP_STARTED of step 'ship_order' (attempt 1) (step 'reserve_stock'"
                               " had started before the pivot 'ship_order', which the definition puts before it)"),
            "dependency": (4, "the log has STEP_STARTED of step 'charge_card' (attempt 1); the definition would"
                              " have written STEP_STARTED of step 'screen_order' (attempt 1) (step 'charge_card'"
                              " started before 'screen_order', which it depends on there)"),
            "order": (2, "the log has STEP_STARTED of step 'reserve_stock' (attempt 1); the definition would have"
                         " written STEP_STARTED of step 'charge_card' (attempt 1) (step 'reserve_stock' started"
                         " before 'charge_card', which it depends on there)"),
        }
        for kind, (sequence, reason) in expected_reasons.items():
            response = await stack.stub.PlanMigration(
                API.PlanMigrationRequest(definition=load_definition_file(versions[kind]))
            )
            assert sorted(plan.saga_id for plan in response.plans) == sorted(held), kind
            for plan in response.plans:
                assert plan.verdict == API.MIGRATION_VERDICT_INCOMPATIBLE, (kind, plan)
                assert (plan.diverging_sequence, plan.reason) == (sequence, reason), kind

        plans = await _plan(stack, versions["compatible"], "--page-size", "1")  # a page per saga
        assert [plan["verdict"] for plan in plans] == ["MIGRATION_VERDICT_COMPATIBLE"] * 3
        assert sorted(plan["saga_id"] for plan in plans) == sorted(held)
        plans = await _plan(stack, versions["renamed"], "--map", "reserve_stock=hold_stock")
        assert [(plan["verdict"], plan["reason"]) for plan in plans] == [
            ("MIGRATION_VERDICT_COMPATIBLE_WITH_MAPPING", "with reserve_stock=hold_stock")
        ] * 3
        # Selection: by saga, state and version; the table says the same.
        plans = await _plan(
            stack, versions["compatible"], "--saga", held[1], "--state", "running", "--definition-version", "1"
        )
        assert [(plan["saga_id"], plan["definition_version"]) for plan in plans] == [(held[1], 1)]
        table = await _compensa("--address", stack.orchestrator.address, "plan", str(versions["order"]))
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[0].split() == ["SAGA", "VERSION", "STATE", "VERDICT", "EVENT", "REASON"]
        assert sum(line.split()[3] == "INCOMPATIBLE" for line in table.stdout.splitlines()[1:-1]) == 3
        assert table.stdout.splitlines()[-1] == "incompatible: 3"
        # `compensa replay --definition` names the same event.
        replayed = await _compensa(
            "--address", stack.orchestrator.address, "replay", held[0], "--definition", str(versions["dependency"])
        )
        assert replayed.returncode == 1, replayed.stdout + replayed.stderr
        assert f"diverges at event 4: {expected_reasons['dependency'][1]}" in replayed.stdout

        after = {saga_id: await _state(stack, saga_id) for saga_id in (*held, done)}
        assert after == before, "planning changed a saga"


async def test_bad_input_to_replay_and_plan_is_refused_with_its_code(
    make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    versions = _versions(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: checkout\nsteps: [unclosed\n")
    async with checkout_stack(make_postgres_url) as stack:
        held = await stack.start(card_token="review-bad-input")
        await _until(stack, held, _waiting)
        address = ("--address", stack.orchestrator.address)

        async def refused(*args: str) -> str:
            result = await _compensa(*address, *args)
            assert result.returncode == 2, result.stdout + result.stderr
            return result.stderr.strip()

        assert await refused("replay", "no-such-saga") == "error: NOT_FOUND: saga 'no-such-saga' not found"
        assert await refused("get", "no-such-saga", "--history") == "error: NOT_FOUND: saga 'no-such-saga' not found"
        assert await refused("plan", str(versions["renamed"]), "--map", "reserve_stock=nowhere") == (
            "error: INVALID_ARGUMENT: step_mappings[0].new_step 'nowhere' is not a step of the new definition"
            " (its steps: charge_card, hold_stock, ship_order)"
        )
        assert await refused("plan", str(versions["compatible"]), "--map", "reserve_stock") == (
            "error: compensa plan: argument --map: invalid mapping 'reserve_stock'; use OLD_STEP=NEW_STEP"
            " (see compensa plan --help)"
        )
        unparsable = await refused("plan", str(broken))
        assert unparsable.startswith(f"error: {broken}: ") and "YAML" in unparsable, unparsable
        unparsable = await refused("replay", held, "--definition", str(broken))
        assert unparsable.startswith(f"error: {broken}: "), unparsable

        # The API itself: the same codes, and nothing read before the mapping is checked.
        definition = load_definition_file(versions["renamed"])
        calls: list[tuple[API.PlanMigrationRequest, grpc.StatusCode, str]] = [
            (API.PlanMigrationRequest(definition=definition, step_mappings=[
                bulk_pb2.StepMapping(old_step="reserve_stock", new_step="nowhere")]),
             grpc.StatusCode.INVALID_ARGUMENT, "step_mappings[0].new_step 'nowhere'"),
            (API.PlanMigrationRequest(definition=definition, step_mappings=[
                bulk_pb2.StepMapping(old_step="nowhere", new_step="hold_stock")]),
             grpc.StatusCode.INVALID_ARGUMENT,
             "step_mappings[0].old_step 'nowhere' is not a step of checkout version(s) 1"),
            (API.PlanMigrationRequest(definition=definition, saga_ids=[held, "no-such-saga"]),
             grpc.StatusCode.NOT_FOUND, "saga 'no-such-saga' not found"),
            (API.PlanMigrationRequest(definition=definition, state=S.SAGA_STATE_SUCCEEDED),
             grpc.StatusCode.INVALID_ARGUMENT, "state must be RUNNING or COMPENSATING"),
            (API.PlanMigrationRequest(), grpc.StatusCode.INVALID_ARGUMENT, "definition is required"),
            (API.PlanMigrationRequest(definition=API.PlanMigrationRequest().definition),
             grpc.StatusCode.INVALID_ARGUMENT, "definition"),
        ]
        calls += [
            (API.PlanMigrationRequest(definition=definition, page_token="not-issued"),
             grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
            (API.PlanMigrationRequest(definition=definition, saga_ids=["no spaces allowed"]),
             grpc.StatusCode.INVALID_ARGUMENT, "saga_ids[0] must be 1-128 characters"),
            (API.PlanMigrationRequest(definition=definition, definition_version=-1),
             grpc.StatusCode.INVALID_ARGUMENT, "definition_version must be 0 (any) or positive"),
        ]
        unknown = API.PlanMigrationRequest(definition=definition)
        unknown.definition.name = "nothing_registered"
        calls.append(
            (unknown, grpc.StatusCode.NOT_FOUND, "definition 'nothing_registered' not found; register it first")
        )
        for request, code, text in calls:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stack.stub.PlanMigration(request)
            assert raised.value.code() == code, raised.value.details()
            assert text in (raised.value.details() or ""), raised.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stack.stub.GetSagaHistory(API.GetSagaHistoryRequest(saga_id="no spaces allowed"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_history_and_plan_need_the_reader_role_and_the_definition_in_scope(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        rig.participant.script("execute", "reserve", ("sleep", 3.0))
        await rig.begin("scope-1")
        history = await rig.stub.GetSagaHistory(
            API.GetSagaHistoryRequest(saga_id="scope-1"), metadata=bearer("reader")
        )
        assert history.history.saga.saga_id == "scope-1" and history.history.definition.name == "board"
        definition = history.history.definition
        plan = API.PlanMigrationRequest(definition=definition)
        planned = await rig.stub.PlanMigration(plan, metadata=bearer("reader"))
        assert [(item.saga_id, item.verdict) for item in planned.plans] == [
            ("scope-1", API.MIGRATION_VERDICT_COMPATIBLE)
        ]
        # A caller limited to other definitions: the saga is not there for it
        # (as for GetSaga), and planning its definition is refused.
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await rig.stub.GetSagaHistory(API.GetSagaHistoryRequest(saga_id="scope-1"), metadata=bearer("elsewhere"))
        assert (hidden.value.code(), hidden.value.details()) == (grpc.StatusCode.NOT_FOUND, "saga 'scope-1' not found")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rig.stub.PlanMigration(plan, metadata=bearer("elsewhere"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "limited to other" in (refused.value.details() or ""), refused.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as nobody:
            await rig.stub.GetSagaHistory(API.GetSagaHistoryRequest(saga_id="scope-1"))
        assert nobody.value.code() == grpc.StatusCode.UNAUTHENTICATED
