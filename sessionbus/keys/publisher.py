"""``sessionbus keys``: generates the farm's ticket keys on a schedule and publishes the ring.

Several publishers may run for availability; exactly one rotates at a time.  The lock is an
exclusive queue (``<prefix>.keys.leader``) that the broker holds for one live connection: a
second declare gets 405 RESOURCE_LOCKED; when the holder's process dies the broker drops the
queue at once, and when it merely freezes, once the connection's (short) heartbeat times out.
Standbys try to take it every ``retry_every`` seconds.

The leader publishes on the very connection that holds the lock, so a leader that lost the lock
(frozen, partitioned) cannot get one more ring onto the bus: the broker has closed that connection
and takes nothing more from it.

On taking the lock the leader first reads the current ring back from the key stream and continues
its timeline (``sessionbus.keys.ring.advance``): keys that are live stay exactly as they are, so a
failover breaks no ticket.  It then publishes (sealed, persistent, with publisher confirms) each
ring that differs from the last, and the unchanged ring every ``Timeline.refresh_every`` seconds
so that the key stream's last chunk always holds it for a node that starts.

Key material never leaves this process except sealed: logs carry counts, times and key-name
prefixes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractRobustConnection
from aiormq.exceptions import AMQPError, ChannelLockedResource

from sessionbus.bus.connection import BROKER_ERRORS, BrokerSettings, connect, connect_once, retry
from sessionbus.bus.topology import (
    Topology,
    check_keys,
    check_with,
    key_routing_key,
)
from sessionbus.keys.follower import KeyFollower
from sessionbus.keys.ring import Timeline, added_keys, advance, describe, newest
from sessionbus.metrics import Metrics
from sessionbus.schemas.codec import CONTENT_TYPE, encode_key_ring, sender_user
from sessionbus.schemas.sealing import BusKeys
from sessionbus.schemas.ticket_keys import KeyRing
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PublisherSettings:
    publisher_id: str  # the origin of the rings it publishes: routing key ``keys.<id>``
    timeline: Timeline = Timeline()  # noqa: RUF009 - frozen
    # Heartbeat of the lock connection: a frozen leader loses the lock after ~2 heartbeats.
    lock_heartbeat: int = 2
    retry_every: float = 1.0  # standbys try to take the lock this often
    read_timeout: float = 3.0  # a new leader waits this long for the ring on the key stream
    publish_timeout: float = 10.0


class LostLock(Exception):
    """The lock connection closed or a publish on it failed: stop leading."""


class KeyPublisher:
    def __init__(
        self,
        settings: PublisherSettings,
        broker: BrokerSettings,
        keys: BusKeys,
        topology: Topology,
        *,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.s = settings
        self._metrics = metrics = metrics or Metrics()
        self.supervisor = supervisor or Supervisor(metrics)
        self._pm = metrics.publisher
        self._broker = broker
        self._keys = keys
        self._topo = topology
        self.leading = asyncio.Event()  # set while this process holds the lock
        self.ring: KeyRing | None = None  # the last ring this process published
        self._connection: AbstractRobustConnection | None = None
        self._follower: KeyFollower | None = None
        self._lock_conn: AbstractConnection | None = None
        self._bus_ready = asyncio.Event()  # the key stream exists and is followed
        self._standing_by = False
        self._unreachable = False
        self._ids = itertools.count(1)  # unique message ids (aiormq matches confirms by them)
        self._published = {
            r: self._pm.rings_published.labels(r) for r in ("change", "refresh")
        }
        self._pm.leader.set(0)

    # --- lifetime ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stand by or lead until ``stop`` is set; then release the lock."""
        follow = self.supervisor.spawn(self._follow(), "key-follower")
        try:
            # Follow the key stream before competing for the lock: a leader needs the ring.
            await _wait_any(stop, self._bus_ready, None)
            while not stop.is_set():
                channel = await self._try_lock()
                if channel is None:
                    await _wait(stop, self.s.retry_every)
                    continue
                self._standing_by = False
                try:
                    await self._lead(channel, stop)
                except LostLock as exc:
                    log.warning("key publisher %s: lost the lock (%s); standing by",
                                self.s.publisher_id, exc)
                except BROKER_ERRORS as exc:  # a channel error while leading: give the lock up
                    log.warning("key publisher %s: giving up the lock after %s; standing by",
                                self.s.publisher_id, _describe_error(exc))
                finally:
                    self.leading.clear()
                    self._pm.leader.set(0)
                    await self._drop_lock_connection()
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow
            await self._drop_lock_connection()
            if self._follower is not None:
                with contextlib.suppress(*BROKER_ERRORS):
                    await self._follower.stop()
            if self._connection is not None:
                with contextlib.suppress(*BROKER_ERRORS):
                    await self._connection.close()

    async def _follow(self) -> None:
        """Follow the key stream all the time (standby or leader): exports the ring size and
        newest-key age the farm sees, and holds the newest ring for a takeover."""
        self._connection = conn = await connect(
            replace(self._broker, name=f"sessionbus keys {self.s.publisher_id}"),
            wait=False, on_state=self._metrics.bus.broker_state,
        )
        await conn.connected.wait()
        await retry(
            lambda: check_with(conn, self._topo, check_keys), "finding the key stream"
        )
        # The farm's view of the ring (this leader's own rings included) is what is exported.
        self._follower = KeyFollower(self._connection, self._topo, self._keys,
                                     metrics=self._metrics, supervisor=self.supervisor)
        await retry(self._follower.start, "following the key stream")
        self._bus_ready.set()

    # --- the lock ---------------------------------------------------------------------------

    async def _try_lock(self) -> AbstractChannel | None:
        """A confirming channel on the connection that now holds the lock, or None."""
        try:
            if self._lock_conn is None or self._lock_conn.is_closed:
                self._lock_conn = await self._open_lock_connection()
            channel = await self._lock_conn.channel(publisher_confirms=True)
        except BROKER_ERRORS as exc:
            if not self._unreachable:  # once per outage, not every second
                log.warning("key publisher %s: cannot reach the broker for the lock (%s)",
                            self.s.publisher_id, type(exc).__name__)
                self._unreachable = True
            await self._drop_lock_connection()
            return None
        self._unreachable = False
        try:
            await channel.declare_queue(self._topo.keys_lock_queue, exclusive=True)
        except ChannelLockedResource:
            # Another publisher leads (the broker closed this channel, not the connection).
            if not self._standing_by:
                log.info("key publisher %s: another publisher leads; standing by",
                         self.s.publisher_id)
                self._standing_by = True
            return None
        except BROKER_ERRORS as exc:
            log.warning("key publisher %s: lock attempt failed (%s)", self.s.publisher_id,
                        _describe_error(exc))
            await self._drop_lock_connection()
            return None
        return channel

    async def _open_lock_connection(self) -> AbstractConnection:
        return await connect_once(self._broker, f"sessionbus keys {self.s.publisher_id} lock",
                                  self.s.lock_heartbeat)

    async def _drop_lock_connection(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None and not conn.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await asyncio.wait_for(conn.close(), 5)

    # --- leading ----------------------------------------------------------------------------

    async def _lead(self, channel: AbstractChannel, stop: asyncio.Event) -> None:
        conn = self._lock_conn
        assert conn is not None
        lost = asyncio.Event()
        conn.close_callbacks.add(lambda *_: lost.set())
        self.leading.set()
        self._pm.leader.set(1)
        log.info("key publisher %s: leading (holds %s)", self.s.publisher_id,
                 self._topo.keys_lock_queue)
        exchange = await check_keys(channel, self._topo)

        async def publish(ring: KeyRing, reason: str) -> None:
            if conn.is_closed or lost.is_set():
                raise LostLock("lock connection closed")
            body, headers = encode_key_ring(ring, self.s.publisher_id, self._keys)
            message = aio_pika.Message(
                body, headers=headers, content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=f"{self.s.publisher_id}.ring.{ring.seq}.{next(self._ids)}",
                timestamp=time.time(), user_id=sender_user(self._broker.url),
            )
            try:
                await asyncio.wait_for(
                    exchange.publish(
                        message, key_routing_key(self.s.publisher_id), mandatory=True
                    ),
                    self.s.publish_timeout,
                )
            except BROKER_ERRORS as exc:
                raise LostLock(f"publish failed: {type(exc).__name__}") from None
            self._published[reason].inc()

        ring = await self._read_ring()
        if ring is not None:
            log.info("key publisher %s: continuing %s", self.s.publisher_id,
                     describe(ring, time.time()))
        else:
            log.info("key publisher %s: no ring on the key stream; starting a new timeline",
                     self.s.publisher_id)
        last_publish = float("-inf")
        tl = self.s.timeline
        # Wake this much before a key is due, so that a late wake-up (scheduling, a slow
        # publish) does not push the next encrypt window back.
        early = min(0.5, tl.announce_ahead / 4)
        while not stop.is_set():
            if lost.is_set():
                raise LostLock("lock connection closed")
            now = time.time()
            new, next_change = advance(ring, now, tl, early=early)
            if new is not ring:
                await publish(new, "change")
                rotations = added_keys(ring, new)
                self._pm.rotations.inc(rotations)
                log.info("key publisher %s: published %s%s", self.s.publisher_id,
                         describe(new, now), f", {rotations} new" if rotations else "")
                ring, last_publish = new, now
            elif now - last_publish >= tl.refresh_every:
                await publish(ring, "refresh")
                last_publish = now
            self.ring = ring
            wake = min(next_change, last_publish + tl.refresh_every)
            await _wait_any(stop, lost, max(0.01, wake - time.time()))

    async def _read_ring(self) -> KeyRing | None:
        """The newest ring on the key stream, read after taking the lock (nothing else publishes
        from now on), or None if the stream holds none."""
        assert self._connection is not None
        # From a few refresh periods back, not the last chunk only: rings that every follower
        # refuses (forged, if someone could write the stream) may fill the last chunk, and the
        # genuine ring refreshed before them must still be found.
        since = datetime.fromtimestamp(
            time.time() - 3 * self.s.timeline.refresh_every - 5, tz=UTC)
        fresh = KeyFollower(self._connection, self._topo, self._keys, export=False,
                            metrics=self._metrics, supervisor=self.supervisor, start=since)
        try:
            await asyncio.wait_for(fresh.start(), self.s.read_timeout + 10)
            if await fresh.wait(self.s.read_timeout) is not None:
                # The last chunk may hold several rings, delivered together: let them land.
                for _ in range(20):
                    seen = fresh.ring
                    await asyncio.sleep(0.05)
                    if fresh.ring is seen:
                        break
            found = fresh.ring
        except BROKER_ERRORS as exc:
            raise LostLock(f"cannot read the key stream: {type(exc).__name__}") from None
        finally:
            with contextlib.suppress(*BROKER_ERRORS):
                await fresh.stop()
        held = self._follower.ring if self._follower is not None else None
        return newest(newest(found, held), self.ring)


def _describe_error(exc: Exception) -> str:
    """The exception's type, and the broker's reply text for AMQP errors (which cannot hold
    key material: the broker only ever sees sealed rings). Never other exceptions' text."""
    if isinstance(exc, AMQPError):
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return type(exc).__name__


async def _wait(stop: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout)


async def _wait_any(a: asyncio.Event, b: asyncio.Event, timeout: float | None) -> None:
    tasks = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
