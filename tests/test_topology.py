"""Declaring the bus against the real broker: idempotent, routed as designed, removable."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import ChannelClosed

from sessionbus.bus.topology import (
    Topology,
    declare_core,
    declare_keys,
    declare_replica_queue,
    delete_all,
    key_routing_key,
    session_routing_key,
)
from sessionbus.schemas.events import EventType

pytestmark = pytest.mark.broker

NODE = "node-a"


async def declare_everything(
    connection: AbstractRobustConnection, topo: Topology, declared_queues: list[str]
) -> None:
    declared_queues.append(topo.replica_queue(NODE))
    channel = await connection.channel()
    try:
        for _ in range(2):  # twice: idempotent
            await declare_core(channel, topo)
            await declare_keys(channel, topo)
            await declare_replica_queue(channel, topo, NODE)
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
    for name in [*queues, topology.replica_queue(NODE)]:
        assert await exists(connection, "queue", name), name
    # the check can fail: what was not declared is not there
    assert not await exists(connection, "queue", topology.replica_queue("node-b"))
    assert not await exists(connection, "exchange", f"{topology.prefix}.nope")


async def test_sessions_route_to_replica_and_stream(
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

    replica = await channel.get_queue(topology.replica_queue(NODE))
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
    await dlx.publish(aio_pika.Message(b"bad"), routing_key="anything")
    dead = await channel.get_queue(topology.dead_queue)
    assert await drain(dead) == [b"bad"]
    await channel.close()


async def test_delete_all_removes_everything(connection: AbstractRobustConnection) -> None:
    topo = Topology(prefix=f"sbtest-{uuid.uuid4().hex[:10]}")
    extra: list[str] = []
    try:
        await declare_everything(connection, topo, extra)
        assert await exists(connection, "queue", topo.replica_queue(NODE))
    finally:
        channel = await connection.channel()
        await delete_all(channel, topo, extra)
        await channel.close()
    exchanges, queues = topo.all_names()
    for name in exchanges:
        assert not await exists(connection, "exchange", name), name
    for name in [*queues, *extra]:
        assert not await exists(connection, "queue", name), name


async def test_only_the_key_publisher_declares_the_key_stream(
    connection: AbstractRobustConnection, topology: Topology,
) -> None:
    channel = await connection.channel()
    await declare_core(channel, topology)  # what nodes, workers and caches run
    await channel.close()
    assert not await exists(connection, "exchange", topology.keys_exchange)
    assert not await exists(connection, "queue", topology.key_stream)
    channel = await connection.channel()
    await declare_keys(channel, topology)
    await channel.close()
    assert await exists(connection, "queue", topology.key_stream)
