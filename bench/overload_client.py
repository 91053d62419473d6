"""The overload client: StartSaga calls from many callers at once, against
one orchestrator with a small bound of sagas in flight (--max-sagas-in-flight).

Each of --callers callers makes StartSaga calls one after another, without
waiting out the retry delay of a refusal (a flood, not a polite client), until
--calls have been made in all. Prints one JSON line: the count of each answer
(gRPC status code) and, per code, the latency p50/p99/max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
import uuid

import grpc
from common import percentile, saga_input

from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc


async def flood(address: str, definition: str, callers: int, calls: int) -> dict[str, object]:
    seconds: dict[str, list[float]] = collections.defaultdict(list)
    left = calls
    payload = saga_input()

    async def caller(stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            request = orchestrator_pb2.StartSagaRequest(
                saga_id=f"flood-{uuid.uuid4().hex}", definition_name=definition, input=payload
            )
            began = time.perf_counter()
            try:
                await stub.StartSaga(request, timeout=60.0)
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = error.code().name
            seconds[code].append(time.perf_counter() - began)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        await channel.channel_ready()
        began = time.perf_counter()
        await asyncio.gather(*(caller(stub) for _ in range(callers)))
        took = time.perf_counter() - began
    for values in seconds.values():
        values.sort()
    return {
        "seconds": round(took, 2),
        "answers": {code: len(values) for code, values in sorted(seconds.items())},
        "latency_ms": {
            code: {
                "p50": round(percentile(values, 0.5) * 1000, 1),
                "p99": round(percentile(values, 0.99) * 1000, 1),
                "max": round(values[-1] * 1000, 1),
            }
            for code, values in sorted(seconds.items())
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--definition", required=True)
    parser.add_argument("--callers", type=int, required=True)
    parser.add_argument("--calls", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(flood(args.address, args.definition, args.callers, args.calls))), flush=True)


if __name__ == "__main__":
    main()
