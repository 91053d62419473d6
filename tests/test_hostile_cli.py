"""Misuse of the `compensa` command line: each is one line on stderr and exit
code 2, never a traceback, a log line of gRPC's C core, or a silent success."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import checkout_stack
from tests.test_cli import _compensa, _compensa_async


def _closed_address() -> str:
    """An address nothing listens on: a command that gets as far as calling it fails differently."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def _files(tmp_path: Path) -> dict[str, Path]:
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("a: " + "[" * 100_000 + "]" * 100_000)
    deep_json = tmp_path / "deep.json"
    deep_json.write_text('{"name": ' + "[" * 100_000 + "]" * 100_000 + "}")
    empty = tmp_path / "empty"
    empty.mkdir()
    huge = tmp_path / "huge.yaml"
    with huge.open("w") as file:
        file.write("name: huge\ndescription: ")
        file.write("x" * (50 * 1024 * 1024))
    binary = tmp_path / "ca.pem"
    binary.write_bytes(bytes(range(256)) * 64)
    return {"deep_yaml": deep_yaml, "deep_json": deep_json, "empty": empty, "huge": huge, "binary": binary}


MISUSES: dict[str, Callable[[dict[str, Path], str], list[str | bytes]]] = {
    "start --version out of int32": lambda f, a: ["start", "checkout", "--input", "{}", "--version", "99999999999"],
    "list --page-size out of int32": lambda f, a: ["list", "--page-size", "99999999999"],
    "definitions --version out of int32": lambda f, a: ["definitions", "checkout", "--version", "99999999999"],
    "watch --after 2^70": lambda f, a: ["watch", "x", "--after", str(2**70)],
    "watch --after not a number": lambda f, a: ["watch", "x", "--after", "ten"],
    "--timeout negative": lambda f, a: ["get", "x", "--timeout", "-1"],
    "--timeout nan": lambda f, a: ["get", "x", "--timeout", "nan"],
    "serve --listen not an address": lambda f, a: ["serve", "--listen", "not-an-address"],
    "serve --listen port 99999": lambda f, a: ["serve", "--listen", "127.0.0.1:99999"],
    "participant --listen not an address": lambda f, a: [
        "participant", "inventory", "--listen", "nope", "--db", "sqlite+aiosqlite:///unused.db"
    ],
    "register deep YAML": lambda f, a: ["register", str(f["deep_yaml"])],
    "register deep JSON": lambda f, a: ["register", str(f["deep_json"])],
    "serve --definitions deep YAML": lambda f, a: ["serve", "--listen", "127.0.0.1:0", "--definitions", str(f["deep_yaml"])],
    "register empty directory": lambda f, a: ["register", str(f["empty"])],
    "register 50 MB file": lambda f, a: ["register", str(f["huge"])],
    "--tls-ca binary": lambda f, a: ["--tls-ca", str(f["binary"]), "get", "x"],
    "argument not UTF-8": lambda f, a: ["get", b"\xff\xfe"],
}


@pytest.mark.parametrize("misuse", MISUSES)
def test_misuse_is_one_line_and_exit_2(misuse: str, tmp_path: Path) -> None:
    files = _files(tmp_path) if misuse.startswith(("register", "serve --definitions", "--tls")) else {}
    address = _closed_address()
    result = _compensa(*MISUSES[misuse](files, address), "--address", address, cwd=tmp_path)  # type: ignore[arg-type]
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
