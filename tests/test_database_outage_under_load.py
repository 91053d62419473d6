"""The orchestrator's database goes silent for some seconds while callers keep
calling, then comes back: one loss and one return in the log, health down
once and up once, and no caller is failed after the return by a wait for a
pooled connection that began during the outage.

The orchestrator's database is a cluster of its own (the flood of connections
at the return must not use up the shared server's), reached through a TCP
proxy that holds every byte (a blackhole) and then forwards again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

import grpc
import pg
import psycopg
import pytest
from grpc_health.v1 import health_pb2
from harness import assert_replays_without_divergence, checkout_input, checkout_stack, poll_until
from psycopg import sql
from tcp_proxy import TcpProxy
from test_database_full import HealthRecord

from compensa.v1 import orchestrator_pb2

# Several processes and many connections each: one at a time (make test's --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.xdist_group("heavy")]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_CALLERS = 48
_OUTAGE_SECONDS = 5.0
# A caller's failure this long after the return came from the outage, not after it.
_AFTER_RETURN_SECONDS = 1.0


async def test_a_database_outage_under_load_is_one_loss_and_one_return(
    private_postgres: pg.PostgresServer,
    make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="compensa.server")
    with psycopg.connect(private_postgres.admin_conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("orchestrator")))
    url = private_postgres.admin_url.set(database="orchestrator")
    proxy = await TcpProxy.to(f"{url.host}:{url.port}")
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    # (ended at, status code) of every call.
    answers: list[tuple[float, grpc.StatusCode]] = []
    started: list[str] = []
    calling = True
    try:
        async with checkout_stack(make_postgres_url, orchestrator_url=proxied) as stack:
            health = HealthRecord(stack.orchestrator.address)

            async def caller() -> None:
                while calling:
                    saga_id = f"outage-{secrets.token_hex(6)}"
                    code = grpc.StatusCode.OK
                    try:
                        await stack.stub.StartSaga(orchestrator_pb2.StartSagaRequest(
                            saga_id=saga_id, definition_name="checkout", input=checkout_input()
                        ), timeout=30)
                        started.append(saga_id)
                        await stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id), timeout=30)
                    except grpc.aio.AioRpcError as error:
                        code = error.code()
                    answers.append((time.monotonic(), code))
                    await asyncio.sleep(0.01)  # ok-sleep: a caller's pace

            callers = [asyncio.create_task(caller()) for _ in range(_CALLERS)]
            try:
                await poll_until(lambda: len(answers) >= 100, timeout=60)
                await proxy.cut()
                await poll_until(lambda: health.statuses()[-1:] == [_NOT_SERVING], timeout=30)
                await asyncio.sleep(_OUTAGE_SECONDS)  # ok-sleep: the outage lasts a while under load
                await proxy.heal()
                await poll_until(lambda: health.statuses()[-1:] == [_SERVING], timeout=30)
                returned_at = time.monotonic()
                ended = len(answers)
                await poll_until(lambda: len(answers) >= ended + 200, timeout=60)
                await asyncio.sleep(4.0)  # ok-sleep: waits begun in the outage have all ended by now
            finally:
                calling = False
                await asyncio.gather(*callers, return_exceptions=True)
                await health.close()
            # Every saga started through the outage replays to where it ended.
            following = asyncio.Semaphore(16)

            async def final(saga_id: str) -> None:
                async with following:
                    await stack.wait_final(saga_id, timeout=60)

            await asyncio.gather(*(final(saga_id) for saga_id in started))
            await assert_replays_without_divergence(stack.stub, started)
    finally:
        with contextlib.suppress(Exception):
            await proxy.close()

    messages = [record.getMessage() for record in caplog.records if record.name == "compensa.server"]
    lost = [message for message in messages if "lost its database" in message]
    returned = [message for message in messages if "reached its database again" in message]
    assert (len(lost), len(returned)) == (1, 1), (lost, returned)
    assert health.statuses() == [_SERVING, _NOT_SERVING, _SERVING], health.seen
    late_failures = [
        code for at, code in answers if at > returned_at + _AFTER_RETURN_SECONDS and code != grpc.StatusCode.OK
    ]
    assert late_failures == [], f"{len(late_failures)} calls failed more than {_AFTER_RETURN_SECONDS}s after the return"
