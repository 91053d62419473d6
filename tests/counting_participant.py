"""A participant that notes the exact arrival and end of every call it gets,
for the flow-control tests: limits are checked from the participant's side
(DESIGN-NOTES 10), never from the orchestrator's counters.

In the test's process (`serving`) for small scenarios; as a process of its
own (`python tests/counting_participant.py --listen ADDR --notes FILE`) where
the test's own work (starting thousands of sagas, polling their states)
would delay the handlers and so misdate arrivals. The process appends one
line per ended call to FILE and serves grpc.health.v1 so that the test can
wait for it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from compensa.v1 import participant_pb2, participant_pb2_grpc

#: (saga id, step or "" for a Compensate, arrival, end), monotonic seconds.
Call = tuple[str, str, float, float]


@dataclass
class CountingParticipant(participant_pb2_grpc.ParticipantServiceServicer):
    """Answers every call after `work_seconds`, and notes when each arrived
    and ended. A saga whose id ends in "-declined" fails its Execute (a
    business failure: nothing applied, so nothing to compensate)."""

    work_seconds: float = 0.05
    arrivals: list[float] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    executed: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    most_in_flight: int = 0
    notes: TextIO | None = None

    async def _work(self, saga_id: str, step: str = "") -> None:
        arrived = time.monotonic()
        self.arrivals.append(arrived)
        self.executed[saga_id] = self.executed.get(saga_id, 0) + 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.work_seconds)  # ok-sleep: the participant's work
        finally:
            self.in_flight -= 1
            call = (saga_id, step, arrived, time.monotonic())
            self.calls.append(call)
            if self.notes is not None:
                self.notes.write(f"{saga_id} {step or '-'} {call[2]:.6f} {call[3]:.6f}\n")
                self.notes.flush()

    async def Execute(
        self, request: participant_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.ExecuteResponse:
        await self._work(request.context.saga_id, request.context.step_name)
        if request.context.saga_id.endswith("-declined"):
            return participant_pb2.ExecuteResponse(
                result=participant_pb2.EXECUTE_RESULT_FAILED, failure_reason="declined"
            )
        return participant_pb2.ExecuteResponse(result=participant_pb2.EXECUTE_RESULT_SUCCEEDED)

    async def Compensate(
        self, request: participant_pb2.CompensateRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.CompensateResponse:
        await self._work(request.context.saga_id)
        return participant_pb2.CompensateResponse()

    def most_in_one_second(self) -> int:
        """The most calls that arrived within any one-second window."""
        return most_in_one_second(self.arrivals)


def most_in_one_second(arrivals: Iterable[float]) -> int:
    """The most of `arrivals` within any one-second window."""
    times = sorted(arrivals)
    return max((bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


def most_at_once(calls: Iterable[Call]) -> int:
    """The most calls in flight at once (an end before a start at the same instant)."""
    edges = sorted([(arrived, 1) for _, _, arrived, _ in calls] + [(ended, -1) for *_, ended in calls])
    most = current = 0
    for _, change in edges:
        current += change
        most = max(most, current)
    return most


def read_notes(path: Path) -> list[Call]:
    """The calls a participant process noted in `path` (none before its first)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    calls = []
    for line in lines:
        parts = line.split()
        if len(parts) == 4:  # a line being written is left for the next read
            saga_id, step, arrived, ended = parts
            calls.append((saga_id, "" if step == "-" else step, float(arrived), float(ended)))
    return calls


@asynccontextmanager
async def serving(participant: CountingParticipant, port: int = 0) -> AsyncIterator[str]:
    """`participant` served on 127.0.0.1 (a free port unless given); its address."""
    server = grpc.aio.server()
    participant_pb2_grpc.add_ParticipantServiceServicer_to_server(participant, server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def _serve(listen: str, notes: Path, work_seconds: float) -> None:
    host, port = listen.rsplit(":", 1)
    assert host == "127.0.0.1", listen
    with notes.open("a") as file:
        participant = CountingParticipant(work_seconds=work_seconds, notes=file)
        async with serving(participant, int(port)):
            await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="127.0.0.1:PORT")
    parser.add_argument("--notes", type=Path, required=True, help="file to append a line per ended call to")
    parser.add_argument("--work-seconds", type=float, default=0.05)
    args = parser.parse_args()
    asyncio.run(_serve(args.listen, args.notes, args.work_seconds))


if __name__ == "__main__":
    main()
