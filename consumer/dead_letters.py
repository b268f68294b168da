"""Reading the dead-letter queue: list what was rejected and why, re-queue or drop it.

Works on whatever the DLX routes into ``Topology.dead_queue`` (fanout or topic exchange alike): a
dead-lettered copy is recognised by its ``sessionbus-reject-reason`` header, and
``sessionbus-source`` names the queue or stream it came from. Messages are taken with basic.get
and left unacknowledged until the walk ends, so each is seen once per walk; what is neither
replayed nor purged goes back when the channel closes. Output never holds session ids, session
bytes or keys: a session is named by ``session_ref`` only.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from sessionbus.bus.topology import Topology
from sessionbus.consumer.worker import H_REPLAY_INDEXES, session_ref
from sessionbus.schemas.codec import H_REASON, decode_batch
from sessionbus.schemas.errors import EnvelopeError
from sessionbus.schemas.sealing import BusKeys

H_SOURCE = "sessionbus-source"
H_REPLAY_TO = "sessionbus-replay-to"  # routes a replayed copy to its one consumer queue
H_INDEXES = "sessionbus-rejected-indexes"
# Headers the dead-lettering added: a replayed copy goes back as it was first published.
_DEAD_HEADERS = (H_REASON, H_SOURCE, H_INDEXES, H_REPLAY_INDEXES, H_REPLAY_TO, "x-death",
                 "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What an operator may see of one dead-lettered message."""

    position: int
    reason: str
    source: str
    size: int
    type: str = "?"
    origin: str = "?"
    age: float | None = None  # seconds since the origin published it
    events: int = 0
    rejected: list[int] = field(default_factory=list)  # indexes of the events that failed
    sessions: list[str] = field(default_factory=list)  # session_ref of the failed events
    note: str = ""  # why it cannot be opened, if it cannot

    def line(self) -> str:
        age = "?" if self.age is None else f"{self.age:.0f}s"
        parts = [f"#{self.position}", f"reason={self.reason}", f"source={self.source}",
                 f"type={self.type}", f"origin={self.origin}", f"age={age}",
                 f"events={self.events}", f"bytes={self.size}"]
        if self.rejected:
            parts.append("rejected=" + ",".join(map(str, self.rejected)))
        if self.sessions:
            parts.append("sessions=" + ",".join(self.sessions))
        if self.note:
            parts.append(f"({self.note})")
        return " ".join(parts)


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v) if v is not None else "?"


def _indexes(headers: dict[str, Any]) -> list[int]:
    raw = headers.get(H_INDEXES)
    return [i for i in raw if isinstance(i, int)] if isinstance(raw, list) else []


def original_indexes(headers: dict[str, Any]) -> list[int]:
    """The failed events' indexes in the ORIGINAL message: a replayed copy that failed again
    counts its events from its own (narrowed) list."""
    failed = _indexes(headers)
    before = headers.get(H_REPLAY_INDEXES)
    if isinstance(before, list):
        return [before[i] for i in failed if 0 <= i < len(before) and isinstance(before[i], int)]
    return failed


def inspect(position: int, message: AbstractIncomingMessage, keys: BusKeys) -> DeadLetter:
    headers = dict(message.headers or {})
    reason, source = _text(headers.get(H_REASON)), _text(headers.get(H_SOURCE))
    rejected = original_indexes(headers)
    base = DeadLetter(position, reason, source, len(message.body), rejected=rejected)
    try:
        # Authenticated before anything in it is read; expired sessions are still listed.
        batch = decode_batch(message.body, headers, keys, now=0.0)
    except EnvelopeError as exc:
        return replace(base, note=f"cannot be opened: {exc.reason.value}")
    chosen = [batch.events[i] for i in rejected if 0 <= i < len(batch.events)]
    return replace(
        base, type=batch.type.value, origin=batch.origin,
        age=max(0.0, time.time() - batch.time), events=len(batch.events),
        sessions=[session_ref(e.session_id) for e in (chosen or batch.events)][:8],
    )




@dataclass(slots=True)
class Walk:
    """The result of one pass over the dead-letter queue."""

    seen: list[DeadLetter] = field(default_factory=list)
    done: list[DeadLetter] = field(default_factory=list)
    skipped: list[tuple[DeadLetter, str]] = field(default_factory=list)


