"""What users write: a ``Consumer`` — an async handler subscribed to chosen events.

    from sessionbus.consumer.api import Consumer, EventType, SessionEvent

    async def handle(event: SessionEvent) -> None:
        ...

    consumer = Consumer("audit", handle, types=(EventType.NEW, EventType.REMOVE))

and run it with ``sessionbus worker --consumer mypackage.audit:consumer``.

Delivery is at least once (a crash before the ack means the message comes again), in publish order
per origin, one event at a time per consumer, so the events of one session arrive in order.  A
handler that raises is retried ``retries`` times (with a growing pause); after that the message
goes to the dead-letter queue with reason ``handler`` and the consumer moves on.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sessionbus.schemas.events import SESSION_EVENT_TYPES, EventType, SessionEvent

__all__ = ["Consumer", "EventType", "SessionEvent", "Source"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Source(StrEnum):
    QUEUE = "queue"  # its own durable queue: nothing is missed while the worker is down
    EXCLUSIVE = "exclusive"  # a temporary queue that lives as long as the worker's connection
    STREAM = "stream"  # replay of the session stream from ``replay_from`` (NEW and REMOVE only)


Handler = Callable[[SessionEvent], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Consumer:
    name: str  # names its durable queue and labels its metrics
    handler: Handler
    types: tuple[EventType, ...] = SESSION_EVENT_TYPES
    origins: tuple[str, ...] | None = None  # None: every node
    source: Source = Source.QUEUE
    replay_from: str | int | datetime = "next"  # stream only: "first", "next", offset, time
    retries: int = 3
    retry_delay: float = 0.1  # seconds, doubled per retry
    prefetch: int = 64

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"consumer name {self.name!r}: use [a-z0-9._-], at most 64")
        if not self.types or any(t not in SESSION_EVENT_TYPES for t in self.types):
            raise ValueError("types must be a non-empty subset of new, get, remove")
        if self.source is Source.STREAM and EventType.GET in self.types:
            raise ValueError("the session stream holds NEW and REMOVE only; use a queue for GET")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")

    def wants(self, event: SessionEvent) -> bool:
        return event.type in self.types and (
            self.origins is None or event.origin in self.origins
        )
