"""The `compensa` command line, its timeline rendering, and the demo, against real servers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2

from compensa.orchestrator.cli.demo import CHECKOUT_PARTICIPANTS, DEFINITIONS_DIR
from compensa.orchestrator.shared import timeline
from compensa.v1 import saga_pb2

COMPENSA = Path(sys.executable).parent / "compensa"
SUBCOMMANDS = (
    "serve", "migrate", "purge", "participant", "demo", "start", "get", "list", "status", "watch", "cancel", "retry",
    "resolve", "register", "definitions", "alerts", "codegen", "replay", "plan",
)
CHECKOUT_INPUT = {
    "order_id": "order-cli-1",
    "sku": "sku-widget",
    "quantity": 1,
    "amount_cents": 1_000,
    "card_token": "card-ok",
    "shipping_address": "1 Saga Street",
}
# Generous: a subprocess that hangs must fail the test, not the suite.
COMMAND_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class _Completed:
    returncode: int
    stdout: str
    stderr: str


def _compensa(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COMPENSA), *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, cwd=cwd
    )


async def _compensa_async(*args: str, cwd: Path | None = None) -> _Completed:
    """Runs `compensa` without blocking the event loop that serves the in-process servers."""
    process = await asyncio.create_subprocess_exec(
        str(COMPENSA), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_SECONDS)
    assert process.returncode is not None
    return _Completed(process.returncode, stdout.decode(), stderr.decode())


def _timestamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


# --- help and argument errors ---------------------------------------------------------


def test_help_exits_zero() -> None:
    result = _compensa("--help")
    assert result.returncode == 0, result.stderr
    for subcommand in SUBCOMMANDS:
        assert subcommand in result.stdout


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_subcommand_help_exits_zero(subcommand: str) -> None:
    result = _compensa(subcommand, "--help")
    assert result.returncode == 0, result.stderr
    assert f"compensa {subcommand}" in result.stdout


def test_list_with_unknown_state_exits_2_naming_valid_states() -> None:
    result = _compensa("list", "--state", "bogus")
    assert result.returncode == 2
    assert "bogus" in result.stderr
    for state in ("running", "compensating", "succeeded", "compensated", "failed"):
        assert state in result.stderr


def test_list_with_malformed_duration_exits_2() -> None:
    result = _compensa("list", "--stuck", "ten minutes")
    assert result.returncode == 2
    assert "invalid duration" in result.stderr


def test_serve_with_a_retention_that_is_not_positive_exits_2(tmp_path: Path) -> None:
    result = _compensa("serve", "--retention", "0s", "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert result.returncode == 2
    assert "--retention must be positive" in result.stderr
    assert not (tmp_path / ".compensa").exists()  # nothing was created


def test_purge_with_an_age_that_is_not_positive_exits_2(tmp_path: Path) -> None:
    result = _compensa("purge", "--older-than", "0s", "--db", f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    assert result.returncode == 2
    assert "--older-than must be positive" in result.stderr


def test_purge_of_a_sqlite_file_that_does_not_exist_exits_2_and_creates_none(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    result = _compensa("purge", "--older-than", "30d", "--db", f"sqlite+aiosqlite:///{missing}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no database at {missing}; check --db"
    assert not missing.exists()


def test_purge_of_a_database_without_compensa_tables_exits_2_and_creates_none(
    make_postgres_url: Callable[[], str]
) -> None:
    import sqlalchemy as sa

    url = make_postgres_url()
    result = _compensa("purge", "--db", url, "--older-than", "30d")
    assert result.returncode == 2
    assert result.stderr.startswith("error: no Compensa tables in this database")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert not [name for name in sa.inspect(conn).get_table_names() if name.startswith("compensa_")]
    finally:
        engine.dispose()


def test_unreachable_orchestrator_says_there_is_none_and_how_to_point_at_one() -> None:
    # Port 1 is never an orchestrator; the deadline bounds the wait.
    result = _compensa("--address", "127.0.0.1:1", "get", "some-saga", "--timeout", "2")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: no orchestrator at 127.0.0.1:1 (connection refused)"), result.stderr
    assert "--address" in result.stderr and "COMPENSA_ADDRESS" in result.stderr


# --- timeline rendering ---------------------------------------------------------------


def test_format_event_shows_sequence_step_attempt_and_states() -> None:
    event = saga_pb2.SagaEvent(
        saga_id="saga-1",
        sequence=3,
        type=saga_pb2.EVENT_TYPE_STEP_SUCCEEDED,
        time=_timestamp(43_201, 234_000_000),
        saga_state=saga_pb2.SAGA_STATE_RUNNING,
        step_name="charge_card",
        step_state=saga_pb2.STEP_STATE_SUCCEEDED,
        attempt=1,
    )
    line = timeline.format_event(event)
    assert "#3" in line
    assert "12:00:01.234" in line
    assert "STEP SUCCEEDED" in line
    assert "charge_card" in line
    assert "attempt 1" in line
    assert "saga RUNNING" in line
    assert "\n" not in line
    assert "\033[" not in line


def test_format_event_shows_reason_and_actor() -> None:
    event = saga_pb2.SagaEvent(
        sequence=5,
        type=saga_pb2.EVENT_TYPE_STEP_COMPENSATING,
        saga_state=saga_pb2.SAGA_STATE_COMPENSATING,
        step_name="reserve_stock",
        message="payment declined",
        actor="ops@host",
    )
    line = timeline.format_event(event)
    assert "#5" in line
    assert "STEP COMPENSATING" in line
    assert "reserve_stock" in line
    assert "reason: payment declined" in line
    assert "by ops@host" in line


def test_format_event_says_which_replica_took_a_saga_over_from_which() -> None:
    event = saga_pb2.SagaEvent(
        sequence=4,
        type=saga_pb2.EVENT_TYPE_TAKEN_OVER,
        saga_state=saga_pb2.SAGA_STATE_RUNNING,
        message="replica b took the saga over from replica a: its lease expired 1.2s ago",
        actor="b",
    )
    line = timeline.format_event(event)
    assert "TAKEN OVER" in line
    assert "saga RUNNING" in line
    assert line.endswith("  replica b took the saga over from replica a: its lease expired 1.2s ago")


def test_format_event_colours_only_when_asked() -> None:
    event = saga_pb2.SagaEvent(
        sequence=9, type=saga_pb2.EVENT_TYPE_SAGA_COMPENSATED, saga_state=saga_pb2.SAGA_STATE_COMPENSATED
    )
    assert "\033[" in timeline.format_event(event, color=True)
    assert "\033[" not in timeline.format_event(event)


def test_format_saga_shows_header_and_one_line_per_step() -> None:
    saga = saga_pb2.Saga(
        saga_id="saga-2",
        definition_name="checkout",
        definition_version=4,
        state=saga_pb2.SAGA_STATE_COMPENSATED,
        sequence=11,
        failure_reason="charge_card: card declined",
        steps=[
            saga_pb2.Step(
                name="reserve_stock", state=saga_pb2.STEP_STATE_COMPENSATED, attempts=1, compensate_attempts=1
            ),
            saga_pb2.Step(name="charge_card", state=saga_pb2.STEP_STATE_FAILED, attempts=2, last_error="card declined"),
            saga_pb2.Step(name="ship_order", state=saga_pb2.STEP_STATE_PENDING),
        ],
    )
    header, *rest = timeline.format_saga(saga).splitlines()
    assert "saga-2" in header
    assert "checkout@4" in header
    assert "COMPENSATED" in header
    assert "11" in header
    step_lines = [line for line in rest if line.strip().split()[0] in {"reserve_stock", "charge_card", "ship_order"}]
    assert len(step_lines) == 3
    reserve, charge, ship = step_lines
    assert "COMPENSATED" in reserve and "attempts 1" in reserve
    assert "FAILED" in charge and "attempts 2" in charge and "card declined" in charge
    assert "PENDING" in ship


# --- against real servers -------------------------------------------------------------


@dataclass(frozen=True)
class _Deployment:
    address: str


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[_Deployment]:
    """The three example participants and an orchestrator, on SQLite files in tmp_path."""
    async with checkout_deployment(tmp_path) as running:
        yield running


@asynccontextmanager
async def checkout_deployment(tmp_path: Path) -> AsyncIterator[_Deployment]:
    """The three example participants and an orchestrator, on SQLite files in tmp_path."""
    from compensa.examples.server import start_participant
    from compensa.orchestrator.config import ServerConfig
    from compensa.orchestrator.server import start_orchestrator

    participants = [
        await start_participant(kind, f"sqlite+aiosqlite:///{tmp_path / kind}.db") for kind in CHECKOUT_PARTICIPANTS
    ]
    orchestrator = await start_orchestrator(
        ServerConfig(
            listen="127.0.0.1:0",
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}",
            definition_paths=(DEFINITIONS_DIR / "checkout.yaml",),
            participants={
                kind: running.address for kind, running in zip(CHECKOUT_PARTICIPANTS, participants, strict=True)
            },
        )
    )
    try:
        yield _Deployment(address=orchestrator.address)
    finally:
        await orchestrator.stop()
        for participant in participants:
            await participant.stop()


async def test_start_with_malformed_json_exits_2(deployment: _Deployment) -> None:
    result = await _compensa_async("--address", deployment.address, "start", "checkout", "--input", "{not json")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "CheckoutInput" in result.stderr


async def test_start_unknown_definition_exits_2_with_not_found(deployment: _Deployment) -> None:
    result = await _compensa_async("--address", deployment.address, "start", "no-such-flow", "--input", "{}")
    assert result.returncode == 2
    assert result.stderr.startswith("error: NOT_FOUND: ")


async def test_start_wait_get_list_and_watch(deployment: _Deployment) -> None:
    address = ("--address", deployment.address)
    succeeded = await _compensa_async(
        *address, "start", "checkout", "--input", json.dumps(CHECKOUT_INPUT), "--saga-id", "cli-ok", "--wait"
    )
    assert succeeded.returncode == 0, succeeded.stdout + succeeded.stderr
    assert "SAGA SUCCEEDED" in succeeded.stdout
    assert "charge_card" in succeeded.stdout

    declined_input = json.dumps({**CHECKOUT_INPUT, "order_id": "order-cli-2", "card_token": "flagged-card"})
    declined = await _compensa_async(
        *address, "start", "checkout", "--input", declined_input, "--saga-id", "cli-declined", "--wait"
    )
    assert declined.returncode == 1, declined.stdout + declined.stderr
    assert "SAGA COMPENSATED" in declined.stdout

    shown = await _compensa_async(*address, "get", "cli-declined", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "SAGA_STATE_COMPENSATED"
    assert isinstance(json.loads(shown.stdout)["sequence"], int)

    table = await _compensa_async(*address, "list")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["SAGA", "ID", "DEFINITION", "STATE", "SEQ", "UPDATED"]
    assert sorted(row.split()[0] for row in rows) == ["cli-declined", "cli-ok"]
    # Aligned: each column starts at the same offset on every line.
    for row in rows:
        _, definition, state, *_ = row.split()
        assert (row.index(definition), row.index(state)) == (header.index("DEFINITION"), header.index("STATE")), row

    listed = await _compensa_async(*address, "list", "--state", "compensated", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["saga_id"] for line in listed.stdout.splitlines()] == ["cli-declined"]

    watched = await _compensa_async(*address, "watch", "cli-ok", "--json")
    assert watched.returncode == 0, watched.stderr
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    # 64-bit integers as JSON numbers, not protobuf's strings (the CLI's JSON is for people and jq).
    assert [event["sequence"] for event in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "EVENT_TYPE_SAGA_SUCCEEDED"

    status = await _compensa_async(*address, "status")
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines()]
    assert rows[0] == ["DEFINITION", "STATE", "SAGAS", "STUCK", "UNRESOLVED", "OLDEST", "CHANGE"]
    assert [row[:5] for row in rows[1:3]] == [
        ["checkout", "SUCCEEDED", "1", "-", "-"],
        ["checkout", "COMPENSATED", "1", "-", "-"],
    ]
    assert "unchanged for 10m" in status.stdout
    summary = json.loads((await _compensa_async(*address, "status", "--json", "--stuck", "90s")).stdout)
    assert [(entry["state"], entry["count"]) for entry in summary["states"]] == [
        ("SAGA_STATE_SUCCEEDED", 1), ("SAGA_STATE_COMPENSATED", 1),
    ]
    assert summary["stuck_for"] == "90s"

    not_allowed = await _compensa_async(*address, "resolve", "cli-ok", "--note", "nothing to do")
    assert not_allowed.returncode == 2
    assert not_allowed.stderr.startswith("error: FAILED_PRECONDITION: ")


async def test_purge_deletes_finished_sagas_older_than_asked(deployment: _Deployment, tmp_path: Path) -> None:
    address = ("--address", deployment.address)
    database = ("--db", f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}")
    done = await _compensa_async(
        *address, "start", "checkout", "--input", json.dumps(CHECKOUT_INPUT), "--saga-id", "cli-purged", "--wait"
    )
    assert done.returncode == 0, done.stdout + done.stderr

    too_young = await _compensa_async("purge", *database, "--older-than", "1h")
    assert too_young.returncode == 0, too_young.stderr
    assert too_young.stdout.strip() == "deleted 0 saga(s) done for good"
    assert (await _compensa_async(*address, "get", "cli-purged")).returncode == 0

    await asyncio.sleep(0.05)  # ok-sleep: the saga's last change must be older than the 10ms asked below
    purged = await _compensa_async("purge", *database, "--older-than", "10ms")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.strip() == "deleted 1 saga(s) done for good"
    gone = await _compensa_async(*address, "get", "cli-purged")
    assert gone.returncode == 2
    assert gone.stderr.startswith("error: NOT_FOUND: ")


async def test_register_and_list_definitions(deployment: _Deployment, tmp_path: Path) -> None:
    address = ("--address", deployment.address)
    checkout = (DEFINITIONS_DIR / "checkout.yaml").read_text()
    changed = tmp_path / "checkout-v2.yaml"
    changed.write_text(checkout.replace("description: ", "description: (v2) ", 1))
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        checkout.replace("name: checkout", "name: checkout-broken", 1).replace("kind: PIVOT", "kind: BOGUS")
    )

    refused = await _compensa_async(*address, "register", str(changed), str(broken))
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and "broken.yaml" in refused.stderr and "BOGUS" in refused.stderr
    assert refused.stdout == ""  # the valid file was not sent either

    registered = await _compensa_async(*address, "register", str(changed))
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout.startswith("checkout version 2: registered, the latest now (was version 1)\n---")
    again = await _compensa_async(*address, "register", str(changed))
    assert again.stdout.strip() == "checkout version 2: unchanged, already registered (the latest)"

    listed = await _compensa_async(*address, "definitions")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "VERSION", "STEPS", "DESCRIPTION"]
    assert [row.split()[:3] for row in rows] == [["checkout", "2", "3"]]
    assert "(v2)" in rows[0]

    first = await _compensa_async(*address, "definitions", "checkout", "--version", "1")
    assert first.returncode == 0, first.stderr
    shown = json.loads(first.stdout)
    assert shown["version"] == 1 and "(v2)" not in shown["description"]
    assert [step["name"] for step in shown["steps"]] == ["reserve_stock", "charge_card", "ship_order"]

    missing = await _compensa_async(*address, "definitions", "no-such-flow")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: NOT_FOUND: ")
    assert (await _compensa_async(*address, "definitions", "--version", "1")).returncode == 2


async def test_alerts_and_participants_list_show_a_participant_failing_its_health_checks(tmp_path: Path) -> None:
    """On the embedded SQLite store: the probe, the alert, the log and the list."""
    from webhook_receiver import health_server

    from compensa.orchestrator.config import ServerConfig
    from compensa.orchestrator.server import start_orchestrator

    async with health_server(serving=False) as watched:
        orchestrator = await start_orchestrator(ServerConfig(
            listen="127.0.0.1:0", database_url=f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}",
            participants={"watched": watched.address}, participant_health_seconds=0.1,
            alert_participant_unhealthy_seconds=0.3,
        ))
        try:
            address = ("--address", orchestrator.address)
            printed = await _compensa_async(*address, "alerts", "--limit", "1")
            assert printed.returncode == 0, printed.stderr
            (line,) = printed.stdout.splitlines()
            assert line.startswith("@1 ") and "PARTICIPANT_UNHEALTHY" in line
            assert f"participant watched at {watched.address}: " in line and "NOT_SERVING" in line
            listed = await _compensa_async(*address, "participants", "list")
            assert listed.returncode == 0, listed.stderr
            assert "watched" in listed.stdout and " failing " in listed.stdout and "(alerted)" in listed.stdout

            await watched.set(True)
            as_json = await _compensa_async(*address, "alerts", "--after", "1", "--limit", "1", "--json")
            assert as_json.returncode == 0, as_json.stderr
            recovered = json.loads(as_json.stdout)
            assert (recovered["position"], recovered["kind"]) == (2, "ALERT_KIND_PARTICIPANT_RECOVERED")
        finally:
            await orchestrator.stop()


def test_serve_refuses_a_participant_health_interval_that_is_not_positive(tmp_path: Path) -> None:
    result = _compensa("serve", "--db", f"sqlite+aiosqlite:///{tmp_path}/x.db", "--participant-health-interval", "0s")
    assert result.returncode == 2 and "--participant-health-interval must be positive" in result.stderr


def test_demo_succeeds_from_any_directory(tmp_path: Path) -> None:
    result = _compensa("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCEEDED" in result.stdout
    assert "COMPENSATED" in result.stdout
    assert "demo OK" in result.stdout
    # It ends, so it shows no dashboard link that would be dead by the time it is clicked.
    assert "http://" not in result.stdout
    assert "compensa demo --stay" in result.stdout


def test_migrate_creates_the_schema_and_is_repeatable(make_postgres_url: Callable[[], str]) -> None:
    import sqlalchemy as sa

    url = make_postgres_url()
    for _ in range(2):
        result = _compensa("migrate", "--db", url)
        assert result.returncode == 0, result.stderr
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert {"compensa_sagas", "compensa_saga_steps", "compensa_saga_events", "compensa_definitions"} <= tables


def test_serve_with_a_database_timeout_that_is_not_positive_exits_2(tmp_path: Path) -> None:
    result = _compensa("serve", "--database-timeout", "0s", "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert result.returncode == 2
    assert "--database-timeout must be positive" in result.stderr
    assert not (tmp_path / ".compensa").exists()  # nothing was created
