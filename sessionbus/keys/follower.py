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
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelNotFoundEntity

from sessionbus.bus.topology import Topology
from sessionbus.consumer.subscription import StreamSource, Subscription
from sessionbus.keys.ring import newest
from sessionbus.metrics import Metrics
from sessionbus.schemas.codec import decode_key_ring
from sessionbus.schemas.sealing import BusKeys
from sessionbus.schemas.ticket_keys import KeyRing
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)


class KeyFollower:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        keys: BusKeys,
        on_ring: Callable[[KeyRing], None] | None = None,
        *,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
        export: bool = True,
        start: str | datetime = "last",
    ) -> None:
        self.ring: KeyRing | None = None
        metrics = metrics or Metrics()
        if export:  # a publisher's one-off read of the stream exports nothing
            metrics.key_ring.watch(lambda: self.ring)
        self._supervisor = supervisor or Supervisor(metrics)
        self.received = asyncio.Event()
        self._on_ring = on_ring

        def decode(body: bytes, headers: Mapping[str, Any]) -> KeyRing:
            return decode_key_ring(body, headers, keys)

        self._sub: Subscription[KeyRing] = Subscription(
            connection, topology, StreamSource(topology.key_stream, start), decode,
            self._handle, prefetch=16, metrics=metrics, supervisor=self._supervisor,
        )
        # Catch-up after any reconnect: forget the offset reached, so the restored channel
        # subscribes from the stream's last chunk again (the current ring at once) instead of
        # resuming after the last ring seen; older rings it may re-read are ignored below.
        connection.close_callbacks.add(self._forget_offset)
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
            self._wait_task = self._supervisor.spawn(self._subscribe_later(), "key-follower")

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
        for task in (self._wait_task,):
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
        if newest(self.ring, ring) is not ring:
            return None  # not newer than the ring held
        self.ring = ring
        self.received.set()
        log.info("ticket key ring %d: %d keys", ring.seq, len(ring.keys))
        if self._on_ring is not None:
            self._on_ring(ring)
        return None
