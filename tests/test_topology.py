"""Provisioning the bus (v2) against the real broker: idempotent, routed as designed, cluster-safe
arguments, roles only check, removable."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import ChannelClosed

from sessionbus.bus.topology import (
    Topology,
    check_keys,
    check_sessions,
    dead_letter_key,
    declare_admin,
    delete_all,
    key_routing_key,
    provisioned,
    session_routing_key,
)
from sessionbus.schemas.events import EventType

pytestmark = pytest.mark.broker

NODE = "node-a"


async def declare_everything(
    connection: AbstractRobustConnection, topo: Topology, declared_queues: list[str]
) -> None:
    """The admin step, twice (idempotent), and a queue bound as an old per-node replica was, to
    show that the stream takes what such a queue took."""
    declared_queues.append(f"{topo.prefix}.probe")
    channel = await connection.channel()
    try:
        for _ in range(2):
            await declare_admin(channel, topo)
        probe = await channel.declare_queue(f"{topo.prefix}.probe", durable=True)
        for t in ("new", "remove"):
            await probe.bind(topo.sessions_exchange, routing_key=f"session.{t}.*")
    finally:
        await channel.close()


async def exists(connection: AbstractRobustConnection, kind: str, name: str) -> bool:
    """Passive declare on a throwaway channel (a 404 closes the channel it happens on)."""
    channel = await connection.channel()
    try:
        if kind == "queue":
            await channel.get_queue(name, ensure=True)
        else:
            await channel.get_exchange(name, ensure=True)
    except ChannelClosed:  # aio-pika raises ChannelNotFoundEntity, a ChannelClosed
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


async def stream_bodies(
    connection: AbstractRobustConnection, stream: str, want: int, timeout: float = 10.0
) -> list[bytes]:
    """The first ``want`` messages of a stream, read from its start (consume + manual ack: a
    basic.get on a stream would close the connection)."""
    channel = await connection.channel()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(message: AbstractIncomingMessage) -> None:
        await got.put(message.body)
        await message.ack()

    try:
        await channel.set_qos(prefetch_count=16)
        queue = await channel.get_queue(stream, ensure=True)
        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        return [await asyncio.wait_for(got.get(), timeout) for _ in range(want)]
    finally:
        await channel.close()


async def drain(queue: AbstractQueue) -> list[bytes]:
    bodies = []
    while (message := await queue.get(fail=False, timeout=5)) is not None:
        bodies.append(message.body)
        await message.ack()
    return bodies


async def test_declare_twice_is_idempotent(
    connection: AbstractRobustConnection, topology: Topology, declared_queues: list[str]
) -> None:
    await declare_everything(connection, topology, declared_queues)
    exchanges, queues = topology.all_names()
    for name in exchanges:
        assert await exists(connection, "exchange", name), name
    for name in queues:
        assert await exists(connection, "queue", name), name
    # the check can fail: what was not declared is not there
    assert not await exists(connection, "queue", f"{topology.prefix}.replica.{NODE}")
    assert not await exists(connection, "exchange", f"{topology.prefix}.nope")


async def test_sessions_route_to_the_stream_only_new_and_remove(
    connection: AbstractRobustConnection, topology: Topology, declared_queues: list[str]
) -> None:
    await declare_everything(connection, topology, declared_queues)
    channel = await connection.channel()  # publisher confirms: published means routed
    sessions = await channel.get_exchange(topology.sessions_exchange)
    tag = uuid.uuid4().hex.encode()
    published = {
        t: b"%s-%s" % (t.value.encode(), tag) for t in (EventType.GET, EventType.NEW,
                                                         EventType.REMOVE)
    }
    for t, body in published.items():  # GET first: it must go nowhere a replica reads
        await sessions.publish(aio_pika.Message(body), routing_key=session_routing_key(t, NODE))
    assert session_routing_key(EventType.NEW, NODE) == "session.new.node-a"

    replica = await channel.get_queue(f"{topology.prefix}.probe")
    # one copy each, though the queue was declared (and bound) twice
    assert await drain(replica) == [published[EventType.NEW], published[EventType.REMOVE]]
    assert await stream_bodies(connection, topology.session_stream, 2) == [
        published[EventType.NEW], published[EventType.REMOVE]
    ]

    keys = await channel.get_exchange(topology.keys_exchange)
    await keys.publish(aio_pika.Message(b"ring-" + tag), routing_key=key_routing_key("publisher"))
    assert await stream_bodies(connection, topology.key_stream, 1) == [b"ring-" + tag]
    assert await drain(replica) == []  # key rings never reach a session replica
    await channel.close()


async def test_dead_letter_exchange_feeds_the_dead_queue(
    connection: AbstractRobustConnection, topology: Topology, declared_queues: list[str]
) -> None:
    await declare_everything(connection, topology, declared_queues)
    channel = await connection.channel()
    dlx = await channel.get_exchange(topology.dlx)
    await dlx.publish(aio_pika.Message(b"bad"), routing_key=dead_letter_key("forged", "node-a"))
    dead = await channel.get_queue(topology.dead_queue)
    assert await drain(dead) == [b"bad"]
    await channel.close()


async def test_delete_all_removes_everything(connection: AbstractRobustConnection) -> None:
    topo = Topology(prefix=f"sbtest-{uuid.uuid4().hex[:10]}")
    extra: list[str] = []
    try:
        await declare_everything(connection, topo, extra)
        assert await exists(connection, "queue", f"{topo.prefix}.probe")
    finally:
        channel = await connection.channel()
        await delete_all(channel, topo, extra)
        await channel.close()
    exchanges, queues = topo.all_names()
    for name in exchanges:
        assert not await exists(connection, "exchange", name), name
    for name in [*queues, *extra]:
        assert not await exists(connection, "queue", name), name


async def test_roles_only_check_and_a_missing_bus_is_reported(
    connection: AbstractRobustConnection,
) -> None:
    """``check_sessions``/``check_keys`` (what roles run) create nothing: on an unprovisioned
    prefix they fail, and nothing exists afterwards."""
    topo = Topology(prefix=f"sbtest-{uuid.uuid4().hex[:10]}")
    for check in (check_sessions, check_keys):
        channel = await connection.channel()
        with pytest.raises(ChannelClosed):
            await check(channel, topo)
    exchanges, queues = topo.all_names()
    for name in exchanges:
        assert not await exists(connection, "exchange", name), name
    for name in queues:
        assert not await exists(connection, "queue", name), name


async def test_provisioned_objects_are_cluster_safe_and_bounded(
    connection: AbstractRobustConnection, topology: Topology,
) -> None:
    """Streams and the dead queue carry a leader locator and an initial cluster size; the dead
    queue is a quorum queue (no single home node); the key stream has a max-age of the decrypt
    window plus a margin, the session stream about the session lifetime."""
    plan = {q.name: q.arguments for q in provisioned(topology).queues}
    dead = plan[topology.dead_queue]
    assert dead["x-queue-type"] == "quorum" and dead["x-queue-leader-locator"] == "balanced"
    assert dead["x-quorum-initial-group-size"] == 3
    for stream in (topology.session_stream, topology.key_stream):
        assert plan[stream]["x-queue-type"] == "stream"
        assert plan[stream]["x-initial-cluster-size"] == 3
        assert plan[stream]["x-queue-leader-locator"] == "balanced"
    assert plan[topology.key_stream]["x-max-age"] == "10800s"  # 2 h decrypt window + 1 h
    assert plan[topology.session_stream]["x-max-age"] == "7200s"
    # what the broker holds is what the plan says (a redeclaration with other arguments fails)
    channel = await connection.channel()
    for name, args in plan.items():
        await channel.declare_queue(name, durable=True, arguments=args)
    await channel.close()
    channel = await connection.channel()
    with pytest.raises(ChannelClosed):  # PRECONDITION_FAILED: the check can fail
        await channel.declare_queue(topology.dead_queue, durable=True,
                                    arguments={**dead, "x-queue-type": "classic"})
