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
