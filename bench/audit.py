"""The audit's cost: how long `compensa audit` takes over N finished sagas
across the three checkout participants, and the engine's throughput while it
runs against the same with no audit.

    .venv/bin/python bench/audit.py [--sagas 100000] [--template-sagas 1000] [--load-sagas 500]
                                    [--concurrency 64] [--flat-out] [--load-window SECONDS]

Needs a local PostgreSQL on 127.0.0.1:5432 with trust auth for user
`postgres`; creates databases `compensa_bench_audit_<role>_<random>` and drops
them at the end. Each part is a process of its own, as in a deployment: the
orchestrator (`compensa serve`, which runs the audit when asked: AuditSagas,
paced, in its event loop beside the engine), the three example participants
(`compensa participant KIND`), and bench/load_client.py, whose sagas measure
the engine's throughput; this process only prepares, asks and times.

How the N sagas are made. `--template-sagas` run for real through the engine
and the participants (a tenth of them compensated: their card is declined).
The rest are copies of those, written in batches straight into the tables
the audit reads, each copy a saga of its own id: its saga and step rows in
the orchestrator's database (not its events: the audit does not read them),
and its barrier rows in each participant's (same answers, keyed by the new
id). The audit then reads all N through the real paths: the store's queries
in creation order, and ListBarrierRows of each participant over gRPC, and
must report 0 discrepancies.

What runs, in order: rounds of `--load-sagas` alone; with `--flat-out`, an
audit from this process with nothing else running and no rests (its own
cost, reporting only); the audit the orchestrator runs (AuditSagas with no
options, as `compensa audit`: resuming, and asked again if the database
stalls past its timeout and ends a run) with rounds of load for as long as it
runs (or `--load-window` seconds); rounds alone again. Not part of `make test`; prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import grpc
import psycopg
import sqlalchemy as sa
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.ext.asyncio import create_async_engine

from compensa.checkout.v1 import checkout_pb2
from compensa.examples import DEFINITIONS_DIR
from compensa.examples.server import build_participant
from compensa.orchestrator.engine.auditor import AuditOptions, run_audit
from compensa.orchestrator.shared.errors import StoreUnavailable
from compensa.orchestrator.store import open_store
from compensa.orchestrator.store.schema import saga_steps, sagas
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
BENCH_DIR = Path(__file__).resolve().parent
COMPENSA = str(Path(sys.executable).parent / "compensa")
_DONE = (saga_pb2.SAGA_STATE_SUCCEEDED, saga_pb2.SAGA_STATE_COMPENSATED, saga_pb2.SAGA_STATE_FAILED)
_KINDS = ("inventory", "payment", "shipping")


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


def _input(declined: bool) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(checkout_pb2.CheckoutInput(
        order_id=f"o-{uuid.uuid4().hex[:10]}", sku=f"sku-{uuid.uuid4().hex[:6]}", quantity=1, amount_cents=500,
        card_token="flagged-bench" if declined else "tok_visa", shipping_address="1 Saga Street",
    ))
    return packed


async def _run_templates(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, count: int, concurrency: int
) -> list[str]:
    """Runs `count` sagas (every tenth declined, so compensated) to their end; their ids."""
    tag = uuid.uuid4().hex[:6]
    ids = [f"bench-{tag}-{index}" for index in range(count)]
    queue = iter(enumerate(ids))

    async def worker() -> None:
        for index, saga_id in queue:
            await stub.StartSaga(orchestrator_pb2.StartSagaRequest(
                saga_id=saga_id, definition_name="checkout", input=_input(declined=index % 10 == 9)
            ))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    while True:
        summary = await stub.SummarizeSagas(orchestrator_pb2.SummarizeSagasRequest())
        if all(row.state in _DONE for row in summary.states):
            return ids
        await asyncio.sleep(0.2)  # polling interval


def _copy_statement(table: sa.Table, renamed: dict[str, str], key: str) -> sa.TextClause:
    """INSERT of copies of `table`'s rows whose `key` is one of :templates,
    one per k in :first..:last, each column in `renamed` replaced by its SQL
    expression (over the row `t` and the copy's number `k`)."""
    columns = [column.name for column in table.columns]
    values = [renamed.get(name, f"t.{name}") for name in columns]
    return sa.text(
        f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {', '.join(values)}"
        f" FROM {table.name} t CROSS JOIN generate_series(CAST(:first AS int), CAST(:last AS int)) AS k"
        f" WHERE t.{key} = ANY(:templates)"
    )


async def _copy_sagas(
    urls: dict[str, str], templates: Sequence[str], total: int, batch_sagas: int
) -> int:
    """Copies of the template sagas (ids `<template>-c<k>`) until there are
    `total` in all: saga and step rows, and every participant's barrier rows;
    `batch_sagas` sagas per transaction. The copies made."""
    copies_each = max(0, -(-(total - len(templates)) // len(templates)))
    per_batch = max(1, batch_sagas // len(templates))
    new_id = "t.saga_id || '-c' || k"
    engines = {role: create_async_engine(url) for role, url in urls.items()}
    statements = {
        "orchestrator": [
            _copy_statement(sagas, {"saga_id": new_id}, "saga_id"),
            _copy_statement(saga_steps, {"saga_id": new_id}, "saga_id"),
        ],
        **{
            kind: [
                _copy_statement(
                    build_participant(kind, engines[kind]).barrier,
                    {
                        "saga_id": new_id,
                        "idempotency_key": f"{new_id} || substr(t.idempotency_key, length(t.saga_id) + 1)",
                    },
                    "saga_id",
                )
            ]
            for kind in _KINDS
        },
    }
    try:
        for first in range(1, copies_each + 1, per_batch):
            parameters = {"first": first, "last": min(copies_each, first + per_batch - 1), "templates": list(templates)}
            for role, role_statements in statements.items():
                async with engines[role].begin() as conn:
                    for statement in role_statements:
                        await conn.execute(statement, parameters)
        for engine in engines.values():
            async with engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(sa.text("ANALYZE"))
    finally:
        for engine in engines.values():
            await engine.dispose()
    return copies_each * len(templates)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _serving(address: str, process: asyncio.subprocess.Process, name: str) -> None:
    """Waits until `address` answers SERVING (grpc.health.v1)."""
    deadline = time.monotonic() + 120
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"{name} exited ({process.returncode})")
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not SERVING after 120 s")
            await asyncio.sleep(0.2)  # polling interval


@contextlib.asynccontextmanager
async def _processes(urls: dict[str, str], database_timeout: float, scratch: Path) -> AsyncIterator[str]:
    """The three participants and the orchestrator, each a process; the orchestrator's address."""
    started: list[asyncio.subprocess.Process] = []
    logs: list[IO[str]] = []
    timeout = f"{database_timeout:g}s"
    try:
        addresses: dict[str, str] = {}
        for kind in _KINDS:
            addresses[kind] = f"127.0.0.1:{_free_port()}"
            process = await asyncio.create_subprocess_exec(
                COMPENSA, "participant", kind, "--listen", addresses[kind], "--db", urls[kind],
                "--database-timeout", timeout, stderr=_log(scratch / f"{kind}.log", logs),
            )
            started.append(process)
            await _serving(addresses[kind], process, kind)
        definitions = scratch / "definitions"
        definitions.mkdir()
        shutil.copy(DEFINITIONS_DIR / "checkout.yaml", definitions / "checkout.yaml")
        address = f"127.0.0.1:{_free_port()}"
        process = await asyncio.create_subprocess_exec(
            COMPENSA, "serve", "--listen", address, "--db", urls["orchestrator"], "--definitions", str(definitions),
            "--database-timeout", timeout, *(f"--participant={kind}={at}" for kind, at in addresses.items()),
            stderr=_log(scratch / "orchestrator.log", logs),
        )
        started.append(process)
        await _serving(address, process, "the orchestrator")
        yield address
    finally:
        for process in reversed(started):
            if process.returncode is None:
                process.terminate()
                await process.wait()
        for log in logs:
            log.close()


def _log(path: Path, logs: list[IO[str]]) -> IO[str]:
    """A process's log file, closed with the others once they stop."""
    log = path.open("w")
    logs.append(log)
    return log


class _LoadClient:
    """bench/load_client.py in a process of its own: runs checkout sagas, each
    to its end, `concurrency` at a time (the run protocol of bench/common.py)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, address: str) -> AsyncIterator[_LoadClient]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(BENCH_DIR / "load_client.py"), "--address", address, "--definition", "checkout",
            "--distinct-orders",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        client = cls(process)
        ready = await client._line()
        if ready != "ready":
            raise RuntimeError(f"the load client said {ready!r}")
        try:
            yield client
        finally:
            assert process.stdin is not None
            process.stdin.close()
            await process.wait()

    async def _line(self) -> str:
        assert self._process.stdout is not None
        line = await self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the load client exited ({await self._process.wait()})")
        return line.decode().strip()

    async def run(self, sagas: int, concurrency: int) -> dict[str, Any]:
        """One round: its sagas, failures and seconds, as the client measured them."""
        assert self._process.stdin is not None
        command = {"cmd": "run", "sagas": sagas, "concurrency": concurrency, "tag": "load"}
        self._process.stdin.write((json.dumps(command) + "\n").encode())
        await self._process.stdin.drain()
        outcome: dict[str, Any] = json.loads(await self._line())
        return outcome


def _throughput(rounds: Sequence[dict[str, Any]]) -> float:
    return round(sum(r["sagas"] - r["failed"] for r in rounds) / sum(r["seconds"] for r in rounds), 1)


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    scratch = Path(tempfile.mkdtemp(prefix="compensa-bench-audit-"))
    try:
        measured = await _measure(args, scratch)
    except BaseException:
        print(f"the processes' logs are kept in {scratch}", file=sys.stderr)
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    return measured


async def _measure(args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    with _databases(["orchestrator", *_KINDS]) as urls:
        async with _processes(urls, args.database_timeout, scratch) as address:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                began = time.monotonic()
                templates = await _run_templates(stub, min(args.template_sagas, args.sagas), args.concurrency)
                template_seconds = time.monotonic() - began
                began = time.monotonic()
                copies = await _copy_sagas(urls, templates, args.sagas, args.copy_batch)
                copy_seconds = time.monotonic() - began
                async with _LoadClient.started(address) as load:
                    alone = [await load.run(args.load_sagas, args.concurrency) for _ in range(args.alone_rounds)]
                    flat_out_seconds = await _flat_out(urls["orchestrator"]) if args.flat_out else None
                    if not args.paced:
                        return {
                            "sagas": args.sagas, "template_sagas": len(templates), "copied_sagas": copies,
                            "copy_seconds": round(copy_seconds, 1),
                            "flat_out_audit_seconds_alone": flat_out_seconds,
                            "engine_sagas_per_second_alone": _throughput(alone),
                        }
                    began = time.monotonic()
                    audit = asyncio.ensure_future(_resumed_audit(stub))
                    # The rounds that ran wholly while the audit did (within
                    # the load window); the one it ended in is counted only
                    # when there is no other.
                    during: list[dict[str, Any]] = []
                    last: dict[str, Any] | None = None
                    while not audit.done() and time.monotonic() - began < args.load_window:
                        outcome = await load.run(args.load_sagas, args.concurrency)
                        if audit.done():
                            last = outcome
                        else:
                            during.append(outcome)
                    partial = not during and last is not None
                    if partial and last is not None:
                        during.append(last)
                    loaded_seconds = time.monotonic() - began
                    reports, interrupted = await audit
                    audit_seconds = time.monotonic() - began
                    after = [await load.run(args.load_sagas, args.concurrency) for _ in range(args.alone_rounds)]
    audited = [p for report in reports for p in report.participants]
    discrepancies = sum(len(p.discrepancies) for p in audited) + sum(len(r.saga_discrepancies) for r in reports)
    sagas_audited = {name: sum(p.sagas for p in audited if p.participant == name) for name in _KINDS}
    alone_rate = _throughput(alone + after)
    during_rate = _throughput(during) if during else None
    return {
        "sagas_audited": sagas_audited,
        "rows_read": {name: sum(p.rows for p in audited if p.participant == name) for name in _KINDS},
        "not_audited": sorted({p.participant for p in audited if not p.audited}),
        "discrepancies": discrepancies,
        "audit_runs_ended_by_the_database": interrupted,
        "template_sagas": len(templates),
        "template_seconds": round(template_seconds, 1),
        "copied_sagas": copies,
        "copy_seconds": round(copy_seconds, 1),
        "flat_out_audit_seconds_alone": round(flat_out_seconds, 1) if flat_out_seconds is not None else None,
        "audit_seconds": round(audit_seconds, 1),
        "audit_seconds_under_load": round(min(loaded_seconds, audit_seconds), 1),
        "audit_sagas_per_second": round(max(sagas_audited.values(), default=0) / audit_seconds, 1),
        "load_rounds": {"alone": len(alone) + len(after), "during_audit": len(during), "partly_after": partial},
        "load_failed_sagas": sum(r["failed"] for r in alone + during + after),
        "engine_sagas_per_second_alone": alone_rate,
        "engine_sagas_per_second_alone_rounds": [round(r["sagas"] / r["seconds"], 1) for r in alone + after],
        "engine_sagas_per_second_during_audit": during_rate,
        "engine_sagas_per_second_during_rounds": [round(r["sagas"] / r["seconds"], 1) for r in during],
        "engine_slowdown_percent": (
            round(100 * (alone_rate - during_rate) / alone_rate, 1) if during_rate is not None else None
        ),
        "median_round_slowdown_percent": (
            round(100 * (1 - statistics.median(r["sagas"] / r["seconds"] for r in during)
                         / statistics.median(r["sagas"] / r["seconds"] for r in alone + after)), 1)
            if during else None
        ),
    }


async def _resumed_audit(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub,
) -> tuple[list[orchestrator_pb2.AuditSagasResponse], int]:
    """What `compensa audit` does with no options (AuditSagas: resume where the
    last run stopped), asked again whenever a run ends UNAVAILABLE (the shared
    database stalled past the timeout): the next run resumes where it stopped,
    as it would after a replica's death. Every run's report, and how many were
    ended so."""
    reports: list[orchestrator_pb2.AuditSagasResponse] = []
    interrupted = 0
    while True:
        try:
            reports.append(await stub.AuditSagas(orchestrator_pb2.AuditSagasRequest(), timeout=4 * 3600))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or interrupted >= 5:
                raise
            interrupted += 1
            print(f"audit run ended: {error.details()}; resuming", file=sys.stderr)
            continue
        return reports, interrupted


async def _flat_out(orchestrator_url: str) -> float:
    """Seconds of an audit of every saga from this process (the orchestrator's
    code, over its database and the participants' RPCs) with no rests."""
    store = open_store(orchestrator_url, timeout=60.0)
    try:
        for attempt in range(3):
            began = time.monotonic()
            try:
                report = await run_audit(store, AuditOptions(since=0.0, busy_fraction=1.0, max_sagas_per_second=1e9))
            except StoreUnavailable as error:  # the shared database stalled: again, from the start
                if attempt == 2:
                    raise
                print(f"flat-out audit ended: {error}; again", file=sys.stderr)
                continue
            seconds = time.monotonic() - began
            break
    finally:
        await store.close()
    assert not report.findings and all(p.audited for p in report.participants), report
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sagas", type=int, default=100_000, help="finished sagas to audit (default 100000)")
    parser.add_argument(
        "--template-sagas", type=int, default=1000,
        help="of those, run through the engine; the rest are copies of these (default 1000)",
    )
    parser.add_argument("--copy-batch", type=int, default=5000, help="copied sagas per transaction (default 5000)")
    parser.add_argument(
        "--load-sagas", type=int, default=500,
        help="sagas per round of load, run alone before and after the audit and in rounds while it runs (default 500)",
    )
    parser.add_argument("--alone-rounds", type=int, default=2, help="rounds alone, before and again after (default 2)")
    parser.add_argument("--concurrency", type=int, default=64, help="sagas at once (default 64)")
    parser.add_argument(
        "--load-window", type=float, default=float("inf"),
        help="seconds of load while the audit runs (default: all of it); the audit then finishes alone",
    )
    parser.add_argument(
        "--flat-out", action="store_true",
        help="first, time an audit with nothing else running and no rests (busy_fraction 1, no rate limit)",
    )
    parser.add_argument(
        "--no-paced", dest="paced", action="store_false",
        help="with --flat-out: stop after it (no audit by the orchestrator, no load during one)",
    )
    parser.add_argument(
        "--database-timeout", type=float, default=3.0,
        help="every process's longest wait on PostgreSQL, in seconds (default 3, serve's): on a shared machine"
             " whose database stalls for seconds, a longer one keeps the audit (one run, ended by a timeout) alive",
    )
    print(json.dumps(asyncio.run(main_async(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
