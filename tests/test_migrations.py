"""Versioned schema migrations: sagas in flight survive an upgrade, start-up
refuses a schema at another revision, and replicas started together on an
empty database all become healthy.

The databases are real (PostgreSQL and the embedded SQLite); the sagas are
written at the first revision the way the engine writes them, then carried
across every later revision and driven to their end by a real orchestrator
and real participants.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from harness import CHECKOUT, checkout_input, checkout_stack
from sqlalchemy.ext.asyncio import AsyncConnection
from webhook_receiver import WebhookReceiver

from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.definitions import definition_fingerprint, load_definition_file
from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.tokens import completion_token
from compensa.orchestrator.server import start_orchestrator
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.errors import SchemaMismatch
from compensa.orchestrator.store import (
    PostgresSagaStore,
    SagaWrite,
    SqliteSagaStore,
    SqlSagaStore,
    migrations,
    open_store,
    schema,
)
from compensa.orchestrator.store.schema import metadata
from compensa.orchestrator.store.sqlite import TableByTableCommit
from compensa.v1 import definition_pb2, orchestrator_pb2, saga_pb2

S = saga_pb2
# A replica of the release that wrote the sagas, gone without releasing them.
OLD_REPLICA = "replica-of-the-previous-release"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/compensa.db"
    url: str = request.getfixturevalue("make_postgres_url")()
    return url


def _sync_url(url: str) -> str:
    return url.replace("+aiosqlite", "")


def _upgrade_to(url: str, revision: str) -> None:
    """Creates the schema as it was at `revision`, as that release would have."""
    engine = sa.create_engine(_sync_url(url))
    try:
        with engine.begin() as connection:
            config = migrations._config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    engine = sa.create_engine(_sync_url(url))
    try:
        with engine.connect() as connection:
            return migrations.schema_state(connection).revision
    finally:
        engine.dispose()


def _outbox_rows(url: str) -> int:
    engine = sa.create_engine(_sync_url(url))
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT count(*) FROM compensa_alert_outbox")).scalar_one())
    finally:
        engine.dispose()


def _write(transition: machine.Transition, expected: int, now: float, *, release: bool, due_at: float | None,
           lease_until: float, fingerprint: str | None = None) -> SagaWrite:
    return SagaWrite(
        saga=transition.saga, events=transition.events, expected_sequence=expected, owner=OLD_REPLICA, epoch=1,
        release=release, due_at=due_at, lease_until=lease_until, changed_steps=transition.changed_steps,
        request_fingerprint=fingerprint,
    )


def _register_as_the_first_release(
    url: str, definition: definition_pb2.SagaDefinition, now: float
) -> definition_pb2.SagaDefinition:
    """Version 1 of `definition`, stored with the columns the first release wrote."""
    stored = definition_pb2.SagaDefinition()
    stored.CopyFrom(definition)
    stored.version = 1
    engine = sa.create_engine(_sync_url(url))
    try:
        with engine.begin() as connection:
            connection.execute(sa.insert(schema.definitions).values(
                name=stored.name, version=1, fingerprint=definition_fingerprint(definition),
                body=stored.SerializeToString(deterministic=True), created_at=now,
            ))
    finally:
        engine.dispose()
    return stored


class _OldReleasePostgresStore(TableByTableCommit, PostgresSagaStore):
    """PostgreSQL as a release before its one-statement flush wrote it, with
    positions from the counter of the releases before 0015."""

    async def _take_positions(self, conn: AsyncConnection, log: sa.Table, count: int) -> range:
        return await SqlSagaStore._take_positions(self, conn, log, count)


def _old_release_store(database_url: str) -> TableByTableCommit:
    if database_url.startswith("postgresql"):
        return _OldReleasePostgresStore(database_url)
    return SqliteSagaStore(database_url)


class _OldRelease:
    """Writes sagas into a database at an earlier revision through the store,
    as the engine of that release did. It uses the store's generic statements
    (SQLAlchemy Core, also PostgreSQL's before its one-statement flush): they
    name only the columns a write sets, and an old release's writes set only
    columns every revision has, whereas the flush names every current column.
    A saga is driven in memory and written once, as it stood when the old
    release went away; steps carry no delivery (the old release knew none),
    so their rows get the column's default."""

    def __init__(self, store: TableByTableCommit, plan: machine.Plan) -> None:
        self.store = store
        self.plan = plan
        self._logs: dict[str, list[records.LogEvent]] = {}

    def start(self, saga_id: str, now: float) -> records.SagaRecord:
        transition = machine.new_saga(
            self.plan, saga_id=saga_id, input=checkout_input().SerializeToString(deterministic=True), now=now
        )
        self._logs[saga_id] = list(transition.events)
        return transition.saga

    def apply(self, saga: records.SagaRecord, event: machine.Event, now: float) -> records.SagaRecord:
        transition = machine.decide(self.plan, saga, event, now)
        self._logs[saga.saga_id] += transition.events
        return transition.saga

    async def write(self, saga: records.SagaRecord, now: float, *, lease_until: float) -> records.SagaRecord:
        final = saga.is_final
        in_flight = bool(machine.due_calls(self.plan, saga, now))
        release = final or not in_flight
        due_at = None if final else (now if in_flight else machine.wake_at(self.plan, saga))
        old = replace(saga, steps=tuple(replace(step, delivery=records.DELIVERY_POSSIBLE) for step in saga.steps))
        transition = machine.Transition(old, tuple(self._logs[saga.saga_id]))
        (result,) = await self.store.commit(
            [_write(transition, 0, now, release=release, due_at=due_at, lease_until=lease_until,
                    fingerprint=saga.saga_id)],
        )
        assert result.ok
        return saga


def test_the_migrations_make_the_schema_the_code_declares(database_url: str) -> None:
    """schema.py (what the code reads and writes) and the revisions (what
    databases get) cannot drift apart."""
    _upgrade_to(database_url, "head")
    engine = sa.create_engine(_sync_url(database_url))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={"version_table": migrations.VERSION_TABLE, "include_object": _declared_for(connection)},
            )
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert differences == []


