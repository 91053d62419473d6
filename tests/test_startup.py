"""Starting `compensa serve` and `compensa participant` as real processes: a port
that is taken and a database that cannot be used stop the start with one line and
exit 2; a database that is only not up yet is waited for."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import COMPENSA, ProcessSet, free_port
from sqlalchemy.engine import make_url

# A start that hangs (the bug) must fail the test, and quickly.
EXIT_TIMEOUT_SECONDS = 15.0
# serve registers ./definitions, whose participants must have addresses; none is called.
PARTICIPANTS = {name: "127.0.0.1:9" for name in ("inventory", "fraud", "payment", "shipping")}
PARTICIPANT_OPTIONS = [
    option for name, address in PARTICIPANTS.items() for option in ("--participant", f"{name}={address}")
]


def _compensa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COMPENSA), *args], capture_output=True, text=True, timeout=EXIT_TIMEOUT_SECONDS,
        stdin=subprocess.DEVNULL,
    )


def _refused_in_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, and stderr ends with one `error:` line naming every needle; no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for needle in needles:
        assert needle in last, result.stderr
    # Nothing else was said at ERROR level or above (the one line is the story).
    others = [line for line in result.stderr.splitlines()[:-1] if " ERROR " in line or line.startswith("E")]
    assert not others, result.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other process listens on, the plain way (no SO_REUSEPORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _sqlite(tmp_path: Path, name: str) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / name}.db"


# --- ports ---------------------------------------------------------------------------


async def test_a_second_orchestrator_on_a_taken_port_exits_with_address_in_use(tmp_path: Path) -> None:
    with ProcessSet(tmp_path) as processes:
        first = processes.orchestrator(_sqlite(tmp_path, "first"), PARTICIPANTS, definitions=())
        await first.start_serving()
        # gRPC sets SO_REUSEPORT by default: the second used to serve too, and
        # the kernel split new connections between them.
        second = _compensa(
            "serve", "--listen", first.address, "--db", _sqlite(tmp_path, "second"), *PARTICIPANT_OPTIONS
        )
        _refused_in_one_line(second, "address in use", first.address)
        assert first.running()


async def test_a_second_participant_on_a_taken_port_exits_with_address_in_use(tmp_path: Path) -> None:
    with ProcessSet(tmp_path) as processes:
        first = processes.participant("payment", _sqlite(tmp_path, "payment"))
        await first.start_serving()
        second = _compensa("participant", "payment", "--listen", first.address, "--db", _sqlite(tmp_path, "other"))
        _refused_in_one_line(second, "address in use", first.address)
        assert first.running()


def test_a_taken_metrics_port_exits_with_address_in_use(tmp_path: Path, taken_port: int) -> None:
    result = _compensa(
        "serve", "--listen", f"127.0.0.1:{free_port()}", "--db", _sqlite(tmp_path, "compensa"),
        "--metrics-listen", f"127.0.0.1:{taken_port}", *PARTICIPANT_OPTIONS,
    )
    _refused_in_one_line(result, "address in use", f"127.0.0.1:{taken_port}")


# --- databases that cannot be used -----------------------------------------------------


def _with_database(admin_url: str, **parts: str) -> str:
    return make_url(admin_url).set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["serve", "participant"])
def test_a_database_that_does_not_exist_exits_2_in_one_line(admin_postgres_url: str, command: str) -> None:
    url = _with_database(admin_postgres_url, database="compensa_no_such_database")
    result = _compensa(*_command(command, url))
    _refused_in_one_line(result, 'database "compensa_no_such_database" does not exist')


@pytest.mark.parametrize("command", ["serve", "participant"])
def test_a_database_user_that_cannot_log_in_exits_2_in_one_line(admin_postgres_url: str, command: str) -> None:
    url = _with_database(admin_postgres_url, username="compensa_no_such_role")
    result = _compensa(*_command(command, url))
    _refused_in_one_line(result, "compensa_no_such_role")


@pytest.mark.parametrize("command", ["serve", "participant"])
def test_a_sqlite_file_in_a_missing_directory_exits_2_in_one_line(tmp_path: Path, command: str) -> None:
    result = _compensa(*_command(command, f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'compensa.db'}"))
    _refused_in_one_line(result, f"{tmp_path / 'missing'}", "does not exist")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("command", ["serve", "participant"])
@pytest.mark.parametrize("url", ["not a url", "mysql://compensa@localhost/compensa"])
def test_a_database_url_that_is_not_one_exits_2_in_one_line(command: str, url: str) -> None:
    result = _compensa(*_command(command, url))
    _refused_in_one_line(result, "--db")


def _command(command: str, url: str) -> list[str]:
    listen = f"127.0.0.1:{free_port()}"
    if command == "serve":
        return ["serve", "--listen", listen, "--db", url, *PARTICIPANT_OPTIONS]
    return ["participant", "payment", "--listen", listen, "--db", url]


# --- a database that is not up yet -----------------------------------------------------


@pytest.mark.parametrize("kind", ["serve", "participant"])
def test_a_database_that_refuses_connections_is_waited_for_with_one_line_warnings(
    tmp_path: Path, kind: str
) -> None:
    # Nothing listens on this port: PostgreSQL is still starting, say.
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/compensa"
    log_path = tmp_path / "process.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(COMPENSA), *_command(kind, url)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + EXIT_TIMEOUT_SECONDS
        while len(_warnings(log_path)) < 2:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)  # ok-sleep: polling the log file, bounded by the deadline
        assert process.poll() is None, log_path.read_text()
    finally:
        process.terminate()
        process.wait(timeout=10)
    text = log_path.read_text()
    assert "Traceback" not in text, text
    # Each retry is one line: no continuation lines (libpq's hints are indented).
    assert not [line for line in text.splitlines() if line[:1].isspace()], text


def _warnings(log_path: Path) -> list[str]:
    return [line for line in log_path.read_text().splitlines() if "not reachable" in line]
