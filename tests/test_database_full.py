"""The orchestrator's database runs out of space: it still answers reads but
refuses every write that needs a new page (SQLSTATE 53100).

The database lives in a tablespace on a small tmpfs that the test fills. Health
must stay NOT_SERVING for the whole time it is full (reads succeeding must not
flip it back), the replica logs one loss and one return, callers read that
the database is out of space (RESOURCE_EXHAUSTED, ErrorInfo reason
DATABASE_FULL, no PostgreSQL file path), the outage is counted and alerted,
and every acknowledged saga finishes once space returns.

Mounting a tmpfs needs root (CI runs as root): elsewhere the test is skipped,
and under CI=true it fails instead.

A read-only database (as a standby after a failover) is refused writes the
same way (SQLSTATE 25006): health stays down while reads succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pg
import psycopg
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import FINAL, checkout_input, checkout_stack, poll_until
from psycopg import sql
from sqlalchemy.engine import make_url
from webhook_receiver import WebhookReceiver

from compensa.v1 import orchestrator_pb2

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

_MOUNT_BYTES = 32 * 1024 * 1024
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# How long the test keeps calling while the disk is full.
_FULL_SECONDS = 5.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _cannot_mount(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"CI=true: the disk-full test must run: {reason}")
    pytest.skip(f"cannot put a database on a small tmpfs here: {reason}")


@dataclass
class SmallDisk:
    """A tmpfs holding a PostgreSQL tablespace, and a database in it."""

    mount: Path
    database_url: str

    def fill(self) -> None:
        """Writes a file until the tmpfs has no byte left."""
        with open(self.mount / "filler", "ab", buffering=0) as filler:
            for chunk in (1024 * 1024, 4096, 512):
                with contextlib.suppress(OSError):
                    while filler.write(b"\0" * chunk):
                        pass

    def free(self) -> None:
        (self.mount / "filler").unlink()


@pytest.fixture
def small_disk(private_postgres: pg.PostgresServer) -> Iterator[SmallDisk]:
    # A cluster of its own: once the tablespace is full, any backend of the
    # cluster that has to write one of its dirty pages fails (seen: another
    # test's CREATE DATABASE on the shared server, DiskFull).
    admin = private_postgres.admin_url
    if admin.host not in ("127.0.0.1", "localhost", None):
        _cannot_mount(f"the test server {admin.host} is not on this machine")
    if os.geteuid() != 0:
        _cannot_mount("mounting a tmpfs needs root")
    try:
        server_user = pwd.getpwnam("postgres")
    except KeyError:
        _cannot_mount("no postgres user to own the tablespace")
    mount = Path(tempfile.mkdtemp(prefix="compensa-small-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={_MOUNT_BYTES}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        mount.rmdir()
        _cannot_mount(f"mount -t tmpfs failed: {mounted.stderr.strip()}")
    location = mount / "tablespace"
    location.mkdir()
    os.chown(location, server_user.pw_uid, server_user.pw_gid)
    suffix = secrets.token_hex(4)
    tablespace, database = f"compensa_small_{suffix}", f"compensa_full_{suffix}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
                    sql.Identifier(tablespace), sql.Literal(str(location))
                )
            )
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 TABLESPACE {}").format(
                sql.Identifier(database), sql.Identifier(tablespace)
            ))
        yield SmallDisk(mount, admin.set(database=database).render_as_string(hide_password=False))
    finally:
        with contextlib.suppress(FileNotFoundError):
            (mount / "filler").unlink()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
            conn.execute(sql.SQL("DROP TABLESPACE IF EXISTS {}").format(sql.Identifier(tablespace)))
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()


class HealthRecord:
    """Every status the orchestrator's grpc.health.v1 Watch sends, with when."""

    def __init__(self, address: str) -> None:
        self.seen: list[tuple[float, int]] = []
        self._channel = grpc.aio.insecure_channel(address)
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        stub = health_pb2_grpc.HealthStub(self._channel)
        async for answer in stub.Watch(health_pb2.HealthCheckRequest(service="")):
            self.seen.append((time.monotonic(), answer.status))

    def statuses(self) -> list[int]:
        return [status for _, status in self.seen]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._task
        await self._channel.close()


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    (details,) = [value for key, value in error.trailing_metadata() or () if key == "grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    (detail,) = status.details
    detail.Unpack(info)
    return info


async def test_a_full_database_keeps_health_down_until_space_returns_and_says_why(
    small_disk: SmallDisk, make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="compensa")
    with WebhookReceiver(script=[]).serving() as webhook:
        async with checkout_stack(
            make_postgres_url, orchestrator_url=small_disk.database_url, alert_webhook=webhook.url,
            alert_webhook_timeout=1.0,
        ) as stack:
            running = stack.orchestrator
            health = HealthRecord(running.address)
            acknowledged: list[str] = []
            refusals: list[grpc.aio.AioRpcError] = []

            async def start_one() -> None:
                saga_id = f"full-{secrets.token_hex(6)}"
                try:
                    await stack.stub.StartSaga(orchestrator_pb2.StartSagaRequest(
                        saga_id=saga_id, definition_name="checkout", input=checkout_input()
                    ), timeout=30)
                except grpc.aio.AioRpcError as error:
                    refusals.append(error)
                else:
                    acknowledged.append(saga_id)

            try:
                for _ in range(10):
                    await start_one()
                assert refusals == [] and health.statuses()[-1:] == [_SERVING]

                small_disk.fill()

                async def refused() -> bool:
                    await start_one()
                    return bool(refusals)

                await poll_until(refused, timeout=60)
                full_since = time.monotonic()
                while time.monotonic() - full_since < _FULL_SECONDS:
                    await start_one()
                    await asyncio.sleep(0.05)  # ok-sleep: a caller's pace while the disk stays full
                freed_at = time.monotonic()
                small_disk.free()
                await poll_until(lambda: health.statuses()[-1:] == [_SERVING], timeout=30)
                for _ in range(5):
                    await start_one()
                for saga_id in acknowledged:
                    saga = (await stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
                    if saga.state not in FINAL:
                        await stack.wait_final(saga_id, timeout=60)
                outages = running.engine.metrics.registry.get_sample_value(
                    "compensa_database_outages_total", {"reason": "DATABASE_FULL"}
                )
                with contextlib.suppress(AssertionError):  # asserted below, after what matters more
                    await poll_until(lambda: webhook.delivered(), timeout=30)
            finally:
                await health.close()

    # Down once, up once: never SERVING while the disk was full.
    assert health.statuses() == [_SERVING, _NOT_SERVING, _SERVING], health.seen
    (down_at, _), (up_at, _) = health.seen[1:]
    assert down_at < freed_at <= up_at
    # Callers read why, without PostgreSQL's file names.
    assert refusals
    for error in refusals:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "out of space" in (error.details() or "") and "pg_tblspc" not in (error.details() or ""), error
        assert _error_info(error).reason == "DATABASE_FULL"
    messages = [record.getMessage() for record in caplog.records]
    lost = [message for message in messages if "lost its database" in message]
    returned = [message for message in messages if "reached its database again" in message]
    assert len(lost) == 1 and len(returned) == 1, (lost, returned)
    assert "DATABASE_FULL" in lost[0] and "pg_tblspc" not in lost[0]
    assert outages == 1.0
    (alert,) = webhook.delivered()
    assert alert.body["kind"] == "DATABASE_REFUSES_WRITES" and alert.body["reason"] == "DATABASE_FULL"
    # Everything acknowledged, before and during the outage, finished.
    assert len(acknowledged) >= 15


async def test_a_read_only_database_keeps_health_down_until_it_takes_writes_again(
    make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    # As after a failover to a standby: connections come back, reads work,
    # every write is refused (SQLSTATE 25006).
    caplog.set_level(logging.INFO, logger="compensa.server")
    async with checkout_stack(make_postgres_url) as stack:
        running = stack.orchestrator
        database = make_url(stack.orchestrator_url).database
        admin = make_url(stack.orchestrator_url).set(drivername="postgresql", database="postgres")
        conninfo = admin.render_as_string(hide_password=False)
        health = HealthRecord(running.address)
        try:
            saga_id = await stack.start()
            await poll_until(lambda: health.statuses()[-1:] == [_SERVING], timeout=30)

            def read_only(on: bool) -> None:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = {}").format(
                        sql.Identifier(database), sql.Literal("on" if on else "off")
                    ))
                    if on:
                        conn.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,)
                        )

            read_only(True)
            refusals: list[grpc.aio.AioRpcError] = []

            async def refused() -> bool:
                try:
                    await stack.start()
                except grpc.aio.AioRpcError as error:
                    if _error_info(error).reason == "DATABASE_READ_ONLY":
                        refusals.append(error)
                return bool(refusals)

            await poll_until(refused, timeout=30)
            refused_at = len(health.seen)
            began = time.monotonic()
            while time.monotonic() - began < 3.0:
                # Reads succeed all along...
                await stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id), timeout=30)
                await asyncio.sleep(0.05)  # ok-sleep: a reader's pace while writes are refused
            # ...and health stays down.
            assert health.statuses()[-1] == _NOT_SERVING and len(health.seen) == refused_at, health.seen
            read_only(False)
            await poll_until(lambda: health.statuses()[-1:] == [_SERVING], timeout=30)
            await stack.start()
        finally:
            await health.close()
    (refusal,) = refusals[:1]
    assert refusal.code() == grpc.StatusCode.UNAVAILABLE and "read-only" in (refusal.details() or "")
    messages = [record.getMessage() for record in caplog.records if record.name == "compensa.server"]
    assert len([message for message in messages if "DATABASE_READ_ONLY" in message]) == 1, messages
