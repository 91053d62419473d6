"""Sagas partitioned over two PostgreSQL clusters (issue 27, docs/partitions.md).

One `compensa serve` with `--db` on one throwaway cluster and `--partition-db`
on another, real participants: sagas started through it land in both
databases (read directly in each), and GetSaga, ListSagas (paged across both)
and WatchSagas (from the start, and resumed, after a kill -9 and restart,
from a token taken midway while sagas still ran) see every saga and every
event exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pg
import psycopg
import pytest
from processes import COMPENSA, FAST_RECONNECT, ProcessSet
from sqlalchemy.engine import make_url
from test_crash import SKUS, Order, start_stack, wait_all_final
from test_store import T0, _alert, _create, _plan, _write

from compensa.orchestrator.store import PARTITION_COUNT, PartitionedStore, open_store, partition_of
from compensa.v1 import bulk_pb2, orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.xdist_group("heavy")]

SAGA_COUNT = 60
#: Events read before the first stream is closed and its token kept.
MIDWAY_EVENTS = 120
STREAM_TIMEOUT = 60.0

EventKey = tuple[str, int]  # (saga_id, sequence)


def _conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _rows(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(_conninfo(url)) as conn:
        return list(conn.execute(query).fetchall())


async def _read_stream(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, request: orchestrator_pb2.WatchSagasRequest,
    *, until: Callable[[list[saga_pb2.SagaEvent]], bool],
) -> tuple[list[saga_pb2.SagaEvent], str]:
    """Events of a WatchSagas stream until `until(events)`, and the resume
    token of the last message read."""
    events: list[saga_pb2.SagaEvent] = []
    token = ""
    stream = stub.WatchSagas(request)
    try:
        async with asyncio.timeout(STREAM_TIMEOUT):
            async for response in stream:
                events += [response.event] if response.HasField("event") else list(response.events)
                assert response.resume_token, "every message carries a resume token"
                token = response.resume_token
                if until(events):
                    break
    finally:
        stream.cancel()
    return events, token


@contextlib.asynccontextmanager
async def partitioned_store(home_url: str, *partition_urls: str, **options: Any) -> AsyncIterator[PartitionedStore]:
    """A PartitionedStore over these databases, its schema and map ready."""
    store = open_store(home_url, partition_urls=partition_urls, **options)
    assert isinstance(store, PartitionedStore)
    try:
        await store.ensure_schema()
        yield store
    finally:
        await store.close()


def _once_each(events: list[saga_pb2.SagaEvent]) -> collections.Counter[EventKey]:
    return collections.Counter((event.saga_id, event.sequence) for event in events)


async def test_sagas_spread_over_two_databases_are_served_as_one(
    tmp_path: Path, make_postgres_url: Callable[[], str],
    private_postgres_pair: tuple[pg.PostgresServer, pg.PostgresServer],
) -> None:
    home_server, other_server = private_postgres_pair
    home_url = pg.DatabaseFactory(home_server).create()
    other_url = pg.DatabaseFactory(other_server).create()
    orders = [Order(f"part-{n:03d}", "ok", SKUS[n % len(SKUS)], 1, 1_000 + n, f"tok-{n}") for n in range(SAGA_COUNT)]
    with ProcessSet(tmp_path) as processes:
        stack = await start_stack(
            processes, make_postgres_url, {}, orchestrator_url=home_url,
            orchestrator_options=["--partition-db", other_url],
        )
        async with grpc.aio.insecure_channel(stack.orchestrator.address, options=FAST_RECONNECT) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            # A stream from the start, opened before any saga: it is cut
            # midway while sagas still run, and its token resumes it later.
            first_part = asyncio.create_task(_read_stream(
                stub, orchestrator_pb2.WatchSagasRequest(after_position=0),
                until=lambda events: len(events) >= MIDWAY_EVENTS,
            ))
            started = await asyncio.gather(*(stub.StartSaga(order.request(), timeout=20.0) for order in orders))
            assert all(response.created for response in started)
            midway_events, midway_token = await first_part
            sagas = await wait_all_final(stub, orders)
            assert {saga.state for saga in sagas.values()} == {saga_pb2.SAGA_STATE_SUCCEEDED}
            every_event = {(saga.saga_id, sequence) for saga in sagas.values() for sequence in
                           range(1, saga.sequence + 1)}

            # Each database holds sagas, each saga in the database its partition says.
            held = {url: {row[0] for row in _rows(url, "SELECT saga_id FROM compensa_sagas")}
                    for url in (home_url, other_url)}
            assert all(held.values()), f"a database holds no saga: {[len(ids) for ids in held.values()]}"
            assert held[home_url].isdisjoint(held[other_url])
            assert held[home_url] | held[other_url] == {order.saga_id for order in orders}
            partition_map = dict(_rows(home_url, "SELECT partition_no, database_id FROM compensa_partition_map"))
            assert len(partition_map) == PARTITION_COUNT
            home_id = partition_map[partition_of(next(iter(held[home_url])))]
            for url, saga_ids in held.items():
                assert {partition_map[partition_of(saga_id)] == home_id for saga_id in saga_ids} == {url == home_url}
            # Each database's events are its own sagas' only.
            for url, saga_ids in held.items():
                logged = {row[0] for row in _rows(url, "SELECT DISTINCT saga_id FROM compensa_saga_events")}
                assert logged == saga_ids

            # GetSaga finds every saga, wherever it is.
            for order in orders:
                saga = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=order.saga_id), timeout=5.0)).saga
                assert saga.state == saga_pb2.SAGA_STATE_SUCCEEDED and saga.saga_id == order.saga_id

            # ListSagas in small pages: every saga once, newest first across both.
            listed: list[saga_pb2.Saga] = []
            request = orchestrator_pb2.ListSagasRequest(page_size=7)
            pages = 0
            while True:
                response = await stub.ListSagas(request, timeout=10.0)
                listed += response.sagas
                pages += 1
                if not response.next_page_token:
                    break
                request.page_token = response.next_page_token
            assert collections.Counter(saga.saga_id for saga in listed) == collections.Counter(
                order.saga_id for order in orders
            )
            assert pages >= SAGA_COUNT // 7
            order_keys = [(saga.create_time.ToNanoseconds(), saga.saga_id) for saga in listed]
            assert order_keys == sorted(order_keys, reverse=True)

            # WatchSagas from the start: every event exactly once, each
            # saga's in sequence order.
            from_start, _ = await _read_stream(
                stub, orchestrator_pb2.WatchSagasRequest(max_events_per_message=50),
                until=lambda events: len(events) >= len(every_event),
            )
            assert _once_each(from_start) == collections.Counter(every_event)
            for saga_id in sagas:
                sequences = [event.sequence for event in from_start if event.saga_id == saga_id]
                assert sequences == sorted(sequences)

            # Resumed from the token taken midway, by a new process (a token
            # is a durable cursor): the rest, no gap, no duplicate.
            stack.orchestrator.kill()
            await stack.orchestrator.start_serving()
            assert 0 < len(midway_events) < len(every_event)
            rest, _ = await _read_stream(
                stub, orchestrator_pb2.WatchSagasRequest(resume_token=midway_token),
                until=lambda events: len(midway_events) + len(events) >= len(every_event),
            )
            assert _once_each(midway_events + rest) == collections.Counter(every_event)

            # Nothing more is pending after the last token: a stream resumed
            # there is quiet until a new saga starts, and then sends only it.
            _, last_token = await _read_stream(
                stub, orchestrator_pb2.WatchSagasRequest(resume_token=midway_token),
                until=lambda events: len(events) >= len(every_event) - len(midway_events),
            )
            late = Order("part-late", "ok", SKUS[0], 1, 999, "tok-late")
            following = asyncio.create_task(_read_stream(
                stub, orchestrator_pb2.WatchSagasRequest(resume_token=last_token),
                until=lambda events: any(event.type == saga_pb2.EVENT_TYPE_SAGA_SUCCEEDED for event in events),
            ))
            await stub.StartSaga(late.request(), timeout=20.0)
            late_events, _ = await following
            assert {event.saga_id for event in late_events} == {late.saga_id}
            assert [event.sequence for event in late_events] == list(range(1, len(late_events) + 1))

            # One int64 cannot say where two logs stand.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _read_stream(stub, orchestrator_pb2.WatchSagasRequest(after_position=5), until=bool)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "resume_token" in (refused.value.details() or "")


def test_migrate_upgrades_every_database(make_postgres_url: Callable[[], str]) -> None:
    home_url, other_url = make_postgres_url(), make_postgres_url()
    migrated = subprocess.run(
        [str(COMPENSA), "migrate", "--db", home_url, "--partition-db", other_url],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    for url in (home_url, other_url):
        assert _rows(url, "SELECT count(*) FROM compensa_sagas") == [(0,)]


async def test_a_restart_reads_the_map_it_made(
    private_postgres_pair: tuple[pg.PostgresServer, pg.PostgresServer],
) -> None:
    """The map is made once; a restart naming the databases in another order
    reads it unchanged, and one that leaves a database out is refused."""
    from compensa.common.startup import DatabaseMisconfigured

    home_server, other_server = private_postgres_pair
    home_url = pg.DatabaseFactory(home_server).create()
    other_url = pg.DatabaseFactory(other_server).create()
    third_url = pg.DatabaseFactory(other_server).create()

    async def map_of(url: str, *partition_urls: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        async with partitioned_store(url, *partition_urls) as store:
            chosen = store.partition_map
            return chosen.databases, tuple(chosen.databases[owner] for owner in chosen.owners)

    databases, placed = await map_of(home_url, other_url)
    assert collections.Counter(placed) == {databases[0]: PARTITION_COUNT // 2, databases[1]: PARTITION_COUNT // 2}
    _, placed_again = await map_of(home_url, third_url, other_url)
    assert placed_again == placed  # a database added holds nothing until partitions move to it
    with pytest.raises(DatabaseMisconfigured, match="neither --db nor any --partition-db"):
        await map_of(home_url, third_url)

    # A deployment that ran on one database keeps its sagas where they are.

    alone_url = pg.DatabaseFactory(home_server).create()
    alone = open_store(alone_url)
    try:
        await alone.ensure_schema()
        await _create(alone, await _plan(alone), "from-before")
    finally:
        await alone.close()
    databases, placed = await map_of(alone_url, pg.DatabaseFactory(other_server).create())
    assert set(placed) == {databases[0]}


async def test_a_group_commit_lands_each_write_in_its_own_database_and_alerts_are_delivered_from_each(
    make_postgres_url: Callable[[], str],
) -> None:
    """The store alone, two databases on the shared server: one flush with
    writes for sagas of both is answered in order, each write in its saga's
    database; a saga's alert is claimed from its database's outbox and its
    delivery is told to that database; a bulk action selects the sagas of
    both."""
    from compensa.orchestrator.shared.selection import SagaSelection
    from compensa.orchestrator.store import BulkItem, BulkJob
    from compensa.orchestrator.store.partitioned import ALERT_POSITION_SLOTS

    async with partitioned_store(make_postgres_url(), make_postgres_url()) as store:
        plan = await _plan(store)
        ids = [f"g-{n}" for n in range(40)]
        by_database = {index: [i for i in ids if store.database_index(i) == index] for index in (0, 1)}
        assert all(by_database.values())
        home_id, other_id = by_database[0][0], by_database[1][0]
        sagas = [await _create(store, plan, saga_id) for saga_id in (home_id, other_id)]

        # One flush: an alert for each saga, and a stale write between them.
        alerts = [_alert(saga, T0 + 1) for saga in sagas]
        results = await store.commit([
            _write(alerts[0], sagas[0].sequence, epoch=1, now=T0 + 1),
            _write(_alert(sagas[1], T0 + 1), sagas[1].sequence - 1, epoch=1, now=T0 + 1),
            _write(alerts[1], sagas[1].sequence, epoch=1, now=T0 + 1),
        ])
        assert [result.ok for result in results] == [True, False, True]
        for index, saga in enumerate(sagas):
            stored = await store.databases[index].load_saga(saga.saga_id) or pytest.fail(saga.saga_id)
            assert stored.sequence == saga.sequence + 1
            assert await store.databases[1 - index].load_saga(saga.saga_id) is None

        claimed = await store.claim_alerts(T0 + 1, T0 + 10, 10)
        assert sorted(pending.alert.saga_id for pending in claimed) == sorted((home_id, other_id))
        assert {pending.alert.position % ALERT_POSITION_SLOTS: pending.alert.saga_id for pending in claimed} == {
            0: home_id, 1: other_id
        }
        for pending in claimed:
            await store.alert_delivered(pending.alert.position)
        assert await store.claim_alerts(T0 + 1000, T0 + 1010, 10) == []

        # A bulk action selects the sagas of both; its job and items are
        # home's, and its batches get every item.
        selection = SagaSelection(definition_name="checkout")
        count, sample = await store.count_selection(selection, now=T0 + 2, sample_size=10)
        assert (count, sorted(saga.saga_id for saga in sample)) == (2, sorted((home_id, other_id)))
        job = BulkJob(
            "job-1", bulk_pb2.BULK_ACTION_KIND_CANCEL, "definition=checkout", b"", "checkout", "", "test",
            bulk_pb2.BULK_ACTION_STATE_RUNNING, 0.0, T0 + 2, T0 + 2,
        )
        stored, created = await store.create_bulk_job(job, selection)
        assert created and stored is not None and stored.selected == 2
        claimed = await store.claim_bulk_job("replica-a", T0 + 3, T0 + 30)
        assert claimed is not None and claimed.bulk_action_id == "job-1"
        acted: list[tuple[str, int]] = []

        async def act(items: list[BulkItem]) -> tuple[list[tuple[str, int, str]], float]:
            acted.extend((item.saga_id, item.selected_sequence) for item in items)
            return [(item.saga_id, bulk_pb2.BULK_ITEM_OUTCOME_DONE, "") for item in items], T0 + 3
        assert await store.run_bulk_batch("job-1", "replica-a", claimed.epoch, 10, act) == 2
        assert sorted(acted) == sorted((saga.saga_id, saga.sequence + 1) for saga in sagas)
        assert await store.complete_bulk_job("job-1", "replica-a", claimed.epoch, T0 + 4)


async def test_flow_control_reads_and_records_each_sagas_side_in_its_database(
    make_postgres_url: Callable[[], str],
) -> None:
    """The budget is home's; a saga's priority and the waits of its calls are
    in its own database, written and read there through one exchange."""

    from compensa.orchestrator.store import CapacityWait, ParticipantLimits

    async with partitioned_store(make_postgres_url(), make_postgres_url()) as store:
        plan = await _plan(store)
        ids = [f"f-{n}" for n in range(40)]
        chosen = [next(i for i in ids if store.database_index(i) == index) for index in (0, 1)]
        for priority, saga_id in enumerate(chosen, start=1):
            await store.record_saga_flow(saga_id, "checkout", concurrency_key=None, priority=priority, now=T0)
            await _create(store, plan, saga_id)
        await store.set_participant("pay", "127.0.0.1:1", updated_by="test", now=T0)
        await store.set_participant_limits("pay", ParticipantLimits(max_in_flight=1), updated_by="test", now=T0)

        waits = [CapacityWait(saga_id, "charge_card", "pay", "max_in_flight", T0) for saga_id in chosen]
        grant = await store.exchange_capacity(
            "pay", "replica-a", returned=0, wanted=2, now=T0, lease_until=T0 + 30, waits_started=waits,
            priorities_of=chosen,
        )
        assert grant.granted == 1  # home's budget: one in flight at most
        assert dict(grant.priorities) == {chosen[0]: 1, chosen[1]: 2}
        for saga_id in chosen:
            assert [wait.step_name for wait in (await store.flow_of(saga_id)).waits] == ["charge_card"]
        await store.exchange_capacity(
            "pay", "replica-a", returned=1, wanted=0, now=T0 + 1, lease_until=T0 + 30,
            waits_ended=[(saga_id, "charge_card") for saga_id in chosen],
        )
        for saga_id in chosen:
            assert (await store.flow_of(saga_id)).waits == ()


async def test_a_database_that_fails_fails_only_its_own_writes(
    make_postgres_url: Callable[[], str], admin_postgres_url: str,
) -> None:
    """The writer commits each database's share of a batch on its own: with
    one database gone, the other's writes still land and are answered; and
    the deployment is not reported reachable while one database is gone."""

    from compensa.orchestrator.engine.writer import TransitionWriter
    from compensa.orchestrator.shared.errors import StoreUnavailable
    from compensa.orchestrator.shared.metrics import Metrics

    home_url, other_url = make_postgres_url(), make_postgres_url()
    outcomes: list[BaseException | None] = []
    async with partitioned_store(home_url, other_url, timeout=2.0) as store:
        store.subscribe_reachability(lambda error, began: outcomes.append(error))
        writer = TransitionWriter(store, lambda landed: None, Metrics(), timeout=5.0)
        plan = await _plan(store)
        ids = [f"w-{n}" for n in range(40)]
        chosen = [next(i for i in ids if store.database_index(i) == index) for index in (0, 1)]
        sagas = [await _create(store, plan, saga_id) for saga_id in chosen]
        with psycopg.connect(_conninfo(admin_postgres_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{make_url(other_url).database}" WITH (FORCE)')
        writer.start()
        try:
            home_write, other_write = await asyncio.gather(
                *(writer.submit(_write(_alert(saga, T0 + 1), saga.sequence, epoch=1, now=T0 + 1)) for saga in sagas),
                return_exceptions=True,
            )
        finally:
            await writer.stop()
        assert not isinstance(home_write, BaseException) and home_write.ok, home_write
        assert isinstance(other_write, StoreUnavailable), other_write
        assert (await store.load_saga(chosen[0]) or pytest.fail("gone")).sequence == sagas[0].sequence + 1
        assert outcomes[-1] is not None  # home answered last, but the other database is still out
        await store.clock()
        assert outcomes[-1] is not None


async def test_a_transaction_holding_one_databases_log_back_is_found_and_alerted_there(
    private_postgres_pair: tuple[pg.PostgresServer, pg.PostgresServer],
) -> None:
    """Each database's log is held back by its own open transactions: the
    holdup is found in the database it is in, and alerted (and delivered)
    from there. (Clusters of the test's own: the oldest open transaction is
    the whole cluster's, and the shared server's other tests open theirs.)"""

    from compensa.orchestrator.store import LOG_HELD_BACK
    from compensa.orchestrator.store.partitioned import ALERT_POSITION_SLOTS

    home_url, other_url = (pg.DatabaseFactory(server).create() for server in private_postgres_pair)
    async with partitioned_store(home_url, other_url) as store:
        assert store.log_can_be_held_back
        plan = await _plan(store)
        other_saga = next(f"h-{n}" for n in range(40) if store.database_index(f"h-{n}") == 1)
        async with await psycopg.AsyncConnection.connect(_conninfo(other_url)) as holder:
            held = await (await holder.execute("SELECT pg_current_xact_id()::text::bigint")).fetchone()
            assert held is not None
            await _create(store, plan, other_saga)
            holdup = await store.log_holdup()
            assert holdup is not None and holdup.transaction == held[0]
            alert = await store.alert_log_holdup(holdup, now=T0 + 1, message="held back")
            assert alert is not None and alert.kind == LOG_HELD_BACK
            assert alert.position % ALERT_POSITION_SLOTS == 1
            (pending,) = await store.claim_alerts(T0 + 1, T0 + 10, 10)
            assert pending.alert.position == alert.position
        assert await store.log_holdup() is None


async def test_watch_alerts_streams_every_databases_alert_log_and_resumes_from_a_token(
    make_postgres_url: Callable[[], str],
) -> None:
    """A saga's alert is in its own database's alert log: WatchAlerts reads
    them all, and resumes from a token with a position per database."""
    from harness import checkout_stack

    from compensa.orchestrator.store.partitioned import ALERT_POSITION_SLOTS

    async with checkout_stack(make_postgres_url, partition_database_urls=(make_postgres_url(),)) as stack:
        store = stack.orchestrator.engine.store
        assert isinstance(store, PartitionedStore)
        plan = await _plan(store)
        now = await store.clock()
        # Released until long after the test, so the engine leaves them be.
        later = now + 3600
        chosen = [next(f"a-{n}" for n in range(40) if store.database_index(f"a-{n}") == index) for index in (0, 1)]
        for saga_id in chosen:
            saga = await _create(store, plan, saga_id, now=now, release=True, due_at=later)
            (raised,) = await store.commit(
                [_write(_alert(saga, now, f"alert of {saga_id}"), saga.sequence, epoch=1, now=now, release=True,
                        due_at=later)]
            )
            assert raised.ok

        async def read(request: orchestrator_pb2.WatchAlertsRequest, count: int) -> list[
            orchestrator_pb2.WatchAlertsResponse
        ]:
            stream = stack.stub.WatchAlerts(request)
            try:
                async with asyncio.timeout(STREAM_TIMEOUT):
                    return [await stream.read() for _ in range(count)]
            finally:
                stream.cancel()

        both = await read(orchestrator_pb2.WatchAlertsRequest(), 2)
        assert sorted(response.alert.saga_id for response in both) == sorted(chosen)
        assert {response.alert.position % ALERT_POSITION_SLOTS: response.alert.saga_id for response in both} == {
            0: chosen[0], 1: chosen[1]
        }
        (rest,) = await read(orchestrator_pb2.WatchAlertsRequest(resume_token=both[0].resume_token), 1)
        assert rest.alert == both[1].alert

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await read(orchestrator_pb2.WatchAlertsRequest(after_position=both[0].alert.position), 1)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # a token of the other stream
            await read(orchestrator_pb2.WatchAlertsRequest(resume_token=both[0].resume_token.replace("a1.", "w1.")), 1)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_dashboards_live_list_follows_every_database_and_resumes_from_its_token(
    make_postgres_url: Callable[[], str],
) -> None:
    """The live list's server-sent events follow both databases' logs; their
    ids (and the page's starting point) are resume tokens."""
    import re

    import aiohttp
    from harness import checkout_stack

    async def live(url: str) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200, await response.text()
            message: dict[str, str] = {}
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if line:
                    field, _, value = line.partition(": ")
                    message[field] = value
                elif "data" in message:
                    yield message["id"], json.loads(message["data"])
                    message = {}

    async def until_succeeded(url: str, saga_ids: set[str]) -> tuple[str, set[str]]:
        """The last message's id once every one of `saga_ids` is SUCCEEDED, and every saga seen."""
        seen: set[str] = set()
        done: set[str] = set()
        async with asyncio.timeout(STREAM_TIMEOUT):
            async for message_id, events in live(url):
                seen |= {event["saga_id"] for event in events}
                done |= {event["saga_id"] for event in events if event["state"] == "SUCCEEDED"}
                if saga_ids <= done:
                    return message_id, seen
        raise AssertionError("the live list ended")

    async with checkout_stack(
        make_postgres_url, partition_database_urls=(make_postgres_url(),), http_listen="127.0.0.1:0"
    ) as stack:
        store = stack.orchestrator.engine.store
        assert isinstance(store, PartitionedStore)
        dashboard = stack.orchestrator.dashboard
        assert dashboard is not None
        async with aiohttp.ClientSession() as session, session.get(dashboard.url) as page:
            html = await page.text()
        after = (re.search(r'data-after="([^"]+)"', html) or pytest.fail("no data-after")).group(1)
        ids = [f"d-{n}" for n in range(40)]
        chosen = {next(i for i in ids if store.database_index(i) == index) for index in (0, 1)}
        for saga_id in sorted(chosen):
            await stack.start(saga_id)
        last_id, seen = await until_succeeded(f"{dashboard.url}live?after={after}", chosen)
        assert seen == chosen

        # From the last message's id: only what came after it (whenever the
        # list subscribes: it reads the logs from the token first).
        late = next(i for i in ids if i not in chosen)
        following = asyncio.create_task(until_succeeded(f"{dashboard.url}live?after={last_id}", {late}))
        await stack.start(late)
        _, seen_late = await following
        assert seen_late == {late}
