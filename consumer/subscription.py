"""A queue or a stream → validated messages → a handler, with dead-lettering and offset tracking.

One subscription owns one robust channel.  Deliveries are handled one at a time, in order, so a
handler sees the events of one session in the order they were published.  A message is acked
only after its handler returned, so a process that dies never loses an acked message.

Messages that fail validation are counted by reason and acked; a copy (with the reason in a header)
goes to the dead-letter exchange *best effort* (``dead_letters.DeadLetters``: bounded, on a
channel of its own, never awaited before the ack).  Streams forbid reject/nack (RabbitMQ closes
the connection), so this one path serves queues and streams alike, and the copy carries a reason
that native dead-lettering could not.

A stream consumer remembers the last offset it handled and, whenever it has to subscribe again
(its channel reopened after a reconnect, or the broker cancelled the consumer, as it does when a
stream's leader moves), subscribes from the next one.  aio-pika's own recovery would re-run the
original consume, from the original start: the consumer is registered non-robust and re-made
here with the offset reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

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
from sessionbus.consumer.dead_letters import DeadLetters
from sessionbus.metrics import Metrics
from sessionbus.schemas.codec import H_REASON, DecodedBatch, delivery_headers
from sessionbus.schemas.errors import EnvelopeError
from sessionbus.schemas.freshness import Freshness
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)

T = TypeVar("T")

Decoder = Callable[[bytes, Mapping[str, Any]], T]


class Inbound(NamedTuple):
    """What a delivery says about itself, for a decoder that checks the sender: the
    broker-validated ``user_id`` and the routing key (whose suffix is the origin)."""

    body: bytes
    headers: Mapping[str, Any]
    routing_key: str
    user_id: str | None


@dataclass(frozen=True, slots=True)
class WithEnvelope(Generic[T]):
    """Wraps a decoder that takes the whole ``Inbound`` instead of (body, headers)."""

    decode: Callable[[Inbound], T]

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
        decode: Decoder[T] | WithEnvelope[T],
        handler: Handler[T],
        *,
        prefetch: int = 64,
        report_rejects: bool = True,
        consumer_id: str | None = None,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._conn = connection
        self._consumer_id = consumer_id  # named in dead letters: which replica judged it
        self._m = (metrics or Metrics()).delivery
        self._supervisor = supervisor or Supervisor(metrics)
        # False for a replay of messages live consumers already judged: counting and
        # dead-lettering them again would double every reject.
        self._report = report_rejects
        self._topo = topology
        self._source = source
        self._decode_fn: Callable[[AbstractIncomingMessage, dict[str, Any]], T] = (
            _with_envelope(decode.decode) if isinstance(decode, WithEnvelope)
            else _body_and_headers(decode)
        )
        self._handler = handler
        self._prefetch = prefetch
        self._dead = DeadLetters(connection, topology, self._m, self._supervisor)
        self._resubscribing: asyncio.Task[None] | None = None
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._freshness = Freshness()  # replay state of this delivery path (see codec)
        self._worker: asyncio.Task[None] | None = None
        self._stopping = False
        self._closing = False
        self._busy = False
        self.last_offset: int | None = None  # streams: the last offset handled
        self.handled = 0  # messages handled (acked)
        self.delivered = 0  # deliveries received (a resubscribe from too far back shows here)
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
        assert self._channel is not None
        underlay = await self._channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)

    def _on_cancelled(self, frame: Any) -> None:
        """The broker cancelled our consumer (a stream's leader moved, the queue went away):
        subscribe again from the offset reached, retrying until it works or we stop."""
        if self._stopping or getattr(frame, "consumer_tag", None) != self._tag:
            return
        log.warning("subscription %s: consumer cancelled by the broker; resubscribing",
                    self._source.name)
        self._tag = None
        if self._resubscribing is None or self._resubscribing.done():
            self._resubscribing = self._supervisor.spawn(self._resubscribe(), "subscription")

    async def _resubscribe(self) -> None:
        delay = 0.2
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                if self._channel is None or self._channel.is_closed:
                    return  # the channel's reopen callback subscribes again
                await self._consume()
                return
            except Exception as exc:
                log.warning("subscription %s: resubscribe failed: %s", self._source.name,
                            type(exc).__name__)
                delay = min(delay * 2, 5.0)

    async def _on_reopen(self, *_: Any) -> None:
        if self._stopping:
            return
        log.info("subscription %s: channel reopened, subscribing again", self._source.name)
        try:
            await self._consume()
        except BROKER_ERRORS as exc:  # the next reopen tries again
            log.warning("subscription %s: resubscribe failed: %s", self._source.name, exc)

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        self.delivered += 1
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
        for task in (self._worker, self._resubscribing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._dead.stop()
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
        # the delivery (routing key, broker-checked user, replay state) goes with the headers
        headers: dict[str, Any] = delivery_headers(message, self._freshness)
        try:
            decoded = self._decode_fn(message, headers)
        except EnvelopeError as exc:
            if self._report:
                self._m.events_rejected.labels(exc.reason.value).inc()
                self._dead_letter(message, exc.reason.value)
        else:
            failed = await self._handler(decoded) or []
            if isinstance(decoded, DecodedBatch) and decoded.rejected and self._report:
                for r in decoded.rejected:
                    self._m.events_rejected.labels(r.reason).inc()
                failed = [(r.index, r.reason) for r in decoded.rejected] + failed
            if failed:
                self._dead_letter(message, failed[0][1], [i for i, _ in failed])
        if offset is not None:
            self.last_offset = offset
        with contextlib.suppress(*BROKER_ERRORS):  # a closed channel: redelivered, applied again
            await message.ack()
        self.handled += 1

    def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, indexes: list[int] | None = None
    ) -> None:
        """Hand a copy to the dead-letter publisher (best effort, never waits)."""
        headers: dict[str, Any] = dict(message.headers or {})
        headers[H_REASON] = reason
        headers["sessionbus-source"] = self._source.name
        if self._consumer_id is not None:
            headers["sessionbus-rejected-by"] = self._consumer_id
        if indexes is not None:
            headers["sessionbus-rejected-indexes"] = indexes[:256]
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        self._dead.offer(copy, reason)

    async def dead_letters_flushed(self, timeout: float) -> bool:
        """Wait until the dead-letter copies offered so far were sent or dropped (tests)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._dead.pending:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True


def _body_and_headers(
    decode: Decoder[T],
) -> Callable[[AbstractIncomingMessage, dict[str, Any]], T]:
    def run(message: AbstractIncomingMessage, headers: dict[str, Any]) -> T:
        return decode(message.body, headers)
    return run


def _with_envelope(
    decode: Callable[[Inbound], T],
) -> Callable[[AbstractIncomingMessage, dict[str, Any]], T]:
    def run(message: AbstractIncomingMessage, headers: dict[str, Any]) -> T:
        return decode(Inbound(message.body, headers, message.routing_key or "",
                              message.user_id))
    return run