def _declared_for(connection: sa.Connection) -> Callable[..., bool]:
    """The objects of schema.py a database of this dialect has: PostgreSQL's
    positions need no counter table."""
    def include(value: object, name: str | None, kind: str, reflected: bool, compare_to: object) -> bool:
        return not (connection.dialect.name == "postgresql" and kind == "table" and name == schema.log_head.name)
    return include


async def test_sagas_in_flight_survive_an_upgrade_from_the_first_revision(
    database_url: str, make_postgres_url: Callable[[], str]
) -> None:
    _upgrade_to(database_url, migrations.BASELINE)
    old = _old_release_store(database_url)
    now = time.time()
    try:
        definition = load_definition_file(CHECKOUT)
        stored = _register_as_the_first_release(database_url, definition, now)
        release = _OldRelease(old, machine.Plan.of(stored))
        # In flight: its first call was due when the old replica went away.
        running = await release.write(release.start("mig-running", now), now, lease_until=now - 1)
        # Waiting on a backoff after a transient error of its first step.
        backing_off = release.start("mig-backoff", now)
        backing_off = release.apply(backing_off, machine.ExecuteErrored("reserve_stock", "UNAVAILABLE"), now)
        await release.write(backing_off, now, lease_until=now - 1)
        # Waiting for a long-running step (the payment) to be reported.
        waiting = release.start("mig-waiting", now)
        waiting = release.apply(waiting, machine.ExecuteSucceeded("reserve_stock", None), now)
        waiting = release.apply(waiting, machine.ExecutePending("charge_card"), now)
        await release.write(waiting, now, lease_until=now - 1)
        # Done before the upgrade.
        done = release.start("mig-done", now)
        for step in ("reserve_stock", "charge_card", "ship_order"):
            done = release.apply(done, machine.ExecuteSucceeded(step, None), now)
        await release.write(done, now, lease_until=now - 1)
        token_key = await old.secret("completion_token")
    finally:
        await old.close()
    assert backing_off.step("reserve_stock").next_attempt_at is not None
    assert waiting.step("charge_card").state == records.STEP_WAITING
    assert done.state == records.SUCCEEDED and running.state == records.RUNNING

    # This release will not run on the old schema: it names the command to run.
    with pytest.raises(SchemaMismatch, match="compensa migrate"):
        await start_orchestrator(ServerConfig(database_url=database_url, listen="127.0.0.1:0"))
    assert _revision(database_url) == migrations.BASELINE

    upgraded = open_store(database_url)
    try:
        assert await upgraded.upgrade_schema() == (migrations.BASELINE, migrations.head())
        assert await upgraded.upgrade_schema() == (migrations.head(), migrations.head())  # repeatable
    finally:
        await upgraded.close()

    async with checkout_stack(make_postgres_url, orchestrator_url=database_url) as stack:
        token = completion_token(token_key, "mig-waiting", "charge_card")
        await stack.stub.CompleteStep(orchestrator_pb2.CompleteStepRequest(
            completion_token=token, result=orchestrator_pb2.COMPLETION_RESULT_SUCCEEDED
        ))
        for saga_id in ("mig-running", "mig-backoff", "mig-waiting"):
            final = await stack.wait_final(saga_id)
            assert final.state == S.SAGA_STATE_SUCCEEDED, (saga_id, final)
        # Each effect once: the old release had already reserved and charged
        # for the waiting saga; the finished one is not touched again.
        reserved = [row.saga_id for row in await stack.rows("inventory", "inventory_reservations")]
        assert sorted(reserved) == ["mig-backoff", "mig-running"]
        charged = [row.saga_id for row in await stack.rows("payment", "payment_charges")]
        assert sorted(charged) == ["mig-backoff", "mig-running"]
        shipped = [row.saga_id for row in await stack.rows("shipping", "shipping_shipments")]
        assert sorted(shipped) == ["mig-backoff", "mig-running", "mig-waiting"]
        events = await stack.events("mig-done")
        assert [event.sequence for event in events] == list(range(1, len(events) + 1))
        assert events[-1].saga_state == S.SAGA_STATE_SUCCEEDED


