"""Suite-wide fixtures: a real PostgreSQL server and fresh databases on it.

Fixtures (other tests code against these names):

- ``postgres_url``: SQLAlchemy URL (``postgresql+psycopg://...``) of a fresh empty
  database for this run, dropped at session end.
- ``make_postgres_url``: ``() -> str`` creating one more fresh empty database per call,
  all dropped at session end.
- ``admin_postgres_url``: the server's admin URL (its maintenance database).

A test using any of them, or marked ``@pytest.mark.postgres``, is a PostgreSQL test.
Where no server can be found or started (see tests/pg.py), PostgreSQL tests FAIL under
``CI=true`` and are skipped with a loud banner otherwise.

Under pytest-xdist (``make test`` runs two workers) each worker finds its own server
(or starts its own throwaway cluster), and tells the controller what it found, so that
the summary's banner is printed where the terminal is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pg  # tests/ has no __init__.py, so pytest puts it on sys.path (prepend import mode)
import pytest

_POSTGRES_FIXTURES = frozenset({"postgres_url", "make_postgres_url", "admin_postgres_url"})
_NOT_FOUND_BANNER = "POSTGRESQL NOT FOUND: the PostgreSQL suite was SKIPPED"

# Discovery's verdict ("origin" or "missing") for the terminal summary; empty until a test needs it.
# Under xdist each worker fills its own, sent to the controller in its workeroutput.
_outcome: dict[str, str] = {}
_WORKER_OUTPUT_KEY = "compensa_postgres_outcome"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def pytest_report_header(config: pytest.Config) -> str:
    """Says where PostgreSQL tests will run; only cheap probes, no cluster is started here."""
    if os.environ.get("DATABASE_URL"):
        return "postgres: DATABASE_URL"
    local = pg.find_local_server()
    if local is not None:
        return f"postgres: {local.origin}"
    bindir = pg.find_server_bindir()
    if bindir is not None:
        return f"postgres: no server running; a throwaway cluster from {bindir} starts when needed"
    verdict = "PostgreSQL tests will FAIL (CI=true)" if _in_ci() else _NOT_FOUND_BANNER
    return f"postgres: no server and no server binaries: {verdict}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _POSTGRES_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


def pytest_sessionfinish(session: pytest.Session) -> None:
    worker_output = getattr(session.config, "workeroutput", None)  # set on an xdist worker only
    if worker_output is not None:
        worker_output[_WORKER_OUTPUT_KEY] = dict(_outcome)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """On the xdist controller: merges a finished worker's verdict into ours."""
    worker_outcome: dict[str, str] = getattr(node, "workeroutput", {}).get(_WORKER_OUTPUT_KEY, {})
    for key, value in worker_outcome.items():
        known = _outcome.get(key, "").split("; ") if key in _outcome else []
        _outcome[key] = "; ".join(dict.fromkeys([*known, *value.split("; ")]))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if "missing" in _outcome:
        terminalreporter.section("PostgreSQL", sep="!", red=True, bold=True)
        failed = _in_ci() or bool(os.environ.get("DATABASE_URL"))
        verdict = "POSTGRESQL NOT FOUND: the PostgreSQL suite FAILED" if failed else _NOT_FOUND_BANNER
        terminalreporter.write_line(verdict, red=True, bold=True)
        for attempt in _outcome["missing"].split("; "):
            terminalreporter.write_line(f"  tried {attempt}")
    elif "origin" in _outcome:
        terminalreporter.write_line(f"PostgreSQL tests ran against: {_outcome['origin']}")
    browserless = [
        report for report in terminalreporter.stats.get("skipped", [])
        if "Chromium or chromedriver is missing" in str(getattr(report, "longrepr", ""))
    ]
    if browserless:
        terminalreporter.section("Chromium", sep="!", red=True, bold=True)
        terminalreporter.write_line(
            "CHROMIUM NOT FOUND: the dashboard's browser test was SKIPPED"
            " (apt-get install -y chromium chromium-driver; under CI=true it fails instead)",
            red=True, bold=True,
        )


@pytest.fixture(scope="session")
def _postgres_server() -> Iterator[pg.PostgresServer]:
    try:
        server: pg.PostgresServer | None = pg.find_or_start_server()
        problem = ""
    except pg.PostgresNotFound as exc:
        server, problem = None, str(exc)
    if server is None:
        _outcome["missing"] = problem
        if _in_ci() or os.environ.get("DATABASE_URL"):
            reason = "CI=true" if _in_ci() else "DATABASE_URL is set"
            pytest.fail(f"PostgreSQL not found ({reason}, so this fails rather than skips): {problem}", pytrace=False)
        pytest.skip(f"{_NOT_FOUND_BANNER}; see the summary for what was tried")
    _outcome["origin"] = server.origin
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(autouse=True)
def _postgres_marker(request: pytest.FixtureRequest) -> None:
    # A test marked `postgres` that uses none of the fixtures still needs a server.
    if request.node.get_closest_marker("postgres") is not None:
        request.getfixturevalue("_postgres_server")


@pytest.fixture(scope="session")
def admin_postgres_url(_postgres_server: pg.PostgresServer) -> str:
    """The server's admin URL, to its maintenance database."""
    return _postgres_server.admin_url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def make_postgres_url(_postgres_server: pg.PostgresServer) -> Iterator[Callable[[], str]]:
    """A callable creating a fresh empty database per call; all are dropped at session end."""
    factory = pg.DatabaseFactory(_postgres_server)
    try:
        yield factory.create
    finally:
        factory.drop_all()


def _server_bindir() -> Path:
    bindir = pg.find_server_bindir()
    if bindir is None:
        if _in_ci():
            pytest.fail("PostgreSQL server binaries not found; CI needs them for a cluster of the test's own")
        pytest.skip("PostgreSQL server binaries not found: cannot start a cluster of the test's own")
    return bindir


@pytest.fixture
def private_postgres() -> Iterator[pg.PostgresServer]:
    """A cluster of the test's own (`pg_ctl` on a free port), for what would
    disturb the shared server's other tests: a crash-restart, a full
    tablespace (whose dirty pages any backend of the cluster may have to
    write, failing where it does)."""
    server = pg.start_throwaway_cluster(_server_bindir())
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def private_postgres_pair() -> Iterator[tuple[pg.PostgresServer, pg.PostgresServer]]:
    """Two clusters of the test's own, started together: two databases that
    share nothing (sagas partitioned over two PostgreSQL servers)."""
    bindir = _server_bindir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        starting = [pool.submit(pg.start_throwaway_cluster, bindir) for _ in range(2)]
        wait(starting)
    servers = [future.result() for future in starting if future.exception() is None]
    try:
        for future in starting:
            future.result()  # re-raises a start that failed, after the other is in `servers`
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.close()


@pytest.fixture(scope="session")
def postgres_url(make_postgres_url: Callable[[], str]) -> str:
    """A fresh empty database for this test run, dropped at session end."""
    return make_postgres_url()
