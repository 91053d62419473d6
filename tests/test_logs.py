"""`--log-format json`: one JSON object per line, with the saga's fields
where the line is about a saga (bound per task, or given with extra=)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from compensa.orchestrator.cli import build_parser, main
from compensa.orchestrator.shared import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("compensa.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_each_task_logs_the_fields_of_its_own_saga(captured: io.StringIO) -> None:
    logger = logging.getLogger("compensa.test-logs")
    both_bound = asyncio.Barrier(2)

    async def drive(saga_id: str, step: str) -> None:
        logs.bind(saga_id=saga_id, trace_id=f"trace-of-{saga_id}")
        logs.bind(step=step, attempt=2)
        await both_bound.wait()  # both bound before either logs: no leak between tasks
        logger.info("calling %s", step)

    await asyncio.gather(drive("s1", "reserve"), drive("s2", "charge"))
    logger.warning("not about a saga")
    lines = _lines(captured)
    about = {line["saga_id"]: line for line in lines if "saga_id" in line}
    assert about["s1"] | {"time": None} == {
        "time": None, "level": "INFO", "logger": "compensa.test-logs", "message": "calling reserve",
        "saga_id": "s1", "step": "reserve", "attempt": 2, "trace_id": "trace-of-s1",
    }
    assert about["s2"]["step"] == "charge" and about["s2"]["trace_id"] == "trace-of-s2"
    assert str(about["s1"]["time"]).endswith("+00:00")
    assert lines[-1]["message"] == "not about a saga" and "saga_id" not in lines[-1]


def test_extra_fields_and_exceptions_are_written(captured: io.StringIO) -> None:
    logger = logging.getLogger("compensa.test-logs")
    try:
        raise ValueError("bad \"quoted\"\nline")
    except ValueError:
        logger.exception("failed", extra={"saga_id": "s9", "step": "ship", "attempt": 3, "trace_id": None})
    (line,) = _lines(captured)
    assert (line["saga_id"], line["step"], line["attempt"]) == ("s9", "ship", 3)
    assert "trace_id" not in line
    assert "ValueError: bad \"quoted\"" in str(line["exception"])


@pytest.mark.parametrize("command", [["serve"], ["participant", "payment", "--listen", "x:1", "--db", "u"], ["demo"]])
def test_the_server_commands_take_log_format(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args([*command, "--log-format", "json"]).log_format == "json"
    assert build_parser().parse_args(command).log_format == "text"
    assert main([*command, "--log-format", "xml"]) == 2
    assert "argument --log-format: invalid choice: 'xml'" in capsys.readouterr().err
