"""``sessionbus cache``: a session store that speaks memcached and Redis, backed by a replica.

A farm of servers that keep TLS sessions in memcached or Redis (Apache httpd's ``SSLSessionCache
memcache:``/``redis:``) joins the sessionbus farm by pointing each server at a local cache front:
sessions a server stores go into the front's replica and out as NEW events; lookups are answered
from the replica, which the embedded replicator fills with every peer's sessions (after a warm-join
replay of the last session lifetime); deletes travel as REMOVE, and ``sessionbus revoke`` reaches
these sessions like any other.

The broker is never on a request's path: the listeners start before the broker is reached and
answer from memory whether it is up or not; what changed meanwhile waits in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass

from sessionbus.bus.connection import BrokerSettings
from sessionbus.bus.topology import Topology
from sessionbus.consumer.local_sessions import LocalSessions
from sessionbus.metrics import Metrics
from sessionbus.producer.outbox import OutboxSettings
from sessionbus.schemas.sealing import BusKeys
from sessionbus.servers.cache.access import AccessPolicy, listens_on_loopback
from sessionbus.servers.cache.connection import (
    CacheConnection,
    Connections,
    FrontLimits,
    Listener,
    precreate,
)
from sessionbus.servers.cache.memcache import MemcacheConnection
from sessionbus.servers.cache.redis import RedisConnection
from sessionbus.servers.cache.store import Store
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)

# At most one NEW (and one REMOVE) message per this many seconds. Each message costs the cache
# (seal, publish, confirm, its own copy coming back and acked) about 0.3 ms of CPU on an idle
# core and several times that on the core httpd keeps busy: sending every event at once, as a
# node does, published about one message per request under httpd's TLS 1.3 load (a set per
# resumption). Measured under that load, 20 ms between messages still cost ~75 µs of cache CPU
# per resumption and 100 ms ~0-20; at 50 ms an event waits at most that long, and not at all
# after a quiet spell. GET events (statistics) wait up to OutboxSettings.get_linger.
DEFAULT_MIN_INTERVAL = 0.05
CACHE_OUTBOX = OutboxSettings(min_interval=DEFAULT_MIN_INTERVAL)  # batches are bounded by bytes too


@dataclass(frozen=True, slots=True)
class CacheSettings:
    node_id: str
    memcache: tuple[str, int] | None = None
    redis: tuple[str, int] | None = None
    # At least the servers' own session lifetime (httpd's SSLSessionCacheTimeout): it caps every
    # entry's expiry and is how far back a cache that starts replays the farm's sessions.
    session_timeout: int = 7200
    replication: bool = True
    limits: FrontLimits = FrontLimits()  # noqa: RUF009 - frozen
    outbox: OutboxSettings = CACHE_OUTBOX
    max_replica_entries: int = 1_000_000
    max_replica_bytes: int = 512 * 2**20
    access: AccessPolicy = AccessPolicy()  # noqa: RUF009 - frozen
    # Answer a TLS session's set at once and validate, store and publish it after (issue 19).
    defer_sets: bool = True


class CacheFront:
    def __init__(
        self,
        settings: CacheSettings,
        broker: BrokerSettings,
        keys: BusKeys,
        topology: Topology,
        *,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        if settings.memcache is None and settings.redis is None:
            raise ValueError("a cache front needs a memcache or a redis listener")
        for addr in (settings.memcache, settings.redis):
            if addr is not None and not settings.access.allow_remote and not (
                listens_on_loopback(addr[0])
            ):
                raise ValueError(
                    f"{addr[0]} is not a loopback address: the memcached and Redis protocols "
                    "have no authentication (allow_remote says it is meant)")
        self.settings = settings
        self._broker = broker
        self._keys = keys
        self._topo = topology
        # sid_ctx None: a cache front keeps sessions of every context, and opaque values
        self.metrics = metrics = metrics or Metrics()
        self.supervisor = supervisor = supervisor or Supervisor(metrics)
        self.bus = LocalSessions(
            "cache", settings.node_id, topology, keys, broker,
            replication=settings.replication, outbox=settings.outbox, sid_ctx=None,
            session_lifetime=float(settings.session_timeout),
            max_entries=settings.max_replica_entries, max_bytes=settings.max_replica_bytes,
            metrics=metrics, supervisor=supervisor,
        )
        self.cache, self.outbox = self.bus.cache, self.bus.outbox
        self.store = Store(
            settings.node_id, self.cache, self.outbox,
            session_lifetime=float(settings.session_timeout),
            max_value=settings.limits.max_value,
            services=settings.access.services, defer=settings.defer_sets, metrics=metrics.cache,
        )
        self.connections = Connections(settings.limits, metrics.cache, settings.access)
        self._servers: dict[str, Listener] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def address(self, protocol: str) -> tuple[str, int]:
        """Where the ``memcache`` or ``redis`` listener listens (after ``start``)."""
        return self._servers[protocol].address()

    @property
    def protocols(self) -> list[str]:
        return list(self._servers)

    async def start(self) -> None:
        store, conns = self.store, self.connections
        if self.settings.replication:
            await self.bus.connect()
        listeners: list[tuple[str, tuple[str, int] | None, type[CacheConnection]]] = [
            ("memcache", self.settings.memcache, MemcacheConnection),
            ("redis", self.settings.redis, RedisConnection),
        ]
        try:
            for name, addr, proto in listeners:
                if addr is None:
                    continue
                precreate(self.connections.metrics, name)
                self._servers[name] = Listener.bind(
                    addr[0], addr[1],
                    lambda sock, proto=proto: proto(sock, store, conns),  # type: ignore[misc]
                    functools.partial(self.supervisor.fail, f"cache-{name}-listener"),
                )
                log.info("cache %s: %s on %s:%d", self.settings.node_id, name,
                         *self.address(name))
        except OSError:
            await self.stop(0.5)
            raise
        self._tasks.append(self.supervisor.spawn(self._housekeeping(), "cache-housekeeping"))

    async def wait_bus_ready(self, timeout: float) -> bool:
        return await self.bus.wait_ready(timeout)

    async def _housekeeping(self) -> None:
        """Close idle connections; until the replicator runs (it sweeps), sweep the replica."""
        every = max(0.05, min(self.settings.limits.idle_timeout / 4, 5.0))
        while True:
            await asyncio.sleep(every)
            self.connections.sweep_idle(time.monotonic())
            if self.bus.replicator is None:
                self.cache.sweep()

    async def stop(self, drain_timeout: float = 5.0) -> None:
        for server in self._servers.values():
            server.close()
        self.connections.close_all()
        self.store.drain()  # sets answered STORED are stored and published before the end
        await self.bus.flush_and_stop_replica(drain_timeout)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.bus.close()
