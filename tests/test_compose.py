"""docker-compose.yml agrees with the real `compensa` CLI and with itself.

No Docker engine runs here, so the file is checked, not started.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from compensa.examples import DEFINITIONS_DIR

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# The console script installed next to this interpreter, as in the image.
COMPENSA = Path(sys.executable).parent / "compensa"
ORCHESTRATOR = "orchestrator"
POSTGRES = "postgres"


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def _command(service: str) -> list[str]:
    command = _services()[service]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _compensa_services() -> list[str]:
    return sorted(name for name, spec in _services().items() if "build" in spec or name == ORCHESTRATOR)


def _participant_services() -> list[str]:
    return [name for name in _compensa_services() if _command(name)[1:2] == ["participant"]]


def _option_values(command: list[str], flag: str) -> list[str]:
    values = []
    for index, token in enumerate(command):
        if token == flag:
            values.append(command[index + 1])
        elif token.startswith(flag + "="):
            values.append(token.partition("=")[2])
    return values


@cache
def _help(leading_words: tuple[str, ...]) -> str:
    """`compensa <subcommand> [positionals] --help`: positionals included, so argparse checks them."""
    if not COMPENSA.exists():
        pytest.fail(f"no compensa script at {COMPENSA}; install the project (make test does)")
    result = subprocess.run([str(COMPENSA), *leading_words, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, (
        f"`compensa {' '.join(leading_words)} --help` exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
    return result.stdout


def test_compose_has_the_expected_services() -> None:
    assert {POSTGRES, ORCHESTRATOR, "inventory", "payment", "shipping"} <= _services().keys()
    assert _services()[POSTGRES]["image"].startswith("postgres:16")
    assert "healthcheck" in _services()[POSTGRES]


@pytest.mark.parametrize("service", _compensa_services())
def test_command_is_a_real_cli_invocation(service: str) -> None:
    command = _command(service)
    assert command[0] == "compensa", f"{service}: command must start with `compensa`: {command}"
    first_flag = next((i for i, token in enumerate(command) if token.startswith("-")), len(command))
    help_text = _help(tuple(command[1:first_flag]))
    for flag in sorted({token.partition("=")[0] for token in command if token.startswith("--")}):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
            f"{service}: `compensa {command[1]} --help` does not list {flag}:\n{help_text}"
        )


def test_orchestrator_reaches_every_participant_where_it_listens() -> None:
    routes = dict(value.split("=", 1) for value in _option_values(_command(ORCHESTRATOR), "--participant"))
    listening = {}
    for service in _participant_services():
        command = _command(service)
        kind = command[2]
        (listen,) = _option_values(command, "--listen")
        listening[kind] = f"{service}:{listen.rpartition(':')[2]}"
    assert listening, "no participant services"
    assert routes == listening


def test_orchestrator_starts_after_postgres_is_healthy_and_the_participants() -> None:
    depends_on = _services()[ORCHESTRATOR]["depends_on"]
    assert isinstance(depends_on, dict), "depends_on must be a mapping to state conditions"
    assert depends_on[POSTGRES]["condition"] == "service_healthy"
    for service in _participant_services():
        assert service in depends_on, f"orchestrator does not depend on {service}"
    for service in _participant_services():
        assert _services()[service]["depends_on"][POSTGRES]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", _compensa_services())
def test_database_urls_name_the_compose_postgres(service: str) -> None:
    environment = _services()[POSTGRES]["environment"]
    user, password, database = (
        environment["POSTGRES_USER"], environment["POSTGRES_PASSWORD"], environment["POSTGRES_DB"]
    )
    (db_url,) = _option_values(_command(service), "--db")
    assert db_url == f"postgresql+psycopg://{user}:{password}@{POSTGRES}:5432/{database}"


def test_definitions_directory_is_in_the_image() -> None:
    (definitions,) = _option_values(_command(ORCHESTRATOR), "--definitions")
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^WORKDIR /app$", dockerfile, re.MULTILINE)
    assert re.search(r"^COPY participants/compensa/examples/definitions/ definitions/$", dockerfile, re.MULTILINE)
    assert definitions == "/app/definitions"


def test_every_participant_the_shipped_definitions_name_is_served_and_routed() -> None:
    """serve refuses definitions naming a participant with no address, so the
    shipped definitions and the compose file must agree on who exists."""
    import compensa.checkout.v1.checkout_pb2  # noqa: F401  (the definitions' input type)
    from compensa.orchestrator.definitions import load_definitions

    named = {step.participant for definition in load_definitions([DEFINITIONS_DIR]) for step in definition.steps}
    routes = dict(value.split("=", 1) for value in _option_values(_command(ORCHESTRATOR), "--participant"))
    assert named == set(routes), f"named in definitions/: {sorted(named)}; routed by compose: {sorted(routes)}"
    served = {_command(service)[2] for service in _participant_services()}
    assert named == served
