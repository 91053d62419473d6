"""Database URLs: every form a user of SQLAlchemy or libpq writes for several
hosts reaches the live host when another is down (the orchestrator's store,
the participant SDK and `compensa migrate` alike), and a URL no command can
read, or a database that fails, is one line and exit 2 from every command."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from compensa.common.startup import DatabaseMisconfigured
from compensa.orchestrator.store import open_store
from compensa.participants.serving import create_participant_engine
from tests.test_cli import _compensa


def _closed_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _several_hosts(url: str, form: str, *, live_first: bool, options: tuple[str, ...] = ()) -> str:
    """`url` (one live host) written in `form` with a second host that is
    down, and more query `options` (NAME=VALUE)."""
    live = make_url(url)
    host, port, database = live.host, live.port or 5432, live.database
    dead_port = _closed_port()

    def ordered(pair: list[str]) -> list[str]:
        return pair if live_first else pair[::-1]

    address, query = "", list(options)
    if form == "libpq host list":
        address = ",".join(ordered([f"{host}:{port}", f"127.0.0.1:{dead_port}"]))
    elif form == "SQLAlchemy ?host=HOST:PORT":
        query += ordered([f"host={host}:{port}", f"host=127.0.0.1:{dead_port}"])
    elif form == "bare ?host=NAME with one port":
        # A name that never resolves is a host that is down.
        query += [*ordered([f"host={host}", "host=db-b.invalid"]), f"port={port}"]
    else:
        assert form == "libpq ?host=H1,H2&port=P1,P2"
        (first_host, first_port), (second_host, second_port) = [
            (str(host), str(port)), ("127.0.0.1", str(dead_port))
        ][:: 1 if live_first else -1]
        query += [f"host={first_host},{second_host}", f"port={first_port},{second_port}"]
    return f"postgresql+psycopg://postgres@{address}/{database}" + (f"?{'&'.join(query)}" if query else "")


FORMS = (
    "libpq host list", "SQLAlchemy ?host=HOST:PORT", "bare ?host=NAME with one port", "libpq ?host=H1,H2&port=P1,P2"
)


@pytest.mark.parametrize("live_first", [True, False], ids=["live first", "down first"])
@pytest.mark.parametrize("form", FORMS)
async def test_every_multi_host_form_reaches_the_live_host(
    form: str, live_first: bool, make_postgres_url: Callable[[], str]
) -> None:
    url = _several_hosts(make_postgres_url(), form, live_first=live_first, options=("target_session_attrs=read-write",))
    store = open_store(url, timeout=5.0)
    try:
        await store.ensure_schema()
        await store.ping()
    finally:
        await store.close()
    engine = create_participant_engine(url, database_timeout=5.0)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


def test_migrate_and_purge_reach_the_live_host_of_a_libpq_host_list(make_postgres_url: Callable[[], str]) -> None:
    url = _several_hosts(make_postgres_url(), "libpq host list", live_first=False)
    migrated = _compensa("migrate", "--db", url)
    assert migrated.returncode == 0 and migrated.stdout.startswith("schema upgraded"), migrated.stderr
    purged = _compensa("purge", "--db", url, "--older-than", "1d")
    assert purged.returncode == 0 and purged.stdout == "deleted 0 saga(s) done for good\n", purged.stderr


def test_a_url_of_the_wrong_form_is_refused_in_one_line_naming_the_forms_that_work() -> None:
    for url in (
        "bogus://x", "not a url", "postgresql+psycopg://u@h:abc/db", "postgresql+psycopg://u:secret@h/db?host",
        "postgresql+psycopg://u@h:x/db?password=secret",
    ):
        with pytest.raises(DatabaseMisconfigured) as refused:
            open_store(url)
        message = str(refused.value)
        assert "\n" not in message and "USER@HOST1:PORT1,HOST2:PORT2" in message, message
        assert "secret" not in message
        with pytest.raises(DatabaseMisconfigured):
            create_participant_engine(url)


UNREADABLE = {
    "unknown scheme": "bogus://x",
    "not a URL": "not a url",
    "port not a number": "postgresql+psycopg://postgres@127.0.0.1:abc/db",
    "host list with a port not a number": "postgresql+psycopg://postgres@127.0.0.1:1,127.0.0.1:x/db",
}


@pytest.mark.parametrize("command", [["migrate"], ["purge", "--older-than", "1d"]], ids=["migrate", "purge"])
@pytest.mark.parametrize("url", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_a_url_the_commands_cannot_read_is_one_line_and_exit_2(command: list[str], url: str, tmp_path: Path) -> None:
    result = _compensa(*command, "--db", url, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --db ") and result.stderr.count("\n") == 1, result.stderr
    assert "use postgresql+psycopg://" in result.stderr


@pytest.mark.parametrize(
    "command", [["migrate"], ["purge", "--older-than", "1d"], ["serve", "--listen", "127.0.0.1:0"]],
    ids=["migrate", "purge", "serve"],
)
def test_database_errors_are_one_line_without_sqlalchemy_s_background_link(
    command: list[str], postgres_url: str, tmp_path: Path
) -> None:
    for url in (
        f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/db",
        make_url(postgres_url).set(database="compensa_no_such_database").render_as_string(hide_password=False),
    ):
        if command[0] == "serve" and "127.0.0.1:" in url and "no_such" not in url:
            continue  # serve waits for a database that refuses connections: the one-line refusal is the other case
        result = _compensa(*command, "--db", url, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Background on this error" not in result.stderr, result.stderr
        last = result.stderr.splitlines()[-1]
        assert last.startswith("error: ") and result.stderr.endswith(last + "\n"), result.stderr
        if command[0] != "serve":
            assert result.stderr.count("\n") == 1, result.stderr
