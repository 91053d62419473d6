"""The README's tutorial, run as written: its files are written to an empty
directory and its commands run one by one (those ending in `&` in the
background), with real processes throughout.

The only change made to the text: the fixed ports are swapped for free ones,
so that the test cannot collide with anything else on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "## Tutorial: your own saga, from nothing", "## Definition files"
BLOCK = re.compile(r"<!-- tutorial:(file (?P<name>\S+)|run) -->\n```\w*\n(?P<body>.*?)```", re.S)
PORTS = ("50051", "50071", "50072")
COMMAND_TIMEOUT_SECONDS = 60


def _tutorial() -> list[tuple[str | None, str]]:
    """(file name or None for commands, block text), in README order."""
    text = README.read_text()
    section = text[text.index(START):text.index(END)]
    blocks = [(match["name"], match["body"]) for match in BLOCK.finditer(section)]
    assert blocks, "no tutorial blocks found in the README"
    return blocks


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _wait_until_serving(port: str, *, grpc_health: bool, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + COMMAND_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"background process exited with {process.returncode}"
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING or not grpc_health:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)  # ok-sleep: polling a server's health with a deadline
    raise AssertionError(f"nothing serving on port {port} within {COMMAND_TIMEOUT_SECONDS}s")


@pytest.fixture
def background() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_the_readme_tutorial_runs_as_written(tmp_path: Path, background: list[subprocess.Popen[bytes]]) -> None:
    ports = {port: _free_port() for port in PORTS}
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COMPENSA_ADDRESS"] = f"127.0.0.1:{ports['50051']}"
    env.pop("COMPENSA_DATABASE_URL", None)
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}

    for name, body in _tutorial():
        if name is not None:
            (tmp_path / name).write_text(body)
            continue
        for line in body.splitlines():
            for fixed, free in ports.items():
                line = line.replace(fixed, free)
            words = shlex.split(line)
            if words[-1] == "&":
                process = subprocess.Popen(words[:-1], cwd=tmp_path, env=env)
                background.append(process)
                port = next(free for free in ports.values() if free in line)
                _wait_until_serving(port, grpc_health=words[0] == "compensa", process=process)
                continue
            result = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True,
                                    timeout=COMMAND_TIMEOUT_SECONDS)
            outputs[line] = result
            assert "Traceback" not in result.stderr, (line, result.stderr)

    def ran(prefix: str) -> subprocess.CompletedProcess[str]:
        (result,) = [result for line, result in outputs.items() if line.startswith(prefix)]
        return result

    for prefix in ("python -m grpc_tools.protoc", "compensa participants set", "compensa register"):
        for line, result in outputs.items():
            if line.startswith(prefix):
                assert result.returncode == 0, (line, result.stdout, result.stderr)
    assert "trip version 1: registered" in ran("compensa register").stdout

    booked = ran("compensa start trip --saga-id trip-1")
    assert booked.returncode == 0 and "SUCCEEDED" in booked.stdout, booked.stdout + booked.stderr
    compensated = ran("compensa start trip --saga-id trip-2")
    assert compensated.returncode == 1 and "COMPENSATED" in compensated.stdout, compensated.stdout
    watched = ran("compensa watch trip-2")
    assert watched.returncode == 0 and "COMPENSATED" in watched.stdout, watched.stdout + watched.stderr
    shown = json.loads(ran("compensa get trip-2 --json").stdout)
    assert shown["state"] == "SAGA_STATE_COMPENSATED"
    assert shown["input"]["destination"] == "Atlantis"

    # Each participant's own effects: the compensated trip's hotel is cancelled,
    # its flight was never booked.
    def bookings(database: str) -> set[tuple[str, str]]:
        with sqlite3.connect(tmp_path / database) as connection:
            return set(connection.execute("SELECT saga_id, status FROM bookings"))

    assert bookings("hotels.db") == {("trip-1", "booked"), ("trip-2", "cancelled")}
    assert bookings("flights.db") == {("trip-1", "booked")}
