"""One duration grammar: the command line and definition files read the same
strings as the same lengths, and refuse the same strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from compensa.orchestrator.cli import build_parser
from compensa.orchestrator.definitions import load_definition_file
from compensa.orchestrator.shared.errors import CompensaError, DefinitionError
from tests.test_definitions import edited, write

#: Text -> its length in nanoseconds.
SAME_ON_BOTH_SIDES = {
    "250ms": 250_000_000,
    "1.5s": 1_500_000_000,
    "0.500s": 500_000_000,
    "90s": 90_000_000_000,
    "10m": 600_000_000_000,
    "1h30m": 5_400_000_000_000,
    "2d": 172_800_000_000_000,
    "1d12h": 129_600_000_000_000,
    "1m0.5s": 60_500_000_000,
    "1.5ms": 1_500_000,
    " 10M ": 600_000_000_000,
}
#: Text no side accepts as a duration.
REFUSED_ON_BOTH_SIDES = (
    "ten minutes",
    "10",
    "1.5",
    "1h 30m",
    "h",
    "1w",
    "1.s",
    ".5s",
    "1e3s",
    "0.0000000001s",  # finer than a nanosecond
    "400000000000s",  # beyond google.protobuf.Duration's range
    "9" * 60 + "d",
    "",
)


def _from_command_line(text: str) -> int:
    args = build_parser().parse_args(["list", "--stuck", text])
    return int(args.stuck.ToNanoseconds())


def _from_definition_file(tmp_path: Path, text: str) -> int:
    # step_timeout takes up to a year; it must be at least execute_timeout.
    path = write(tmp_path, edited(steps={0: {"execute_timeout": "1ms", "step_timeout": text}}))
    return int(load_definition_file(path).steps[0].step_timeout.ToNanoseconds())


@pytest.mark.parametrize("text", SAME_ON_BOTH_SIDES)
def test_the_same_text_is_the_same_length_on_the_command_line_and_in_a_definition_file(
    text: str, tmp_path: Path
) -> None:
    assert _from_command_line(text) == SAME_ON_BOTH_SIDES[text]
    assert _from_definition_file(tmp_path, text) == SAME_ON_BOTH_SIDES[text]


@pytest.mark.parametrize("text", REFUSED_ON_BOTH_SIDES)
def test_text_that_is_no_duration_is_refused_on_both_sides_with_the_same_words(text: str, tmp_path: Path) -> None:
    with pytest.raises(CompensaError) as on_command_line:
        _from_command_line(text)
    with pytest.raises(DefinitionError) as in_file:
        _from_definition_file(tmp_path, text)
    assert in_file.value.field == "step_timeout"
    command_line_problem = str(on_command_line.value).removeprefix("compensa list: argument --stuck: ")
    command_line_problem = command_line_problem.removesuffix(" (see compensa list --help)")
    assert str(in_file.value).endswith(f"field 'step_timeout': {command_line_problem}")
    assert "invalid duration" in command_line_problem


def test_a_negative_duration_reads_as_negative_in_a_file_and_is_refused_on_the_command_line(tmp_path: Path) -> None:
    # A file's checks name the field that must be positive; the command line has no use for one.
    path = write(tmp_path, edited(steps={0: {"retry": {"max_attempts": 3, "initial_backoff": "-1h30m"}}}))
    with pytest.raises(DefinitionError, match=r"must be from 0 to .*, got -5400s"):
        load_definition_file(path)
    with pytest.raises(CompensaError, match="negative"):
        build_parser().parse_args(["list", "--stuck=-1h30m"])
