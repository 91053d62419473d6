"""A real checkout stack for tests: three participants and an orchestrator,
in this process, on port 0, with their own databases."""

from __future__ import annotations

import asyncio
import collections
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import any_pb2
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine
from tcp_proxy import TcpProxy

from compensa.checkout.v1 import checkout_pb2
from compensa.examples import DEFINITIONS_DIR
from compensa.examples.server import RunningParticipant, start_participant
from compensa.orchestrator.api.history_checks import check_history
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import RunningOrchestrator, start_orchestrator
from compensa.orchestrator.shared.records import FINAL_SAGA_STATES
from compensa.orchestrator.store import PostgresSagaStore, SagaStore
from compensa.participants.faults import FaultPlan
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

REPO = Path(__file__).resolve().parents[1]
CHECKOUT = DEFINITIONS_DIR / "checkout.yaml"
FINAL = FINAL_SAGA_STATES


def checkout_input(**overrides: Any) -> any_pb2.Any:
    """A packed CheckoutInput with a unique order and SKU."""
    unique = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "order_id": f"order-{unique}",
        "sku": f"sku-{unique}",
        "quantity": 2,
        "amount_cents": 4_200,
        "card_token": "tok_visa",
        "shipping_address": "1 Saga Street",
    }
    values.update(overrides)
    packed = any_pb2.Any()
    packed.Pack(checkout_pb2.CheckoutInput(**values))
    return packed


