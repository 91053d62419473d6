"""Group commits of many lightly loaded replicas (issue 27): how many flushes
PostgreSQL takes a second when N writers commit side by side, each flushing
small batches as a replica with little to do does.

    .venv/bin/python bench/group_commits.py [--writers 1,4,16,64] [--seconds 10] [--batch 4]
                                            [--processes P] [--database-timeout S] [--quick]

Store level: no gRPC, no participants. It creates a fresh database, lets the
store create its schema as `compensa serve` does (ensure_schema), registers
bench/run.py's three-step `bench` definition, and then, for each N, runs N
writers for --seconds. Each writer is a replica's group commit: a
PostgresSagaStore of its own (its own flush connection), whose `commit` it
calls with a batch of --batch transitions, awaits, and calls again, flat out:
one flush in flight per writer, as a replica's writer task has, so N writers
are N flushes at once and the figures are the ceiling of N such replicas.
Every write goes through the store's public API only, so the same script
measures the flush before and after a change to it.

What a batch holds: the transitions the engine decides (machine.new_saga,
machine.decide) for sagas of the `bench` definition, as the engine's
_write_for guards them (this writer owns them, epoch 1). A `bench` saga is
four transitions: created (with its first step started), then three step
successes (each starting the next step, the last one ending the saga), two
events each. So one transition in four creates a saga and the other three
advance sagas this writer holds: with --batch 4, every flush is one new saga
and three step successes of three others, the steady mix of a replica running
that definition. Every write must land (a guard that fails is a bug of this
bench: it stops). A flush the store gives up on (StoreUnavailable: it waited
past --database-timeout, 3 s as `compensa serve`'s default, for the log's
lock, say) is counted as failed, as a replica's writer would fail it; its
sagas are dropped, their outcome unknown, and the writer goes on. Each writer starts with a few sagas of its own and a
warm-up, unmeasured; its sagas are its own, so writers contend on nothing but
what the flush itself shares between them.

Writers run in --processes processes (default: as many as CPUs, at most N),
each an asyncio loop over its writers, so that the client is less likely to be
the limit; the table shows the bench's own CPU, its busiest process, the CPU
of the database's backends and the machine's busy CPU, in cores, to tell
which one was.

The store's change notices (a NOTIFY on a connection of each replica's own,
after its commits) are silenced: two connections for each of 64 writers do
not fit PostgreSQL's default max_connections of 100, and the notices are not
part of the group commit measured. The PostgreSQL settings that matter are
printed first: compare before/after runs only at the same settings.

Needs a local PostgreSQL on 127.0.0.1:5432 with trust auth for user
`postgres`; creates `compensa_bench_group_commits_<random>` and drops it at
the end. Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from multiprocessing.context import SpawnProcess
from typing import Any

import psycopg
from common import STEP_NAMES, cpu_seconds, host_busy_seconds, percentile, saga_input
from run import _STEP, BENCH_DEFINITION, PG_ADMIN_DSN, PG_HOST, BenchFailed, Lab, machine_description, warn_if_busy

from compensa.common.database import DEFAULT_DATABASE_TIMEOUT
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.definitions import definition_fingerprint, load_definition_file
from compensa.orchestrator.engine import machine
from compensa.orchestrator.shared.errors import StoreUnavailable
from compensa.orchestrator.shared.records import STEP_RUNNING, SagaRecord
from compensa.orchestrator.store import PostgresSagaStore, SagaWrite
from compensa.v1 import definition_pb2

#: Transitions of one `bench` saga: created, then one per step succeeding.
TRANSITIONS_PER_SAGA = 1 + len(STEP_NAMES)
#: Unmeasured flushes of each writer before the run (PostgreSQL settles on a
#: generic plan for the prepared flush after five).
WARMUP_FLUSHES = 10
LEASE_SECONDS = ServerConfig.lease_seconds
#: Settings that bear on how fast commits go, printed before the runs.
SETTINGS = (
    "server_version", "max_connections", "shared_buffers", "synchronous_commit", "fsync", "wal_sync_method",
    "wal_level", "wal_buffers", "wal_writer_delay", "wal_writer_flush_after", "commit_delay", "commit_siblings",
    "full_page_writes", "wal_compression", "max_wal_size", "checkpoint_timeout", "default_transaction_isolation",
)
#: Connections left for everything else while the writers run (this process's, other users').
SPARE_CONNECTIONS = 5


class Replica:
    """One writer: a store of its own, as a replica has, and the sagas it holds."""

    def __init__(self, url: str, plan: machine.Plan, name: str, batch: int, timeout: float) -> None:
        self.store = PostgresSagaStore(url, notifier=name, timeout=timeout)
        _silence_change_notices(self.store)
        self.plan = plan
        self.name = name
        self.batch = batch
        self.input = saga_input(name).SerializeToString(deterministic=True)
        #: Sagas it holds that have a step left to succeed, oldest first.
        self.held: collections.deque[SagaRecord] = collections.deque()
        self.decided = 0
        self.created = 0

    def next_batch(self) -> list[SagaWrite]:
        """The next flush: one transition in TRANSITIONS_PER_SAGA creates a
        saga, the others advance held sagas (each saga at most once)."""
        now = time.time()
        writes: list[SagaWrite] = []
        for _ in range(self.batch):
            if self.decided % TRANSITIONS_PER_SAGA == 0 or not self.held:
                writes.append(self._create(now))
            else:
                writes.append(self._advance(self.held.popleft(), now))
            self.decided += 1
        return writes

    def first_sagas(self) -> list[SagaWrite]:
        """A flush of new sagas only: something to advance from the first batch on."""
        now = time.time()
        return [self._create(now) for _ in range(TRANSITIONS_PER_SAGA)]

    def _create(self, now: float) -> SagaWrite:
        self.created += 1
        saga_id = f"{self.name}-{self.created}"
        transition = machine.new_saga(self.plan, saga_id=saga_id, input=self.input, now=now)
        return self._write(transition, expected=0, now=now, fingerprint=saga_id)

    def _advance(self, saga: SagaRecord, now: float) -> SagaWrite:
        running = next(step.name for step in saga.steps if step.state == STEP_RUNNING)
        transition = machine.decide(self.plan, saga, machine.ExecuteSucceeded(running, None), now)
        return self._write(transition, expected=saga.sequence, now=now)

    def _write(
        self, transition: machine.Transition, *, expected: int, now: float, fingerprint: str | None = None
    ) -> SagaWrite:
        # As the engine's _write_for: held while a call is due, released when final.
        saga = transition.saga
        if saga.is_final:
            release, due_at = True, None
        elif machine.due_calls(self.plan, saga, now):
            release, due_at = False, now
        else:
            release, due_at = True, machine.wake_at(self.plan, saga)
        return SagaWrite(
            saga=saga, events=transition.events, expected_sequence=expected, owner=self.name, epoch=1,
            release=release, due_at=due_at, lease_until=now + LEASE_SECONDS, changed_steps=transition.changed_steps,
            request_fingerprint=fingerprint,
        )

    async def flush(self, writes: list[SagaWrite]) -> None:
        """Commits `writes`; every one must land. StoreUnavailable when the
        store gave up: the writes' sagas are dropped (they may have landed)."""
        results = await self.store.commit(writes)
        missed = [write.saga.saga_id for write, result in zip(writes, results, strict=True) if not result.ok]
        if missed:
            raise BenchFailed(f"{self.name}: {len(missed)} of {len(writes)} writes did not land: {missed[:5]}")
        for write in writes:
            if not write.saga.is_final:
                self.held.append(write.saga)


