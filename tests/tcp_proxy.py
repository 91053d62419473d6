"""A TCP proxy for tests that break a link without killing anything.

`TcpProxy` listens on 127.0.0.1 (port 0) and forwards every connection to a
target. It can:

- `blackhole()`: keep every connection open and forward nothing, in either
  direction; new connections are accepted and held the same way. What was
  sent stays in the socket buffers and is delivered at `heal()`, as after a
  network partition that TCP retransmissions outlive.
- `cut()`: close every connection and refuse new ones (nothing listens on the
  port until `heal()`).
- `heal()`: forward again (after a cut, listen again on the same port).

It runs on the event loop of the test that owns it; no pytest here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

_CHUNK = 64 * 1024


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`; see the module docstring."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.state = "forwarding"
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        #: Connections accepted so far (a test can see that a client reconnected).
        self.accepted = 0

    @classmethod
    async def to(cls, address: str) -> TcpProxy:
        """A started proxy to `address` ("host:port")."""
        host, _, port = address.rpartition(":")
        proxy = cls(host, int(port))
        await proxy.start()
        return proxy

    @property
    def address(self) -> str:
        """Where clients connect instead of the target: "127.0.0.1:PORT"."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listens (on a free port the first time, on the same port after a cut)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock)

    def blackhole(self) -> None:
        """Holds every byte, on open connections and new ones, until `heal`."""
        self.state = "blackhole"
        self._flowing.clear()

    async def cut(self) -> None:
        """Closes every connection and stops listening, so connecting is refused."""
        self.state = "cut"
        self._flowing.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            _abort(writer)
        for task in list(self._links):
            task.cancel()
        if self._links:
            await asyncio.wait(self._links)

    async def heal(self) -> None:
        """Forwards again; after a cut, listens again on the same port."""
        if self._server is None:
            await self.start()
        self.state = "forwarding"
        self._flowing.set()

    async def close(self) -> None:
        """Stops listening and closes every connection."""
        await self.cut()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        # The link runs in a task of its own that `cut` cancels: asyncio logs
        # an error when the task of a connection callback is cancelled.
        link = asyncio.create_task(self._link(client_reader, client_writer))
        self._links.add(link)
        try:
            await asyncio.wait([link])
        finally:
            self._links.discard(link)

    async def _link(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        target_writer: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()
            if getattr(client_reader, "_eof", False):
                # The client gave up while the link was held: connecting now
                # would only open and close a session on the target.
                return
            target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
            self._writers.add(target_writer)
            await asyncio.gather(
                self._pump(client_reader, target_writer), self._pump(target_reader, client_writer)
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_writer, target_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    _abort(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await self._flowing.wait()
            data = await reader.read(_CHUNK)
            # Read before a blackhole began: held, not delivered, until it ends.
            await self._flowing.wait()
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
