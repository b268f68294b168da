"""What a TLS node and a cache front share: a replica, an outbox, and the bus that feeds both.

The member serves from memory at once; everything that needs the broker starts in the
background whenever the broker is first reachable (check the bus, publish, replicate) and comes back
by itself after an outage, so a node or cache never waits on the network to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from aio_pika.abc import AbstractRobustConnection

from sessionbus.bus.connection import BROKER_ERRORS, BrokerSettings, connect, retry
from sessionbus.bus.topology import Topology, check_sessions, check_with
from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.consumer.replicator import Replicator, ReplicatorSettings
from sessionbus.metrics import Metrics
from sessionbus.producer.outbox import Outbox, OutboxSettings
from sessionbus.schemas.sealing import BusKeys
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)

BusStart = Callable[[AbstractRobustConnection], Awaitable[None]]


class LocalSessions:
    """A process's own view of the farm's sessions: its replica, its outbox, and the bus that
    feeds both (the node and the cache front alike)."""

    def __init__(
        self,
        name: str,
        node_id: str,
        topology: Topology,
        keys: BusKeys,
        broker: BrokerSettings,
        *,
        replication: bool,
        outbox: OutboxSettings,
        sid_ctx: bytes | None,
        session_lifetime: float,
        max_entries: int,
        max_bytes: int,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.name = name  # "node", "cache": names the broker connection
        self.node_id = node_id
        self._topo = topology
        self._keys = keys
        self._broker = broker
        self._sid_ctx = sid_ctx
        self._lifetime = session_lifetime
        self.replication = replication
        self.metrics = metrics = metrics or Metrics()
        self.supervisor = supervisor or Supervisor(metrics)
        self.cache = PeerCache(max_entries=max_entries, max_bytes=max_bytes)
        metrics.replica.watch(self.cache)
        self.outbox = (
            Outbox(node_id, topology, keys, outbox, metrics=metrics) if replication else None
        )
        self.connection: AbstractRobustConnection | None = None
        self.replicator: Replicator | None = None
        self._ready = asyncio.Event()
        self._declared = False
        self._restored = False  # channels and consumers restored since the last (re)connect
        self.extra_checks: list[tuple[str, Callable[[], bool]]] = []  # e.g. a key ring held

    async def connect(self, extra: BusStart | None = None) -> None:
        """Open the connection (returns at once) and start the bus side in the background;
        ``extra`` runs once connected, after the declares and before the replica starts."""
        self.connection = await connect(
            replace(self._broker, name=f"sessionbus {self.name} {self.node_id}"),
            wait=False, on_state=self.metrics.bus.broker_state,
        )
        # aio-pika sets `connected` before it restores channels; reconnect callbacks run after.
        self.metrics.replica.bus_ready.set_function(self._bus_ready)
        self.metrics.replica.subscribed.set_function(self._replica_subscribed)
        self.connection.close_callbacks.add(lambda *_: self._restored_is(False))
        self.connection.reconnect_callbacks.add(lambda *_: self._restored_is(True))
        self.supervisor.spawn(self._start_bus(extra), "bus-start")

    async def _start_bus(self, extra: BusStart | None) -> None:
        conn = self.connection
        assert conn is not None
        await conn.connected.wait()
        self._restored_is(True)
        # Provisioned by the admin step: a role only checks it is there (and waits until it is).
        await retry(lambda: check_with(conn, self._topo, check_sessions), "finding the bus")
        self._declared = True
        if self.outbox is not None:
            self.supervisor.spawn(self.outbox.run(conn), "outbox")
        if extra is not None:
            await extra(conn)
        if self.replication:
            replicator = Replicator(
                conn, self._topo, self._keys, self.cache,
                ReplicatorSettings(node_id=self.node_id, sid_ctx=self._sid_ctx,
                                   session_lifetime=self._lifetime),
                metrics=self.metrics, supervisor=self.supervisor,
            )
            await retry(replicator.start, "starting the replica")
            self.replicator = replicator
        self._ready.set()

    def _restored_is(self, restored: bool) -> None:
        self._restored = restored

    def checks(self) -> list[tuple[str, bool]]:
        """What readiness means here, each check named: connected, declared, subscribed."""
        conn = self.connection
        connected = conn is not None and conn.connected.is_set() and self._restored
        out = [("broker connected", connected), ("bus declared", self._declared)]
        if self.replication:
            out.append(("replica subscribed", connected and self.replicator is not None))
        if self.outbox is not None:
            out.append(("outbox publishing", not self.outbox.blocked))
        out += [(name, check()) for name, check in self.extra_checks]
        return out

    def readiness(self) -> tuple[bool, str]:
        """(ready, one line per check) for /ready."""
        checks = self.checks()
        return all(ok for _, ok in checks), "\n".join(
            f"{'ok' if ok else 'NOT'} {name}" for name, ok in checks)

    def _bus_ready(self) -> float:
        return 1.0 if self._ready.is_set() and all(ok for _, ok in self.checks()) else 0.0

    def _replica_subscribed(self) -> float:
        return 1.0 if dict(self.checks()).get("replica subscribed") else 0.0

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self._ready.is_set()

    async def flush_and_stop_replica(self, drain_timeout: float) -> None:
        """Publish what is waiting (if the broker is there), stop replicating."""
        conn = self.connection
        if (
            self.outbox is not None
            and conn is not None
            and conn.connected.is_set()
            and not await self.outbox.flush(drain_timeout)
        ):
            log.warning("%d events not published at shutdown", self.outbox.depth)
        if self.replicator is not None:
            await self.replicator.stop(drain_timeout)

    async def close(self) -> None:
        await self.supervisor.cancel_all()
        if self.connection is not None:
            try:
                await self.connection.close()
            except BROKER_ERRORS as exc:  # shutting down: the broker may be gone already
                log.debug("closing the broker connection: %s", type(exc).__name__)
