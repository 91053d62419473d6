"""The audit's cost: how long `compensa audit` takes over N finished sagas
across the three checkout participants, and the engine's throughput while it
runs against the same with no audit.

    .venv/bin/python bench/audit.py [--sagas 100000] [--load-sagas 2000] [--concurrency 64]

Needs a local PostgreSQL on 127.0.0.1:5432 with trust auth for user
`postgres`; creates databases `compensa_bench_audit_<role>_<random>` and drops
them at the end. Everything runs in this process (one orchestrator, three SDK
participants), as a deployment's one replica would: the audit is paced by the
orchestrator (AuditSagas), in its event loop, beside the engine. Not part of
`make test`; prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import Iterator

import grpc
import psycopg
from google.protobuf import any_pb2, timestamp_pb2

from compensa.checkout.v1 import checkout_pb2
from compensa.examples import DEFINITIONS_DIR
from compensa.examples.server import start_participant
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import start_orchestrator
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
_DONE = (saga_pb2.SAGA_STATE_SUCCEEDED, saga_pb2.SAGA_STATE_COMPENSATED, saga_pb2.SAGA_STATE_FAILED)


@contextlib.contextmanager
def _databases(roles: list[str]) -> Iterator[dict[str, str]]:
    suffix = secrets.token_hex(3)
    names = {role: f"compensa_bench_audit_{role}_{suffix}" for role in roles}
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        for name in names.values():
            admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {role: f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}" for role, name in names.items()}
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            for name in names.values():
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _input() -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(checkout_pb2.CheckoutInput(
        order_id=f"o-{uuid.uuid4().hex[:10]}", sku=f"sku-{uuid.uuid4().hex[:6]}", quantity=1, amount_cents=500,
        card_token="tok_visa", shipping_address="1 Saga Street",
    ))
    return packed


async def _run_sagas(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, count: int, concurrency: int) -> float:
    """Starts `count` sagas, `concurrency` at a time, and waits until all are final; the seconds it took."""
    began = time.monotonic()
    tag = uuid.uuid4().hex[:6]
    queue = iter(range(count))

    async def worker() -> None:
        for index in queue:
            await stub.StartSaga(orchestrator_pb2.StartSagaRequest(
                saga_id=f"bench-{tag}-{index}", definition_name="checkout", input=_input()
            ))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    while True:
        summary = await stub.SummarizeSagas(orchestrator_pb2.SummarizeSagasRequest())
        if all(row.state in _DONE for row in summary.states):
            return time.monotonic() - began
        await asyncio.sleep(0.2)  # polling interval


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    with _databases(["orchestrator", "inventory", "payment", "shipping"]) as urls:
        participants = {
            kind: await start_participant(kind, urls[kind]) for kind in ("inventory", "payment", "shipping")
        }
        orchestrator = await start_orchestrator(ServerConfig(
            listen="127.0.0.1:0", database_url=urls["orchestrator"],
            definition_paths=(DEFINITIONS_DIR / "checkout.yaml",),
            participants={kind: p.address for kind, p in participants.items()},
        ))
        try:
            async with grpc.aio.insecure_channel(orchestrator.address) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                fill_seconds = await _run_sagas(stub, args.sagas, args.concurrency)
                alone = await _run_sagas(stub, args.load_sagas, args.concurrency)
                request = orchestrator_pb2.AuditSagasRequest(since=timestamp_pb2.Timestamp(seconds=0))
                began = time.monotonic()
                audit = asyncio.ensure_future(stub.AuditSagas(request, timeout=3600))
                during = await _run_sagas(stub, args.load_sagas, args.concurrency)
                report = await audit
                audit_seconds = time.monotonic() - began
        finally:
            await orchestrator.stop(0)
            for participant in participants.values():
                await participant.stop(0)
    discrepancies = sum(len(p.discrepancies) for p in report.participants) + len(report.saga_discrepancies)
    return {
        "sagas_audited": max((p.sagas for p in report.participants), default=0),
        "participants": len(report.participants),
        "discrepancies": discrepancies,
        "audit_seconds": round(audit_seconds, 2),
        "filled_sagas_per_second": round(args.sagas / fill_seconds, 1),
        "engine_sagas_per_second_alone": round(args.load_sagas / alone, 1),
        "engine_sagas_per_second_during_audit": round(args.load_sagas / during, 1),
        "engine_slowdown_percent": round(100 * (during - alone) / alone, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sagas", type=int, default=100_000, help="finished sagas to audit (default 100000)")
    parser.add_argument("--load-sagas", type=int, default=2000,
                        help="sagas run to measure the engine's throughput, alone and during the audit (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="sagas started at once (default 64)")
    print(json.dumps(asyncio.run(main_async(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
