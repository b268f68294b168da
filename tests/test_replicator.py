"""The replicator on the real broker: apply, consistency rules, expiry, bad input, warm join."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from sessionbus.bus.topology import Topology, declare_core, session_routing_key
from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.consumer.replicator import Replicator, ReplicatorSettings
from sessionbus.metrics import Metrics
from sessionbus.producer.outbox import Outbox
from sessionbus.schemas.codec import CONTENT_TYPE, encode_rows
from sessionbus.schemas.events import EventType, RemoveReason
from sessionbus.schemas.sealing import BusKeys
from tests.conftest import TEST_SID_CTX

pytestmark = pytest.mark.broker

DerFactory = Callable[..., bytes]


async def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


METRICS = Metrics()  # this module's own registry: what its components count

def rejected_total(reason: str) -> float:
    return METRICS.value("sessionbus_events_rejected_total", {"reason": reason})


class Bus:
    def __init__(self, conn: AbstractRobustConnection, topo: Topology, keys: BusKeys,
                 queues: list[str]) -> None:
        self.conn, self.topo, self.keys, self.queues = conn, topo, keys, queues
        self.replicators: list[Replicator] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def replica(self, node_id: str, **kw: object) -> Replicator:
        r = Replicator(self.conn, self.topo, self.keys, PeerCache(),
                       ReplicatorSettings(node_id=node_id, sid_ctx=TEST_SID_CTX, **kw),  # type: ignore[arg-type]
                       metrics=METRICS)
        await r.start()
        self.replicators.append(r)
        return r

    def outbox(self, origin: str) -> Outbox:
        box = Outbox(origin, self.topo, self.keys, metrics=METRICS)
        self.tasks.append(asyncio.get_running_loop().create_task(box.run(self.conn)))
        return box

    async def publish_raw(self, body: bytes, headers: dict[str, object], key: str) -> None:
        ch = await self.conn.channel()
        x = await ch.get_exchange(self.topo.sessions_exchange)
        await x.publish(aio_pika.Message(body, headers=headers, content_type=CONTENT_TYPE,  # type: ignore[arg-type]
                                         user_id="guest"), key)
        await ch.close()

    async def close(self) -> None:
        for r in self.replicators:
            await r.stop(5)
        for t in self.tasks:
            t.cancel()


@pytest.fixture
async def bus(
    connection: AbstractRobustConnection, topology: Topology, bus_keys: BusKeys,
    declared_queues: list[str],
) -> AsyncIterator[Bus]:
    ch = await connection.channel()
    await declare_core(ch, topology)
    await ch.close()
    b = Bus(connection, topology, bus_keys, declared_queues)
    try:
        yield b
    finally:
        await b.close()


async def test_events_from_a_producer_are_applied(bus: Bus, session_der: DerFactory) -> None:
    replica = await bus.replica("node-b")
    box = bus.outbox("node-a")
    ids = [os.urandom(32) for _ in range(200)]
    for sid in ids:
        box.put_new(sid, TEST_SID_CTX, time.time() + 300, session_der(session_id=sid))
    assert await wait_until(lambda: all(sid in replica.cache for sid in ids))
    found = replica.cache.get(ids[0])
    assert found is not None and found.origin == "node-a"
    for sid in ids[:50]:
        box.put_remove(sid, TEST_SID_CTX, time.time() + 300, RemoveReason.REVOKE)
    assert await wait_until(lambda: not any(sid in replica.cache for sid in ids[:50]))
    assert all(sid in replica.cache for sid in ids[50:])


async def test_own_live_events_are_skipped(bus: Bus, session_der: DerFactory) -> None:
    # (a replay applies a node's own events too: a node that restarted has lost them)
    replica = await bus.replica("node-a", replay=False)
    other = await bus.replica("node-b", replay=False)
    box = bus.outbox("node-a")
    sid = os.urandom(32)
    box.put_new(sid, TEST_SID_CTX, time.time() + 300, session_der(session_id=sid))
    assert await wait_until(lambda: sid in other.cache)
    assert sid not in replica.cache  # a node puts its own sessions in its replica itself


async def test_remove_then_older_new_stays_removed(bus: Bus, session_der: DerFactory) -> None:
    replica = await bus.replica("node-b")
    sid = os.urandom(32)
    now = time.time()
    der = session_der(session_id=sid)
    body, headers = encode_rows(
        EventType.REMOVE, "node-a", [[2, now, sid, TEST_SID_CTX, now + 300, "revoke"]], bus.keys)
    await bus.publish_raw(body, headers, session_routing_key(EventType.REMOVE, "node-a"))
    # the NEW happened earlier but arrives later (another route, a replay, a resend)
    body, headers = encode_rows(
        EventType.NEW, "node-a", [[1, now - 5, sid, TEST_SID_CTX, now + 300, der, False]],
        bus.keys)
    await bus.publish_raw(body, headers, session_routing_key(EventType.NEW, "node-a"))
    marker = os.urandom(32)
    body, headers = encode_rows(
        EventType.NEW, "node-a",
        [[3, now, marker, TEST_SID_CTX, now + 300, session_der(session_id=marker), False]],
        bus.keys)
    await bus.publish_raw(body, headers, session_routing_key(EventType.NEW, "node-a"))
    assert await wait_until(lambda: marker in replica.cache)  # everything before it was applied
    assert sid not in replica.cache
    assert replica.cache.get(sid) is None


async def test_expired_sessions_are_never_served(bus: Bus, session_der: DerFactory) -> None:
    replica = await bus.replica("node-b")
    box = bus.outbox("node-a")
    short, past = os.urandom(32), os.urandom(32)
    before = rejected_total("expired")
    box.put_new(short, TEST_SID_CTX, time.time() + 1.0, session_der(session_id=short))
    box.put_new(past, TEST_SID_CTX, time.time() - 1.0, session_der(session_id=past))
    assert await wait_until(lambda: short in replica.cache)
    assert await wait_until(lambda: rejected_total("expired") >= before + 1)
    assert replica.cache.get(past) is None
    await asyncio.sleep(1.2)
    assert replica.cache.get(short) is None


async def test_a_thousand_bad_messages_are_dead_lettered_and_counted(
    bus: Bus, session_der: DerFactory, other_bus_keys: BusKeys,
) -> None:
    replica = await bus.replica("node-b")
    reasons = ("forged", "unknown_key", "version", "oversize", "truncated")
    before = {r: rejected_total(r) for r in reasons}
    now = time.time()
    good_row = [1, now, b"x" * 32, TEST_SID_CTX, now + 300,
                session_der(session_id=b"x" * 32), False]
    key = session_routing_key(EventType.NEW, "node-x")
    sent = dict.fromkeys(reasons, 0)
    ch = await bus.conn.channel(publisher_confirms=True)
    x = await ch.get_exchange(bus.topo.sessions_exchange)
    for i in range(1000):
        kind = reasons[i % len(reasons)]
        if kind == "forged":
            body, headers = encode_rows(EventType.NEW, "node-x", [good_row], bus.keys)
            flip = i % len(body)
            flip = 0 if 1 <= flip <= 4 else flip  # an altered key id is unknown_key, not forged
            body = body[:flip] + bytes([body[flip] ^ 0x01]) + body[flip + 1 :]
        elif kind == "unknown_key":
            body, headers = encode_rows(EventType.NEW, "node-x", [good_row], other_bus_keys)
        elif kind == "version":
            body, headers = encode_rows(EventType.NEW, "node-x", [good_row], bus.keys)
            headers = {**headers, "sessionbus-version": 99}
        elif kind == "oversize":
            body, headers = os.urandom(1100 * 1024), {"sessionbus-version": 1,
                                                      "sessionbus-type": "new",
                                                      "sessionbus-origin": "node-x"}
        else:
            body, headers = os.urandom(i % 31), {"sessionbus-version": 1,
                                                 "sessionbus-type": "new",
                                                 "sessionbus-origin": "node-x"}
        sent[kind] += 1
        await x.publish(aio_pika.Message(body, headers=headers), key)  # type: ignore[arg-type]
    await ch.close()
    # a good message after them still gets through: the worker kept running
    box = bus.outbox("node-x")
    sid = os.urandom(32)
    box.put_new(sid, TEST_SID_CTX, time.time() + 300, session_der(session_id=sid))
    assert await wait_until(lambda: sid in replica.cache, timeout=60)
    assert await wait_until(
        lambda: sum(rejected_total(r) - before[r] for r in reasons) >= 1000, timeout=60)
    await asyncio.sleep(0.5)  # nothing more may arrive: exactly one count per message
    for r in reasons:
        assert rejected_total(r) - before[r] == sent[r], r
    # dead-lettering is best effort and off the ack path: give the copies a moment to land
    assert replica.subscription is not None
    assert await replica.subscription.dead_letters_flushed(30)
    ch = await bus.conn.channel()
    dead = await ch.declare_queue(bus.topo.dead_queue, passive=True)
    assert dead.declaration_result.message_count == 1000
    await ch.close()


async def test_warm_join_holds_sessions_published_before_it_started(
    bus: Bus, session_der: DerFactory,
) -> None:
    box = bus.outbox("node-a")
    ids = [os.urandom(32) for _ in range(500)]
    for sid in ids:
        box.put_new(sid, TEST_SID_CTX, time.time() + 600, session_der(session_id=sid))
    assert await box.flush(30)
    late = await bus.replica("node-late")
    assert await wait_until(lambda: len(late.cache) >= 500, timeout=30)
    assert all(sid in late.cache for sid in ids)
    await asyncio.wait_for(late.caught_up.wait(), 10)


def applied_new() -> float:
    return METRICS.value(
        "sessionbus_events_consumed_total", {"type": "new", "outcome": "applied"})


async def publish_and_count(box: Outbox, replica: Replicator, session_der: DerFactory,
                            n: int = 50) -> float:
    """Publish ``n`` NEW events; how many the process applied for them (after a pause in
    which a stream consumer still following would have delivered them again)."""
    before = applied_new()
    ids = [os.urandom(32) for _ in range(n)]
    for s in ids:
        box.put_new(s, TEST_SID_CTX, time.time() + 600, session_der(session_id=s))
    assert await box.flush(30)
    assert await wait_until(lambda: all(s in replica.cache for s in ids), timeout=30)
    await asyncio.sleep(1.0)
    return applied_new() - before


async def test_once_warm_new_events_are_applied_once(
    bus: Bus, session_der: DerFactory,
) -> None:
    """Warm join and live replication are one stream consumer: once the history is delivered,
    later events are applied once each."""
    box = bus.outbox("node-a")
    sid = os.urandom(32)
    box.put_new(sid, TEST_SID_CTX, time.time() + 600, session_der(session_id=sid))
    assert await box.flush(30)
    late = await bus.replica("node-late")
    await asyncio.wait_for(late.caught_up.wait(), 10)
    assert sid in late.cache
    assert await publish_and_count(box, late, session_der) == 50


async def test_an_empty_stream_is_caught_up_and_then_followed_live(
    bus: Bus, session_der: DerFactory,
) -> None:
    """An empty stream: the replica is warm at once, and events published after are applied
    once each (before v2 this replay and a replica queue both delivered them for live_margin)."""
    replica = await bus.replica("node-empty", live_margin=1.5)
    await asyncio.wait_for(replica.caught_up.wait(), 10)  # warm at once: nothing to replay
    box = bus.outbox("node-a")
    assert await publish_and_count(box, replica, session_der) == 50
    await asyncio.sleep(1.0)
    assert await publish_and_count(box, replica, session_der) == 50


async def test_after_a_reconnect_the_stream_resumes_at_the_next_offset(
    amqp_url: str, topology: Topology, bus_keys: BusKeys, session_der: DerFactory,
) -> None:
    """The replica's connection is cut twice (through a TCP proxy); each time the channel is
    restored and the stream consumed again from the last applied offset + 1: every event is
    applied exactly once (a consume re-run with its first arguments would apply the history
    again), and the events published while it was away arrive."""
    from yarl import URL

    from sessionbus.bus.connection import BrokerSettings, connect
    from tests.tcp_proxy import TcpProxy

    broker = URL(amqp_url)
    proxy = TcpProxy(broker.host or "127.0.0.1", broker.port or 5672)
    await proxy.start()
    conn = await connect(BrokerSettings(url=proxy.url(broker.user or "guest",
                                                      broker.password or "guest"),
                                        backoff_min=0.1, backoff_max=0.5))
    pub = await connect(BrokerSettings(url=amqp_url))
    replica = Replicator(conn, topology, bus_keys, PeerCache(),
                         ReplicatorSettings(node_id="node-r", sid_ctx=TEST_SID_CTX),
                         metrics=METRICS)
    box = Outbox("node-a", topology, bus_keys, metrics=METRICS)
    task = asyncio.get_running_loop().create_task(box.run(pub))
    try:
        await replica.start()
        await asyncio.wait_for(replica.caught_up.wait(), 10)
        all_ids: list[bytes] = []
        before = applied_new()
        for _ in range(2):
            ids = [os.urandom(32) for _ in range(100)]
            all_ids += ids
            for s in ids[:50]:
                box.put_new(s, TEST_SID_CTX, time.time() + 600, session_der(session_id=s))
            assert await box.flush(30)
            want = list(all_ids[:-50])
            assert await wait_until(lambda w=want: all(s in replica.cache for s in w))
            offset = replica.last_offset
            assert offset is not None
            await asyncio.sleep(0.3)  # the acks reach the broker: nothing is in flight
            await proxy.cut()  # the replica's connection drops; the robust connection returns
            for s in ids[50:]:  # published while it is away
                box.put_new(s, TEST_SID_CTX, time.time() + 600, session_der(session_id=s))
            assert await box.flush(30)
            want = list(all_ids)
            assert await wait_until(lambda w=want: all(s in replica.cache for s in w), 30)
            assert (replica.last_offset or 0) > offset
        await asyncio.sleep(1.0)  # a replay from the start would arrive meanwhile
        assert applied_new() - before == len(all_ids)
        assert proxy.cuts >= 2
        sub = replica.subscription
        assert sub is not None
        assert sub.delivered == sub.handled  # nothing was delivered twice
    finally:
        task.cancel()
        await replica.stop(5)
        await pub.close()
        await conn.close()
        await proxy.stop()


async def test_a_full_origin_table_rejects_acks_and_dead_letters(
    bus: Bus, session_der: DerFactory,
) -> None:
    """A replica whose origin table is full rejects the new origin's events (reason
    table_full), dead-letters them and goes on: the next good event is applied."""
    replica = await bus.replica("node-b")
    await asyncio.wait_for(replica.caught_up.wait(), 10)
    assert len(replica.cache) == 0
    replica.cache._origins.extend(f"filler-{i}" for i in range(1 << 16))  # the table is full
    before = rejected_total("table_full")
    spoofed = bus.outbox("node-new")
    sid = os.urandom(32)
    spoofed.put_new(sid, TEST_SID_CTX, time.time() + 300, session_der(session_id=sid))
    assert await spoofed.flush(30)
    assert await wait_until(lambda: rejected_total("table_full") - before == 1)
    assert sid not in replica.cache
    assert replica.subscription is not None
    assert await replica.subscription.dead_letters_flushed(10)
    count = -1
    for _ in range(50):  # the quorum queue's count may trail its confirm a moment
        ch = await bus.conn.channel()
        dead = await ch.declare_queue(bus.topo.dead_queue, passive=True)
        count = dead.declaration_result.message_count
        await ch.close()
        if count:
            break
        await asyncio.sleep(0.1)
    assert count == 1
    replica.cache._origins.clear()  # room again: replication was never stalled
    later = os.urandom(32)
    spoofed.put_new(later, TEST_SID_CTX, time.time() + 300, session_der(session_id=later))
    assert await wait_until(lambda: later in replica.cache)


async def test_without_a_dlx_publishing_and_replication_go_on(
    bus: Bus, session_der: DerFactory,
) -> None:
    """The DLX (and so the dead queue) gone: a bad message is still rejected and acked, its
    copy is lost and counted, and good events before and after it are published and applied
    (nothing on the publish path or the ack path waits for the DLX)."""
    replica = await bus.replica("node-b")
    await asyncio.wait_for(replica.caught_up.wait(), 10)
    ch = await bus.conn.channel()
    await ch.exchange_delete(bus.topo.dlx)
    await ch.close()
    lost0 = METRICS.value("sessionbus_dead_letters_lost_total")
    box = bus.outbox("node-a")
    first, last = os.urandom(32), os.urandom(32)
    box.put_new(first, TEST_SID_CTX, time.time() + 300, session_der(session_id=first))
    assert await box.flush(30)
    await bus.publish_raw(os.urandom(40), {"sessionbus-version": 1, "sessionbus-type": "new",
                                           "sessionbus-origin": "node-a"},
                          session_routing_key(EventType.NEW, "node-a"))
    box.put_new(last, TEST_SID_CTX, time.time() + 300, session_der(session_id=last))
    assert await box.flush(30)
    assert await wait_until(lambda: first in replica.cache and last in replica.cache)
    assert await wait_until(
        lambda: METRICS.value("sessionbus_dead_letters_lost_total") - lost0 == 1, 15)