def _silence_change_notices(store: PostgresSagaStore) -> None:
    """Sends none of the store's change notices (see the module's docstring);
    a store without that announcer is left as it is."""
    announcer = getattr(store, "_announcer", None)
    if announcer is not None:
        announcer.announce = lambda saga_ids: None


@dataclasses.dataclass
class WriterFigures:
    """What one worker process's writers did in the measured window."""

    commits: int = 0
    #: Flushes the store gave up on (StoreUnavailable), and the first one's error.
    failed: int = 0
    first_error: str = ""
    transitions: int = 0
    events: int = 0
    #: From the common start to this process's last flush ending.
    seconds: float = 0.0
    cpu_seconds: float = 0.0


async def _drive(replicas: list[Replica], start: float, deadline: float) -> tuple[WriterFigures, list[float]]:
    """Every replica flushes flat out from `start` (time.monotonic) until `deadline`."""
    figures = WriterFigures()
    latencies_ms: list[float] = []

    async def writer(replica: Replica) -> None:
        while time.monotonic() < deadline:
            writes = replica.next_batch()
            began = time.perf_counter()
            try:
                await replica.flush(writes)
            except StoreUnavailable as error:
                figures.failed += 1
                figures.first_error = figures.first_error or str(error)
                continue
            finally:
                latencies_ms.append((time.perf_counter() - began) * 1000)
            figures.commits += 1
            figures.transitions += len(writes)
            figures.events += sum(len(write.events) for write in writes)

    await asyncio.sleep(max(0.0, start - time.monotonic()))
    cpu_before = time.process_time()
    await asyncio.gather(*(writer(replica) for replica in replicas))
    figures.cpu_seconds = time.process_time() - cpu_before
    figures.seconds = time.monotonic() - start
    return figures, latencies_ms


