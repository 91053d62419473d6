"""A bulk action over many sagas: how fast a `retry-now` job works through
them, and the engine's throughput beside it (the sagas it sets going finish);
or, with --action move, how fast a MOVE job moves them to another version.

Seeds --sagas sagas of a one-step definition into a fresh PostgreSQL
database, each waiting out an hour's retry backoff of its step (the state a
failing participant leaves them in, written through the store's group commit
as the engine writes it: faster than failing each one for real), starts one
`compensa serve` against a participant that answers OK, starts the job over
all of them at --rate, and samples the job's progress and the number of
SUCCEEDED sagas every half second until both are done. A move replays each
saga's log under version 2 (compatible: a longer execute_timeout) and moves
it there; the sagas go on waiting, so the engine has nothing to finish.

    .venv/bin/python bench/bulk_job.py --sagas 100000 --rate 10000
    .venv/bin/python bench/bulk_job.py --sagas 20000 --rate 10000 --action move

Not part of `make test` or `make bench`; needs the PostgreSQL of bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psycopg
from common import cpu_seconds, saga_input
from noop_participant import NoopParticipant

from compensa.orchestrator.definitions import load_definition_file
from compensa.orchestrator.engine import machine
from compensa.orchestrator.store import PostgresSagaStore, SagaWrite
from compensa.v1 import bulk_pb2, orchestrator_pb2, orchestrator_pb2_grpc, participant_pb2_grpc, saga_pb2

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
COMPENSA = Path(sys.executable).parent / "compensa"
DEFINITION = """\
name: bench_bulk
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: charge
    participant: noop
    execute_timeout: 5s
    retry: {max_attempts: 100, initial_backoff: 1h, backoff_multiplier: 1, max_backoff: 1h}
"""
_SEED_BATCH = 1000
#: Version 2, where --action move takes the sagas: compatible with their logs.
VERSION_2 = DEFINITION.replace("execute_timeout: 5s", "execute_timeout: 6s")


async def seed(database_url: str, count: int) -> None:
    """`count` sagas waiting out charge's backoff, as the engine would leave them."""
    store = PostgresSagaStore(database_url, timeout=60)
    try:
        definition = await store.get_definition("bench_bulk")
        assert definition is not None
        plan = machine.Plan.of(definition)
        body = saga_input().SerializeToString(deterministic=True)
        now = await store.clock()
        for start in range(0, count, _SEED_BATCH):
            writes = []
            for n in range(start, min(count, start + _SEED_BATCH)):
                started = machine.new_saga(plan, saga_id=f"bulk-{n:07d}", input=body, now=now)
                waiting = machine.decide(plan, started.saga, machine.ExecuteErrored("charge", "UNAVAILABLE"), now)
                writes.append(SagaWrite(
                    saga=waiting.saga, events=started.events + waiting.events, expected_sequence=0, owner="bench",
                    epoch=1, release=True, due_at=machine.wake_at(plan, waiting.saga), lease_until=now,
                    changed_steps=(), request_fingerprint="bench",
                ))
            results = await store.commit(writes)
            assert all(result.ok for result in results)
    finally:
        await store.close()


@dataclasses.dataclass
class Sample:
    at: float
    done: int
    succeeded: int
    #: CPU seconds the orchestrator process used since the job started.
    cpu: float


