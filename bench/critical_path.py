"""Where one saga's time goes at concurrency 1.

Starts a no-op participant and a PostgreSQL-backed `compensa serve` on a fresh
database, runs sagas of the bench definition one after another (each waited
for through a WatchSagas stream, as the bench's load client does), then splits
each saga's start-to-finish time at the decision times the engine writes into
its events (`compensa_saga_events.time`). Prints the median of each segment.

    .venv/bin/python bench/critical_path.py [--sagas 300] [--skip 50]

Not part of `make bench`: it explains the c=1 row rather than measuring it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psycopg
from common import STEP_NAMES, saga_input
from run import _STEP, BENCH_DEFINITION, PG_ADMIN_DSN, PG_HOST, free_port, wait_serving

from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
COMPENSA = str(Path(PYTHON).with_name("compensa"))

#: (label, event sequence where it starts, where it ends); sequence 0 is the
#: client sending StartSaga, None the client receiving the final event. The
#: bench saga's log: 1 started, 2 first started, 3 first succeeded, 4 second
#: started, 5 second succeeded, 6 third started, 7 third succeeded, 8 succeeded.
SEGMENTS = (
    ("client sends StartSaga -> the engine decides the new saga", 0, 1),
    ("saga decided -> first step's success decided (commit, call)", 1, 3),
    ("first step's success -> second's (commit, call)", 3, 5),
    ("second step's success -> third's (commit, call)", 5, 7),
    ("third step's success -> client has the final event (commit, stream)", 7, None),
)


async def run_sagas(address: str, count: int) -> list[tuple[str, float, float]]:
    """(saga id, sent, final event received) per saga, one at a time."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        finished: dict[str, asyncio.Future[float]] = {}

        async def watch() -> None:
            request = orchestrator_pb2.WatchSagasRequest(saga_state=saga_pb2.SAGA_STATE_SUCCEEDED)
            async for response in stub.WatchSagas(request):
                waiting = finished.get(response.event.saga_id)
                if waiting is not None and not waiting.done():
                    waiting.set_result(time.time())

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.5)  # the stream is registered before the first saga
        loop = asyncio.get_running_loop()
        rows = []
        for index in range(count):
            saga_id = f"path-{index}"
            finished[saga_id] = loop.create_future()
            sent = time.time()
            await stub.StartSaga(
                orchestrator_pb2.StartSagaRequest(saga_id=saga_id, definition_name="bench", input=saga_input()),
                timeout=10,
            )
            rows.append((saga_id, sent, await asyncio.wait_for(finished[saga_id], 10)))
        watcher.cancel()
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sagas", type=int, default=300, help="sagas to run (default 300)")
    parser.add_argument("--skip", type=int, default=50, help="first sagas left out as warm-up (default 50)")
    args = parser.parse_args()
    database = f"compensa_path_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory() as definitions:
            steps = "".join(_STEP.format(name=name) for name in STEP_NAMES)
            (Path(definitions) / "bench.yaml").write_text(BENCH_DEFINITION.format(steps=steps))
            participant = subprocess.Popen([PYTHON, str(BENCH_DIR / "noop_participant.py")], stdout=subprocess.PIPE)
            processes.append(participant)
            assert participant.stdout is not None
            participant_address = participant.stdout.readline().decode().split()[1]
            address = f"127.0.0.1:{free_port()}"
            serve = subprocess.Popen(
                [COMPENSA, "serve", "--listen", address, "--db", f"postgresql+psycopg://postgres@{PG_HOST}/{database}",
                 "--definitions", definitions, "--participant", f"noop={participant_address}"],
                stderr=subprocess.DEVNULL,
            )
            processes.append(serve)
            problem = wait_serving(address, serve)
            if problem:
                raise SystemExit(f"compensa serve {problem}")
            rows = asyncio.run(run_sagas(address, args.sagas))[args.skip:]
        with psycopg.connect(PG_ADMIN_DSN.replace("dbname=postgres", f"dbname={database}")) as conn:
            decided: dict[tuple[str, int], float] = {
                (saga_id, sequence): at
                for saga_id, sequence, at in conn.execute("SELECT saga_id, sequence, time FROM compensa_saga_events")
            }
    finally:
        for process in processes:
            process.terminate()
            process.wait()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    def at(saga_id: str, sent: float, received: float, sequence: int | None) -> float:
        if sequence is None:
            return received
        return sent if sequence == 0 else decided[(saga_id, sequence)]

    print(f"critical path at c=1: medians of {len(rows)} sagas (ms)")
    for label, start, end in SEGMENTS:
        spans = [at(s, sent, got, end) - at(s, sent, got, start) for s, sent, got in rows]
        print(f"  {label:<72} {statistics.median(spans) * 1000:6.2f}")
    print(f"  {'total':<72} {statistics.median(got - sent for _, sent, got in rows) * 1000:6.2f}")


if __name__ == "__main__":
    main()
