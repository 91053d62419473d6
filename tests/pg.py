"""Finding or starting a PostgreSQL server for the test suite, and making databases on it.

No pytest here: tests/conftest.py turns this into fixtures.

Discovery order (first hit wins):

1. ``DATABASE_URL``: a SQLAlchemy URL; when set it must work.
2. A local server at ``COMPENSA_TEST_PG_HOST``:``COMPENSA_TEST_PG_PORT``
   (default 127.0.0.1:5432) as user ``postgres``, database ``postgres`` or ``test``.
3. A throwaway cluster from the server binaries in ``/usr/lib/postgresql/*/bin``
   (or ``COMPENSA_TEST_PG_BINDIR``; set it empty to disable), on a free port in a
   temp dir, stopped and deleted by :meth:`PostgresServer.close`.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

_CONNECT_TIMEOUT_SECONDS = 3
_DEFAULT_HOST = "127.0.0.1"
_DEFAULT_PORT = 5432
_ADMIN_USER = "postgres"
# The maintenance database first, so that the admin URL points there when it exists.
_ADMIN_DATABASES = ("postgres", "test")
_CLUSTER_USER = "postgres"
# Connections that drop the suite's databases at its end, together.
_DROPPING_CONNECTIONS = 8


class PostgresNotFound(Exception):
    """No PostgreSQL server could be found or started; the message says what was tried."""


@dataclass
class PostgresServer:
    """A reachable server: where it is, how it was found, and how to let it go."""

    admin_url: URL
    origin: str
    _cleanup: Callable[[], None] | None = field(default=None, repr=False)
    _restart: Callable[[], None] | None = field(default=None, repr=False)

    def restart(self) -> None:
        """Crash-restarts a server we started (`pg_ctl restart -m immediate`)."""
        if self._restart is None:
            raise RuntimeError(f"cannot restart {self.origin}: we did not start it")
        self._restart()

    def admin_conninfo(self) -> str:
        """The admin URL as a libpq connection string, for psycopg."""
        return _conninfo(self.admin_url)

    def close(self) -> None:
        """Stops and deletes the server when we started it; otherwise does nothing."""
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()


def find_or_start_server() -> PostgresServer:
    """Returns a reachable server following the module's discovery order.

    Raises :class:`PostgresNotFound` when every step fails.
    """
    tried: list[str] = []
    env_url = os.environ.get("DATABASE_URL")
    if env_url:
        url = _psycopg_url(make_url(env_url))
        error = _try_connect(url)
        if error is not None:
            # An explicit setting that does not work is a mistake to report, not to paper over.
            raise PostgresNotFound(f"DATABASE_URL={_shown(url)} is not usable: {error}")
        return PostgresServer(url, origin=f"DATABASE_URL ({_shown(url)})")

    server = find_local_server(tried)
    if server is not None:
        return server

    bindir = find_server_bindir()
    if bindir is None:
        tried.append("no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin")
        raise PostgresNotFound("; ".join(tried))
    try:
        return start_throwaway_cluster(bindir)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        tried.append(f"starting a throwaway cluster from {bindir} failed: {_describe(exc)}")
        raise PostgresNotFound("; ".join(tried)) from exc


def find_local_server(tried: list[str] | None = None) -> PostgresServer | None:
    """Returns the server at the local host and port, or None; appends failures to ``tried``."""
    host = os.environ.get("COMPENSA_TEST_PG_HOST", _DEFAULT_HOST)
    port = int(os.environ.get("COMPENSA_TEST_PG_PORT", str(_DEFAULT_PORT)))
    for database in _ADMIN_DATABASES:
        url = URL.create("postgresql+psycopg", username=_ADMIN_USER, host=host, port=port, database=database)
        error = _try_connect(url)
        if error is None:
            return PostgresServer(url, origin=f"local server at {host}:{port}")
        if tried is not None:
            tried.append(f"{_shown(url)}: {error}")
    return None


def find_server_bindir() -> Path | None:
    """Returns the newest directory holding both ``initdb`` and ``pg_ctl``, or None."""
    override = os.environ.get("COMPENSA_TEST_PG_BINDIR")
    candidates = [override] if override is not None else glob.glob("/usr/lib/postgresql/*/bin")
    usable = [
        Path(candidate)
        for candidate in candidates
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file()
    ]
    return max(usable, key=_version_key, default=None)


def start_throwaway_cluster(bindir: Path) -> PostgresServer:
    """Creates and starts a cluster in a temp dir on a free 127.0.0.1 port.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user.
    """
    as_user = _CLUSTER_USER if os.geteuid() == 0 else None
    workdir = Path(tempfile.mkdtemp(prefix="compensa-pg-"))
    datadir = workdir / "data"
    logfile = workdir / "postgres.log"
    try:
        if as_user is not None:
            entry = pwd.getpwnam(as_user)  # KeyError when the user does not exist
            os.chown(workdir, entry.pw_uid, entry.pw_gid)
        pg_ctl = str(bindir / "pg_ctl")
        _run(
            [str(bindir / "initdb"), "-D", str(datadir), "-U", _ADMIN_USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            as_user,
        )
        port = _free_port()
        # The socket lives in our own dir: /var/run/postgresql may be missing or not ours.
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        _run([pg_ctl, "-D", str(datadir), "-l", str(logfile), "-o", options, "-w", "-t", "60", "start"], as_user)
    except (KeyError, OSError, subprocess.CalledProcessError) as exc:
        log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"{_describe(exc)}\n{log}".strip()) from exc

    def cleanup() -> None:
        stop = [pg_ctl, "-D", str(datadir), "-m", "immediate", "-w", "stop"]
        subprocess.run(_as_user(stop, as_user), check=False, capture_output=True, cwd="/")
        shutil.rmtree(workdir, ignore_errors=True)

    def restart() -> None:
        _run(
            [pg_ctl, "-D", str(datadir), "-l", str(logfile), "-o", options, "-m", "immediate", "-w", "restart"],
            as_user,
        )

    url = URL.create("postgresql+psycopg", username=_ADMIN_USER, host="127.0.0.1", port=port, database="postgres")
    return PostgresServer(
        url, origin=f"throwaway cluster from {bindir} at 127.0.0.1:{port}", _cleanup=cleanup, _restart=restart
    )


class DatabaseFactory:
    """Creates fresh empty databases on one server and drops them all in :meth:`drop_all`."""

    def __init__(self, server: PostgresServer) -> None:
        self._server = server
        self._created: list[str] = []

    def create(self) -> str:
        """Creates a database named ``compensa_test_<pid>_<random>`` and returns its SQLAlchemy URL."""
        name = f"compensa_test_{os.getpid()}_{secrets.token_hex(4)}"
        # template0 accepts no connections, so nobody connected to template1 can block us.
        with psycopg.connect(self._server.admin_conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        self._created.append(name)
        return self._server.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        """Drops every database this factory created, disconnecting whoever is still in them.

        A few at a time: each DROP DATABASE waits for a checkpoint, and drops waiting
        together share one (one after another, hundreds of them took minutes).
        """
        names, self._created = self._created, []
        with ThreadPoolExecutor(max_workers=_DROPPING_CONNECTIONS) as pool:
            list(pool.map(self._drop, names))  # re-raises the first drop that failed

    def _drop(self, name: str) -> None:
        with psycopg.connect(self._server.admin_conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _psycopg_url(url: URL) -> URL:
    """The same URL with the psycopg 3 driver, whatever driver it named."""
    if url.get_backend_name() != "postgresql":
        raise PostgresNotFound(f"DATABASE_URL must be a PostgreSQL URL, got {_shown(url)}")
    return url.set(drivername="postgresql+psycopg")


def _conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _try_connect(url: URL) -> str | None:
    """Returns None when the server answers a query, else why not."""
    try:
        with psycopg.connect(_conninfo(url), connect_timeout=_CONNECT_TIMEOUT_SECONDS, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return _describe(exc)
    return None


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        output = (exc.stderr or exc.stdout or "").strip()
        return f"{shlex.join(exc.cmd)} exited {exc.returncode}: {output}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _version_key(bindir: Path) -> tuple[int, ...]:
    version = bindir.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_user(command: Sequence[str], user: str | None) -> list[str]:
    """The command run as ``user``, or as ourselves when ``user`` is None."""
    if user is None:
        return list(command)
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *command]
    return ["su", user, "-s", "/bin/sh", "-c", shlex.join(command)]


def _run(command: Sequence[str], as_user: str | None) -> None:
    full = _as_user(command, as_user)
    # pg_ctl start leaves the postmaster holding inherited pipes; a log file avoids
    # waiting on them, so stdout/stderr go to a temp file rather than capture_output.
    with tempfile.TemporaryFile(mode="w+") as output:
        result = subprocess.run(full, stdout=output, stderr=subprocess.STDOUT, text=True, cwd="/", check=False)
        if result.returncode != 0:
            output.seek(0)
            raise subprocess.CalledProcessError(result.returncode, full, output=output.read())


@dataclass
class ReplicatedPair:
    """A throwaway primary and its standby (streaming replication,
    `pg_basebackup -R`; synchronous or not), each a cluster of its own on a
    free 127.0.0.1 port."""

    bindir: Path
    workdir: Path
    primary_port: int
    standby_port: int
    _as_user: str | None

    @property
    def urls_host_list(self) -> str:
        """The libpq host list of both, in SQLAlchemy's URL (database `orchestrator`)."""
        return (
            f"postgresql+psycopg://{_ADMIN_USER}@127.0.0.1:{self.primary_port},127.0.0.1:{self.standby_port}"
            "/orchestrator?target_session_attrs=read-write"
        )

    def conninfo(self, port: int, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={port} user={_ADMIN_USER} dbname={database}"

    def url(self, port: int, database: str) -> str:
        """The SQLAlchemy URL of `database` on one of the two."""
        return f"postgresql+psycopg://{_ADMIN_USER}@127.0.0.1:{port}/{database}"

    def stop_standby(self) -> None:
        """`pg_ctl stop -m immediate` of the standby (the primary goes on alone)."""
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.workdir / "standby"), "-m", "immediate", "-w", "stop"],
             self._as_user)

    def kill_primary(self) -> None:
        """SIGKILL of the primary's postmaster (its backends end with it)."""
        pid = int((self.workdir / "primary" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 9)

    def promote_standby(self) -> None:
        """`pg_ctl promote`, waiting until the standby accepts writes."""
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.workdir / "standby"), "-w", "-t", "60", "promote"],
             self._as_user)

    def close(self) -> None:
        """Stops both (whatever is left of them) and deletes their files."""
        for name in ("primary", "standby"):
            stop = [str(self.bindir / "pg_ctl"), "-D", str(self.workdir / name), "-m", "immediate", "-w", "stop"]
            subprocess.run(_as_user(stop, self._as_user), check=False, capture_output=True, cwd="/")
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_primary_with_standby(bindir: Path, *, synchronous: bool = True) -> ReplicatedPair:
    """A primary and a standby streaming from it, both started and the
    standby streaming when this returns. `synchronous`: the primary's commits
    wait for the standby (`synchronous_standby_names = '*'`); otherwise the
    standby follows asynchronously, and the primary goes on without it. As
    root, both belong to the ``postgres`` user (initdb refuses root)."""
    as_user = _CLUSTER_USER if os.geteuid() == 0 else None
    workdir = Path(tempfile.mkdtemp(prefix="compensa-pg-pair-"))
    pair = ReplicatedPair(bindir, workdir, _free_port(), _free_port(), as_user)
    pg_ctl = str(bindir / "pg_ctl")
    try:
        if as_user is not None:
            entry = pwd.getpwnam(as_user)
            os.chown(workdir, entry.pw_uid, entry.pw_gid)
        primary, standby = workdir / "primary", workdir / "standby"
        _run([str(bindir / "initdb"), "-D", str(primary), "-U", _ADMIN_USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
             as_user)
        common = f"-k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=on"
        primary_options = f"-p {pair.primary_port} {common} -c wal_level=replica -c max_wal_senders=4"
        if synchronous:
            primary_options += " -c synchronous_standby_names='*' -c synchronous_commit=on"
        _run([pg_ctl, "-D", str(primary), "-l", str(workdir / "primary.log"), "-o", primary_options, "-w", "-t", "60",
              "start"], as_user)
        _run([str(bindir / "pg_basebackup"), "-D", str(standby), "-R", "-X", "stream", "-c", "fast",
              "-h", "127.0.0.1", "-p", str(pair.primary_port), "-U", _ADMIN_USER], as_user)
        _run([pg_ctl, "-D", str(standby), "-l", str(workdir / "standby.log"), "-o", f"-p {pair.standby_port} {common}",
              "-w", "-t", "60", "start"], as_user)
        with psycopg.connect(pair.conninfo(pair.primary_port), autocommit=True) as conn:
            deadline = time.monotonic() + 60
            wanted = "sync_state = 'sync'" if synchronous else "state = 'streaming'"
            while conn.execute(f"SELECT count(*) FROM pg_stat_replication WHERE {wanted}").fetchone() != (1,):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no standby with {wanted} within 60s")
                time.sleep(0.1)  # ok-sleep: polling interval with a deadline
    except (KeyError, OSError, subprocess.CalledProcessError, RuntimeError, psycopg.Error) as exc:
        logs = "".join(
            (workdir / log).read_text(errors="replace")[-1500:]
            for log in ("primary.log", "standby.log") if (workdir / log).exists()
        )
        pair.close()
        raise RuntimeError(f"{_describe(exc)}\n{logs}".strip()) from exc
    return pair
