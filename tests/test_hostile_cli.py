"""Misuse of the `compensa` command line: each is one line on stderr and exit
code 2, never a traceback, a log line of gRPC's C core, or a silent success."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.harness import checkout_stack
from tests.test_cli import (
    CHECKOUT_INPUT,
    COMMAND_TIMEOUT_SECONDS,
    COMPENSA,
    _compensa,
    _compensa_async,
    _Completed,
    _Deployment,
    checkout_deployment,
)


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[_Deployment]:
    """The checkout participants and an orchestrator, on SQLite files in tmp_path."""
    async with checkout_deployment(tmp_path) as running:
        yield running


def _closed_address() -> str:
    """An address nothing listens on: a command that gets as far as calling it fails differently."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def _deep(path: Path, opening: str, closing: str) -> Path:
    path.write_text(opening + "[" * 100_000 + "]" * 100_000 + closing)
    return path


def _huge(path: Path) -> Path:
    with path.open("w") as file:
        file.write("name: huge\ndescription: ")
        file.write("x" * (50 * 1024 * 1024))
    return path


def _binary(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 64)
    return path


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


#: Each misuse, as the arguments it passes (files made in the test's directory).
MISUSES: dict[str, Callable[[Path], list[str | bytes]]] = {
    "start --version out of int32": lambda d: ["start", "checkout", "--input", "{}", "--version", "99999999999"],
    "list --page-size out of int32": lambda d: ["list", "--page-size", "99999999999"],
    "definitions --version out of int32": lambda d: ["definitions", "checkout", "--version", "99999999999"],
    "watch --after 2^70": lambda d: ["watch", "x", "--after", str(2**70)],
    "watch --after not a number": lambda d: ["watch", "x", "--after", "ten"],
    "list --stuck negative": lambda d: ["list", "--stuck=-5m"],
    "list --stuck beyond a Duration": lambda d: ["list", "--stuck", "400000000000s"],
    "watch without ID or --all": lambda d: ["watch"],
    "watch with ID and --all": lambda d: ["watch", "x", "--all"],
    "definitions --version without NAME": lambda d: ["definitions", "--version", "2"],
    "--timeout negative": lambda d: ["get", "x", "--timeout", "-1"],
    "--timeout nan": lambda d: ["get", "x", "--timeout", "nan"],
    "serve --listen not an address": lambda d: ["serve", "--listen", "not-an-address"],
    "serve --listen port 99999": lambda d: ["serve", "--listen", "127.0.0.1:99999"],
    "participant --listen not an address": lambda d: [
        "participant", "inventory", "--listen", "nope", "--db", "sqlite+aiosqlite:///unused.db"
    ],
    "register deep YAML": lambda d: ["register", str(_deep(d / "deep.yaml", "a: ", ""))],
    "register deep JSON": lambda d: ["register", str(_deep(d / "deep.json", '{"name": ', "}"))],
    "serve --definitions deep YAML": lambda d: [
        "serve", "--listen", "127.0.0.1:0", "--definitions", str(_deep(d / "deep.yaml", "a: ", ""))
    ],
    "register empty directory": lambda d: ["register", str(_empty(d / "empty"))],
    "register 50 MB file": lambda d: ["register", str(_huge(d / "huge.yaml"))],
    "--tls-ca binary": lambda d: ["--tls-ca", str(_binary(d / "ca.pem")), "get", "x"],
    "argument not UTF-8": lambda d: ["get", b"\xff\xfe"],
}


@pytest.mark.parametrize("misuse", MISUSES)
def test_misuse_is_one_line_and_exit_2(misuse: str, tmp_path: Path) -> None:
    address = _closed_address()
    result = _compensa(*MISUSES[misuse](tmp_path), "--address", address, cwd=tmp_path)  # type: ignore[arg-type]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1 and len(result.stderr) < 400, result.stderr
    assert result.stdout == ""