class DeadLetters:
    def __init__(self, connection: AbstractRobustConnection, topology: Topology,
                 keys: BusKeys, user: str) -> None:
        self._conn = connection
        self._topo = topology
        self._keys = keys
        self._user = user  # the broker user this tool publishes as (the broker checks it)
        self._bound: set[str] = set()

    @property
    def replay_exchange(self) -> str:
        return f"{self._topo.prefix}.replay"

    def replayable(self, letter: DeadLetter) -> str | None:
        """Why ``letter`` cannot go back to its consumer, or None if it can."""
        if not letter.source.startswith(self._topo.consumer_queue("")):
            return f"its source {letter.source} is not a consumer queue"
        if letter.note:
            return letter.note
        return None

    async def walk(self, action: str, reason: str | None, limit: int | None) -> Walk:
        """``action`` is list, replay or purge; ``reason`` and ``limit`` narrow what it acts on
        (``limit`` bounds the messages acted on, or listed)."""
        result = Walk()
        channel = await self._conn.channel(publisher_confirms=True)
        try:
            queue = await channel.declare_queue(self._topo.dead_queue, passive=True)
            total = queue.declaration_result.message_count or 0
            for position in range(1, total + 1):  # bounded: the depth when the walk began
                if limit is not None and len(result.seen) >= limit:
                    break
                message = await queue.get(no_ack=False, fail=False, timeout=10)
                if message is None:
                    break
                letter = inspect(position, message, self._keys)
                if reason is not None and letter.reason != reason:
                    continue  # left unacked: back in the queue when the channel closes
                result.seen.append(letter)
                if action == "purge":
                    await message.ack()
                    result.done.append(letter)
                elif action == "replay":
                    why = self.replayable(letter)
                    if why is not None:
                        result.skipped.append((letter, why))
                        continue
                    await self._replay(channel, message, letter)
                    await message.ack()
                    result.done.append(letter)
        finally:
            await channel.close()  # every message not acked returns to the queue
            if self._bound:
                await self._unbind()
        return result

    async def _unbind(self) -> None:
        """Take the replay exchange's bindings away again, and the exchange if no other walk
        uses it (best effort: a leftover binding routes only what this tool publishes)."""
        channel = await self._conn.channel()
        try:
            exchange = await channel.get_exchange(self.replay_exchange, ensure=False)
            for queue in sorted(self._bound):
                with contextlib.suppress(Exception):
                    q = await channel.get_queue(queue, ensure=False)
                    await q.unbind(exchange, arguments=self._match(queue))
            with contextlib.suppress(Exception):
                await exchange.delete(if_unused=True)
        finally:
            self._bound.clear()
            with contextlib.suppress(Exception):
                await channel.close()

    @staticmethod
    def _match(queue: str) -> dict[str, Any]:
        return {"x-match": "all", H_REPLAY_TO: queue}

    async def _replay(self, channel: AbstractChannel, message: AbstractIncomingMessage,
                      letter: DeadLetter) -> None:
        headers: dict[str, Any] = {
            k: v for k, v in (message.headers or {}).items() if k not in _DEAD_HEADERS
        }
        if letter.rejected and letter.reason == "handler":
            headers[H_REPLAY_INDEXES] = list(letter.rejected)
        headers[H_REPLAY_TO] = letter.source
        copy = aio_pika.Message(
            message.body, headers=headers, content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, user_id=self._user,
        )
        # Into the consumer's own queue only, yet with the routing key its origin published it
        # on (the receiver checks it, and it is in the sealed message's associated data): a
        # headers exchange of our own, bound to that one queue by a header naming it.
        # Mandatory: a queue that is gone is an error, not a silent drop (the letter stays).
        exchange = await channel.declare_exchange(
            self.replay_exchange, aio_pika.ExchangeType.HEADERS, durable=False,
        )
        if letter.source not in self._bound:
            queue = await channel.get_queue(letter.source, ensure=True)
            await queue.bind(exchange, arguments=self._match(letter.source))
            self._bound.add(letter.source)
        await exchange.publish(copy, routing_key=f"session.{letter.type}.{letter.origin}",
                               mandatory=True, timeout=10)
