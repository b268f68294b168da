"""The TLS node: an asyncio TLS terminator whose OpenSSL session cache is the farm's.

Sessions it makes go into its replica and out as NEW events; lookups are answered from the
replica (which the embedded replicator fills with every peer's sessions); tickets, in stateless
mode, are sealed with the farm's key ring.  The broker is never on the handshake path: if it is
unreachable the node serves on, and events wait in the outbox until it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from enum import StrEnum

from aio_pika.abc import AbstractRobustConnection

from sessionbus.bus.connection import BrokerSettings, retry
from sessionbus.bus.topology import Topology
from sessionbus.consumer.local_sessions import LocalSessions
from sessionbus.keys.follower import KeyFollower
from sessionbus.metrics import Metrics
from sessionbus.producer import openssl
from sessionbus.producer.outbox import OutboxSettings
from sessionbus.producer.session_hooks import SessionHooks
from sessionbus.producer.ticket_hooks import RingTicketKeys
from sessionbus.schemas.sealing import BusKeys
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)

_MAX_REQUEST_HEAD = 16 << 10
_IDLE_TIMEOUT = 30.0


class TicketMode(StrEnum):
    STATEFUL = "stateful"  # TLS 1.3 "tickets" are cache ids: every resumption goes via the replica
    STATELESS = "stateless"  # tickets sealed with the farm's key ring
    OFF = "off"  # no tickets: TLS 1.2 session ids only, TLS 1.3 never resumes


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


def make_context(settings: NodeSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(settings.cert, settings.key)
    if settings.tickets is not TicketMode.STATELESS:
        # Stateful: TLS 1.2 resumes by session id and TLS 1.3 tickets are ids in the cache.
        ctx.options |= ssl.OP_NO_TICKET
    if settings.tickets is TicketMode.OFF:
        ctx.num_tickets = 0
    return ctx


class Node:
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
        self._broker = broker
        self._keys = keys
        self._topo = topology
        self.metrics = metrics = metrics or Metrics()
        self.supervisor = supervisor = supervisor or Supervisor(metrics)
        self.bus = LocalSessions(
            "node", settings.node_id, topology, keys, broker,
            replication=settings.replication, outbox=settings.outbox, sid_ctx=settings.sid_ctx,
            session_lifetime=float(settings.session_timeout),
            max_entries=settings.max_replica_entries, max_bytes=settings.max_replica_bytes,
            metrics=metrics, supervisor=supervisor,
        )
        self.cache, self.outbox = self.bus.cache, self.bus.outbox
        self.hooks = SessionHooks(
            settings.node_id, settings.sid_ctx, self.cache, self.outbox,
            stateless_tickets=settings.tickets is TicketMode.STATELESS, metrics=metrics,
        )
        self._handshakes = {k: metrics.node.handshakes.labels(k) for k in ("full", "resumed")}
        self.ticket_keys = RingTicketKeys(metrics=metrics)
        self.context = make_context(settings)
        openssl.install_session_cache(
            self.context, self.hooks, sid_ctx=settings.sid_ctx, timeout=settings.session_timeout
        )
        if settings.tickets is TicketMode.STATELESS:
            openssl.install_ticket_keys(self.context, self.ticket_keys)
        self.key_follower: KeyFollower | None = None
        if settings.tickets is TicketMode.STATELESS:
            self.bus.extra_checks.append(("ticket key ring held", self._ring_held))
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def _ring_held(self) -> bool:
        return self.key_follower is not None and self.key_follower.ring is not None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        if self.settings.replication or self.settings.tickets is TicketMode.STATELESS:
            stateless = self.settings.tickets is TicketMode.STATELESS
            await self.bus.connect(self._follow_keys if stateless else None)
        self._server = await asyncio.start_server(
            self._serve, self.settings.host, self.settings.port, ssl=self.context,
            ssl_handshake_timeout=10, limit=_MAX_REQUEST_HEAD,
        )
        log.info("node %s listening on %s:%d", self.settings.node_id, *self.address)

    def readiness(self) -> tuple[bool, str]:
        """/ready: the bus checks, or ready at once for a lone node that uses no bus."""
        if not (self.settings.replication or self.settings.tickets is TicketMode.STATELESS):
            return True, "ok no bus (lone node)"
        return self.bus.readiness()

    async def _follow_keys(self, conn: AbstractRobustConnection) -> None:
        self.key_follower = KeyFollower(conn, self._topo, self._keys,
                                        on_ring=self.ticket_keys.update, metrics=self.metrics,
                                        supervisor=self.supervisor)
        await retry(self.key_follower.start, "following the key stream")

    async def wait_bus_ready(self, timeout: float) -> bool:
        return await self.bus.wait_ready(timeout)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), drain_timeout)
        for t in list(self._conns):
            t.cancel()
        await self.bus.flush_and_stop_replica(drain_timeout)
        if self.key_follower is not None:
            await self.key_follower.stop()
        await self.bus.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        sslobj = writer.get_extra_info("ssl_object")
        self._handshakes["resumed" if sslobj.session_reused else "full"].inc()
        try:
            if self.settings.upstream is not None:
                await self._forward(reader, writer, *self.settings.upstream)
            else:
                await self._answer(reader, writer)
        except ssl.SSLError:
            session = sslobj.session
            if session is not None:
                self.hooks.connection_failed(session.id)
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