@pytest.mark.postgres
async def test_misuse_answered_by_the_orchestrator_is_one_line_and_exit_2(
    make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        address = ("--address", stack.orchestrator.address)
        saga_id = await stack.start()
        for args in (
            ("cancel", saga_id, "--actor", "a" * 300),
            ("cancel", saga_id, "--reason", "a\x01" * 3000),
            ("start", "checkout", "--saga-id", "x\n", "--input", '{"order_id": "o"}'),
            ("get", "x" * 100_000),
        ):
            result = await _compensa_async(*args, *address, cwd=tmp_path)
            assert result.returncode == 2, (args[0], result.stdout, result.stderr)
            assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
            assert len(result.stderr) < 1200, result.stderr
        listed = await _compensa_async("list", *address, cwd=tmp_path)
        assert listed.returncode == 0 and "x\n" not in listed.stdout.split()


# --- a newcomer's mistakes: each is one line that says what to do ---------------------


def _one_line(result: subprocess.CompletedProcess[str] | _Completed) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_a_typo_in_a_global_option_is_named_with_the_option_meant(tmp_path: Path) -> None:
    error = _one_line(_compensa("--adress", _closed_address(), "list", cwd=tmp_path))
    assert "unknown option '--adress'; did you mean --address?" in error, error


def test_watch_without_arguments_says_what_to_give(tmp_path: Path) -> None:
    error = _one_line(_compensa("watch", "--address", _closed_address(), cwd=tmp_path))
    assert "watch needs a saga ID (compensa watch ID), or --all" in error, error


def test_a_proto_import_not_found_points_at_proto_path(tmp_path: Path) -> None:
    (tmp_path / "trip.proto").write_text(
        'syntax = "proto3";\npackage travel.v1;\nimport "common/money.proto";\nmessage TripInput { string a = 1; }\n'
    )
    (tmp_path / "trip.yaml").write_text(
        "name: trip\ninput_type: travel.v1.TripInput\nsteps:\n  - {name: book, participant: 127.0.0.1:1}\n"
    )
    error = _one_line(_compensa("register", "trip.yaml", "--proto", "trip.proto", cwd=tmp_path))
    assert "common/money.proto" in error and "--proto-path DIR" in error, error


def _listening_socket() -> socket.socket:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def test_serve_http_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        error = _one_line(_compensa(
            "serve", "--listen", "127.0.0.1:0", "--http", f"127.0.0.1:{port}", "--db",
            f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", cwd=tmp_path,
        ))
    assert error == f"error: address in use: 127.0.0.1:{port} (--http; another process listens there)\n"


def test_a_failed_start_shows_only_why_not_the_open_api_warning(postgres_url: str, tmp_path: Path) -> None:
    nobody = postgres_url.replace("postgres@", "nobody-here@", 1)
    assert nobody != postgres_url, postgres_url
    result = _compensa("serve", "--listen", "127.0.0.1:0", "--db", nobody, cwd=tmp_path)
    error = _one_line(result)
    assert 'role "nobody-here" does not exist' in error, error


def test_a_database_url_without_a_driver_gets_the_async_one(tmp_path: Path) -> None:
    result = _compensa("migrate", "--db", f"sqlite:///{tmp_path / 'plain.db'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("schema upgraded from an empty database"), result.stdout
    assert (tmp_path / "plain.db").exists()


def test_serve_without_db_says_where_it_keeps_sagas(tmp_path: Path) -> None:
    serve = subprocess.Popen(
        [str(COMPENSA), "serve", "--listen", "127.0.0.1:0"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        seen: list[str] = []
        assert serve.stderr is not None
        for line in serve.stderr:  # ends when the process does; the server logs "serving on" when up
            seen.append(line)
            if "serving on" in line:
                break
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    said = [line for line in seen if "embedded SQLite database" in line]
    assert said and ".compensa/compensa.db" in said[0] and "--db" in said[0], seen


def test_the_sdk_serve_on_a_taken_port_ends_with_one_line(tmp_path: Path) -> None:
    script = tmp_path / "participant.py"
    script.write_text(textwrap.dedent("""\
        import asyncio, sys
        from compensa.examples.inventory import InventoryParticipant
        from compensa.participants import create_participant_engine, serve

        engine = create_participant_engine(f"sqlite:///{sys.argv[2]}")
        asyncio.run(serve(InventoryParticipant(engine), listen=sys.argv[1]))
        """))
    with _listening_socket() as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, str(script), address, str(tmp_path / "inventory.db")],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS,
        )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr == f"error: address in use: {address} (another process listens there)\n"


def _into_a_closed_pipe(*args: str) -> tuple[int, str]:
    """Runs compensa with its output going to a pipe nobody reads any more (`| head` after its lines)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [str(COMPENSA), *args], stdout=write_end, stderr=subprocess.PIPE, text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
        )
    finally:
        os.close(write_end)
    return result.returncode, result.stderr


async def test_a_reader_that_goes_away_ends_list_get_and_watch_quietly(deployment: _Deployment) -> None:
    address = ("--address", deployment.address)
    started = await _compensa_async(*address, "start", "checkout", "--input", json.dumps(CHECKOUT_INPUT),
                                    "--saga-id", "piped", "--wait")
    assert started.returncode == 0, started.stderr
    for args in (("list",), ("get", "piped"), ("get", "piped", "--json"), ("watch", "piped")):
        code, stderr = await asyncio.to_thread(_into_a_closed_pipe, *address, *args)
        assert (code, stderr) == (141, ""), args


async def test_start_of_a_version_that_does_not_exist_names_those_that_do(deployment: _Deployment) -> None:
    address = ("--address", deployment.address)
    error = _one_line(await _compensa_async(*address, "start", "checkout", "--version", "99", "--input", "{}"))
    assert error == "error: NOT_FOUND: definition 'checkout' has no version 99; its versions: 1 (latest 1)\n"


async def test_an_unknown_input_field_is_named_with_the_right_one(deployment: _Deployment) -> None:
    address = ("--address", deployment.address)
    typo = json.dumps({**CHECKOUT_INPUT, "card_tokn": "x"})
    error = _one_line(await _compensa_async(*address, "start", "checkout", "--input", typo))
    assert "has no field 'card_tokn'; did you mean 'card_token'?" in error, error
    assert "shipping_address" in error  # the fields it has, as the .proto names them


async def test_start_reads_its_input_from_a_file_or_stdin(deployment: _Deployment, tmp_path: Path) -> None:
    address = ("--address", deployment.address)
    missing = _one_line(
        await _compensa_async(*address, "start", "checkout", "--input", "@nowhere.json", cwd=tmp_path)
    )
    assert "--input @nowhere.json: cannot read nowhere.json" in missing, missing

    (tmp_path / "order.json").write_text(json.dumps({**CHECKOUT_INPUT, "order_id": "from-a-file"}))
    from_file = await _compensa_async(*address, "start", "checkout", "--input", "@order.json", "--saga-id", "f",
                                      "--json", cwd=tmp_path)
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["input"]["order_id"] == "from-a-file"
    from_stdin = await asyncio.to_thread(
        subprocess.run, [str(COMPENSA), *address, "start", "checkout", "--input", "@-", "--saga-id", "s", "--json"],
        input=json.dumps({**CHECKOUT_INPUT, "order_id": "from-stdin"}), capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert json.loads(from_stdin.stdout)["input"]["order_id"] == "from-stdin"
