"""What the bench's processes share: /proc readings, the run protocol, the
saga payload and the result of one measured run.

Every workload process (the orchestrator's load client, the null driver, the
naive loop) speaks the same line protocol on stdin/stdout, so that the parent
can read the measured process's CPU counters right before and right after
each run, with nothing else happening in between:

    parent -> child   {"cmd": "run", "sagas": 5000, "concurrency": 64, "tag": "r1"}
    child  -> parent  {"ok": true, "sagas": 5000, "failed": 0, "seconds": ..., "latencies_ms": [...]}

The child prints "ready" once it can take commands; EOF on stdin ends it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2

from compensa.checkout.v1 import checkout_pb2

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Names of the three steps of the bench saga, in order.
STEP_NAMES = ("first", "second", "third")
#: The long-running step of the waiting-saga definition.
WAITING_STEP = "hold"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    # The command name (field 2) may contain spaces; fields after ")" are fixed.
    fields = text.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def host_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all CPUs, every process, the
    kernel), from /proc/stat: everything but idle and iowait."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    # guest time is already counted in user time.
    return (sum(fields[:8]) - idle - iowait) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of process `pid`, in KiB, from /proc/<pid>/status."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def saga_input(order_id: str = "") -> any_pb2.Any:
    """The input every bench saga carries: a small, realistic checkout order
    (with `order_id`, of its own SKU too)."""
    order = checkout_pb2.CheckoutInput(
        order_id=order_id or "order-1", sku=f"sku-{order_id}" if order_id else "sku-1", quantity=1,
        amount_cents=1999, card_token="tok_visa", shipping_address="1 Bench Street",
    )
    packed = any_pb2.Any()
    packed.Pack(order)
    return packed


@dataclass
class RunOutcome:
    """What one measured run of a workload produced, as seen by its client."""

    sagas: int
    failed: int
    seconds: float
    latencies_ms: list[float]
    first_error: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "ok": True, "sagas": self.sagas, "failed": self.failed, "seconds": self.seconds,
                "latencies_ms": [round(value, 3) for value in self.latencies_ms], "first_error": self.first_error,
            }
        )


RunHandler = Callable[[dict[str, Any]], Awaitable[str]]


async def run_workers(
    total: int,
    concurrency: int,
    one: Callable[[int], Awaitable[float | None]],
    failures: tuple[type[BaseException], ...],
) -> tuple[list[float], list[str], float]:
    """Runs `one(index)` for indexes 0..total-1, `concurrency` at a time: the
    latencies it returned (None adds none), the failures of the `failures`
    kinds as text, and the seconds the whole run took."""
    import asyncio

    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < total:
            index, next_index = next_index, next_index + 1
            try:
                latency = await one(index)
            except failures as error:
                errors.append(f"{type(error).__name__}: {error}")
                continue
            if latency is not None:
                latencies.append(latency)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    return latencies, errors, time.perf_counter() - began


async def timed_run(
    command: dict[str, Any], saga: Callable[[str], Awaitable[object]], failures: tuple[type[BaseException], ...]
) -> str:
    """A "run" command: command["sagas"] sagas through `saga(saga_id)`,
    command["concurrency"] at a time, each timed from call to return; the
    RunOutcome as JSON."""
    total, concurrency = int(command["sagas"]), int(command["concurrency"])
    prefix = f"{command.get('tag', 'run')}-{uuid.uuid4().hex[:8]}"

    async def one(index: int) -> float:
        started = time.perf_counter()
        await saga(f"{prefix}-{index}")
        return (time.perf_counter() - started) * 1000

    latencies, errors, seconds = await run_workers(total, concurrency, one, failures)
    return RunOutcome(total, len(errors), seconds, latencies, errors[0] if errors else "").to_json()


async def serve_commands(handle: RunHandler) -> None:
    """Answers the parent's commands (one JSON object a line) until stdin closes."""
    import asyncio

    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        command: dict[str, Any] = json.loads(line)
        try:
            answer = await handle(command)
        except Exception as error:  # reported to the parent, which fails the bench
            answer = json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"})
        print(answer, flush=True)
