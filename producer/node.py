"""The TLS node: an asyncio TLS terminator whose OpenSSL session cache is the farm's.

Sessions it makes go into its replica and out as NEW events; lookups are answered from the
replica (which the embedded replicator fills with every peer's sessions); tickets, in stateless
mode, are sealed with the farm's key ring. It is a ``sessionbus.Farm`` member serving the context
the farm attached to; the broker is never on the handshake path: if it is
unreachable the node serves on, and events wait in the outbox until it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass

from sessionbus.bus.connection import BrokerSettings
from sessionbus.bus.topology import Topology
from sessionbus.consumer.local_sessions import LocalSessions
from sessionbus.farm import Farm, FarmSettings, TicketMode
from sessionbus.keys.follower import KeyFollower
from sessionbus.metrics import Metrics
from sessionbus.producer import openssl
from sessionbus.producer.outbox import OutboxSettings
from sessionbus.schemas.sealing import BusKeys
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)

__all__ = ["Node", "NodeSettings", "TicketMode", "make_context"]

_MAX_REQUEST_HEAD = 16 << 10
_IDLE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class NodeSettings:
    node_id: str
    host: str
    port: int
    cert: str
    key: str
    upstream: tuple[str, int] | None = None
    session_timeout: int = 7200
    tickets: TicketMode = TicketMode.STATEFUL
    service: str = "sessionbus"  # the session id context: one per service, shared by its nodes
    replication: bool = True
    outbox: OutboxSettings = OutboxSettings()  # noqa: RUF009 - frozen
    max_replica_entries: int = 1_000_000
    max_replica_bytes: int = 512 * 2**20

    @property
    def sid_ctx(self) -> bytes:
        return self.service.encode()

    def farm(self) -> FarmSettings:
        return FarmSettings(
            node_id=self.node_id, service=self.service, session_timeout=self.session_timeout,
            tickets=self.tickets, replication=self.replication, outbox=self.outbox,
            max_replica_entries=self.max_replica_entries,
            max_replica_bytes=self.max_replica_bytes,
        )


def make_context(settings: NodeSettings) -> ssl.SSLContext:
    """The node's server context with its certificate (the farm's attach sets the rest)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(settings.cert, settings.key)
    return ctx


class Node:
    """A ``sessionbus.Farm`` member serving its own attached context with asyncio streams."""

    def __init__(
        self,
        settings: NodeSettings,
        broker: BrokerSettings,
        keys: BusKeys,
        topology: Topology,
        *,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        if len(settings.sid_ctx) > openssl.MAX_SID_CTX:
            raise ValueError(f"service name longer than {openssl.MAX_SID_CTX} bytes")
        self.settings = settings
        self.farm = Farm(settings.farm(), bus_keys=keys, broker=broker, topology=topology,
                         metrics=metrics or Metrics(), supervisor=supervisor, role="node")
        self.metrics, self.supervisor = self.farm.metrics, self.farm.supervisor
        self.bus: LocalSessions = self.farm.bus
        self.cache, self.outbox = self.farm.replica, self.farm.outbox
        self.hooks, self.ticket_keys = self.farm.hooks, self.farm.ticket_keys
        self.context = self.farm.attach(make_context(settings))
        if settings.tickets is TicketMode.STATELESS:
            self.bus.extra_checks.append(("ticket key ring held", self._ring_held))
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def _ring_held(self) -> bool:
        return self.key_follower is not None and self.key_follower.ring is not None

    def readiness(self) -> tuple[bool, str]:
        """/ready: the bus checks, or ready at once for a lone node that uses no bus."""
        if not (self.settings.replication or self.settings.tickets is TicketMode.STATELESS):
            return True, "ok no bus (lone node)"
        return self.bus.readiness()

    @property
    def key_follower(self) -> KeyFollower | None:
        return self.farm.key_follower

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve; ``sock``, if given, is the listening socket the caller bound already."""
        await self.farm.start()
        host, port = (None, None) if sock is not None else (self.settings.host, self.settings.port)
        self._server = await asyncio.start_server(
            self._serve, host, port, sock=sock, ssl=self.context,
            ssl_handshake_timeout=10, limit=_MAX_REQUEST_HEAD,
        )
        log.info("node %s listening on %s:%d", self.settings.node_id, *self.address)

    async def wait_bus_ready(self, timeout: float) -> bool:
        return await self.farm.wait_ready(timeout)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), drain_timeout)
        for t in list(self._conns):
            t.cancel()
        await self.farm.stop(drain_timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        sslobj = writer.get_extra_info("ssl_object")
        self.farm.handshake_done(sslobj)
        try:
            if self.settings.upstream is not None:
                await self._forward(reader, writer, *self.settings.upstream)
            else:
                await self._answer(reader, writer)
        except ssl.SSLError:
            self.farm.connection_failed(sslobj)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):  # the peer is gone: nothing to do
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one HTTP request with 200 and the node's id, then close."""
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IDLE_TIMEOUT)
        if not head:
            return
        body = f"node {self.settings.node_id}\n".encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), _IDLE_TIMEOUT
        )

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: transport closed
                    if dst.can_write_eof():
                        dst.write_eof()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            up_writer.close()

