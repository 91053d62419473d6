"""A transaction left open on PostgreSQL holds the log's readers back, and
says so: PostgreSQL's log positions come from the writing transactions' ids,
and readers stop below the oldest one still open (store/postgres.py).

A session of the test's own opens a transaction that has written (it has an
id) and leaves it open while a saga runs to its end: WatchSagas delivers
nothing of the saga meanwhile, the metric counts the wait, and past the
threshold a log line and one EVENT_LOG_HELD_BACK alert (webhook) name the
transaction and who holds it. Once it ends, the stream delivers every event
of the saga, in order, none twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

import pg
import psycopg
import pytest
from harness import checkout_stack, poll_until
from webhook_receiver import WebhookReceiver

from compensa.common.database import parse_database_url
from compensa.orchestrator.store import LOG_HELD_BACK, LogHoldup, open_store
from compensa.v1 import orchestrator_pb2, saga_pb2

HOLDER = "a-forgotten-psql-session"


async def test_an_open_transaction_holds_watchers_back_is_alerted_once_and_loses_nothing(
    private_postgres: pg.PostgresServer, make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    # The orchestrator's database on a server of its own: another test's
    # transactions on a shared one would hold the log back too.
    with psycopg.connect(private_postgres.admin_conninfo(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE orchestrator")
    orchestrator_url = private_postgres.admin_url.set(database="orchestrator").render_as_string(hide_password=False)
    caplog.set_level(logging.INFO, logger="compensa.engine")
    with WebhookReceiver(script=[]).serving() as webhook:
        async with checkout_stack(
            make_postgres_url, orchestrator_url=orchestrator_url, alert_webhook=webhook.url,
            alert_log_held_back_seconds=1.0,
        ) as stack:
            conninfo = parse_database_url(stack.orchestrator_url).conninfo
            assert conninfo is not None
            metrics = stack.orchestrator.engine.metrics.registry
            watched: list[saga_pb2.SagaEvent] = []

            async def watch() -> None:
                stream = stack.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(after_position=0))
                async for message in stream:
                    watched.append(message.event)

            watcher = asyncio.create_task(watch())
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, application_name=HOLDER) as holder:
                    held = (await (await holder.execute("SELECT pg_current_xact_id()::text::bigint")).fetchone())
                    assert held is not None
                    saga_id = await stack.start()
                    final = await stack.wait_final(saga_id)
                    assert final.state == saga_pb2.SAGA_STATE_SUCCEEDED
                    alerted = await poll_until(lambda: webhook.of_kind(LOG_HELD_BACK), timeout=20.0)
                    # The saga ran to its end; its events wait behind the open transaction.
                    assert [event for event in watched if event.saga_id == saga_id] == []
                    waited = metrics.get_sample_value("compensa_event_log_held_back_seconds")
                    assert waited is not None and waited >= 1.0
                    (body,) = [delivery.body for delivery in alerted]
                    assert str(held[0]) in str(body["message"]) and HOLDER in str(body["message"])
                    assert body["alert_id"] == f"log/{body['alert_position']}"
                    warnings = [r.getMessage() for r in caplog.records if "readers are held back" in r.getMessage()]
                    assert len(warnings) == 1 and HOLDER in warnings[0]
                    await holder.commit()

                await poll_until(lambda: any(event.saga_id == saga_id and event.sequence == final.sequence
                                             for event in watched), timeout=10.0)
                mine = [event for event in watched if event.saga_id == saga_id]
                assert [event.sequence for event in mine] == list(range(1, final.sequence + 1))
                assert all(a.position < b.position for a, b in itertools.pairwise(watched))
                await poll_until(lambda: metrics.get_sample_value("compensa_event_log_held_back_seconds") == 0.0)
                await poll_until(lambda: any("readers go on" in r.getMessage() for r in caplog.records))
                # The alert itself is in the alert log, readable now that the transaction ended.
                alerts = stack.stub.WatchAlerts(orchestrator_pb2.WatchAlertsRequest(after_position=0))
                first = await asyncio.wait_for(alerts.read(), 10.0)
                assert first.alert.kind == orchestrator_pb2.ALERT_KIND_EVENT_LOG_HELD_BACK
                alerts.cancel()
                assert len(webhook.of_kind(LOG_HELD_BACK)) == 1
            finally:
                watcher.cancel()


async def test_replicas_that_see_one_holdup_raise_its_alert_once(make_postgres_url: Callable[[], str]) -> None:
    url = make_postgres_url()
    stores = [open_store(url) for _ in range(3)]
    try:
        await stores[0].ensure_schema()
        holdup = LogHoldup(transaction=123456789, holder="pid 1, user x")
        raised = await asyncio.gather(*(
            store.alert_log_holdup(holdup, now=1000.0 + n, message="held") for n, store in enumerate(stores)
        ))
        assert len([alert for alert in raised if alert is not None]) == 1
        again = await stores[0].alert_log_holdup(LogHoldup(transaction=123456790, holder="y"), now=2000.0, message="x")
        assert again is not None and again.kind == LOG_HELD_BACK
    finally:
        for store in stores:
            await store.close()
