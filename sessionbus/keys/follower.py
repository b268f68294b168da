"""Follows the key stream: the newest ticket-key ring, at once on start and at every change.

Starting from the stream's last chunk delivers the current ring immediately; a ring only replaces
the one held if it is newer (by issue time, then sequence), so a replayed or reordered older ring
never rolls the farm back.  When the publisher goes silent the last ring stays in force, and the
age metric says how old its newest key is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelNotFoundEntity

from sessionbus.bus.topology import Topology
from sessionbus.consumer import metrics
from sessionbus.consumer.subscription import StreamSource, Subscription
from sessionbus.schemas.codec import decode_key_ring
from sessionbus.schemas.sealing import BusKeys
from sessionbus.schemas.ticket_keys import KeyRing

log = logging.getLogger(__name__)


class KeyFollower:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        keys: BusKeys,
        on_ring: Callable[[KeyRing], None] | None = None,
    ) -> None:
        self.ring: KeyRing | None = None
        self.received = asyncio.Event()
        self._on_ring = on_ring

        def decode(body: bytes, headers: Mapping[str, Any]) -> KeyRing:
            return decode_key_ring(body, headers, keys)

        self._sub: Subscription[KeyRing] = Subscription(
            connection, topology, StreamSource(topology.key_stream, "last"), decode,
            self._handle, prefetch=16,
        )
        # Catch-up after any reconnect: forget the offset reached, so the restored channel
        # subscribes from the stream's last chunk again (the current ring at once) instead of
        # resuming after the last ring seen; older rings it may re-read are ignored below.
        connection.close_callbacks.add(self._forget_offset)
        self._age_task: asyncio.Task[None] | None = None
        self._wait_task: asyncio.Task[None] | None = None
        self._stream = topology.key_stream

    def _forget_offset(self, *_: Any) -> None:
        self._sub.last_offset = None

    async def start(self) -> None:
        """Subscribe; if the key stream does not exist yet (no key publisher has run), keep
        waiting for it in the background: only the key publisher declares it."""
        try:
            await self._sub.start()
        except ChannelNotFoundEntity:
            log.info("no key stream %s yet: waiting for a key publisher", self._stream)
            self._wait_task = asyncio.get_running_loop().create_task(self._subscribe_later())
        self._age_task = asyncio.get_running_loop().create_task(self._report_age())

    async def _subscribe_later(self) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await self._sub.start()
            except ChannelNotFoundEntity:
                delay = min(delay * 2, 5.0)
                continue
            log.info("key stream %s found: following it", self._stream)
            return

    async def stop(self) -> None:
        for task in (self._wait_task, self._age_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._sub.stop(5)

    async def wait(self, timeout: float) -> KeyRing | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.received.wait(), timeout)
        return self.ring

    async def _handle(self, ring: KeyRing) -> list[tuple[int, str]] | None:
        held = self.ring
        if held is not None and (ring.issued_at, ring.seq) <= (held.issued_at, held.seq):
            return None
        self.ring = ring
        self.received.set()
        log.info("ticket key ring %d: %d keys", ring.seq, len(ring.keys))
        self._export(time.time())
        if self._on_ring is not None:
            self._on_ring(ring)
        return None

    def _export(self, now: float) -> None:
        ring = self.ring
        if ring is None:
            return
        metrics.TICKET_KEYS.set(len(ring.live(now)))
        newest = ring.newest_published_at()
        if newest is not None:
            metrics.TICKET_KEY_NEWEST_AGE.set(max(0.0, now - newest))

    async def _report_age(self) -> None:
        while True:
            self._export(time.time())
            await asyncio.sleep(1.0)
