"""Best-effort copies of rejected messages to the dead-letter exchange, off the consuming path.

A consumer hands a copy over with ``offer`` (never waits) and acks the original at once; one task
publishes the copies on a channel of its own, each publish bounded by a timeout.  When the copy
cannot go (no DLX, its broker node down, a refused routing key, the backlog full) it is dropped
and counted: a dead letter is for inspection, and must never stall replication or an ack.  A
failed publish closes only this channel (the broker answers a missing exchange with a channel
error), never the consumer's.

Routing key ``dead.<reason>.<username>`` on a topic DLX: each broker user may write only its own
suffix, so nobody can route into a stream through it or pose as another sender's dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from sessionbus.bus.topology import Topology, dead_letter_key
from sessionbus.metrics import DeliveryMetrics
from sessionbus.schemas.errors import Reason
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)


def broker_username(connection: Any) -> str:
    """The user a connection logged in as (the routing-key suffix topic permissions allow)."""
    url = getattr(connection, "url", None)
    user = getattr(url, "user", None)
    return user if isinstance(user, str) and user else "guest"


class DeadLetters:
    def __init__(
        self,
        connection: AbstractConnection,
        topology: Topology,
        metrics: DeliveryMetrics,
        supervisor: Supervisor,
        *,
        max_messages: int = 10_000,
        max_bytes: int = 256 * 2**20,
        in_flight: int = 128,
        timeout: float = 5.0,
        retry_after: float = 1.0,
    ) -> None:
        self._conn = connection
        self._topo = topology
        self._m = metrics
        self._supervisor = supervisor
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._retry_after = retry_after
        self._in_flight = in_flight
        self._sending = 0  # copies awaiting their confirm
        self._failed_at = -1e9  # monotonic time of the last failed publish
        self._pending: deque[tuple[aio_pika.Message, str]] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel: AbstractChannel | None = None
        self._user = broker_username(connection)
        self.sent = 0
        self.lost = 0

    def offer(self, message: aio_pika.Message, reason: str) -> None:
        """Queue a copy for the DLX; drops it (counted) when the backlog is full. Never waits."""
        size = len(message.body)
        if len(self._pending) >= self._max_messages or self._bytes + size > self._max_bytes:
            self._lose(reason, "backlog full")
            return
        self._pending.append((message, reason))
        self._bytes += size
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = self._supervisor.spawn(self._run(), "dead-letters")

    @property
    def pending(self) -> int:
        """Copies not yet sent or dropped (queued or awaiting their confirm)."""
        return len(self._pending) + self._sending

    def _lose(self, reason: str, why: str) -> None:
        self.lost += 1
        self._m.dead_letters_lost.inc()
        if self.lost == 1 or self.lost % 1000 == 0:  # a line per thousand, not per message
            log.warning("dead letter (reason %s) not kept: %s (%d so far)", reason, why,
                        self.lost)

    async def _run(self) -> None:
        """Publish the backlog, up to ``in_flight`` copies awaiting confirms at once (a flood of
        bad messages must not outrun one-at-a-time confirms and overflow the backlog)."""
        slots = asyncio.Semaphore(self._in_flight)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await slots.acquire()
                if not self._pending:
                    slots.release()
                    continue
                pause = self._failed_at + self._retry_after - time.monotonic()
                if pause > 0:  # after a failure, wait before trying again (a backlog meanwhile)
                    slots.release()
                    await asyncio.sleep(pause)
                    continue
                message, reason = self._pending.popleft()
                self._bytes -= len(message.body)
                self._sending += 1  # counted as pending from here until _publish is done
                try:
                    channel = await self._open()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._sending -= 1
                    slots.release()
                    self._lose(reason, type(exc).__name__)
                    self._failed_at = time.monotonic()
                    continue
                task = asyncio.get_running_loop().create_task(
                    self._publish(channel, message, reason, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for t in tasks:
                t.cancel()

    async def _publish(self, channel: AbstractChannel, message: aio_pika.Message, reason: str,
                       slots: asyncio.Semaphore) -> None:
        try:
            exchange = await channel.get_exchange(self._topo.dlx, ensure=False)
            await asyncio.wait_for(
                exchange.publish(message, dead_letter_key(reason, self._user)), self._timeout
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lose(reason, type(exc).__name__)
            self._failed_at = time.monotonic()
            if self._channel is channel:
                await self._close()
            return
        finally:
            self._sending -= 1
            slots.release()
        self.sent += 1
        self._m.dead_lettered.labels(
            reason if reason in Reason._value2member_map_ else Reason.MALFORMED.value
        ).inc()

    async def _open(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await asyncio.wait_for(
                self._conn.channel(publisher_confirms=True), self._timeout
            )
        return self._channel

    async def _close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 2)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close()
