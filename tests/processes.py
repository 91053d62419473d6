"""Real `compensa` processes for tests that kill them: start, wait until SERVING,
SIGKILL, restart on the same port, and show their logs when a test fails.

No pytest here. A `ProcessSet` is a context manager: every process started
through it is killed when the block ends, and if the block raised, the tail of
each process's log is printed (pytest shows it with the failure).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compensa.examples import DEFINITIONS_DIR

COMPENSA = Path(sys.executable).parent / "compensa"
REPO = Path(__file__).resolve().parents[1]
CHECKOUT_DEFINITION = DEFINITIONS_DIR / "checkout.yaml"

#: Client channel options: reconnect quickly to a process that was restarted,
#: instead of gRPC's default backoff of 1s growing by 1.6x.
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ProcessExited(Exception):
    """A process ended while it was expected to come up."""


class ManagedProcess:
    """One command line, run as a process that can be killed and run again.

    Its stdout and stderr go to `log_path`, appended to across restarts with a
    marker line per start, so the whole history of the port is in one file.
    """

    def __init__(self, name: str, args: Sequence[str], address: str, log_path: Path) -> None:
        self.name = name
        self.args = list(args)
        self.address = address
        self.log_path = log_path
        self.starts = 0
        self.kills = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Starts the process; it must not be running."""
        if self.running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts} of {self.name}: {' '.join(self.args)}\n".encode())
            log.flush()
            # The child keeps its own handle on the file; ours closes here.
            self._process = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )

    async def wait_serving(self, timeout: float = 20.0) -> None:
        """Polls grpc.health.v1 Check("") until it answers SERVING; raises
        ProcessExited if the process dies first, TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.address, options=FAST_RECONNECT) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            last = "no answer yet"
            while True:
                if not self.running():
                    code = self._process.returncode if self._process is not None else None
                    raise ProcessExited(f"{self.name} exited with {code} before serving\n{self.tail()}")
                try:
                    answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                except grpc.aio.AioRpcError as error:
                    last = f"{error.code().name}: {error.details()}"
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not SERVING after {timeout}s ({last})\n{self.tail()}")
                await asyncio.sleep(0.05)  # ok-sleep: health polling interval, bounded by the deadline

    async def start_serving(self, timeout: float = 20.0) -> None:
        """Starts the process and waits until it is SERVING."""
        self.start()
        await self.wait_serving(timeout)

    def kill(self, *, cleanup: bool = False) -> None:
        """SIGKILL, then reap: nothing of the process survives, not even its socket.
        `cleanup` kills are not counted in `kills`."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        if not cleanup:
            self.kills += 1
        what = "cleanup" if cleanup else f"#{self.kills}"
        with self.log_path.open("ab") as log:
            log.write(f"===== SIGKILL {what} of {self.name} (pid {process.pid})\n".encode())

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM and wait up to `grace` seconds, then SIGKILL."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the process's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_lines(self, needle: str) -> list[str]:
        """Lines of the log containing `needle`."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if needle in line]


class ProcessSet:
    """The processes of one test; killed when the `with` block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: dict[str, ManagedProcess] = {}

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            if error is not None:
                self.print_tails()
        finally:
            for process in self.processes.values():
                process.kill(cleanup=True)

    def add(self, name: str, args: Sequence[str], address: str) -> ManagedProcess:
        if name in self.processes:
            raise ValueError(f"process {name!r} exists")
        process = ManagedProcess(name, args, address, self.log_dir / f"{name}.log")
        self.processes[name] = process
        return process

    def participant(self, kind: str, database_url: str, *, faults: str = "", port: int | None = None) -> ManagedProcess:
        """`compensa participant KIND` on a fixed port (kept across restarts)."""
        address = f"127.0.0.1:{port or free_port()}"
        args = [str(COMPENSA), "participant", kind, "--listen", address, "--db", database_url]
        if faults:
            args += ["--faults", faults]
        return self.add(kind, args, address)

    def orchestrator(
        self,
        database_url: str,
        participants: Mapping[str, str],
        *,
        definitions: Sequence[Path] = (CHECKOUT_DEFINITION,),
        lease_seconds: float = 1.0,
        port: int | None = None,
        name: str = "orchestrator",
        options: Sequence[str] = (),
    ) -> ManagedProcess:
        """`compensa serve` on a fixed port, with more command-line `options`.
        Each start is a new replica id, so a restart takes over its
        predecessor's sagas when their leases expire."""
        address = f"127.0.0.1:{port or free_port()}"
        args = [
            str(COMPENSA), "serve", "--listen", address, "--db", database_url, "--lease-seconds", str(lease_seconds)
        ]
        args += options
        for path in definitions:
            args += ["--definitions", str(path)]
        for participant, participant_address in participants.items():
            args += ["--participant", f"{participant}={participant_address}"]
        return self.add(name, args, address)

    async def replicas(
        self,
        database_url: str,
        participants: Mapping[str, str],
        names: Sequence[str],
        *,
        definitions: Sequence[Path] = (CHECKOUT_DEFINITION,),
    ) -> dict[str, ManagedProcess]:
        """Replicas `names` of one deployment (`--replica-id NAME`), started
        together and serving when this returns."""
        replicas = {
            name: self.orchestrator(
                database_url, participants, definitions=definitions, name=name, options=["--replica-id", name]
            )
            for name in names
        }
        for replica in replicas.values():
            replica.start()
        for replica in replicas.values():
            await replica.wait_serving(60)
        return replicas

    def print_tails(self, lines: int = 40) -> None:
        for process in self.processes.values():
            print(f"----- last {lines} lines of {process.log_path}")
            print(process.tail(lines))


# --- process introspection (for tests that measure or attribute work) ---------


def vm_rss_kib(pid: int) -> int:
    """The resident set size of process `pid` in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _tcp_inodes(local_port: int, remote_port: int) -> set[str]:
    """Socket inodes of TCP connections from `local_port` to `remote_port` (IPv4 and IPv6)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == local_port and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                inodes.add(inode)
    return inodes


def owner_of_connection(peer: str, server_port: int, processes: Sequence[ManagedProcess]) -> str | None:
    """Which of `processes` holds the client end of the TCP connection that a
    server on `server_port` sees as `peer` (grpc's context.peer(), e.g.
    "ipv4:127.0.0.1:54321"); None if none of them (or it is gone)."""
    try:
        client_port = int(peer.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None
    wanted = {f"socket:[{inode}]" for inode in _tcp_inodes(client_port, server_port)}
    if not wanted:
        return None
    for process in processes:
        pid = process.pid
        if pid is None or not process.running():
            continue
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) in wanted:
                        return process.name
                except OSError:
                    continue
        except OSError:
            continue
    return None