async def _worker(
    url: str, definition: bytes, names: Sequence[str], batch: int, timeout: float, to_parent: Any, from_parent: Any
) -> None:
    stored = definition_pb2.SagaDefinition.FromString(definition)
    plan = machine.Plan.of(stored)
    replicas = [Replica(url, plan, name, batch, timeout) for name in names]
    try:
        # Its first sagas and a warm-up, unmeasured: a flush's plan is cached
        # and its connection open before the run. A flush the store gives up
        # on here is one more of the run's own (it would fail those too).
        for replica in replicas:
            with contextlib.suppress(StoreUnavailable):
                await replica.flush(replica.first_sagas())
            for _ in range(WARMUP_FLUSHES):
                with contextlib.suppress(StoreUnavailable):
                    await replica.flush(replica.next_batch())
        to_parent.put(("ready", os.getpid()))
        window: tuple[float, float] | None = await asyncio.to_thread(from_parent.get)
        if window is None:
            return
        figures, latencies_ms = await _drive(replicas, *window)
        to_parent.put(("done", dataclasses.asdict(figures), latencies_ms))
        # Connections stay open until the parent has read their backends' CPU.
        await asyncio.to_thread(from_parent.get)
    finally:
        for replica in replicas:
            await replica.store.close()


def worker_main(
    url: str, definition: bytes, names: Sequence[str], batch: int, timeout: float, to_parent: Any, from_parent: Any
) -> None:
    """A worker process: its writers, run when the parent says when."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the bench
    try:
        asyncio.run(_worker(url, definition, names, batch, timeout, to_parent, from_parent))
    except BaseException as error:
        to_parent.put(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


# -- the parent


@dataclasses.dataclass
class Level:
    """The figures of N writers."""

    writers: int
    processes: int
    commits: int
    failed: int
    first_error: str
    transitions: int
    events: int
    seconds: float
    #: Of every flush, failed ones included.
    latencies_ms: list[float]
    bench_cpu_seconds: float
    busiest_process_cpu_seconds: float
    database_cpu_seconds: float
    host_cpu_seconds: float

    def rate(self, count: int) -> float:
        return count / self.seconds if self.seconds else 0.0

    def cores(self, cpu_seconds: float) -> float:
        return cpu_seconds / self.seconds if self.seconds else float("nan")


def postgres_settings() -> list[tuple[str, str]]:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        return [(name, str(admin.execute(f"SHOW {name}").fetchone()[0])) for name in SETTINGS]  # type: ignore[index]


def database_url(database: str) -> str:
    return f"postgresql+psycopg://postgres@{PG_HOST}/{database}"


async def prepare(database: str, lab: Lab) -> bytes:
    """The schema, as `compensa serve` creates it, and the `bench`
    definition; the definition as stored, serialized."""
    definition_file = lab.dir / "bench.yaml"
    definition_file.write_text(BENCH_DEFINITION.format(steps="".join(_STEP.format(name=name) for name in STEP_NAMES)))
    definition = load_definition_file(definition_file)
    store = PostgresSagaStore(database_url(database))
    try:
        await store.ensure_schema()
        stored, _ = await store.register_definition(
            definition, definition_fingerprint(definition), time.time(), actor="bench/group_commits.py"
        )
    finally:
        await store.close()
    return stored.SerializeToString()


def backend_pids(database: str) -> list[int]:
    """The writers' backends (not autovacuum's, which come and go)."""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'", (database,)
        ).fetchall()
    return [int(row[0]) for row in rows]


def backends_cpu(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds so far of those of these PostgreSQL backends that /proc
    shows (none: a server elsewhere, or in a container of its own)."""
    found: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[pid] = cpu_seconds(pid)
    return found


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the backends of the second reading used since the first
    (those connected since, all of theirs: a store reconnects after a failed
    flush; those gone since are missed). NaN when /proc showed none."""
    return sum(after[pid] - before.get(pid, 0.0) for pid in after) if after else float("nan")


def check_connections(writers: int) -> None:
    """BenchFailed, before anything starts, if N writers' connections do not fit."""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        allowed = int(admin.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
        reserved = int(admin.execute("SHOW superuser_reserved_connections").fetchone()[0])  # type: ignore[index]
        used = int(admin.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
                   .fetchone()[0])  # type: ignore[index]
    free = allowed - reserved - used
    if writers + SPARE_CONNECTIONS > free:
        raise BenchFailed(
            f"{writers} writers need {writers} connections (+{SPARE_CONNECTIONS} spare), and PostgreSQL has {free}"
            f" free ({allowed} max_connections, {reserved} reserved, {used} in use)"
        )


