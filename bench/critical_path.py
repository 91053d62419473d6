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
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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
    parser.add_argument("--postgres-log", type=Path, metavar="FILE",
                        help="the PostgreSQL server's log file (readable): log the bench database's statements"
                             " and print the group commit's server-side execution time")
    args = parser.parse_args()
    database = f"compensa_path_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
        if args.postgres_log:
            # Every statement's server-side duration goes to the server's log.
            admin.execute(f'ALTER DATABASE "{database}" SET log_min_duration_statement = 0')
            log_start = args.postgres_log.stat().st_size
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
            metrics_address = f"127.0.0.1:{free_port()}"
            serve = subprocess.Popen(
                [COMPENSA, "serve", "--listen", address, "--db", f"postgresql+psycopg://postgres@{PG_HOST}/{database}",
                 "--definitions", definitions, "--participant", f"noop={participant_address}",
                 "--metrics-listen", metrics_address],
                stderr=subprocess.DEVNULL,
            )
            processes.append(serve)
            problem = wait_serving(address, serve)
            if problem:
                raise SystemExit(f"compensa serve {problem}")
            rows = asyncio.run(run_sagas(address, args.sagas))[args.skip:]
            with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
                exposition = response.read().decode()
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

    def figures(spans: list[float]) -> str:
        ordered = sorted(spans)
        p90 = ordered[int(len(ordered) * 0.9)]
        return f"{statistics.median(ordered) * 1000:6.2f} {p90 * 1000:6.2f} {statistics.fmean(ordered) * 1000:6.2f}"

    # The medians of the segments do not add up to the total's when a delay
    # lands in a different segment from saga to saga: the mean column does.
    print(f"critical path at c=1: {len(rows)} sagas (ms)")
    print(f"  {'segment':<72} {'p50':>6} {'p90':>6} {'mean':>6}")
    for label, start, end in SEGMENTS:
        spans = [at(s, sent, got, end) - at(s, sent, got, start) for s, sent, got in rows]
        print(f"  {label:<72} {figures(spans)}")
    print(f"  {'total':<72} {figures([got - sent for _, sent, got in rows])}")
    commits = _histogram_mean(exposition, "compensa_group_commit_seconds")
    print(f"  group commits (all {commits[1]:.0f} of the run, warm-up included): mean {commits[0] * 1000:.2f} ms")
    if args.postgres_log:
        with args.postgres_log.open(errors="replace") as server_log:
            server_log.seek(log_start)
            executions = sorted(
                float(match.group(1))
                for match in re.finditer(r"duration: ([0-9.]+) ms  execute (_pg3_\d+)", server_log.read())
            )[args.skip * 4:]
        if executions:
            p50, mean = statistics.median(executions), statistics.fmean(executions)
            print(f"  of which the statement's execution in the server (log_min_duration_statement, prepared"
                  f" statements): p50 {p50:.2f} ms, mean {mean:.2f} ms ({len(executions)}; the WAL flush at its"
                  f" commit comes after)")


def _histogram_mean(exposition: str, name: str) -> tuple[float, float]:
    """(mean, count) of a Prometheus histogram in a text exposition."""
    values = {}
    for line in exposition.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(f"{name}{suffix} "):
                values[suffix] = float(line.split()[1])
    return values["_sum"] / max(values["_count"], 1), values["_count"]


if __name__ == "__main__":
    main()
