"""Watch-stream subscribers for the bench's subscriber section: N streams kept open.

Opens N streams on the orchestrator with grpc.aio, spread over channels of at
most --per-channel streams each (every channel its own TCP connection), and
keeps them open, consuming and counting whatever arrives:

  watch-sagas  N WatchSagas streams, optionally filtered (--definition,
               --saga-state); the "alerting dashboard" (filter FAILED) and
               the full feed (no filter) cases.
               With --batch B, up to B events per message (the batched full
               feed), and with --window-ms W a batch_window of W ms.
  watch-saga   N WatchSaga streams with follow_after_end, one per saga id of
               --saga-ids (a file, one id a line, at least N of them); each
               starts with a snapshot of its saga.
  dashboard-live  N dashboards with the saga list open: each a server-sent
               event stream of /live (the whole log, as a browser's
               EventSource reads it) from the dashboard at --http-url, each
               on its own connection.

Prints "ready N" once all N are open: for watch-saga when every stream has
received its first message (the saga's snapshot, sent at once, so the server
has accepted it); for watch-sagas a filtered stream may receive nothing, so
every request has been sent and one Health round trip per channel (on the
same connection, after the streams' requests) has come back, the process sleeps --settle seconds, a
deliberate settle delay for the server to register the last streams.

Then answers one command per stdin line, "stats", with a JSON object:
{"events": received so far, "open": streams still open, "errors": streams
that ended with an error, "first_error": "..."}. EOF on stdin ends it. Runs in
its own process so that its CPU is never counted as the orchestrator's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

_OPEN_TIMEOUT = 120.0


class Subscribers:
    """N open streams and what they received."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self.events = 0
        self.open = 0
        self.errors = 0
        self.first_error = ""
        channels = (args.count + args.per_channel - 1) // args.per_channel
        # A local subchannel pool: each channel gets its own connection
        # instead of sharing one with every channel to the same address.
        self._channels = [
            grpc.aio.insecure_channel(args.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._calls: list[Any] = []
        self._first: list[asyncio.Future[None]] = []
        self._sessions: list[aiohttp.ClientSession] = []

    async def _follow_live(self, session: aiohttp.ClientSession, first: asyncio.Future[None]) -> None:
        """One dashboard's live list: counts the events of each message."""
        self.open += 1
        try:
            async with session.get(self._args.http_url.rstrip("/") + "/live") as response:
                if response.status != 200:
                    raise RuntimeError(f"/live answered {response.status}: {await response.text()}")
                async for line in response.content:
                    if not first.done():
                        first.set_result(None)  # the server wrote its retry line: the stream is open
                    if line.startswith(b"data: "):
                        self.events += len(json.loads(line[6:]))
        except (aiohttp.ClientError, RuntimeError) as error:
            self.errors += 1
            self.first_error = self.first_error or str(error)
        finally:
            self.open -= 1
            if not first.done():
                first.set_result(None)

    async def _open_dashboards(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self._args.count):
            # Its own connection, as each browser has.
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
            self._sessions.append(session)
            first: asyncio.Future[None] = loop.create_future()
            self._first.append(first)
            self._tasks.append(asyncio.create_task(self._follow_live(session, first)))
        await asyncio.wait_for(asyncio.gather(*self._first), _OPEN_TIMEOUT)

    def _request(self, index: int, saga_ids: list[str]) -> tuple[Any, Any]:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channels[index // self._args.per_channel])
        if self._args.kind == "watch-saga":
            return stub.WatchSaga, orchestrator_pb2.WatchSagaRequest(saga_id=saga_ids[index], follow_after_end=True)
        state = saga_pb2.SagaState.Value(self._args.saga_state or "SAGA_STATE_UNSPECIFIED")
        request = orchestrator_pb2.WatchSagasRequest(
            definition_name=self._args.definition, saga_state=state, max_events_per_message=self._args.batch
        )
        if self._args.window_ms:
            request.batch_window.FromMilliseconds(self._args.window_ms)
        return stub.WatchSagas, request

    async def _consume(self, call: Any, first: asyncio.Future[None]) -> None:
        self.open += 1
        try:
            async for response in call:
                self.events += len(response.events) if self._args.kind == "watch-sagas" and self._args.batch > 1 else 1
                if not first.done():
                    first.set_result(None)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.errors += 1
                self.first_error = self.first_error or f"{error.code().name}: {error.details()}"
        finally:
            self.open -= 1
            if not first.done():
                first.set_result(None)  # ended without an event: open_all sees it in self.open

    async def open_all(self) -> None:
        if self._args.kind == "dashboard-live":
            await self._open_dashboards()
            if self.open != self._args.count:
                raise SystemExit(f"subscribers: {self.open} of {self._args.count} live lists open: {self.first_error}")
            return
        saga_ids: list[str] = []
        if self._args.kind == "watch-saga":
            with open(self._args.saga_ids) as lines:  # noqa: ASYNC230 (a small file, read before any stream opens)
                saga_ids = [line.strip() for line in lines if line.strip()]
            if len(saga_ids) < self._args.count:
                raise SystemExit(f"subscribers: {len(saga_ids)} saga ids for {self._args.count} streams")
        loop = asyncio.get_running_loop()
        for index in range(self._args.count):
            method, request = self._request(index, saga_ids)
            call = method(request)
            first: asyncio.Future[None] = loop.create_future()
            self._calls.append(call)
            self._first.append(first)
            self._tasks.append(asyncio.create_task(self._consume(call, first)))
        # (call.wait_for_connection() is no help: it also waits for the
        # server's initial metadata, which grpc sends with the first message.)
        if self._args.kind == "watch-saga":
            await asyncio.wait_for(asyncio.gather(*self._first), _OPEN_TIMEOUT)
        else:
            for channel in self._channels:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            # Deliberate settle delay: a filtered stream that matches nothing
            # receives nothing, so the client cannot see the server accept it.
            await asyncio.sleep(self._args.settle)
        if self.open != self._args.count:
            raise SystemExit(f"subscribers: {self.open} of {self._args.count} streams open: {self.first_error}")

    def stats(self) -> str:
        return json.dumps(
            {"events": self.events, "open": self.open, "errors": self.errors, "first_error": self.first_error}
        )

    async def close(self) -> None:
        for call in self._calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(session.close() for session in self._sessions))
        await asyncio.gather(*(channel.close() for channel in self._channels))


async def main_async(args: argparse.Namespace) -> None:
    subscribers = Subscribers(args)
    try:
        await subscribers.open_all()
        print(f"ready {subscribers.open}", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            if line.strip() == "stats":
                print(subscribers.stats(), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
    finally:
        await subscribers.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="orchestrator HOST:PORT")
    parser.add_argument("--kind", choices=("watch-sagas", "watch-saga", "dashboard-live"), required=True)
    parser.add_argument("--http-url", default="", help="dashboard-live: the dashboard's URL")
    parser.add_argument("--count", type=int, required=True, help="streams to open")
    parser.add_argument("--definition", default="", help="watch-sagas: definition filter (default: any)")
    parser.add_argument("--saga-state", default="", help="watch-sagas: saga_state filter, e.g. SAGA_STATE_FAILED")
    parser.add_argument("--saga-ids", help="watch-saga: file with one saga id a line")
    parser.add_argument("--per-channel", type=int, default=100, help="streams per channel/connection (default 100)")
    parser.add_argument("--batch", type=int, default=0,
                        help="watch-sagas: max_events_per_message (default 0: one event per message)")
    parser.add_argument("--window-ms", type=int, default=0, help="watch-sagas with --batch: batch_window in ms")
    parser.add_argument("--settle", type=float, default=2.0, help="watch-sagas: settle delay in seconds (default 2)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
