"""A participant that does nothing: every Execute and Compensate succeeds at once.

Execute answers EXECUTE_RESULT_PENDING when the request carries a completion
token (the step is long-running), which is how the waiting-saga measurement
parks sagas. No database, no SDK: the bench measures the orchestrator.

With --delay-ms, every Execute answers that much later (the overload case:
sagas that take a while, as with a participant that does real work).

Prints "ready HOST:PORT" on stdout once serving; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import grpc

from compensa.common.serving import GRPC_SERVER_OPTIONS
from compensa.v1 import participant_pb2, participant_pb2_grpc

_PENDING = participant_pb2.ExecuteResponse(result=participant_pb2.EXECUTE_RESULT_PENDING)
_SUCCEEDED = participant_pb2.ExecuteResponse(result=participant_pb2.EXECUTE_RESULT_SUCCEEDED)
_COMPENSATED = participant_pb2.CompensateResponse()


class NoopParticipant(participant_pb2_grpc.ParticipantServiceServicer):
    """Succeeds at everything (Execute after `delay` seconds); parks long-running steps."""

    def __init__(self, delay: float = 0.0) -> None:
        self._delay = delay

    async def Execute(
        self, request: participant_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.ExecuteResponse:
        if self._delay:
            await asyncio.sleep(self._delay)
        return _PENDING if request.completion_token else _SUCCEEDED

    async def Compensate(
        self, request: participant_pb2.CompensateRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.CompensateResponse:
        return _COMPENSATED


async def serve(listen: str, delay: float) -> None:
    server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
    participant_pb2_grpc.add_ParticipantServiceServicer_to_server(NoopParticipant(delay), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {listen.rpartition(':')[0]}:{port}", flush=True)
    await stop.wait()
    await server.stop(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="how long each Execute takes (default 0)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