async def test_a_subscriber_resumes_across_the_upgrade_to_positions_without_a_counter(
    make_postgres_url: Callable[[], str],
) -> None:
    """Revision 0015 drops PostgreSQL's position counter: sagas written with
    the counter's positions, in flight at the upgrade, finish after it, and a
    WatchSagas resumed from a position of the old log gets every later event
    once, old ones first, in increasing positions."""
    database_url = make_postgres_url()
    _upgrade_to(database_url, "0014")
    old = _OldReleasePostgresStore(database_url)
    now = time.time()
    try:
        definition = load_definition_file(CHECKOUT)
        stored, _ = await old.register_definition(definition, definition_fingerprint(definition), now)
        release = _OldRelease(old, machine.Plan.of(stored))
        in_flight = [f"up-{n}" for n in range(4)]
        for saga_id in in_flight:
            await release.write(release.start(saga_id, now), now, lease_until=now - 1)
        old_log = await old.read_log(0, 100)
    finally:
        await old.close()
    assert [event.position for event in old_log] == list(range(1, len(old_log) + 1))  # the counter's
    resume_after = old_log[len(old_log) // 2].position

    upgraded = open_store(database_url)
    try:
        assert await upgraded.upgrade_schema() == ("0014", migrations.head())
    finally:
        await upgraded.close()
    async with checkout_stack(make_postgres_url, orchestrator_url=database_url) as stack:
        finals = {saga_id: await stack.wait_final(saga_id) for saga_id in in_flight}
        assert {final.state for final in finals.values()} == {S.SAGA_STATE_SUCCEEDED}
        wanted = sum(final.sequence for final in finals.values()) - sum(
            1 for event in old_log if event.position <= resume_after
        )
        resumed: list[S.SagaEvent] = []
        stream = stack.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(after_position=resume_after))
        async with asyncio.timeout(20):
            async for message in stream:
                resumed.append(message.event)
                if len(resumed) == wanted:
                    break
        stream.cancel()
    assert all(a.position < b.position for a, b in itertools.pairwise(resumed))
    old_after = [event.position for event in old_log if event.position > resume_after]
    assert [event.position for event in resumed[:len(old_after)]] == old_after
    before = {(event.saga_id, event.event.sequence) for event in old_log if event.position <= resume_after}
    after = [(event.saga_id, event.sequence) for event in resumed]
    assert len(after) == len(set(after)) and not before & set(after)
    assert before | set(after) == {
        (saga_id, sequence) for saga_id, final in finals.items() for sequence in range(1, final.sequence + 1)
    }