def run_level(
    database: str, definition: bytes, writers: int, processes: int, batch: int, seconds: float, timeout: float,
    tag: str,
) -> Level:
    """N writers spread over `processes` processes, for `seconds`."""
    check_connections(writers)
    context = multiprocessing.get_context("spawn")
    to_parent = context.Queue()
    names = [f"{tag}-w{index}" for index in range(writers)]
    shares = [names[index::processes] for index in range(processes)]
    channels = [context.Queue() for _ in shares]
    workers: list[SpawnProcess] = [
        context.Process(
            target=worker_main, args=(database_url(database), definition, share, batch, timeout, to_parent, channel),
            name=f"group-commit-writers-{index}", daemon=True,
        )
        for index, (share, channel) in enumerate(zip(shares, channels, strict=True))
    ]
    try:
        for worker in workers:
            worker.start()
        setup_deadline = time.monotonic() + 120
        for _ in workers:
            _expect(to_parent, "ready", setup_deadline - time.monotonic(), workers)
        pids = backend_pids(database)
        database_before, host_before = backends_cpu(pids), host_busy_seconds()
        start = time.monotonic() + 0.1
        for channel in channels:
            channel.put((start, start + seconds))
        answers = [_expect(to_parent, "done", seconds + 60, workers) for _ in workers]
        database_after, host_after = backends_cpu(backend_pids(database)), host_busy_seconds()
    finally:
        for channel in channels:
            channel.put(None)
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join()
    latencies: list[float] = sorted(value for answer in answers for value in answer[2])
    figures = [WriterFigures(**answer[1]) for answer in answers]
    return Level(
        writers=writers, processes=processes, commits=sum(each.commits for each in figures),
        failed=sum(each.failed for each in figures),
        first_error=next((each.first_error for each in figures if each.failed), ""),
        transitions=sum(each.transitions for each in figures), events=sum(each.events for each in figures),
        seconds=max(each.seconds for each in figures), latencies_ms=latencies,
        bench_cpu_seconds=sum(each.cpu_seconds for each in figures),
        busiest_process_cpu_seconds=max(each.cpu_seconds for each in figures),
        database_cpu_seconds=cpu_between(database_before, database_after), host_cpu_seconds=host_after - host_before,
    )