@dataclass
class Stack:
    orchestrator: RunningOrchestrator
    participants: dict[str, RunningParticipant]
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub
    channel: grpc.aio.Channel
    orchestrator_url: str
    extra: dict[str, Any] = field(default_factory=dict)

    async def start(self, saga_id: str | None = None, definition: str = "checkout", **input_values: Any) -> str:
        saga_id = saga_id or f"saga-{uuid.uuid4().hex[:12]}"
        await self.stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(
                saga_id=saga_id, definition_name=definition, input=checkout_input(**input_values)
            )
        )
        return saga_id

    async def wait_final(self, saga_id: str, timeout: float = 30.0) -> saga_pb2.Saga:
        """Follows WatchSaga until the final event, then returns the saga."""
        async def follow() -> None:
            async for response in self.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(
                saga_id=saga_id, replay_history=True
            )):
                if response.event.saga_state in FINAL:
                    pass
        await asyncio.wait_for(follow(), timeout)
        return (await self.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga

    async def get(self, saga_id: str) -> saga_pb2.Saga:
        """The saga as it is now."""
        return (await self.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga

    async def events(self, saga_id: str) -> list[saga_pb2.SagaEvent]:
        """The saga's whole log, once it has ended (follows it until then)."""
        out: list[saga_pb2.SagaEvent] = []
        async for response in self.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(
            saga_id=saga_id, replay_history=True
        )):
            out.append(response.event)
        return out

    @asynccontextmanager
    async def another_replica(self, **config: Any) -> AsyncIterator[RunningOrchestrator]:
        """A second orchestrator on this stack's database and participants;
        `config` overrides ServerConfig fields."""
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "database_url": self.orchestrator_url,
            "definition_paths": (CHECKOUT,),
            "participants": {kind: participant.address for kind, participant in self.participants.items()},
        }
        running = await start_orchestrator(ServerConfig(**{**settings, **config}))
        try:
            yield running
        finally:
            await running.stop(0)

    def engine_of(self, kind: str) -> AsyncEngine:
        return self.participants[kind].engine

    async def rows(self, kind: str, table: str, **where: Any) -> list[sa.Row[Any]]:
        """Rows of a participant's own table, optionally filtered by columns."""
        engine = self.engine_of(kind)
        async with engine.connect() as conn:
            meta = sa.MetaData()
            await conn.run_sync(lambda sync: meta.reflect(sync, only=[table]))
            t = meta.tables[table]
            query = sa.select(t).where(*(t.c[k] == v for k, v in where.items()))
            return list((await conn.execute(query)).all())


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a /metrics endpoint on 127.0.0.1, by name and labels."""
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text: str = response.read().decode()
            return text

    text = await asyncio.to_thread(get)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def poll_until(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Calls `check` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)  # ok-sleep: polling interval with a deadline


@asynccontextmanager
async def checkout_stack(
    make_url: Callable[[], str],
    *,
    faults: Mapping[str, FaultPlan] | None = None,
    definition_paths: tuple[Path, ...] = (CHECKOUT,),
    lease_seconds: float = 5.0,
    max_payload_bytes: int = 1024 * 1024,
    orchestrator_url: str | None = None,
    watch_reread_seconds: float = 5.0,
    metrics_listen: str | None = None,
    participant_proxies: Sequence[str] = (),
    participant_purge_interval: float | None = None,
    **config: Any,
) -> AsyncIterator[Stack]:
    """Starts inventory, payment and shipping (each on its own database from
    `make_url`) and an orchestrator on another, all on port 0. The
    orchestrator calls the participants named in `participant_proxies`
    through a TcpProxy each (in `stack.extra["proxies"]` by name); the
    participants purge their barrier rows every `participant_purge_interval`
    seconds, if given; `config` sets more ServerConfig fields."""
    faults = faults or {}
    participants: dict[str, RunningParticipant] = {}
    for kind in ("inventory", "payment", "shipping"):
        participants[kind] = await start_participant(
            kind, make_url(), faults=faults.get(kind), purge_interval=participant_purge_interval
        )
    proxies = {kind: await TcpProxy.to(participants[kind].address) for kind in participant_proxies}
    orchestrator_url = orchestrator_url or make_url()
    orchestrator = await start_orchestrator(
        ServerConfig(
            listen="127.0.0.1:0",
            database_url=orchestrator_url,
            definition_paths=definition_paths,
            participants={kind: (proxies[kind] if kind in proxies else p).address for kind, p in participants.items()},
            lease_seconds=lease_seconds,
            max_payload_bytes=max_payload_bytes,
            watch_reread_seconds=watch_reread_seconds,
            metrics_listen=metrics_listen,
            **config,
        )
    )
    channel = grpc.aio.insecure_channel(orchestrator.address)
    stack = Stack(
        orchestrator=orchestrator,
        participants=participants,
        stub=orchestrator_pb2_grpc.OrchestratorServiceStub(channel),
        channel=channel,
        orchestrator_url=orchestrator_url,
        extra={"proxies": proxies},
    )
    try:
        yield stack
    finally:
        await channel.close()
        await orchestrator.stop(0)
        for proxy in proxies.values():
            await proxy.close()
        for participant in participants.values():
            await participant.stop(0)


async def replay_divergences(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, saga_ids: Iterable[str]
) -> tuple[list[str], collections.Counter[str]]:
    """Every saga's history replayed through the state machine under its own
    version: what diverged or ended elsewhere (nothing may), and how many
    replayed sagas hold each kind of event."""
    problems: list[str] = []
    kinds: collections.Counter[str] = collections.Counter()
    gate = asyncio.Semaphore(16)

    async def replay(saga_id: str) -> None:
        async with gate:
            response = await stub.GetSagaHistory(orchestrator_pb2.GetSagaHistoryRequest(saga_id=saga_id), timeout=10.0)
        check = check_history(response.history)
        events = response.history.events
        kinds.update({saga_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_") for event in events})
        if not check.ok:
            problems.append(f"{saga_id}: replay: {check.summary()}")

    await asyncio.wait_for(asyncio.gather(*(replay(saga_id) for saga_id in saga_ids)), 60.0)
    return problems, kinds


async def assert_replays_without_divergence(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, saga_ids: Iterable[str]
) -> None:
    """Each saga's log, replayed through the pure machine, ends where the stored saga is."""
    chosen = list(saga_ids)
    assert chosen, "no saga to replay"
    problems, _ = await replay_divergences(stub, chosen)
    assert problems == [], "\n".join(problems)


_SNAPSHOT_XMAX = sa.text("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
_SNAPSHOT_XMIN = sa.text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")


async def log_caught_up(store: SagaStore) -> None:
    """Waits until the logs read everything committed so far. On PostgreSQL a
    read stops below the oldest transaction still open (see store/postgres.py),
    any database's: another test's, here, for a few milliseconds."""
    if not isinstance(store, PostgresSagaStore):
        return
    async with store.engine.connect() as conn:
        committed_below = (await conn.execute(_SNAPSHOT_XMAX)).scalar_one()
        deadline = time.monotonic() + 10
        while (await conn.execute(_SNAPSHOT_XMIN)).scalar_one() < committed_below:
            assert time.monotonic() < deadline, "a transaction held the log back for 10 s"
            await asyncio.sleep(0.005)  # ok-sleep: another session's transaction ends on its own
