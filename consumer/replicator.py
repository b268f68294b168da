"""Applies peers' NEW/REMOVE events to a replica (a ``PeerCache``), after a warm-join replay.

On start it declares the node's durable replica queue (every message published from then on
reaches it) and, to warm up, replays the session stream from ``now - session lifetime``.  Once the
replay delivers a batch published after the queue existed, everything newer is in the queue too,
so the replay stops.  Duplicates between the two are harmless: applying is idempotent.

Live events of this node's own origin are skipped (the node put them in its replica when it made
them); replayed ones are applied, because a node that restarted has lost its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from sessionbus.bus.topology import Topology, declare_replica_queue
from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.consumer.subscription import QueueSource, StreamSource, Subscription
from sessionbus.metrics import OUTCOMES, Metrics
from sessionbus.schemas.codec import (
    DEFAULT_LIMITS,
    H_ORIGIN,
    H_TYPE,
    DecodedBatch,
    Limits,
    decode_batch,
)
from sessionbus.schemas.events import EventType
from sessionbus.schemas.sealing import BusKeys
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplicatorSettings:
    node_id: str
    # Only sessions of this context are taken (a TLS node); None takes all (a cache front).
    sid_ctx: bytes | None = None
    session_lifetime: float = 7200.0
    replay: bool = True
    # Clock skew allowance between origins when deciding the replay has reached live traffic.
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
        self._decode = partial(self._decode_batch, keys, settings.sid_ctx, limits)
        self._live: Subscription[DecodedBatch] | None = None
        self._replay: Subscription[DecodedBatch] | None = None
        self._queue_ready_at = 0.0
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
        self._node_id_bytes = settings.node_id.encode()


    @staticmethod
    def _decode_batch(
        keys: BusKeys, sid_ctx: bytes | None, limits: Limits, body: bytes,
        headers: Mapping[str, Any],
    ) -> DecodedBatch:
        return decode_batch(body, headers, keys, sid_ctx=sid_ctx, limits=limits)

    def _decode_live(self, body: bytes, headers: Mapping[str, Any]) -> DecodedBatch:
        """Like ``_decode``, but this node's own batches are skipped unopened.

        A node receives everything it publishes back through its replica queue; opening and
        validating it only to skip it was most of what replication cost a node.  Trusting the
        clear header here is safe: the worst a forged origin can do is make us skip a message.
        """
        origin = headers.get(H_ORIGIN)
        if origin == self.settings.node_id or origin == self._node_id_bytes:
            type_name = headers.get(H_TYPE)
            if isinstance(type_name, bytes):
                type_name = type_name.decode("ascii", "replace")
            if type_name in (EventType.NEW.value, EventType.REMOVE.value):
                return DecodedBatch(EventType(type_name), self.settings.node_id, 0.0)
        return self._decode(body, headers)

    async def start(self) -> None:
        node = self.settings.node_id

        async def declare(channel: AbstractChannel) -> AbstractQueue:
            queue = await declare_replica_queue(channel, self._topo, node)
            self._queue_ready_at = time.time()
            return queue

        self._live = Subscription(
            self._conn, self._topo, QueueSource(self._topo.replica_queue(node), declare),
            self._decode_live, self._on_live, prefetch=self.settings.prefetch,
            metrics=self._metrics, supervisor=self._supervisor,
        )
        await self._live.start()
        if self.settings.replay:
            since = datetime.fromtimestamp(
                time.time() - self.settings.session_lifetime, tz=UTC
            )
            self._replay = Subscription(
                self._conn, self._topo, StreamSource(self._topo.session_stream, since),
                self._decode, self._on_replayed, prefetch=self.settings.prefetch,
                report_rejects=False, metrics=self._metrics, supervisor=self._supervisor,
            )
            await self._replay.start()
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
        for sub in (self._replay, self._live):
            if sub is not None:
                await sub.stop(timeout)

    def _set_caught_up(self) -> None:
        if not self.caught_up.is_set():
            self.caught_up.set()
            self._replica_m.caught_up.set(1)
            log.info("replica %s is warm: %d sessions", self.settings.node_id, len(self.cache))

    async def _watch_replay(self) -> None:
        """Declare the replica warm once the replay has gone quiet (history delivered), and
        stop the replay: the queue, declared before it started, holds everything since, and
        following the stream on would apply every new event twice (this node's own unskipped,
        most of a busy cache front's CPU) until ``_on_replayed`` saw a batch newer than the
        queue. A replay that delivered nothing is stopped only after ``live_margin`` of quiet:
        a stream that is slow to start delivering must not lose its history."""
        replay = self._replay
        assert replay is not None
        last = -1
        quiet_since: float | None = None
        while True:
            await asyncio.sleep(0.5)
            handled = replay.handled
            if handled != last or not replay.idle.is_set():
                last, quiet_since = handled, None
                continue
            self._set_caught_up()
            now = time.monotonic()
            quiet_since = now if quiet_since is None else quiet_since
            if handled > 0 or now - quiet_since >= self.settings.live_margin:
                await replay.cancel()
                return

    async def _on_replayed(self, batch: DecodedBatch) -> None:
        self.apply(batch, live=False)
        if batch.time > self._queue_ready_at + self.settings.live_margin:
            # Everything from here on reaches the replica queue as well.
            self._set_caught_up()
            if self._replay is not None:
                asyncio.get_running_loop().create_task(self._replay.cancel())
        return None

    async def _on_live(self, batch: DecodedBatch) -> None:
        self.apply(batch, live=True)
        return None

    def apply(self, batch: DecodedBatch, *, live: bool) -> None:
        """Apply a validated batch. Synchronous: nothing between events can interleave."""
        type_ = batch.type
        if type_ not in (EventType.NEW, EventType.REMOVE):
            return
        m = self._m
        if live and batch.origin == self.settings.node_id:
            m[(type_, "skipped")].inc(len(batch.events))
            return
        put = self.cache.put
        remove = self.cache.remove
        now = time.time()
        observe = self._lag.observe
        applied = skipped = 0
        if type_ is EventType.NEW:
            for ev in batch.events:
                assert ev.der is not None
                # an upsert: a redelivered or replayed NEW is applied again, harmlessly
                if put(ev.session_id, ev.der, expires=ev.expires, origin=ev.origin,
                       sid_ctx=ev.sid_ctx, event_time=ev.time):
                    applied += 1
                    observe(max(0.0, now - ev.time))
                else:
                    skipped += 1  # removed (tombstone) or expired meanwhile
        else:
            for ev in batch.events:
                remove(ev.session_id, expires=ev.expires, event_time=ev.time)
                applied += 1
                observe(max(0.0, now - ev.time))
        if applied:
            m[(type_, "applied")].inc(applied)
        if skipped:
            m[(type_, "skipped")].inc(skipped)
        if batch.rejected:
            m[(type_, "rejected")].inc(len(batch.rejected))

    async def _housekeeping(self) -> None:
        while True:
            self.cache.sweep()  # the replica's gauges read it at scrape time
            await asyncio.sleep(1.0)
