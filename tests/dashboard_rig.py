"""An orchestrator on PostgreSQL with the dashboard and bearer tokens, over a
scripted participant, for the dashboard and access tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from harness import FINAL, checkout_input, poll_until
from scripted_participant import ScriptedParticipant, serve_scripted

from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import RunningOrchestrator, start_orchestrator
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

#: Tokens of the token file, by who holds them.
TOKENS = {
    "operator": "op-9c1e4d0b7a2f44e1",
    "starter": "st-5d2a8f6e3b1c4097",
    "reader": "rd-7e3b9a1c5f2d4086",
    "elsewhere": "ew-1a2b3c4d5e6f7a8b",
}

TOKEN_FILE = f"""\
tokens:
  - token: {TOKENS["operator"]}
    identity: alice
    role: operator
  - token: {TOKENS["starter"]}
    identity: shop
    role: starter
  - token: {TOKENS["reader"]}
    identity: viewer
    role: reader
  - token: {TOKENS["elsewhere"]}
    identity: other-team
    role: operator
    definitions: [other]
"""

_QUICK = "{max_attempts: 3, initial_backoff: 20ms, backoff_multiplier: 1, max_backoff: 20ms}"
#: reserve and notify run in parallel; charge needs both.
BOARD = f"""\
name: board
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: reserve
    participant: scripted
    execute_timeout: 10s
    compensate_timeout: 1s
    retry: {_QUICK}
    compensate_retry: {_QUICK}
  - name: notify
    participant: scripted
    depends_on: []
    execute_timeout: 10s
    compensate_timeout: 1s
    retry: {_QUICK}
    compensate_retry: {_QUICK}
  - name: charge
    participant: scripted
    depends_on: [reserve, notify]
    execute_timeout: 10s
    compensate_timeout: 1s
    retry: {_QUICK}
    compensate_retry: {_QUICK}
"""


def bearer(who: str) -> tuple[tuple[str, str]]:
    """gRPC metadata carrying the token of `who`."""
    return (("authorization", f"Bearer {TOKENS[who]}"),)


@dataclass
class DashboardRig:
    participant: ScriptedParticipant
    orchestrator: RunningOrchestrator
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub

    @property
    def url(self) -> str:
        assert self.orchestrator.dashboard is not None
        return self.orchestrator.dashboard.url.rstrip("/")

    async def begin(self, saga_id: str) -> None:
        await self.stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(saga_id=saga_id, definition_name="board", input=checkout_input()),
            metadata=bearer("starter"),
        )

    async def saga(self, saga_id: str) -> saga_pb2.Saga:
        answer = await self.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id), metadata=bearer("reader"))
        return answer.saga

    async def until(
        self, saga_id: str, predicate: Callable[[saga_pb2.Saga], bool], timeout: float = 20
    ) -> saga_pb2.Saga:
        async def check() -> saga_pb2.Saga | None:
            saga = await self.saga(saga_id)
            return saga if predicate(saga) else None

        found: saga_pb2.Saga = await poll_until(check, timeout)
        return found

    async def final(self, saga_id: str) -> saga_pb2.Saga:
        return await self.until(saga_id, lambda saga: saga.state in FINAL)

    async def failed_for_a_person(self, saga_id: str) -> saga_pb2.Saga:
        """A saga that ends FAILED: charge is refused and reserve's compensation keeps failing."""
        self.participant.script("execute", "charge", "fail")
        self.participant.script("compensate", "reserve", "fail", "fail", "fail")
        await self.begin(saga_id)
        saga = await self.final(saga_id)
        assert saga.state == saga_pb2.SAGA_STATE_FAILED, saga
        return saga

    async def events(self, saga_id: str) -> list[saga_pb2.SagaEvent]:
        request = orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True)
        return [update.event async for update in self.stub.WatchSaga(request, metadata=bearer("reader"))]


@asynccontextmanager
async def dashboard_rig(
    tmp_path: Path, make_postgres_url: Callable[[], str], **config: Any
) -> AsyncIterator[DashboardRig]:
    """The rig; `config` overrides ServerConfig fields (`participants` adds to the scripted one)."""
    participant = ScriptedParticipant()
    server, address = await serve_scripted(participant)
    (tmp_path / "board.yaml").write_text(BOARD)
    (tmp_path / "tokens.yaml").write_text(TOKEN_FILE)
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "database_url": make_postgres_url(),
        "definition_paths": (tmp_path / "board.yaml",),
        "participants": {"scripted": address, **config.pop("participants", {})},
        "http_listen": "127.0.0.1:0",
        "token_file": tmp_path / "tokens.yaml",
        **config,
    }
    orchestrator = await start_orchestrator(ServerConfig(**settings))
    channel = grpc.aio.insecure_channel(orchestrator.address)
    try:
        yield DashboardRig(participant, orchestrator, orchestrator_pb2_grpc.OrchestratorServiceStub(channel))
    finally:
        await channel.close()
        await orchestrator.stop(0)
        await server.stop(0)
