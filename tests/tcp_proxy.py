"""A small asyncio TCP proxy for fault-injection tests (loopback only).

Clients connect to the proxy, the proxy connects each one to the upstream (the broker) and pumps
bytes both ways.  The test breaks the path at will:

- ``cut()``: abort every proxied connection at once (both sides get a TCP RST), as a broken
  network or a crashed load balancer would.  New connections are accepted again immediately.
- ``pause()``: stop accepting (the listening socket is closed: connects are refused) and, by
  default, cut what is open.  ``resume()`` listens again on the same port.
- ``reject_new = True``: keep listening but close each new connection at once; ``attempts`` records
  when each came (to watch a client's reconnect backoff).

aio-pika's own test suite cuts connections through a proxy the same way.  Each instance belongs to
one event loop; every method must be called from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset', no orderly FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port  # 0: chosen at the first start, then kept across pause/resume
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self.reject_new = False
        self.accepted = 0  # connections proxied
        self.refused_upstream = 0  # connections closed because the upstream was unreachable
        self.cuts = 0  # connections aborted by cut()/pause()/stop()
        self.attempts: list[float] = []  # monotonic times of connections closed by reject_new

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "") -> str:
        return f"amqp://{user}:{password}@{self.host}:{self.port}/{vhost}"

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def resume(self) -> None:
        """Listen again (on the same port)."""
        await self.start()

    async def pause(self, *, cut: bool = True) -> int:
        """Stop accepting: connects are refused until ``resume()``. Returns connections cut."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        return await self.cut() if cut else 0

    async def cut(self) -> int:
        """Abort every proxied connection (RST both ways). Returns how many were cut."""
        pairs = list(self._pairs)
        self._pairs.clear()
        for p in pairs:
            _abort(p.client)
            _abort(p.upstream)
            for t in p.tasks:
                t.cancel()
        for p in pairs:
            for t in p.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self.cuts += len(pairs)
        return len(pairs)

    async def stop(self) -> None:
        await self.pause(cut=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.reject_new:
            self.attempts.append(time.monotonic())
            _abort(writer)
            return
        pair = _Pair(writer)
        self._pairs.add(pair)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), 5
            )
        except (OSError, TimeoutError):
            self.refused_upstream += 1
            self._pairs.discard(pair)
            _abort(writer)
            return
        if pair not in self._pairs:  # cut while connecting
            _abort(up_writer)
            return
        pair.upstream = up_writer
        self.accepted += 1
        loop = asyncio.get_running_loop()
        pair.tasks = [
            loop.create_task(self._pump(reader, up_writer, pair)),
            loop.create_task(self._pump(up_reader, writer, pair)),
        ]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    pair: _Pair) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end the other too (a broker closing a connection closes it for
            # the client as well), unless cut() already took this pair.
            if pair in self._pairs:
                self._pairs.discard(pair)
                for w in (pair.client, pair.upstream):
                    if w is not None:
                        w.close()
