"""The README's tutorial, run as a person pastes it: its files written to an
empty directory, its command blocks run by one plain shell as a script, one
line after the other, with no waiting of its own between them (the commands
themselves must cope with a server started on the line before). Real
processes throughout.

The only changes made to the text: the fixed ports are swapped for free ones
(and COMPENSA_ADDRESS points at the orchestrator's), so that the test cannot
collide with anything else on the machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "## Tutorial: your own saga, from nothing", "## Definition files"
BLOCK = re.compile(r"<!-- tutorial:(file (?P<name>\S+)|run) -->\n```\w*\n(?P<body>.*?)```", re.S)
PORTS = ("50051", "50071", "50072")
SCRIPT_TIMEOUT_SECONDS = 300


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


def test_the_readme_tutorial_runs_as_pasted_into_a_shell(tmp_path: Path) -> None:
    ports = {port: _free_port() for port in PORTS}
    script = []
    for name, body in _tutorial():
        if name is not None:
            (tmp_path / name).write_text(body)
        else:
            for fixed, free in ports.items():
                body = body.replace(fixed, free)
            script.append(body)
    (tmp_path / "tutorial.sh").write_text("\n".join(script))
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPENSA_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COMPENSA_ADDRESS"] = f"127.0.0.1:{ports['50051']}"
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        # Its own process group: the servers the script leaves in the background are stopped with it.
        shell = subprocess.Popen(
            ["bash", "tutorial.sh"], cwd=tmp_path, env=env, stdout=stdout, stderr=stderr,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            shell.wait(timeout=SCRIPT_TIMEOUT_SECONDS)
        finally:
            os.killpg(shell.pid, signal.SIGTERM)
    output, errors = stdout_path.read_text(), stderr_path.read_text()
    everything = output + errors

    assert shell.returncode == 0, everything  # the last line, compensa get, succeeded
    assert not re.search(r"^error:|Traceback|command not found", everything, re.M), everything
    assert "trip version 1: registered" in output, everything
    assert re.search(r"saga trip-1 started.*SUCCEEDED", output, re.S), output
    assert re.search(r"saga trip-2 started.*COMPENSATED", output, re.S), output

    # The last command's output: compensa get trip-2 --json.
    shown = json.loads(output[output.rindex("\n{\n") + 1:])
    assert shown["state"] == "SAGA_STATE_COMPENSATED"
    assert shown["input"]["destination"] == "Atlantis"
    # A well-known type as protobuf's JSON mapping prints it, not as base64 of its bytes.
    (hotel,) = [step for step in shown["steps"] if step["name"] == "book_hotel"]
    assert hotel["output"]["@type"] == "type.googleapis.com/google.protobuf.StringValue"
    assert hotel["output"]["value"].startswith("book_hotel-"), hotel

    # Each participant's own effects: the compensated trip's hotel is cancelled,
    # its flight was never booked.
    def bookings(database: str) -> set[tuple[str, str]]:
        with sqlite3.connect(tmp_path / database) as connection:
            return set(connection.execute("SELECT saga_id, status FROM bookings"))

    assert bookings("hotels.db") == {("trip-1", "booked"), ("trip-2", "cancelled")}
    assert bookings("flights.db") == {("trip-1", "booked")}


def test_the_postgres_sections_definitions_path_works_from_any_directory(tmp_path: Path) -> None:
    text = README.read_text()
    match = re.search(r"<!-- postgres:run -->\n```sh\n(?P<body>.*?)```", text, re.S)
    assert match, "no <!-- postgres:run --> block in the README"
    lines = match["body"].splitlines()
    (examples,) = [line for line in lines if line.startswith("EXAMPLES=")]
    assert "--definitions $EXAMPLES/checkout.yaml" in match["body"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    found = subprocess.run(
        ["bash", "-c", f'{examples}\ngrep "^name:" "$EXAMPLES/checkout.yaml"'], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "name: checkout"
