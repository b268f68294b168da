"""``sessionbus.Farm``: join the farm from your own asyncio TLS server with one ``attach(ctx)``.

A ``Farm`` is one farm member: a replica of the farm's sessions, an outbox of NEW/GET/REMOVE
events, the replicator that fills the replica and (stateless tickets) the key follower. ``attach``
installs OpenSSL's session-cache callbacks (and the ticket-key callback) on an ``ssl.SSLContext``
you already have, so aiohttp, uvicorn or ``asyncio.start_server`` serve with the farm's cache::

    farm = sessionbus.Farm.from_env(node_id="web-1")
    farm.attach(ctx)              # before the first handshake; raises AttachError if it cannot
    async with farm:              # the bus side runs on this loop, in the background
        ...serve with ctx...

The node's rules hold: a handshake never waits on the network (lookups are answered from the
replica in memory; events queue in a bounded outbox), the session id context is set per
connection (CPython 3.13 overwrites the context's), and the binding's pointer checks run in
``attach``, so an unusable context fails there, before any handshake, with one ``AttachError``.
Handshakes must run on the thread of the loop that runs the farm (every asyncio server does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from aio_pika.abc import AbstractRobustConnection
from prometheus_client import REGISTRY, CollectorRegistry

from sessionbus.bus.connection import DEFAULT_URL, BrokerSettings, retry
from sessionbus.bus.topology import Topology
from sessionbus.consumer.local_sessions import LocalSessions
from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.keys.follower import KeyFollower
from sessionbus.metrics import Metrics
from sessionbus.producer import openssl
from sessionbus.producer.outbox import Outbox, OutboxSettings
from sessionbus.producer.session_hooks import SessionHooks
from sessionbus.producer.ticket_hooks import RingTicketKeys
from sessionbus.schemas.events import valid_node_id
from sessionbus.schemas.sealing import BusKeyError, BusKeys, load_bus_keys
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)

__all__ = ["AttachError", "Farm", "FarmError", "FarmSettings", "TicketMode"]


class TicketMode(StrEnum):
    STATEFUL = "stateful"  # TLS 1.3 "tickets" are cache ids: every resumption goes via the replica
    STATELESS = "stateless"  # tickets sealed with the farm's key ring
    OFF = "off"  # no tickets: TLS 1.2 session ids only, TLS 1.3 never resumes


class FarmError(ValueError):
    """A farm setting (argument or environment variable) that cannot be used: one line."""


class AttachError(openssl.BindingError):
    """``attach`` cannot use this context (another OpenSSL, a layout the pointer checks reject,
    a client context): raised by ``attach``, before any handshake on the context."""


@dataclass(frozen=True, slots=True)
class FarmSettings:
    node_id: str  # unique in the farm: names this member's events and its replica queue
    service: str = "sessionbus"  # the session id context: one per service, shared by its members
    session_timeout: int = 7200  # seconds, equal on every member
    tickets: TicketMode = TicketMode.STATEFUL
    replication: bool = True  # False: a lone member (nothing published or replicated)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    max_replica_entries: int = 1_000_000
    max_replica_bytes: int = 512 * 2**20

    def __post_init__(self) -> None:
        if not valid_node_id(self.node_id):
            raise FarmError(
                f"{self.node_id!r} is not a node id (lowercase letters, digits and '-', at most 63)"
            )
        if not 0 < len(self.service.encode()) <= openssl.MAX_SID_CTX:
            raise FarmError(f"service must be 1..{openssl.MAX_SID_CTX} bytes")
        if self.session_timeout <= 0:
            raise FarmError("session_timeout must be positive")
        object.__setattr__(self, "tickets", TicketMode(self.tickets))

    @property
    def sid_ctx(self) -> bytes:
        return self.service.encode()


class Farm:
    """One farm member on the running event loop. See the module docstring."""

    def __init__(
        self,
        settings: FarmSettings,
        *,
        bus_keys: BusKeys,
        broker: BrokerSettings | None = None,
        topology: Topology | None = None,
        registry: CollectorRegistry | None = None,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
        role: str = "farm",
    ) -> None:
        """``registry``: where the member's metric families go (default prometheus_client's
        global one; one Farm per registry). ``metrics``/``supervisor``: a process's own
        ``sessionbus.Metrics``/``Supervisor`` instead (what ``sessionbus node`` passes)."""
        self.settings = settings
        self._keys = bus_keys
        self._topo = topology or Topology()
        if metrics is None:
            metrics = Metrics(REGISTRY if registry is None else registry)
        self.metrics = metrics
        try:
            self.supervisor = supervisor or Supervisor(metrics)
            self._member = LocalSessions(
                role, settings.node_id, self._topo, bus_keys, broker or BrokerSettings(),
                replication=settings.replication, outbox=settings.outbox,
                sid_ctx=settings.sid_ctx, session_lifetime=float(settings.session_timeout),
                max_entries=settings.max_replica_entries, max_bytes=settings.max_replica_bytes,
                metrics=metrics, supervisor=self.supervisor,
            )
        except (ValueError, RuntimeError) as exc:  # prometheus_client: a family already there
            raise FarmError(
                "another Farm exports its metrics on this registry: pass registry= "
                f"(one Farm per registry) ({exc})"
            ) from None
        self.hooks = SessionHooks(
            settings.node_id, settings.sid_ctx, self._member.cache, self._member.outbox,
            stateless_tickets=settings.tickets is TicketMode.STATELESS, metrics=metrics,
        )
        self.ticket_keys = RingTicketKeys(metrics=metrics)
        self.key_follower: KeyFollower | None = None
        self._contexts: list[ssl.SSLContext] = []
        self._started = False
        self._handshakes = {k: metrics.node.handshakes.labels(k) for k in ("full", "resumed")}

    @classmethod
    def from_env(
        cls,
        node_id: str | None = None,
        *,
        service: str | None = None,
        tickets: TicketMode | str | None = None,
        session_timeout: int | None = None,
        registry: CollectorRegistry | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Farm:
        """A farm member configured as the ``sessionbus`` commands are: ``SESSIONBUS_AMQP_URL``
        (``amqps://``, or ``amqp://`` on loopback or with ``SESSIONBUS_AMQP_PLAINTEXT=1``),
        ``SESSIONBUS_BUS_KEY_FILE`` (required), ``SESSIONBUS_RING_PUBLIC_KEY_FILE`` (what
        stateless tickets' rings must be signed with), ``SESSIONBUS_ANY_ORIGIN_USERS`` (dev/test,
        loopback only), ``SESSIONBUS_PREFIX``, ``SESSIONBUS_AMQP_CA`` / ``_CERT`` / ``_KEY``, and
        ``SESSIONBUS_NODE_ID``, ``SESSIONBUS_SERVICE``,
        ``SESSIONBUS_TICKETS``, ``SESSIONBUS_SESSION_TIMEOUT`` when not given as arguments, and
        ``SESSIONBUS_LINGER`` (``sessionbus node --linger``: at most one NEW/REMOVE message per
        this many seconds; 0, the default, sends each at once).
        Raises ``FarmError`` (one line, never a secret) for a missing or unusable setting."""
        env = os.environ if environ is None else environ
        node_id = node_id or env.get("SESSIONBUS_NODE_ID")
        if not node_id:
            raise FarmError("no node id: pass node_id= or set SESSIONBUS_NODE_ID")
        key_file = env.get("SESSIONBUS_BUS_KEY_FILE")
        if not key_file:
            raise FarmError("no bus key: set SESSIONBUS_BUS_KEY_FILE")
        url = env.get("SESSIONBUS_AMQP_URL", DEFAULT_URL)
        if not url.startswith(("amqp://", "amqps://")):
            raise FarmError("SESSIONBUS_AMQP_URL must start with amqp:// or amqps://")
        # here, not at the top: sessionbus.cli's package imports every command, the node's too
        from sessionbus.cli.safety import (
            UnsafeSetting,
            check_any_origin_users,
            refuse_plaintext_remote,
        )

        users = [u for u in env.get("SESSIONBUS_ANY_ORIGIN_USERS", "").split(",") if u]
        try:  # the commands' own rules (sessionbus.cli.safety), in their words
            refuse_plaintext_remote(
                url, plaintext_ok=env.get("SESSIONBUS_AMQP_PLAINTEXT", "") == "1"
            )
            any_origin = check_any_origin_users(url, users)
        except UnsafeSetting as exc:
            raise FarmError(str(exc)) from None
        try:
            keys = load_bus_keys(
                key_file, public_key_file=env.get("SESSIONBUS_RING_PUBLIC_KEY_FILE") or None,
                any_origin_users=any_origin,
            )
        except BusKeyError as exc:
            raise FarmError(str(exc)) from None
        timeout_text = env.get("SESSIONBUS_SESSION_TIMEOUT", "7200")
        if session_timeout is None:
            if not timeout_text.isdigit():
                raise FarmError("SESSIONBUS_SESSION_TIMEOUT must be a whole number of seconds")
            session_timeout = int(timeout_text)
        mode = tickets or env.get("SESSIONBUS_TICKETS", TicketMode.STATEFUL.value)
        try:
            ticket_mode = TicketMode(mode)
        except ValueError:
            raise FarmError(
                f"tickets must be one of {', '.join(m.value for m in TicketMode)}"
            ) from None
        try:
            linger = float(env.get("SESSIONBUS_LINGER", "0"))
        except ValueError:
            linger = -1.0
        if not 0 <= linger <= 1:
            raise FarmError("SESSIONBUS_LINGER must be 0..1 seconds")
        settings = FarmSettings(
            node_id=node_id, service=service or env.get("SESSIONBUS_SERVICE", "sessionbus"),
            session_timeout=session_timeout, tickets=ticket_mode,
            outbox=OutboxSettings(min_interval=linger),
        )
        broker = BrokerSettings(
            url=url, ca_file=env.get("SESSIONBUS_AMQP_CA"),
            cert_file=env.get("SESSIONBUS_AMQP_CERT"), key_file=env.get("SESSIONBUS_AMQP_KEY"),
        )
        topology = Topology(prefix=env.get("SESSIONBUS_PREFIX", "sessionbus"))
        return cls(settings, bus_keys=keys, broker=broker, topology=topology, registry=registry)

    # --- what a server calls ------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def replica(self) -> PeerCache:
        """The farm's sessions as this member holds them (read it, don't write it)."""
        return self._member.cache

    @property
    def outbox(self) -> Outbox | None:
        return self._member.outbox

    @property
    def bus(self) -> LocalSessions:
        return self._member

    @property
    def failed(self) -> asyncio.Event:
        """Set when a background task (outbox, replicator, key follower) failed: it was logged
        with its traceback and counted (``sessionbus_task_failures_total``); serving goes on
        from the replica, but the farm no longer replicates. ``sessionbus node`` exits then."""
        return self.supervisor.failed

    def attach(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        """Serve ``ctx``'s sessions from the farm; returns ``ctx``.

        Sets the context's session cache (external only), session id context and timeout, its
        ticket options for the farm's ticket mode (stateful/off: ``OP_NO_TICKET``; off also
        ``num_tickets = 0``; stateless: tickets under the farm's key ring), and installs the
        callbacks. Call it before the context's first handshake, before or after ``start``.
        Raises ``AttachError`` if the binding cannot be used with this context.
        """
        if not isinstance(ctx, ssl.SSLContext):
            raise AttachError(f"attach needs an ssl.SSLContext, got {type(ctx).__name__}")
        if ctx.protocol is ssl.PROTOCOL_TLS_CLIENT:
            raise AttachError("attach needs a server context (PROTOCOL_TLS_SERVER), not a client")
        mode = self.settings.tickets
        try:
            # The pointer checks first: nothing on ctx changes if they fail.
            openssl.check_context(ctx)
            if mode is TicketMode.STATELESS:
                ctx.options &= ~ssl.OP_NO_TICKET
            else:
                # Stateful: TLS 1.2 resumes by session id and TLS 1.3 tickets are cache ids.
                ctx.options |= ssl.OP_NO_TICKET
            if mode is TicketMode.OFF:
                ctx.num_tickets = 0
            openssl.install_session_cache(
                ctx, self.hooks, sid_ctx=self.settings.sid_ctx,
                timeout=self.settings.session_timeout,
            )
            if mode is TicketMode.STATELESS:
                openssl.install_ticket_keys(ctx, self.ticket_keys)
        except AttachError:
            raise
        except (openssl.BindingError, TypeError) as exc:
            raise AttachError(f"cannot attach the farm to this SSLContext: {exc}") from None
        if all(c is not ctx for c in self._contexts):
            self._contexts.append(ctx)
        return ctx

    def detach(self, ctx: ssl.SSLContext) -> None:
        """Take the farm's callbacks off ``ctx`` again (new handshakes resume nothing)."""
        openssl.uninstall(ctx)
        self._contexts = [c for c in self._contexts if c is not ctx]

    def handshake_done(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> None:
        """Count a completed handshake (``sessionbus_handshakes_total{kind}``), if the server
        reports them: ``writer.get_extra_info("ssl_object")`` in a streams handler."""
        if ssl_object is not None:
            self._handshakes["resumed" if ssl_object.session_reused else "full"].inc()

    def connection_failed(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bool:
        """The connection ended in a TLS error (``ssl.SSLError``): if OpenSSL invalidated its
        session (a fatal alert), it resumes nowhere in the farm. True if a REMOVE was sent."""
        session = None if ssl_object is None else ssl_object.session
        return session is not None and self.hooks.connection_failed(session.id)

    # --- running ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the bus side on the running loop; returns at once (nothing waits for the
        broker: until it is reachable, and whenever it is away, the member serves from its
        replica and keeps events in the outbox)."""
        if self._started:
            return
        self._started = True
        stateless = self.settings.tickets is TicketMode.STATELESS
        if self.settings.replication or stateless:
            await self._member.connect(self._follow_keys if stateless else None)

    async def _follow_keys(self, conn: AbstractRobustConnection) -> None:
        self.key_follower = KeyFollower(conn, self._topo, self._keys,
                                        on_ring=self.ticket_keys.update, metrics=self.metrics,
                                        supervisor=self.supervisor)
        await retry(self.key_follower.start, "following the key stream")

    async def wait_ready(self, timeout: float) -> bool:
        """True once the replica is warm (replayed the farm's recent sessions), within
        ``timeout`` seconds; serving never needs to wait for it."""
        return await self._member.wait_ready(timeout)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Publish what waits in the outbox (if the broker is there, within ``drain_timeout``),
        stop replicating and close the broker connection. Attached contexts keep resuming
        from the replica as it was."""
        if not self._started:
            return
        self._started = False
        await self._member.flush_and_stop_replica(drain_timeout)
        if self.key_follower is not None:
            await self.key_follower.stop()
        await self._member.close()

    async def __aenter__(self) -> Farm:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def cleanup_ctx(self, _app: object) -> AsyncIterator[None]:
        """For aiohttp: ``app.cleanup_ctx.append(farm.cleanup_ctx)`` runs the farm for the
        application's lifetime, started before the site listens."""
        async with self:
            yield

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: object) -> AsyncIterator[None]:
        """For Starlette/FastAPI ``lifespan=farm.lifespan`` (uvicorn runs it before serving)."""
        async with self:
            yield
