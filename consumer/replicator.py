"""Applies peers' NEW/REMOVE events to a replica (a ``PeerCache``) by following the session stream.

Warm join and live replication are one path: one stream consumer, started on first start at
``now - session lifetime`` (or at the stream's end with ``replay=False``), resumed after any
reconnect, channel restore or broker-side cancel from the last offset it applied + 1
(``Subscription``).  The broker writes each event once, whoever follows it; there are no
per-node queues.  The replica is *caught up* (``caught_up``, gauge
``sessionbus_replay_caught_up``) once the consumer has delivered the history: it went quiet, or
it reached events published after this replicator started.

Once caught up, this node's own events coming back are skipped unopened, by the routing key
(whose suffix the broker's topic permissions tie to the publishing user) and the origin header,
before any decryption: the node put them in its replica when it made them.  Before that they are
applied: a node that restarted has lost its memory.

A bounded table of the replica that is full (e.g. 65,536 distinct origins) rejects the event with
reason ``table_full``: it is counted and dead-lettered and the message is acked, so replication
never stalls on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from aio_pika.abc import AbstractRobustConnection

from sessionbus.bus.topology import Topology, session_routing_key
from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.consumer.subscription import Inbound, StreamSource, Subscription, WithEnvelope
from sessionbus.metrics import OUTCOMES, Metrics
from sessionbus.schemas.codec import (
    DEFAULT_LIMITS,
    H_ORIGIN,
    DecodedBatch,
    Limits,
    decode_batch,
)
from sessionbus.schemas.events import EventType
from sessionbus.schemas.sealing import BusKeys
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)

# The reason an event is rejected with when a bounded table of the replica is full.
TABLE_FULL = "table_full"


@dataclass(frozen=True, slots=True)
class ReplicatorSettings:
    node_id: str
    # Only sessions of this context are taken (a TLS node); None takes all (a cache front).
    sid_ctx: bytes | None = None
    session_lifetime: float = 7200.0
    # False: follow from the stream's end (no warm join); caught up at once.
    replay: bool = True
    # Clock skew allowance between origins when deciding the replay has reached live traffic,
    # and how long an empty stream stays "not yet caught up" at most.
    live_margin: float = 5.0
    prefetch: int = 256


class Replicator:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        keys: BusKeys,
        cache: PeerCache,
        settings: ReplicatorSettings,
        limits: Limits = DEFAULT_LIMITS,
        *,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.cache = cache
        self._metrics = metrics = metrics or Metrics()
        self._supervisor = supervisor or Supervisor(metrics)
        self.settings = settings
        self._conn = connection
        self._topo = topology
        self._keys = keys
        self._limits = limits
        self._stream: Subscription[DecodedBatch] | None = None
        self._started_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.caught_up = asyncio.Event()
        c = metrics.delivery.events_consumed
        self._m = {
            (t, o): c.labels(t.value, o)
            for t in (EventType.NEW, EventType.REMOVE)
            for o in OUTCOMES
        }
        self._replica_m = metrics.replica
        self._lag = self._replica_m.lag
        self._rejected = metrics.delivery.events_rejected
        node = settings.node_id
        self._own_keys = {session_routing_key(t, node): t for t in (EventType.NEW,
                                                                    EventType.REMOVE)}
        self._own_origins = (node, node.encode())

    @property
    def subscription(self) -> Subscription[DecodedBatch] | None:
        return self._stream

    @property
    def last_offset(self) -> int | None:
        """The stream offset of the last message applied (None before the first)."""
        return self._stream.last_offset if self._stream is not None else None

    def _open(self, inbound: Inbound) -> DecodedBatch:
        """The one place a replica decodes a message: authenticate, then parse.

        ``inbound`` carries the routing key and the broker-validated ``user_id``: the sender
        checks (user_id, origin and routing-key suffix agree; freshness) belong in this call.
        """
        return decode_batch(inbound.body, inbound.headers, self._keys,
                            sid_ctx=self.settings.sid_ctx, limits=self._limits)

    def _decode(self, inbound: Inbound) -> DecodedBatch:
        """``_open``, except that once caught up this node's own batches are skipped unopened.

        A node receives everything it publishes back; opening it only to skip it was most of
        what replication cost a node. The routing key is the broker-checked part (only this
        node's user may publish with it); a forged clear origin header can at worst make this
        node skip a message of its own.
        """
        type_ = self._own_keys.get(inbound.routing_key)
        if (
            type_ is not None
            and self.caught_up.is_set()
            and inbound.headers.get(H_ORIGIN) in self._own_origins
        ):
            return DecodedBatch(type_, self.settings.node_id, 0.0)
        return self._open(inbound)

    async def start(self) -> None:
        self._started_at = time.time()
        start: str | datetime = "next"
        if self.settings.replay:
            start = datetime.fromtimestamp(self._started_at - self.settings.session_lifetime,
                                           tz=UTC)
        self._stream = Subscription(
            self._conn, self._topo, StreamSource(self._topo.session_stream, start),
            WithEnvelope(self._decode), self._on_batch, prefetch=self.settings.prefetch,
            consumer_id=self.settings.node_id, metrics=self._metrics,
            supervisor=self._supervisor,
        )
        await self._stream.start()
        if self.settings.replay:
            self._tasks.append(self._supervisor.spawn(self._watch_replay(), "replicator"))
        else:
            self._set_caught_up()
        self._tasks.append(self._supervisor.spawn(self._housekeeping(), "replicator"))

    async def stop(self, timeout: float = 10.0) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._stream is not None:
            await self._stream.stop(timeout)

    def _set_caught_up(self) -> None:
        if not self.caught_up.is_set():
            self.caught_up.set()
            self._replica_m.caught_up.set(1)
            log.info("replica %s is warm: %d sessions", self.settings.node_id, len(self.cache))

    async def _watch_replay(self) -> None:
        """Declare the replica warm once the stream consumer has gone quiet (the history is
        delivered; what follows is live). ``_on_batch`` declares it earlier when it meets an
        event published after the start."""
        stream = self._stream
        assert stream is not None
        last = -1
        while not self.caught_up.is_set():
            await asyncio.sleep(0.5)
            handled = stream.handled
            if handled != last or not stream.idle.is_set():
                last = handled
                continue
            self._set_caught_up()

    async def _on_batch(self, batch: DecodedBatch) -> list[tuple[int, str]] | None:
        failed = self.apply(batch)
        if (not self.caught_up.is_set()
                and batch.time > self._started_at + self.settings.live_margin):
            self._set_caught_up()  # this one was published after we started: history is done
        return failed

    def apply(self, batch: DecodedBatch) -> list[tuple[int, str]] | None:
        """Apply a validated batch; returns the (index, reason) of events it had to reject.

        Synchronous: nothing between events can interleave.
        """
        type_ = batch.type
        if type_ not in (EventType.NEW, EventType.REMOVE):
            return None
        m = self._m
        put = self.cache.put
        remove = self.cache.remove
        now = time.time()
        observe = self._lag.observe
        applied = skipped = 0
        failed: list[tuple[int, str]] = []
        if type_ is EventType.NEW:
            for i, ev in enumerate(batch.events):
                assert ev.der is not None
                try:
                    # an upsert: a redelivered or replayed NEW is applied again, harmlessly
                    ok = put(ev.session_id, ev.der, expires=ev.expires, origin=ev.origin,
                             sid_ctx=ev.sid_ctx, event_time=ev.time)
                except ValueError:  # a bounded table (origins, contexts) is full
                    failed.append((i, TABLE_FULL))
                    continue
                if ok:
                    applied += 1
                    observe(max(0.0, now - ev.time))
                else:
                    skipped += 1  # removed (tombstone) or expired meanwhile
        else:
            for i, ev in enumerate(batch.events):
                try:
                    remove(ev.session_id, expires=ev.expires, event_time=ev.time)
                except ValueError:
                    failed.append((i, TABLE_FULL))
                    continue
                applied += 1
                observe(max(0.0, now - ev.time))
        if not batch.events and batch.origin == self.settings.node_id:
            skipped += 1  # an own message skipped unopened (counted per message)
        if applied:
            m[(type_, "applied")].inc(applied)
        if skipped:
            m[(type_, "skipped")].inc(skipped)
        rejected = len(batch.rejected) + len(failed)
        if rejected:
            m[(type_, "rejected")].inc(rejected)
        if failed:
            self._rejected.labels(TABLE_FULL).inc(len(failed))
            return failed
        return None

    async def _housekeeping(self) -> None:
        while True:
            self.cache.sweep()  # the replica's gauges read it at scrape time
            await asyncio.sleep(1.0)
