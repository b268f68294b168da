"""Names, routing keys and declarations of the bus: the one place every role takes them from.

Every name hangs off a prefix (``sessionbus`` in production) so a test run, or a second farm on one
broker, gets its own set.  Bounds that operators tune (queue expiry, message TTL, max length,
dead-lettering) come from the policies in ``ops/rabbitmq``; the arguments declared here are only
what a queue cannot exist without, or a safety net that a policy may tighten.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from sessionbus.schemas.events import EventType

# What a replica needs: sessions that appear and sessions that must no longer resume.
REPLICATED_TYPES = (EventType.NEW, EventType.REMOVE)


def session_routing_key(type_: EventType, origin: str) -> str:
    return f"session.{type_.value}.{origin}"


def key_routing_key(origin: str) -> str:
    return f"keys.{origin}"


def binding_keys(types: tuple[EventType, ...] | None, origins: tuple[str, ...] | None) -> list[str]:
    ts = [t.value for t in types] if types else ["*"]
    os_ = list(origins) if origins else ["*"]
    return [f"session.{t}.{o}" for t in ts for o in os_]


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str = "sessionbus"
    # Default retention of the session stream: about the session lifetime (policies override).
    stream_max_age_s: int = 7200
    # Retention only drops whole segments; small segments let max-age take effect in time.
    stream_segment_bytes: int = 16 * 2**20
    dead_max_length: int = 100_000

    @property
    def sessions_exchange(self) -> str:
        return f"{self.prefix}.sessions"

    @property
    def keys_exchange(self) -> str:
        return f"{self.prefix}.keys"

    @property
    def session_stream(self) -> str:
        return f"{self.prefix}.sessions.stream"

    @property
    def key_stream(self) -> str:
        return f"{self.prefix}.keys.stream"

    @property
    def dlx(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def keys_lock_queue(self) -> str:
        return f"{self.prefix}.keys.leader"

    def replica_queue(self, node_id: str) -> str:
        return f"{self.prefix}.replica.{node_id}"

    def consumer_queue(self, name: str) -> str:
        return f"{self.prefix}.consumer.{name}"

    def all_names(self) -> tuple[list[str], list[str]]:
        """(exchanges, fixed queues) this topology declares; per-node queues not included."""
        return (
            [self.sessions_exchange, self.keys_exchange, self.dlx],
            [self.session_stream, self.key_stream, self.dead_queue],
        )


STREAM_ARGS: dict[str, Any] = {"x-queue-type": "stream"}


async def declare_core(channel: AbstractChannel, topo: Topology) -> AbstractExchange:
    """Declare the session exchange and stream, and the dead-letter exchange and queue.

    Idempotent; every role runs it.  Returns the sessions exchange.  The key exchange and key
    stream are the key publisher's alone (``declare_keys``): a role that could declare them
    could also bind the key stream to an exchange it may write, and inject a key ring.
    """
    sessions = await channel.declare_exchange(
        topo.sessions_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dlx = await channel.declare_exchange(topo.dlx, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(
        topo.dead_queue,
        durable=True,
        arguments={"x-max-length": topo.dead_max_length, "x-overflow": "drop-head"},
    )
    await dead.bind(dlx, routing_key="")
    stream = await channel.declare_queue(
        topo.session_stream,
        durable=True,
        arguments={
            **STREAM_ARGS,
            "x-max-age": f"{topo.stream_max_age_s}s",
            "x-stream-max-segment-size-bytes": topo.stream_segment_bytes,
        },
    )
    for t in REPLICATED_TYPES:
        await stream.bind(sessions, routing_key=f"session.{t.value}.*")
    return sessions


async def declare_keys(channel: AbstractChannel, topo: Topology) -> AbstractExchange:
    """Declare the key exchange and the key stream (the key publisher's). Returns the exchange.

    Followers (nodes, keyfile) only look the stream up, and wait until it exists.
    """
    keys = await channel.declare_exchange(
        topo.keys_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    key_stream = await channel.declare_queue(
        topo.key_stream,
        durable=True,
        arguments={
            **STREAM_ARGS,
            "x-max-length-bytes": 8 * 2**20,
            "x-stream-max-segment-size-bytes": 2**20,
        },
    )
    await key_stream.bind(keys, routing_key="keys.*")
    return keys


async def declare_with(
    connection: AbstractConnection,
    topo: Topology,
    *declarers: Callable[[AbstractChannel, Topology], Awaitable[object]],
) -> None:
    """Run declarers (``declare_core``, ``declare_keys``) on a channel of their own."""
    channel = await connection.channel()
    try:
        for declare in declarers:
            await declare(channel, topo)
    finally:
        await channel.close()


async def declare_replica_queue(
    channel: AbstractChannel, topo: Topology, node_id: str
) -> AbstractQueue:
    """The durable queue a node's replica follows (bounded by the ``replica`` policy)."""
    queue = await channel.declare_queue(topo.replica_queue(node_id), durable=True)
    for t in REPLICATED_TYPES:
        await queue.bind(topo.sessions_exchange, routing_key=f"session.{t.value}.*")
    return queue


async def delete_all(
    channel: AbstractChannel, topo: Topology, queues: list[str], timeout: float = 30.0
) -> None:
    """Remove what ``declare_core`` (and the given extra queues) made: for tests and teardown.
    Each deletion is bounded by ``timeout`` seconds (TimeoutError): a teardown never hangs on a
    broker that stopped answering."""
    exchanges, fixed = topo.all_names()
    for q in [*queues, *fixed, topo.keys_lock_queue]:
        await channel.queue_delete(q, timeout=timeout)
    for x in exchanges:
        await channel.exchange_delete(x, timeout=timeout)
