"""What a user watches stays up: `compensa watch ID` follows a saga to its real
end (a FAILED saga may be retried), `compensa watch --all` resumes across an
orchestrator restart, and WatchSaga after a saga's last event ends at once."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from harness import FINAL, checkout_input, poll_until
from processes import COMPENSA, free_port
from scripted_participant import ScriptedParticipant, serve_scripted

from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import RunningOrchestrator, start_orchestrator
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

S = saga_pb2

FLOW = """
name: flow
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: reserve
    participant: scripted
    execute_timeout: 1s
    compensate_timeout: 1s
    compensate_retry: {max_attempts: 2, initial_backoff: 20ms, backoff_multiplier: 1, max_backoff: 20ms}
  - name: charge
    participant: scripted
    execute_timeout: 1s
"""


@dataclass
class Deployment:
    participant: ScriptedParticipant
    config: ServerConfig
    orchestrator: RunningOrchestrator
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub

    async def begin(self, saga_id: str) -> None:
        await self.stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(saga_id=saga_id, definition_name="flow", input=checkout_input())
        )

    async def final(self, saga_id: str) -> saga_pb2.Saga:
        async def check() -> saga_pb2.Saga | None:
            saga = (await self.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
            return saga if saga.state in FINAL else None

        saga: saga_pb2.Saga = await poll_until(check, 15)
        return saga

    async def restart(self) -> None:
        await self.orchestrator.stop(0)
        self.orchestrator = await start_orchestrator(self.config)


@asynccontextmanager
async def deployment(tmp_path: Path, database_url: str) -> AsyncIterator[Deployment]:
    participant = ScriptedParticipant()
    server, address = await serve_scripted(participant)
    definition = tmp_path / "flow.yaml"
    definition.write_text(FLOW)
    # A fixed port: `watch` reconnects to the same address after a restart.
    config = ServerConfig(
        listen=f"127.0.0.1:{free_port()}", database_url=database_url, definition_paths=(definition,),
        participants={"scripted": address},
    )
    orchestrator = await start_orchestrator(config)
    channel = grpc.aio.insecure_channel(orchestrator.address)
    setup = Deployment(participant, config, orchestrator, orchestrator_pb2_grpc.OrchestratorServiceStub(channel))
    try:
        yield setup
    finally:
        await channel.close()
        await setup.orchestrator.stop(0)
        await server.stop(0)


class Watcher:
    """A `compensa watch` process whose output is read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(cls, address: str, *args: str) -> Watcher:
        process = await asyncio.create_subprocess_exec(
            str(COMPENSA), "--address", address, "watch", *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
        return cls(process)

    async def until_line(self, needle: str, timeout: float = 20.0) -> None:
        """Reads output until a line contains `needle`."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.lines):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line with {needle!r} in {self.lines}"
            line = await asyncio.wait_for(self.process.stdout.readline(), remaining)
            assert line, f"watch ended before a line with {needle!r}: {self.lines} {await self._stderr()}"
            self.lines.append(line.decode().rstrip("\n"))

    async def ended(self, timeout: float = 20.0) -> int:
        assert self.process.stdout is not None
        rest = await asyncio.wait_for(self.process.stdout.read(), timeout)
        self.lines += rest.decode().splitlines()
        code = await asyncio.wait_for(self.process.wait(), timeout)
        return code

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()

    async def _stderr(self) -> str:
        assert self.process.stderr is not None
        with_timeout = await asyncio.wait_for(self.process.stderr.read(), 5)
        return with_timeout.decode()


async def test_watch_of_a_failed_saga_follows_a_retry_to_compensated(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with deployment(tmp_path, make_postgres_url()) as d:
        d.participant.script("execute", "charge", "fail")
        d.participant.script("compensate", "reserve", "fail", "fail")
        await d.begin("watch-failed")
        assert (await d.final("watch-failed")).state == S.SAGA_STATE_FAILED
        watcher = await Watcher.start(d.orchestrator.address, "watch-failed")
        try:
            # FAILED and unresolved is not an end: a person may retry it.
            await watcher.until_line("ALERT RAISED")
            await d.stub.RetrySaga(orchestrator_pb2.RetrySagaRequest(saga_id="watch-failed", actor="bob"))
            assert await watcher.ended() == 0
        finally:
            await watcher.stop()
        text = "\n".join(watcher.lines)
        for shown in ("SAGA FAILED", "ALERT RAISED", "OPERATOR RETRIED", "SAGA COMPENSATED"):
            assert shown in text, text


async def test_watch_of_a_failed_saga_ends_when_a_person_resolves_it(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with deployment(tmp_path, make_postgres_url()) as d:
        d.participant.script("execute", "charge", "fail")
        d.participant.script("compensate", "reserve", "fail", "fail")
        await d.begin("watch-resolved")
        assert (await d.final("watch-resolved")).state == S.SAGA_STATE_FAILED
        watcher = await Watcher.start(d.orchestrator.address, "watch-resolved")
        try:
            await watcher.until_line("ALERT RAISED")
            await d.stub.ResolveSaga(orchestrator_pb2.ResolveSagaRequest(saga_id="watch-resolved", note="by hand"))
            assert await watcher.ended() == 0
        finally:
            await watcher.stop()
        assert "OPERATOR RESOLVED" in watcher.lines[-1], watcher.lines


async def test_watch_all_resumes_after_an_orchestrator_restart(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with deployment(tmp_path, make_postgres_url()) as d:
        await d.begin("before-restart")
        await d.final("before-restart")
        watcher = await Watcher.start(d.orchestrator.address, "--all")
        try:
            await watcher.until_line("before-restart")
            await d.restart()
            await d.begin("after-restart")
            await watcher.until_line("after-restart")
            assert watcher.process.returncode is None
        finally:
            await watcher.stop()
        # Nothing shown twice: it resumed after the last position it printed.
        positions = [line.split()[0] for line in watcher.lines if line.startswith("@")]
        assert len(positions) == len(set(positions)), watcher.lines


async def test_watch_saga_after_the_last_event_of_a_saga_done_for_good_ends_at_once(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with deployment(tmp_path, make_postgres_url()) as d:
        await d.begin("done")
        saga = await d.final("done")
        assert saga.state == S.SAGA_STATE_SUCCEEDED
        # A client that reconnects after receiving the final event.
        request = orchestrator_pb2.WatchSagaRequest(saga_id="done", after_sequence=saga.sequence, replay_history=True)
        received = [response async for response in d.stub.WatchSaga(request, timeout=5)]
        assert received == []
        # Before the end it still sends what follows, and ends after the last.
        request.after_sequence = saga.sequence - 1
        received = [response async for response in d.stub.WatchSaga(request, timeout=5)]
        assert [r.event.sequence for r in received] == [saga.sequence]
        # follow_after_end keeps the stream open.
        request.after_sequence = saga.sequence
        request.follow_after_end = True
        with pytest.raises(grpc.aio.AioRpcError) as error:
            _ = [response async for response in d.stub.WatchSaga(request, timeout=0.5)]
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