async def test_an_alert_waiting_in_the_outbox_of_revision_0003_is_delivered_after_the_upgrade(
    database_url: str,
) -> None:
    _upgrade_to(database_url, "0003")
    old = _old_release_store(database_url)
    now = time.time()
    try:
        definition = load_definition_file(CHECKOUT)
        stored = _register_as_the_first_release(database_url, definition, now)
        old_release = _OldRelease(old, machine.Plan.of(stored))
        await old_release.write(old_release.start("mig-alerted", now), now, lease_until=now - 1)
    finally:
        await old.close()
    # What release 0003 wrote with an ALERT_RAISED event, delivered twice without success.
    engine = sa.create_engine(_sync_url(database_url))
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(
                "INSERT INTO compensa_alert_outbox (saga_id, sequence, position, definition_name, step_name,"
                " message, raised_at, attempts, next_attempt_at, last_error) VALUES ('mig-alerted', 7, 41,"
                " 'checkout', 'charge_card', 'a person must act', :now, 2, :now, 'HTTP 500')"
            ), {"now": now - 5})
    finally:
        engine.dispose()

    upgraded = open_store(database_url)
    try:
        assert await upgraded.upgrade_schema() == ("0003", migrations.head())
        (alert,) = await upgraded.read_alerts(0, 10)
        assert (alert.position, alert.alert_id, alert.event_position, alert.step_name) == (
            1, "mig-alerted/7", 41, "charge_card"
        )
    finally:
        await upgraded.close()

    with WebhookReceiver(script=[]).serving() as webhook:
        running = await start_orchestrator(ServerConfig(
            database_url=database_url, listen="127.0.0.1:0", alert_webhook=webhook.url,
            participants={name: "127.0.0.1:9" for name in ("inventory", "payment", "shipping")},
        ))
        try:
            deadline = time.monotonic() + 20
            while not webhook.delivered() or _outbox_rows(database_url):
                assert time.monotonic() < deadline, webhook.deliveries
                await asyncio.sleep(0.05)  # ok-sleep: polling interval, bounded by the deadline
        finally:
            await running.stop(0)
    (delivered,) = webhook.deliveries
    assert delivered.body["alert_id"] == "mig-alerted/7" and delivered.body["delivery_attempt"] == 3
    assert (delivered.body["kind"], delivered.body["position"], delivered.body["sequence"]) == ("SAGA", 41, 7)
    # A new alert takes a later position of the log.
    store = open_store(database_url)
    try:
        await store.set_participant("p", "127.0.0.1:9", updated_by="test", now=now)
        await store.participant_failing("p", now)
        raised = await store.alert_participant_unhealthy("p", unhealthy_before=now, now=now, message="down")
        assert raised is not None and raised.position > 1
    finally:
        await store.close()


async def test_a_database_made_before_migrations_existed_is_upgraded(database_url: str) -> None:
    """Releases before migrations made the tables without a version table:
    that schema is the first revision, and migrate carries it forward."""
    _upgrade_to(database_url, migrations.BASELINE)
    engine = sa.create_engine(_sync_url(database_url))
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP TABLE {migrations.VERSION_TABLE}"))
    finally:
        engine.dispose()
    assert _revision(database_url) == migrations.BASELINE
    store = open_store(database_url)
    try:
        assert await store.upgrade_schema() == (migrations.BASELINE, migrations.head())
        await store.ensure_schema()  # serve accepts it now
    finally:
        await store.close()


async def test_a_schema_from_a_newer_release_is_refused(database_url: str) -> None:
    _upgrade_to(database_url, "head")
    engine = sa.create_engine(_sync_url(database_url))
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = 'from-the-future'"))
    finally:
        engine.dispose()
    store = open_store(database_url)
    try:
        with pytest.raises(SchemaMismatch, match="newer release"):
            await store.ensure_schema()
        with pytest.raises(SchemaMismatch, match="newer release"):
            await store.upgrade_schema()
    finally:
        await store.close()


async def _health(address: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(answer.status)


@pytest.mark.parametrize("trial", range(5))
async def test_replicas_started_together_on_an_empty_database_all_become_healthy(
    trial: int, make_postgres_url: Callable[[], str]
) -> None:
    from grpc_health.v1 import health_pb2

    url = make_postgres_url()
    configs = [
        ServerConfig(
            database_url=url, listen="127.0.0.1:0", definition_paths=(CHECKOUT,),
            # Registering checkout needs addresses for its participants; none is called.
            participants={name: "127.0.0.1:9" for name in ("inventory", "payment", "shipping")},
        )
        for _ in range(3)
    ]
    started = await asyncio.gather(*(start_orchestrator(config) for config in configs), return_exceptions=True)
    replicas = [running for running in started if not isinstance(running, BaseException)]
    try:
        assert len(replicas) == 3, [repr(error) for error in started if isinstance(error, BaseException)]
        for replica in replicas:
            assert await _health(replica.address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        for replica in replicas:
            await replica.stop()
    assert _revision(url) == migrations.head()


def test_serve_that_cannot_start_ends_with_one_line_and_exit_2(tmp_path: Path) -> None:
    """A replica that can never become ready does not stay half-alive
    (listening, never SERVING): the process ends, saying what to run."""
    url = f"sqlite+aiosqlite:///{tmp_path}/old.db"
    _upgrade_to(url, migrations.BASELINE)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "compensa"), "serve", "--listen", "127.0.0.1:0", "--db", url],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "compensa migrate" in last, result.stderr
    assert "Traceback" not in result.stderr
