"""Names, routing keys and declarations of the bus (topology v2), the one place roles take them.

Every name hangs off a prefix (``sessionbus`` in production) so a test run, or a second farm on one
broker, gets its own set.

Who creates what (see ``docs/operations.md``, "Topology"):

* The exchanges, both streams, their bindings and the dead-letter queue are *provisioned* by an
  admin step: ``ops/rabbitmq/definitions.json`` imported into the broker, or ``declare_admin``
  (``sessionbus setup``, the local farm, tests) run with admin credentials.  No role may configure
  them, so no role can bind a stream or the dead queue to anything.
* Roles only look them up passively (``check_sessions``, ``check_keys``): that needs no
  permission and changes nothing.  A role declares only its own queues (the worker's
  ``<prefix>.consumer.<name>``, the key publisher's ``<prefix>.keys.leader`` lock).
* A publishing channel declares nothing: a missing dead-letter exchange never stops a publish.

Bounds that operators tune (retention, max length) come from the policies in ``ops/rabbitmq``;
the arguments declared here are what the objects cannot exist without, a safety net a policy may
tighten, and the cluster-safe placement (``x-queue-leader-locator``, initial cluster size).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from sessionbus.schemas.events import EventType

# What a replica needs: sessions that appear and sessions that must no longer resume.
REPLICATED_TYPES = (EventType.NEW, EventType.REMOVE)

# Members a stream or quorum queue starts with. On a cluster of fewer nodes RabbitMQ uses all it
# has, so one value serves one node and three (the definitions and declare_admin agree on it:
# a redeclaration with other arguments would fail).
DEFAULT_CLUSTER_SIZE = 3


def session_routing_key(type_: EventType, origin: str) -> str:
    return f"session.{type_.value}.{origin}"


def key_routing_key(origin: str) -> str:
    return f"keys.{origin}"


def dead_letter_key(reason: str, username: str) -> str:
    """``dead.<reason>.<username>``: each user may write only its own suffix (topic permission)."""
    return f"dead.{reason}.{username}"


def binding_keys(types: tuple[EventType, ...] | None, origins: tuple[str, ...] | None) -> list[str]:
    ts = [t.value for t in types] if types else ["*"]
    os_ = list(origins) if origins else ["*"]
    return [f"session.{t}.{o}" for t in ts for o in os_]


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str = "sessionbus"
    # Session stream retention: about the session lifetime (policies override).
    stream_max_age_s: int = 7200
    # Retention only drops whole segments; small segments let max-age take effect in time.
    stream_segment_bytes: int = 16 * 2**20
    # Key stream retention: the decrypt window (keep x rotate every = 2 h by default) plus a
    # margin (announce-ahead and a late publisher). An erased key is off the bus after that; a
    # ring older than this holds only erased keys, so nothing a starting node needs is lost.
    key_stream_max_age_s: int = 3 * 3600
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

    def consumer_queue(self, name: str) -> str:
        return f"{self.prefix}.consumer.{name}"

    def all_names(self) -> tuple[list[str], list[str]]:
        """(exchanges, fixed queues) the admin step provisions."""
        return (
            [self.sessions_exchange, self.keys_exchange, self.dlx],
            [self.session_stream, self.key_stream, self.dead_queue],
        )


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Provisioned:
    """Everything the admin step creates: what ``declare_admin`` declares and what
    ``ops/rabbitmq/definitions.json`` holds (a test compares the two)."""

    exchanges: list[str]  # all durable topic exchanges
    queues: list[QueueSpec]  # all durable
    bindings: list[tuple[str, str, str]]  # (exchange, queue, routing key)


def provisioned(topo: Topology, cluster_size: int = DEFAULT_CLUSTER_SIZE) -> Provisioned:
    placement: dict[str, Any] = {"x-queue-leader-locator": "balanced"}
    stream: dict[str, Any] = {
        "x-queue-type": "stream", "x-initial-cluster-size": cluster_size, **placement,
    }
    return Provisioned(
        # Topic exchanges all: topic permissions apply to every one (the DLX included).
        exchanges=[topo.sessions_exchange, topo.keys_exchange, topo.dlx],
        queues=[
            QueueSpec(topo.session_stream, {
                **stream, "x-max-age": f"{topo.stream_max_age_s}s",
                "x-stream-max-segment-size-bytes": topo.stream_segment_bytes,
            }),
            QueueSpec(topo.key_stream, {
                **stream, "x-max-age": f"{topo.key_stream_max_age_s}s",
                "x-max-length-bytes": 8 * 2**20, "x-stream-max-segment-size-bytes": 2**20,
            }),
            # A quorum queue: no single broker node is its home (a classic one was a single
            # point of failure for whoever declared it).
            QueueSpec(topo.dead_queue, {
                "x-queue-type": "quorum", "x-quorum-initial-group-size": cluster_size,
                **placement, "x-max-length": topo.dead_max_length, "x-overflow": "drop-head",
            }),
        ],
        bindings=[
            *((topo.sessions_exchange, topo.session_stream, f"session.{t.value}.*")
              for t in REPLICATED_TYPES),
            (topo.keys_exchange, topo.key_stream, "keys.*"),
            (topo.dlx, topo.dead_queue, "#"),
        ],
    )


async def declare_admin(
    channel: AbstractChannel, topo: Topology, cluster_size: int = DEFAULT_CLUSTER_SIZE
) -> None:
    """Provision the bus: exchanges, streams, bindings and the dead queue. Idempotent.

    For admin credentials only (``sessionbus setup``, the local farm, tests): no role runs it.
    """
    plan = provisioned(topo, cluster_size)
    exchanges = {
        name: await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        for name in plan.exchanges
    }
    queues = {
        q.name: await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
        for q in plan.queues
    }
    for exchange, queue, key in plan.bindings:
        await queues[queue].bind(exchanges[exchange], routing_key=key)


# Kept for callers written before v2 (tests): it provisions, as declare_admin does.
declare_core = declare_admin


async def _check(channel: AbstractChannel, exchanges: list[str], queues: list[str]) -> None:
    for x in exchanges:
        await channel.get_exchange(x, ensure=True)
    for q in queues:
        await channel.get_queue(q, ensure=True)


async def check_sessions(channel: AbstractChannel, topo: Topology) -> AbstractExchange:
    """Passively check the session exchange and stream exist (needs no permission).

    Raises aio-pika's ``ChannelNotFoundEntity`` (and the channel closes) when not provisioned.
    Returns the sessions exchange.
    """
    await _check(channel, [topo.sessions_exchange], [topo.session_stream])
    return await channel.get_exchange(topo.sessions_exchange, ensure=False)


async def check_keys(channel: AbstractChannel, topo: Topology) -> AbstractExchange:
    """Passively check the key exchange and key stream exist. Returns the key exchange."""
    await _check(channel, [topo.keys_exchange], [topo.key_stream])
    return await channel.get_exchange(topo.keys_exchange, ensure=False)


# Kept for callers written before v2: the key publisher only checks, it no longer declares.
declare_keys = check_keys


async def check_with(
    connection: AbstractConnection,
    topo: Topology,
    *checks: Callable[[AbstractChannel, Topology], Awaitable[object]],
) -> None:
    """Run checks (``check_sessions``, ``check_keys``) on a channel of their own: a missing
    object closes the channel it was looked up on, never one a role uses."""
    channel = await connection.channel()
    try:
        for check in checks:
            await check(channel, topo)
    finally:
        if not channel.is_closed:
            await channel.close()


declare_with = check_with  # its pre-v2 name


async def delete_all(
    channel: AbstractChannel, topo: Topology, queues: list[str], timeout: float = 30.0
) -> None:
    """Remove what ``declare_admin`` (and the given extra queues) made: for tests and teardown.
    Each deletion is bounded by ``timeout`` seconds (TimeoutError): a teardown never hangs on a
    broker that stopped answering."""
    exchanges, fixed = topo.all_names()
    for q in [*queues, *fixed, topo.keys_lock_queue]:
        await channel.queue_delete(q, timeout=timeout)
    for x in exchanges:
        await channel.exchange_delete(x, timeout=timeout)
