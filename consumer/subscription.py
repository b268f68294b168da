"""A queue or a stream → validated messages → a handler, with dead-lettering and offset tracking.

One subscription owns one robust channel.  Deliveries are handled one at a time, in order, so a
handler sees the events of one session in the order they were published.  A message is acked
only after its handler returned, so a process that dies never loses an acked message.

Messages that fail validation are counted by reason and a copy (with the reason in a header) is
published to the dead-letter exchange, then the original is acked.  Streams forbid reject/nack
(RabbitMQ closes the connection), so this one path serves queues and streams alike, and the copy
carries a reason that native dead-lettering could not.

A stream consumer remembers the last offset it handled and, whenever its channel reopens (broker
reconnect), subscribes again from the next one: aio-pika's own recovery would replay from the
original start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)

from sessionbus.bus.connection import BROKER_ERRORS
from sessionbus.bus.topology import Topology
from sessionbus.metrics import Metrics
from sessionbus.schemas.codec import H_REASON, DecodedBatch
from sessionbus.schemas.errors import EnvelopeError, Reason
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)

T = TypeVar("T")

Decoder = Callable[[bytes, Mapping[str, Any]], T]
# A handler returns the (index, reason) of events it could not handle, which get dead-lettered.
Handler = Callable[[T], Awaitable[list[tuple[int, str]] | None]]


@dataclass(frozen=True, slots=True)
class QueueSource:
    name: str
    declare: Callable[[AbstractChannel], Awaitable[AbstractQueue]] | None = None


@dataclass(frozen=True, slots=True)
class StreamSource:
    name: str
    start: str | int | datetime = "next"  # "first", "next", an offset, or a point in time


class Subscription(Generic[T]):
    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        source: QueueSource | StreamSource,
        decode: Decoder[T],
        handler: Handler[T],
        *,
        prefetch: int = 64,
        report_rejects: bool = True,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._conn = connection
        self._m = (metrics or Metrics()).delivery
        self._supervisor = supervisor or Supervisor(metrics)
        # False for a replay of messages live consumers already judged: counting and
        # dead-lettering them again would double every reject.
        self._report = report_rejects
        self._topo = topology
        self._source = source
        self._decode = decode
        self._handler = handler
        self._prefetch = prefetch
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._stopping = False
        self._closing = False
        self._busy = False
        self.last_offset: int | None = None  # streams: the last offset handled
        self.handled = 0  # messages handled (acked)
        self.idle = asyncio.Event()  # set whenever the inbox is empty and nothing is in flight
        self.idle.set()

    @property
    def source(self) -> QueueSource | StreamSource:
        return self._source

    async def start(self) -> None:
        channel = await self._conn.channel(publisher_confirms=True)
        assert isinstance(channel, AbstractRobustChannel)
        try:
            await channel.set_qos(prefetch_count=self._prefetch)
            if isinstance(self._source, QueueSource) and self._source.declare is not None:
                self._queue = await self._source.declare(channel)
            else:
                self._queue = await channel.get_queue(self._source.name, ensure=True)
        except BaseException:
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()
            raise
        self._channel = channel
        channel.reopen_callbacks.add(self._on_reopen)
        self._worker = self._supervisor.spawn(self._work(), "subscription")
        await self._consume()

    def _consume_arguments(self) -> dict[str, Any]:
        if not isinstance(self._source, StreamSource):
            return {}
        start = self._source.start if self.last_offset is None else self.last_offset + 1
        return {"x-stream-offset": start}

    async def _consume(self) -> None:
        assert self._queue is not None
        # robust=False: after a reconnect _on_reopen subscribes again with the offset we reached.
        queue = self._queue
        assert isinstance(queue, AbstractRobustQueue)
        self._tag = await queue.consume(
            self._deliver, arguments=self._consume_arguments(), robust=False
        )

    async def _on_reopen(self, *_: Any) -> None:
        if self._stopping:
            return
        log.info("subscription %s: channel reopened, subscribing again", self._source.name)
        try:
            await self._consume()
        except BROKER_ERRORS as exc:  # the next reopen tries again
            log.warning("subscription %s: resubscribe failed: %s", self._source.name, exc)

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        self.idle.clear()
        self._inbox.put_nowait(message)

    async def cancel(self) -> None:
        """Stop receiving new deliveries (what is already here is still handled)."""
        self._stopping = True
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                await asyncio.wait_for(self._queue.cancel(self._tag), 5)
            self._tag = None

    async def stop(self, timeout: float = 10.0) -> bool:
        """Stop: no new deliveries, finish the message being handled within ``timeout``, close.

        Messages delivered but not started are left unacked: closing the channel hands them
        back to the broker (a queue redelivers them; a stream resumes from the offset reached).
        Returns True if the handler finished in time.
        """
        await self.cancel()
        self._closing = True
        finished = True
        try:
            await asyncio.wait_for(self._busy_done(), timeout)
        except TimeoutError:
            finished = False
            log.warning("subscription %s: handler still busy after %.0fs; stopping it",
                        self._source.name, timeout)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await self._channel.close()
        return finished

    async def _busy_done(self) -> None:
        while self._busy:
            await asyncio.sleep(0.01)

    async def drained(self, timeout: float) -> bool:
        """Wait until everything delivered so far has been handled (tests, warm-up)."""
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _work(self) -> None:
        while not self._closing:
            message = await self._inbox.get()
            if self._closing:
                break
            self._busy = True
            # An exception here is a bug, not bad input (that is rejected and dead-lettered):
            # it ends the task, and the supervisor ends the process, instead of a replica that
            # silently stops applying.
            try:
                await self._handle(message)
            finally:
                self._busy = False
                if self._inbox.empty():
                    self.idle.set()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            closed = message.channel.is_closed  # aio-pika raises once that channel is closed
        except aiormq.exceptions.ChannelInvalidStateError:
            closed = True
        if closed:
            return  # from a channel that is gone: the broker redelivers it (queue) or we resume
        offset = None
        if isinstance(self._source, StreamSource):
            raw = (message.headers or {}).get("x-stream-offset")
            offset = raw if isinstance(raw, int) else None
            if offset is not None and self.last_offset is not None and offset <= self.last_offset:
                return  # already handled before a resubscribe
        headers: Mapping[str, Any] = message.headers or {}
        try:
            decoded = self._decode(message.body, headers)
        except EnvelopeError as exc:
            if self._report:
                self._m.events_rejected.labels(exc.reason.value).inc()
                await self._dead_letter(message, exc.reason.value)
        else:
            failed = await self._handler(decoded) or []
            if isinstance(decoded, DecodedBatch) and decoded.rejected and self._report:
                for r in decoded.rejected:
                    self._m.events_rejected.labels(r.reason).inc()
                failed = [(r.index, r.reason) for r in decoded.rejected] + failed
            if failed:
                await self._dead_letter(message, failed[0][1], [i for i, _ in failed])
        if offset is not None:
            self.last_offset = offset
        with contextlib.suppress(*BROKER_ERRORS):  # a closed channel: redelivered, applied again
            await message.ack()
        self.handled += 1

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, indexes: list[int] | None = None
    ) -> None:
        assert self._channel is not None
        headers: dict[str, Any] = dict(message.headers or {})
        headers[H_REASON] = reason
        headers["sessionbus-source"] = self._source.name
        if indexes is not None:
            headers["sessionbus-rejected-indexes"] = indexes[:256]
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        for attempt in range(3):
            try:
                exchange = await self._channel.get_exchange(self._topo.dlx, ensure=False)
                await asyncio.wait_for(exchange.publish(copy, routing_key=reason), 10)
                self._m.dead_lettered.labels(
                    reason if reason in Reason._value2member_map_ else Reason.MALFORMED.value
                ).inc()
                return
            except BROKER_ERRORS as exc:
                log.warning("dead-letter publish failed (attempt %d): %s", attempt + 1,
                            type(exc).__name__)
                await asyncio.sleep(0.5 * (attempt + 1))
        # Give up on the copy but do not block the subscription; the count says it happened.
        log.error("could not dead-letter a message (reason %s)", reason)