def _expect(answers: Any, kind: str, timeout: float, workers: Sequence[SpawnProcess]) -> tuple[Any, ...]:
    """The next answer of a worker, which must be `kind`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer: tuple[Any, ...] = answers.get(timeout=0.5)
            break
        except queue.Empty:
            dead = [worker for worker in workers if worker.exitcode not in (None, 0)]
            if dead:
                raise BenchFailed(f"{dead[0].name} exited ({dead[0].exitcode}) before it said {kind!r}") from None
            if time.monotonic() > deadline:
                raise BenchFailed(f"no writer process said {kind!r} within {timeout:.0f}s") from None
    if answer[0] == "error":
        raise BenchFailed(f"a writer process failed: {answer[1]}")
    if answer[0] != kind:
        raise BenchFailed(f"a writer process said {answer[0]!r} instead of {kind!r}")
    return answer


HEADER = (
    f"{'writers':>7} {'procs':>5} {'commits/s':>10} {'failed':>6} {'transitions/s':>13} {'events/s':>9} {'p50 ms':>7}"
    f" {'p99 ms':>7} {'bench CPU':>9} {'busiest':>7} {'DB CPU':>7} {'machine':>7}"
)


def print_level(level: Level) -> None:
    latencies = level.latencies_ms
    print(
        f"{level.writers:>7} {level.processes:>5} {level.rate(level.commits):>10.0f} {level.failed:>6}"
        f" {level.rate(level.transitions):>13.0f} {level.rate(level.events):>9.0f}"
        f" {percentile(latencies, 0.5):>7.2f} {percentile(latencies, 0.99):>7.2f}"
        f" {level.cores(level.bench_cpu_seconds):>9.2f} {level.cores(level.busiest_process_cpu_seconds):>7.2f}"
        f" {level.cores(level.database_cpu_seconds):>7.2f} {level.cores(level.host_cpu_seconds):>7.2f}",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", default="1,4,16,64", help="N, comma-separated (default 1,4,16,64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per N (default 10)")
    parser.add_argument("--batch", type=int, default=4, help="transitions per flush (default 4)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="most processes the writers run in (default: the CPUs)")
    parser.add_argument("--database-timeout", type=float, default=DEFAULT_DATABASE_TIMEOUT, metavar="SECONDS",
                        help="the store's bound on one flush, as serve's --database-timeout"
                             f" (default {DEFAULT_DATABASE_TIMEOUT:g})")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 seconds per N")
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.writers.split(",") if level]
    if not args.levels or min(args.levels) < 1 or args.batch < 1 or args.processes < 1 or args.seconds <= 0:
        parser.error("--writers, --batch, --processes and --seconds must be positive")
    if args.quick:
        args.seconds = 2.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lab = Lab(keep_logs=False)
    failed = True
    try:
        print(f"bench: {machine_description()}", flush=True)
        print("bench: PostgreSQL " + ", ".join(f"{name}={value}" for name, value in postgres_settings()), flush=True)
        warn_if_busy("start")
        database = lab.create_database("group_commits")
        definition = asyncio.run(prepare(database, lab))
        print(
            f"bench: {args.seconds:g}s per N, {args.batch} transitions per flush (one in {TRANSITIONS_PER_SAGA}"
            f" creates a saga), writers in up to {args.processes} processes; CPU in cores (CPU seconds per second)",
            flush=True,
        )
        failures: list[str] = []
        print(HEADER)
        print("-" * len(HEADER), flush=True)
        for writers in args.levels:
            processes = min(writers, args.processes)
            level = run_level(
                database, definition, writers, processes, args.batch, args.seconds, args.database_timeout,
                f"n{writers}",
            )
            print_level(level)
            if level.failed:
                failures.append(f"N={writers}: {level.failed} flush(es) failed, the first with: {level.first_error}")
        print(
            "bench: failed: flushes the store gave up on (StoreUnavailable), in p50/p99 with the time they took;"
            " bench CPU: all writer processes'; busiest: the one that used most (near 1.00: the client was the"
            f" limit); DB CPU: the writers' PostgreSQL backends'; machine: every process's, of {os.cpu_count()} CPUs"
        )
        for failure in failures:
            print(f"bench: {failure}")
        warn_if_busy("end")
        failed = False
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        return 130
    except BenchFailed as error:
        print(f"bench: FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        lab.close(failed)


if __name__ == "__main__":
    sys.exit(main())