async def measure(args: argparse.Namespace, database_url: str, workdir: Path) -> list[Sample]:
    participant = grpc.aio.server()
    participant_pb2_grpc.add_ParticipantServiceServicer_to_server(NoopParticipant(), participant)
    port = participant.add_insecure_port("127.0.0.1:0")
    await participant.start()
    (workdir / "bench_bulk.yaml").write_text(DEFINITION)
    listen = f"127.0.0.1:{args.port}"
    log = (workdir / "serve.log").open("wb")
    server = await asyncio.create_subprocess_exec(
        str(COMPENSA), "serve", "--listen", listen, "--db", database_url, "--definitions",
        str(workdir / "bench_bulk.yaml"), "--participant", f"noop=127.0.0.1:{port}",
        stdout=log, stderr=subprocess.STDOUT,
    )
    channel = grpc.aio.insecure_channel(listen)
    try:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 60)
        while True:  # the definition is registered once the database is reached
            try:
                await stub.GetDefinition(orchestrator_pb2.GetDefinitionRequest(name="bench_bulk"), timeout=5)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        begun = time.monotonic()
        await seed(database_url, args.sagas)
        print(f"seeded {args.sagas} waiting sagas in {time.monotonic() - begun:.1f}s", flush=True)
        moving = args.action == "move"
        if moving:
            (workdir / "bench_bulk_2.yaml").write_text(VERSION_2)
            version_2 = load_definition_file(workdir / "bench_bulk_2.yaml")
            await stub.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest(definition=version_2), timeout=30)
        begun = time.monotonic()
        started = await stub.StartBulkAction(bulk_pb2.StartBulkActionRequest(
            kind=bulk_pb2.BULK_ACTION_KIND_MOVE if moving else bulk_pb2.BULK_ACTION_KIND_RETRY_NOW,
            filter="definition=bench_bulk", max_sagas_per_second=args.rate, note="bench", to_version=2 if moving else 0,
        ), timeout=300)
        print(f"job started over {started.selected_count} sagas in {time.monotonic() - begun:.1f}s", flush=True)
        job_id = started.bulk_action.bulk_action_id
        begun = time.monotonic()
        cpu_at_start = cpu_seconds(server.pid)
        samples = []
        while True:
            answer = await stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job_id), timeout=30)
            job = answer.bulk_action
            summary = await stub.SummarizeSagas(
                orchestrator_pb2.SummarizeSagasRequest(definition_name="bench_bulk"), timeout=30
            )
            succeeded = sum(state.count for state in summary.states if state.state == saga_pb2.SAGA_STATE_SUCCEEDED)
            cpu = cpu_seconds(server.pid) - cpu_at_start
            samples.append(Sample(time.monotonic() - begun, job.done_count, succeeded, cpu))
            if job.state == bulk_pb2.BULK_ACTION_STATE_COMPLETED and (moving or succeeded >= job.done_count):
                if job.skipped_count or job.failed_count:
                    print(f"job skipped {job.skipped_count}, failed {job.failed_count}", flush=True)
                return samples
            await asyncio.sleep(0.5)
    finally:
        await channel.close()
        server.terminate()
        await server.wait()
        log.close()
        await participant.stop(0)


def report(samples: list[Sample], rate: float) -> None:
    last = samples[-1]
    job_end = next(sample.at for sample in samples if sample.done == last.done)
    print(f"job: {last.done} sagas acted on in {job_end:.1f}s = {last.done / max(job_end, 1e-9):.0f}/s"
          f" (asked for at most {rate:g}/s)")
    print(f"engine: {last.succeeded} sagas SUCCEEDED in {last.at:.1f}s = {last.succeeded / max(last.at, 1e-9):.0f}/s")
    busiest = max(
        (later.succeeded - earlier.succeeded) / (later.at - earlier.at)
        for earlier, later in itertools.pairwise(samples) if later.at > earlier.at
    ) if len(samples) > 1 else 0.0
    print(f"engine, busiest half second: {busiest:.0f} sagas/s finished")
    job_cpu = next(sample.cpu for sample in samples if sample.done == last.done)
    print(f"orchestrator CPU: {job_cpu:.1f}s while the job ran = {1000 * job_cpu / max(last.done, 1):.2f} ms per saga"
          f" (the engine's work on the sagas included); {last.cpu:.1f}s in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sagas", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=10_000.0, help="the job's max_sagas_per_second")
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument("--action", choices=("retry-now", "move"), default="retry-now")
    args = parser.parse_args()
    name = f"compensa_bench_bulk_{os.getpid()}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with tempfile.TemporaryDirectory() as workdir:
            url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
            report(asyncio.run(measure(args, url, Path(workdir))), args.rate)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
