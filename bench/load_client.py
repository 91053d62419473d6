"""The load client: N concurrent workers, each starting a saga and waiting for its end.

Latency is StartSaga sent -> final event received. How a worker waits is
--wait (see bench/README.md for the measurements behind the default):

  watch-all  one WatchSagas stream for the whole client, filtered on the
             definition and on saga_state SUCCEEDED; a worker registers its
             saga id before StartSaga, so no end is missed. A saga not seen
             within the stall timeout is looked up with GetSaga (that is how
             a saga that ended otherwise is detected, and counted as failed).
  watch      a WatchSaga stream per saga, from the sequence StartSaga answered.
  poll       GetSaga every --poll-ms until the saga is final.

Also starts sagas without waiting ("start" command) for the waiting-saga
measurement. Speaks the run protocol of bench/common.py on stdin/stdout; runs
in its own process so that its CPU is never counted as the orchestrator's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from typing import Any

import grpc
from common import RunOutcome, run_workers, saga_input, serve_commands

from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

WAIT_MODES = ("watch-all", "watch", "poll")
_FINAL_STATES = (saga_pb2.SAGA_STATE_SUCCEEDED, saga_pb2.SAGA_STATE_COMPENSATED, saga_pb2.SAGA_STATE_FAILED)
_FINAL_EVENTS = (
    saga_pb2.EVENT_TYPE_SAGA_SUCCEEDED, saga_pb2.EVENT_TYPE_SAGA_COMPENSATED, saga_pb2.EVENT_TYPE_SAGA_FAILED,
)
_CALL_TIMEOUT = 30.0
_STALL_SECONDS = 60.0


class SagaFailed(Exception):
    """A saga ended in another state than SUCCEEDED, or never ended."""


class LoadClient:
    """Starts bench sagas on one channel and waits for their ends."""

    def __init__(
        self, address: str, definition: str, wait: str, poll_seconds: float, *, distinct_orders: bool = False
    ) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)
        self._definition = definition
        self._wait = wait
        self._poll_seconds = poll_seconds
        self._input = saga_input()
        self._distinct_orders = distinct_orders
        # watch-all: saga id -> future resolved with the time its end arrived.
        self._ends: dict[str, asyncio.Future[float]] = {}
        self._watcher: asyncio.Task[None] | None = None

    async def start_watching_all(self) -> None:
        if self._wait == "watch-all":
            self._watcher = asyncio.create_task(self._watch_all())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._watcher
        await self._channel.close()

    async def _watch_all(self) -> None:
        request = orchestrator_pb2.WatchSagasRequest(
            definition_name=self._definition, saga_state=saga_pb2.SAGA_STATE_SUCCEEDED
        )
        async for response in self._stub.WatchSagas(request):
            future = self._ends.pop(response.event.saga_id, None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter())

    def _start_request(self, saga_id: str, definition: str) -> orchestrator_pb2.StartSagaRequest:
        return orchestrator_pb2.StartSagaRequest(
            saga_id=saga_id, definition_name=definition,
            input=saga_input(order_id=saga_id) if self._distinct_orders else self._input,
        )

    async def _final_state(self, saga_id: str) -> int:
        response = await self._stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id), timeout=_CALL_TIMEOUT)
        return int(response.saga.state)

    async def saga(self, saga_id: str) -> float:
        """Runs one saga to its end; its latency in ms. SagaFailed unless it SUCCEEDED."""
        start = self._start_request(saga_id, self._definition)
        if self._wait == "watch-all":
            ended: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            self._ends[saga_id] = ended
            began = time.perf_counter()
            try:
                await self._stub.StartSaga(start, timeout=_CALL_TIMEOUT)
                try:
                    return (await asyncio.wait_for(ended, _STALL_SECONDS) - began) * 1000
                except TimeoutError:
                    state = await self._final_state(saga_id)
                    name = saga_pb2.SagaState.Name(state)  # type: ignore[arg-type]
                    raise SagaFailed(f"saga {saga_id} not seen ending; state {name}") from None
            finally:
                self._ends.pop(saga_id, None)
        began = time.perf_counter()
        started = await self._stub.StartSaga(start, timeout=_CALL_TIMEOUT)
        if self._wait == "watch":
            watch = orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, after_sequence=started.saga.sequence)
            async for response in self._stub.WatchSaga(watch, timeout=_STALL_SECONDS):
                if response.event.type in _FINAL_EVENTS:
                    received = time.perf_counter()
                    if response.event.type != saga_pb2.EVENT_TYPE_SAGA_SUCCEEDED:
                        raise SagaFailed(f"saga {saga_id} ended {saga_pb2.EventType.Name(response.event.type)}")
                    return (received - began) * 1000
            raise SagaFailed(f"saga {saga_id}: watch ended before the saga did")
        state = int(started.saga.state)
        while state not in _FINAL_STATES:
            if time.perf_counter() - began > _STALL_SECONDS:
                raise SagaFailed(f"saga {saga_id} did not end within {_STALL_SECONDS}s")
            await asyncio.sleep(self._poll_seconds)
            state = await self._final_state(saga_id)
        received = time.perf_counter()
        if state != saga_pb2.SAGA_STATE_SUCCEEDED:
            raise SagaFailed(f"saga {saga_id} ended {saga_pb2.SagaState.Name(state)}") from None  # type: ignore[arg-type]
        return (received - began) * 1000

    async def _workers(self, total: int, concurrency: int, one: Any) -> tuple[list[float], list[str], float]:
        return await run_workers(total, concurrency, one, (grpc.aio.AioRpcError, SagaFailed))

    async def handle(self, command: dict[str, Any]) -> str:
        total, concurrency = int(command["sagas"]), int(command["concurrency"])
        prefix = f"{command.get('tag', 'run')}-{uuid.uuid4().hex[:8]}"
        if command["cmd"] == "run":
            latencies, errors, seconds = await self._workers(
                total, concurrency, lambda index: self.saga(f"{prefix}-{index}")
            )
        elif command["cmd"] == "start":
            definition = str(command["definition"])

            async def start_only(index: int) -> None:
                await self._stub.StartSaga(self._start_request(f"{prefix}-{index}", definition), timeout=_CALL_TIMEOUT)

            latencies, errors, seconds = await self._workers(total, concurrency, start_only)
        else:
            raise ValueError(f"unknown command {command['cmd']!r}")
        return RunOutcome(total, len(errors), seconds, latencies, errors[0] if errors else "").to_json()


async def main_async(args: argparse.Namespace) -> None:
    client = LoadClient(
        args.address, args.definition, args.wait, args.poll_ms / 1000, distinct_orders=args.distinct_orders
    )
    await client.start_watching_all()
    try:
        await serve_commands(client.handle)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="orchestrator HOST:PORT")
    parser.add_argument("--definition", default="bench", help="definition of the sagas to run")
    parser.add_argument("--wait", choices=WAIT_MODES, default="watch-all", help="how a worker waits for its saga's end")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="GetSaga interval with --wait poll")
    parser.add_argument(
        "--distinct-orders", action="store_true",
        help="each saga orders its own SKU (order id and SKU from its saga id): the checkout participants then"
             " update no row in common (with one order for all, every reserve waits on the same stock row)",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
