"""What a participant's limits cost when they are never reached (issue 24).

Interleaved A/B at each concurrency: the same `compensa serve` set-up as
`make bench`'s orchestrator row (PostgreSQL, the no-op participant, the
3-step bench definition), once with no limits on the participant and once
with limits far above what the run reaches (10,000 calls in flight, 100,000
calls/s, burst 100,000: the largest accepted), so that every call goes through the gate and its
exchanges with the shared budget in PostgreSQL but none waits. Each pair
runs in a fresh database, A and B in alternating order; the figure is the
median over the pairs of B's throughput over A's.

    .venv/bin/python bench/flow_limits.py [--concurrency 64,256] [--pairs 3] [--sagas 5000]

Target (issue 24): limits never reached cost at most 3% of throughput.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import urllib.request
from collections.abc import Sequence

from common import percentile
from run import COMPENSA, Bench, BenchFailed, Lab, Measurement, Workload, free_port, measure, parse_args

HIGH_LIMITS = ["--max-in-flight", "10000", "--rate", "100000/s", "--burst", "100000"]


def run_once(bench: Bench, definitions: object, concurrency: int, sagas: int, limited: bool, tag: str) -> float:
    """One measured run (after a warm-up) of `compensa serve`; its sagas/s."""
    lab = bench.lab
    database = lab.create_database(f"flow_{tag}")
    metrics = f"127.0.0.1:{free_port()}"
    serve, address = bench.start_orchestrator(  # type: ignore[arg-type]
        database, definitions, f"serve-{tag}", options=["--metrics-listen", metrics],
    )
    client = bench.load_client(address, "bench", f"client-{tag}")
    try:
        if limited:
            subprocess.run(
                [COMPENSA, "participants", "limit", "noop", *HIGH_LIMITS, "--address", address],
                check=True, capture_output=True, text=True,
            )
        runs: list[Measurement] = measure(
            "limits never reached" if limited else "no limits", Workload(client, serve.pid, database),
            sagas, concurrency, 1,
        )
        if runs[0].failed:
            raise BenchFailed(f"{tag}: {runs[0].failed} sagas failed: {runs[0].first_error}")
        run = runs[0]
        throttled = _throttled_seconds(metrics)
        print(
            f"    p50 {percentile(run.latencies_ms, 0.5):.2f} ms; calls waited for capacity"
            f" {throttled:.2f} s in all ({1000 * throttled / (3 * sagas):.3f} ms per call)", flush=True,
        )
        return run.per_second
    finally:
        lab.stop(client)
        lab.stop(serve)
        lab.drop_database(database)


def _throttled_seconds(metrics: str) -> float:
    """compensa_participant_throttled_seconds of the no-op participant (0 when it has no gate)."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("compensa_participant_throttled_seconds_total")
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="64,256", help="levels, comma-separated (default 64,256)")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs per level (default 3)")
    parser.add_argument("--sagas", type=int, default=5000, help="sagas per measured run (default 5000)")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lab = Lab(keep_logs=args.keep_logs)
    failed = True
    try:
        bench = Bench(lab, parse_args(["--sagas", str(args.sagas)]))
        definitions, _ = bench.write_definitions()
        bench.start_participant()
        results: dict[int, list[float]] = {}
        for concurrency in (int(level) for level in args.concurrency.split(",")):
            ratios = results.setdefault(concurrency, [])
            for pair in range(args.pairs):
                figures: dict[bool, float] = {}
                # A then B in even pairs, B then A in odd ones.
                for limited in (False, True) if pair % 2 == 0 else (True, False):
                    tag = f"c{concurrency}-p{pair}-{'limited' if limited else 'free'}"
                    figures[limited] = run_once(bench, definitions, concurrency, args.sagas, limited, tag)
                ratios.append(figures[True] / figures[False])
                print(
                    f"  c={concurrency} pair {pair + 1}: no limits {figures[False]:.0f}/s,"
                    f" limits never reached {figures[True]:.0f}/s ({ratios[-1]:.3f}x)", flush=True,
                )
        print("\nlimits never reached, throughput against no limits (median of the pairs; target >= 0.97x):")
        for concurrency, ratios in results.items():
            median = statistics.median(ratios)
            verdict = "ok" if median >= 0.97 else "MISSED"
            print(f"  c={concurrency}: {median:.3f}x  (pairs: {', '.join(f'{r:.3f}' for r in ratios)})  {verdict}")
        failed = False
        return 0
    except BenchFailed as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 1
    finally:
        lab.close(failed)


if __name__ == "__main__":
    sys.exit(main())
