"""Which version of a definition is the latest, and who made it so:
`register --dry-run` checks and shows the change without registering,
`definitions promote` makes an earlier version the latest again, and
`definitions history` lists both with who did them; registrations over the
API and participant address changes appear in the server's log."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from harness import CHECKOUT, checkout_stack

from compensa.v1 import orchestrator_pb2

COMPENSA = Path(sys.executable).parent / "compensa"


async def _compensa(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(COMPENSA), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_dry_run_promote_and_history(
    tmp_path: Path, make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="compensa")
    changed = tmp_path / "checkout.yaml"
    text = CHECKOUT.read_text()
    assert "description:" in text
    changed.write_text(text.replace("description:", "description: (slower card)", 1))
    async with checkout_stack(make_postgres_url) as stack:
        address = ("--address", stack.orchestrator.address)

        async def latest() -> int:
            answer = await stack.stub.GetDefinition(orchestrator_pb2.GetDefinitionRequest(name="checkout"))
            return answer.definition.version

        code, out, err = await _compensa(*address, "register", "--dry-run", "--actor", "alice", str(changed))
        assert code == 0, err
        assert out.startswith("checkout version 2: would be registered as the latest, after version 1 (dry run"), out
        assert '-  "description": "' in out and '+  "description": "(slower card)' in out, out
        assert await latest() == 1  # nothing written
        history = await stack.stub.GetDefinitionHistory(orchestrator_pb2.GetDefinitionHistoryRequest(name="checkout"))
        assert [change.version for change in history.changes] == [1]

        code, out, err = await _compensa(*address, "register", "--actor", "alice", str(changed))
        assert code == 0, err
        assert out.startswith("checkout version 2: registered, the latest now (was version 1)"), out
        assert await latest() == 2

        code, out, err = await _compensa(*address, "register", "--dry-run", str(changed))
        assert (code, out.strip()) == (0, "checkout version 2: unchanged, already registered (the latest)"), err

        code, out, err = await _compensa(*address, "definitions", "promote", "checkout", "--version", "1",
                                         "--actor", "bob")
        assert (code, out.strip()) == (0, "checkout version 1: is the latest now"), err
        assert await latest() == 1
        # A start without a version runs the promoted one.
        assert (await stack.get(await stack.start())).definition_version == 1

        code, out, err = await _compensa(*address, "definitions", "promote", "checkout", "--version", "7")
        assert code != 0 and "NOT_FOUND" in err and "no version 7" in err, (code, err)

        code, out, err = await _compensa(*address, "definitions", "history", "checkout")
        assert code == 0, err
        rows = [line.split() for line in out.splitlines()[1:]]
        assert [(row[2], row[3], row[4]) for row in rows] == [
            ("1", "registered", "serve"), ("2", "registered", rows[1][4]), ("1", "promoted", rows[2][4]),
        ], out
        assert "alice" in rows[1][4] and "bob" in rows[2][4], out

        await stack.stub.SetParticipant(orchestrator_pb2.SetParticipantRequest(
            name="payment", address=stack.participants["payment"].address, actor="carol"
        ))
    logged = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("definition checkout version 2 registered by ") and "alice" in line
               for line in logged), logged
    assert any(line.startswith("definition checkout version 1 made the latest by ") and "bob" in line
               for line in logged), logged
    assert any(line.startswith("participant payment set to 127.0.0.1:") and "carol" in line for line in logged), logged


async def test_promote_of_bad_input_is_refused(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.PromoteDefinition(orchestrator_pb2.PromoteDefinitionRequest(name="checkout"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stack.stub.PromoteDefinition(orchestrator_pb2.PromoteDefinitionRequest(name="nope", version=1))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as no_history:
            await stack.stub.GetDefinitionHistory(orchestrator_pb2.GetDefinitionHistoryRequest(name="nope"))
        assert no_history.value.code() == grpc.StatusCode.NOT_FOUND
