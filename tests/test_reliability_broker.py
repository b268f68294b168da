"""Broker loss: connections cut mid-stream through a TCP proxy, and a real broker restart.

The restart needs a broker the test owns: these tests run against a private RabbitMQ node
(``tests/private_broker.py``) started for this module, never the shared one.  Every client talks to
it through a ``TcpProxy`` so the test can cut all connections at once (RST, as a network fault).

Proved here:

- 10,000 NEW/REMOVE events from 3 origins (3 ``Outbox``es, each on its own connection) flow to 3
  replicas while every connection is cut 3 times and the broker restarts once.  No event is
  dropped, every replica ends with exactly the expected live sessions (set equality) and none of
  the removed ones.
- A stream subscription (``Subscription`` + ``StreamSource``) resumes at the offset after the last
  one it handled: no offset missing, none handled twice beyond the one in flight at each fault, no
  replay from the start.
- Confirmed events in a durable replica queue survive a broker restart while their consumer is
  down, and the consumer gets every one afterwards.
- Reconnects back off with jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from bench.reliability_table import record
from sessionbus.bus.connection import BrokerSettings, JitteredConnection, connect
from sessionbus.bus.topology import Topology, declare_core, delete_all
from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.consumer.replicator import Replicator, ReplicatorSettings
from sessionbus.consumer.subscription import StreamSource, Subscription
from sessionbus.metrics import Metrics
from sessionbus.producer.outbox import Outbox, OutboxSettings
from sessionbus.schemas.codec import DecodedBatch, decode_batch
from sessionbus.schemas.events import RemoveReason
from tests.farm_support import unique_prefix
from tests.helpers_der import make_session_der
from tests.helpers_keys import farm_keys
from tests.private_broker import PrivateBroker
from tests.tcp_proxy import TcpProxy

CTX = b"sessionbus-test"
ORIGINS = ("origin-a", "origin-b", "origin-c")
REPLICAS = ("replica-1", "replica-2", "replica-3")
CHUNKS = 200
NEW_PER_CHUNK = 40
REMOVE_PER_CHUNK = 10  # from the second chunk on; the first chunk has NEWs instead
FAULTS = {40: "cut", 80: "cut", 120: "restart", 160: "cut"}  # in the middle of these chunks
CHUNK_PAUSE = 0.04  # a steady stream: 50 events every 40 ms
LIFETIME = 900


@pytest.fixture(scope="module")
def private_broker() -> Iterator[PrivateBroker]:
    with PrivateBroker.start_or_skip() as broker:
        yield broker


METRICS = Metrics()  # this module's own registry: what its components count


def metric(name: str, labels: dict[str, str]) -> float:
    return METRICS.registry.get_sample_value(name, labels) or 0.0


def dropped_total() -> float:
    return sum(metric("sessionbus_events_dropped_total", {"type": t})
               for t in ("new", "remove", "get"))


def publish_failures_total() -> float:
    return sum(metric("sessionbus_publish_failures_total", {"reason": r})
               for r in ("timeout", "nack", "connection"))


async def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()


def live_ids(cache: PeerCache) -> set[bytes]:
    return {sid for sid, _ in cache.items()}


@dataclass
class Plan:
    """The events, chunk by chunk: (kind, origin, session id, DER or expiry)."""

    chunks: list[list[tuple[str, str, bytes, Any]]] = field(default_factory=list)
    live: set[bytes] = field(default_factory=set)
    removed: set[bytes] = field(default_factory=set)
    probes: list[bytes] = field(default_factory=list)  # first NEW of each chunk: never removed

    @property
    def events(self) -> int:
        return sum(len(c) for c in self.chunks)


def make_plan(seed: int = 7) -> Plan:
    rng = random.Random(seed)
    now = int(time.time())
    plan = Plan()
    removable: list[tuple[bytes, str]] = []
    for c in range(CHUNKS):
        chunk: list[tuple[str, str, bytes, Any]] = []
        n_new = NEW_PER_CHUNK + (REMOVE_PER_CHUNK if c == 0 else 0)
        for i in range(n_new):
            sid = os.urandom(32)
            origin = ORIGINS[(c * n_new + i) % len(ORIGINS)]
            chunk.append(("new", origin, sid, make_session_der(sid, CTX, now, LIFETIME)))
            plan.live.add(sid)
            if i == 0:
                plan.probes.append(sid)
            else:
                removable.append((sid, origin))
        if c > 0:
            # REMOVEs of sessions made in earlier chunks; a quarter come from another origin
            # (a revoke issued on another node than the one that made the session)
            for _ in range(REMOVE_PER_CHUNK):
                sid, origin = removable.pop(rng.randrange(len(removable) - n_new + 1))
                if rng.random() < 0.25:
                    origin = rng.choice([o for o in ORIGINS if o != origin])
                chunk.append(("remove", origin, sid, float(now + LIFETIME)))
                plan.live.discard(sid)
                plan.removed.add(sid)
        plan.chunks.append(chunk)
    return plan


class Clients:
    """Every connection of the scenario, through the proxy, each counting its reconnects."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.conns: dict[str, AbstractRobustConnection] = {}
        self.reconnects: dict[str, int] = {}

    async def open(self, name: str) -> AbstractRobustConnection:
        conn = await connect(replace(self.settings, name=f"sbtest {name}"))
        self.conns[name] = conn
        self.reconnects[name] = 0

        def counted(*_: Any) -> None:
            self.reconnects[name] += 1

        conn.reconnect_callbacks.add(counted)
        return conn

    def all_connected(self) -> bool:
        return all(c.connected.is_set() for c in self.conns.values())

    async def close(self) -> None:
        for c in self.conns.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.close(), 5)


@pytest.fixture
async def direct(private_broker: PrivateBroker) -> AsyncIterator[AbstractRobustConnection]:
    """A connection straight to the private broker (not through the proxy): setup, checks."""
    conn = await connect(BrokerSettings(url=private_broker.url, name="sbtest direct"))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def proxy(private_broker: PrivateBroker) -> AsyncIterator[TcpProxy]:
    p = TcpProxy("127.0.0.1", private_broker.port)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def cleanup(conn: AbstractRobustConnection, topo: Topology, queues: list[str]) -> None:
    async with asyncio.timeout(30):
        ch = await conn.channel()
        try:
            await delete_all(ch, topo, queues)
        finally:
            await ch.close()


async def read_stream_offsets(conn: AbstractRobustConnection, topo: Topology) -> list[int]:
    """Every offset of the session stream, read by a subscriber that saw no fault."""
    seen: list[int] = []

    def decode(body: bytes, headers: Mapping[str, Any]) -> int:
        seen.append(int(headers["x-stream-offset"]))
        return 0

    async def handle(_: int) -> None:
        return None

    sub: Subscription[int] = Subscription(conn, topo, StreamSource(topo.session_stream, "first"),
                                          decode, handle, prefetch=512)
    await sub.start()
    last, deadline = -1, time.monotonic() + 60
    while len(seen) != last and time.monotonic() < deadline:  # until a second brings nothing
        last = len(seen)
        await asyncio.sleep(1.0)
    await sub.stop(5)
    return seen


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.deadline(600)
async def test_three_cuts_and_a_restart_during_10000_events_lose_nothing(
    private_broker: PrivateBroker, proxy: TcpProxy, direct: AbstractRobustConnection,
) -> None:
    plan = make_plan()
    assert plan.events == 10_000
    topo = Topology(prefix=unique_prefix(), stream_max_age_s=LIFETIME)
    keys = farm_keys()
    ch = await direct.channel()
    await declare_core(ch, topo)
    await ch.close()
    clients = Clients(BrokerSettings(url=proxy.url(), backoff_min=0.1, backoff_max=1.0))
    replicas: list[Replicator] = []
    boxes: list[Outbox] = []
    tasks: list[asyncio.Task[None]] = []
    reader: Subscription[DecodedBatch] | None = None
    handled_offsets: list[int] = []
    dropped0, failures0 = dropped_total(), publish_failures_total()
    recoveries: list[tuple[str, float, float]] = []  # (fault, seconds down, seconds to recover)
    in_flight_at_fault: list[bool] = []
    try:
        # Bounded, whatever happens. The private node's own stop_app and start_app are bounded
        # at 60 s and 60 + 65 s (tests/private_broker.py): a slow but bounded restart must fail
        # there, with its reason, not be cut short here (a CI run saw ~240 s pass in it once).
        async with asyncio.timeout(480):
            for name in REPLICAS:
                r = Replicator(await clients.open(name), topo, keys, PeerCache(),
                               ReplicatorSettings(node_id=name, sid_ctx=CTX,
                                                  session_lifetime=LIFETIME))
                await r.start()
                replicas.append(r)

            def decode(body: bytes, headers: Mapping[str, Any]) -> DecodedBatch:
                handled_offsets.append(int(headers["x-stream-offset"]))
                return decode_batch(body, headers, keys)

            async def ignore(_: DecodedBatch) -> None:
                return None

            reader = Subscription(await clients.open("stream-reader"), topo,
                                  StreamSource(topo.session_stream, "first"), decode, ignore)
            await reader.start()
            for origin in ORIGINS:
                box = Outbox(origin, topo, keys, metrics=METRICS)
                conn = await clients.open(origin)
                tasks.append(asyncio.get_running_loop().create_task(box.run(conn)))
                boxes.append(box)
            by_origin = dict(zip(ORIGINS, boxes, strict=True))
            reached = {k: asyncio.Event() for k in FAULTS}
            injected = {k: asyncio.Event() for k in FAULTS}

            async def feed() -> None:
                for c, chunk in enumerate(plan.chunks):
                    for i, (kind, origin, sid, extra) in enumerate(chunk):
                        if i == len(chunk) // 2 and c in FAULTS:
                            reached[c].set()
                            await injected[c].wait()
                        box = by_origin[origin]
                        if kind == "new":
                            box.put_new(sid, CTX, time.time() + LIFETIME, extra)
                        else:
                            box.put_remove(sid, CTX, extra, RemoveReason.REVOKE)
                    await asyncio.sleep(CHUNK_PAUSE)

            def publishing() -> bool:
                return any(b._in_flight for b in boxes)  # batches awaiting their confirms

            async def inject() -> None:
                try:
                    for c, kind in FAULTS.items():
                        await reached[c].wait()
                        # mid-stream: strike while publishers wait for confirms
                        in_flight_at_fault.append(await wait_until(publishing, 2, step=0.0005))
                        t0 = time.monotonic()
                        if kind == "cut":
                            n = await proxy.cut()
                            assert n >= len(clients.conns), f"cut {n} connections"
                            down = 0.0
                            injected[c].set()
                        else:
                            await asyncio.to_thread(private_broker.stop_app)
                            injected[c].set()  # events keep coming while the broker is down
                            await asyncio.sleep(1.0)
                            await asyncio.to_thread(private_broker.start_app)
                            down = time.monotonic() - t0
                        # recovered: every connection is back (channels restored) and the first
                        # event put after the fault is in every replica
                        probe, n = plan.probes[c + 1], len(recoveries) + 1
                        assert await wait_until(
                            lambda probe=probe, n=n: all(probe in r.cache for r in replicas)
                            and all(v >= n for v in clients.reconnects.values()), 60
                        ), f"no recovery after {kind} at chunk {c}: {clients.reconnects}"
                        recoveries.append((kind, down, time.monotonic() - t0))
                finally:  # never leave the feeder waiting (an assertion above ends it)
                    for e in injected.values():
                        e.set()

            t_start = time.monotonic()
            injector = asyncio.get_running_loop().create_task(inject())
            await feed()
            t_fed = time.monotonic()
            await asyncio.wait_for(injector, 120)
            for box in boxes:
                assert await box.flush(60), f"{box.origin}: {box.depth} events never confirmed"
            converged = await wait_until(
                lambda: all(live_ids(r.cache) == plan.live for r in replicas), 60, step=0.1
            )
            t_converged = time.monotonic()

            # --- every replica holds exactly the expected sessions --------------------------------
            lost = max(len(plan.live - live_ids(r.cache)) for r in replicas)
            for r in replicas:
                have = live_ids(r.cache)
                assert len(have) == len(plan.live), (r.settings.node_id, len(have), len(plan.live))
                assert have == plan.live, r.settings.node_id
                assert not any(sid in r.cache for sid in plan.removed), r.settings.node_id
            assert converged
            assert dropped_total() == dropped0, "the outbox dropped events"
            for name, n in clients.reconnects.items():
                assert n >= len(FAULTS), f"{name} reconnected {n} times"

            # --- the stream subscription resumed at last + 1 each time ----------------------------
            assert await reader.drained(30)
            truth = await read_stream_offsets(direct, topo)
            assert truth == list(range(len(truth)))
            seen = sorted(set(handled_offsets))
            twice = len(handled_offsets) - len(seen)
            assert seen == truth, (
                f"missing offsets: {sorted(set(truth) - set(seen))[:10]}"
            )
            assert twice <= len(FAULTS), f"{twice} offsets handled twice"
            # --- publishers had unconfirmed batches when struck, and sent them again ------------
            failures = publish_failures_total() - failures0
            assert any(in_flight_at_fault), "no fault caught a publish in flight"
            assert failures >= 1, "no publish failed: the faults did not strike mid-stream"
            cuts = [(took, hit) for (kind, _, took), hit in zip(recoveries, in_flight_at_fault,
                                                                  strict=True) if kind == "cut"]
            record(
                "broker connections cut (during the 10,000 events below)",
                injected=(f"{len(cuts)} cuts, each: all {len(clients.conns)} connections (3 "
                          "publishers, 3 replicas, 1 stream reader) reset by the proxy"),
                lost=lost, rejected=0, recover_s=max(t for t, _ in cuts),
                note=(f"{sum(h for _, h in cuts)} of {len(cuts)} struck while batches awaited "
                      "confirms; recovery (each: "
                      + ", ".join(f"{t * 1000:.0f} ms" for t, _ in cuts)
                      + "): fault until every connection is restored and the next event put is "
                      "in all 3 replicas"),
                group="broker-loss",
            )
            (_, down, took), = [r for r in recoveries if r[0] == "restart"]
            record(
                "broker restart (during the 10,000 events below)",
                injected=f"1 restart: rabbitmqctl stop_app / start_app, down {down:.1f} s",
                lost=lost, rejected=0, recover_s=took,
                note=("events kept being produced while it was down (held in the outboxes); "
                      "recovery: stop_app until every connection is restored and the next event "
                      "put is in all 3 replicas"),
                group="broker-loss",
            )
            record(
                "broker loss, end state (3 cuts + 1 restart, 10,000 NEW/REMOVE)",
                injected=(f"{plan.events:,} events ({plan.events - len(plan.removed):,} NEW, "
                          f"{len(plan.removed):,} REMOVE) over {t_fed - t_start:.1f} s"),
                lost=lost, rejected=0, recover_s=t_converged - t_fed,
                note=(f"3 replicas = expected set ({len(plan.live):,} live, {len(plan.removed):,} "
                      f"removed absent); {failures:.0f} batches failed and were resent, 0 dropped; "
                      f"stream reader: "
                      f"{len(truth):,} offsets, 0 missing, {twice} handled twice; recovery: last "
                      "put until every replica exact"),
                group="broker-loss",
            )
    finally:
        for t in tasks:
            t.cancel()
        if reader is not None:
            await reader.stop(5)
        for r in replicas:
            await r.stop(5)
        await clients.close()
        await cleanup(direct, topo, [])  # v2: no per-node queues


@pytest.mark.broker
async def test_a_stream_subscription_resumes_after_each_cut_at_the_next_offset(
    private_broker: PrivateBroker, proxy: TcpProxy, direct: AbstractRobustConnection,
) -> None:
    """3,000 one-event messages in the stream, a reader (prefetch 64, slow handler) cut 3 times
    mid-delivery: it handles every offset, each once but for at most the one in flight per cut,
    and never starts over (which aio-pika's own consumer recovery would do)."""
    topo = Topology(prefix=unique_prefix(), stream_max_age_s=LIFETIME)
    keys = farm_keys()
    n, cuts_at = 3000, (600, 1400, 2200)
    clients = Clients(BrokerSettings(url=proxy.url(), backoff_min=0.1, backoff_max=1.0))
    handled: list[int] = []
    sub: Subscription[int] | None = None
    try:
        async with asyncio.timeout(120):
            ch = await direct.channel()
            await declare_core(ch, topo)
            await ch.close()
            box = Outbox("origin-a", topo, keys, OutboxSettings(batch_max=1, in_flight=64),
                         metrics=METRICS)
            task = asyncio.get_running_loop().create_task(box.run(direct))
            now = int(time.time())
            for _ in range(n):
                sid = os.urandom(32)
                box.put_new(sid, CTX, time.time() + LIFETIME,
                            make_session_der(sid, CTX, now, LIFETIME))
            assert await box.flush(60)
            task.cancel()

            def decode(body: bytes, headers: Mapping[str, Any]) -> int:
                decode_batch(body, headers, keys)
                return int(headers["x-stream-offset"])

            async def handle(offset: int) -> None:
                handled.append(offset)
                await asyncio.sleep(0.0005)  # slow enough that deliveries wait in the prefetch

            sub = Subscription(await clients.open("stream-reader"), topo,
                               StreamSource(topo.session_stream, "first"), decode, handle,
                               prefetch=64)
            await sub.start()
            for at in cuts_at:
                assert await wait_until(lambda at=at: len(handled) >= at, 30)
                assert await proxy.cut() >= 1
            assert await wait_until(lambda: len(set(handled)) >= n, 60)
            await asyncio.sleep(0.5)  # nothing more may come
    finally:
        if sub is not None:
            await sub.stop(5)
        await clients.close()
        await cleanup(direct, topo, [])
    assert clients.reconnects["stream-reader"] >= len(cuts_at)
    assert sorted(set(handled)) == list(range(n)), "an offset is missing"
    twice = len(handled) - n
    assert twice <= len(cuts_at), f"{twice} offsets handled twice"
    record(
        "stream subscription cut mid-delivery",
        injected=f"{len(cuts_at)} cuts while reading {n:,} stream messages (prefetch 64)",
        lost=0, rejected=0, recover_s=None,
        note=f"resumed at last offset + 1 each time: {n:,} offsets handled, 0 missing, "
             f"{twice} handled twice, no replay from the start",
        group="broker-loss",
    )


@pytest.mark.broker
async def test_confirmed_events_survive_a_restart_while_the_consumer_is_down(
    private_broker: PrivateBroker, direct: AbstractRobustConnection,
) -> None:
    topo = Topology(prefix=unique_prefix(), stream_max_age_s=LIFETIME)
    keys = farm_keys()
    ch = await direct.channel()
    await declare_core(ch, topo)
    await ch.close()
    # v2: no per-node queue holds events for a stopped consumer; the restarted one warm-joins
    # from the stream (replay), which is where confirmed events are kept.
    settings = ReplicatorSettings(node_id="replica-d", sid_ctx=CTX, replay=True,
                                  session_lifetime=LIFETIME)
    task: asyncio.Task[None] | None = None
    replica: Replicator | None = None
    try:
        async with asyncio.timeout(120):  # bounded, whatever happens
            first = Replicator(direct, topo, keys, PeerCache(), settings)
            await first.start()
            await first.stop(5)
            box = Outbox("origin-a", topo, keys, metrics=METRICS)
            task = asyncio.get_running_loop().create_task(box.run(direct))
            now = int(time.time())
            ids = [os.urandom(32) for _ in range(2000)]
            for sid in ids:
                der = make_session_der(sid, CTX, now, LIFETIME)
                box.put_new(sid, CTX, time.time() + LIFETIME, der)
            for sid in ids[:500]:
                box.put_remove(sid, CTX, now + LIFETIME, RemoveReason.REVOKE)
            assert await box.flush(60)  # confirmed: persisted by the broker
            task.cancel()
            t0 = time.monotonic()
            await asyncio.to_thread(private_broker.restart)
            assert await wait_until(lambda: direct.connected.is_set(), 30)
            replica = Replicator(direct, topo, keys, PeerCache(), settings)
            await replica.start()
            expected = set(ids[500:])
            assert await wait_until(lambda: live_ids(replica.cache) == expected, 60, step=0.05)
            took = time.monotonic() - t0
            assert not any(sid in replica.cache for sid in ids[:500])
            record(
                "broker restart with the consumer down (durable queue, persistent messages)",
                injected="2,500 confirmed events queued, then stop_app / start_app",
                lost=0, rejected=0, recover_s=took,
                note="recovery: restart until the restarted consumer holds exactly the 1,500 "
                     "expected sessions",
                group="broker-loss",
            )
    finally:
        if task is not None:
            task.cancel()
        if replica is not None:
            await replica.stop(5)
        await cleanup(direct, topo, [])


@pytest.mark.broker
async def test_reconnects_back_off_with_jitter(private_broker: PrivateBroker) -> None:
    proxy = TcpProxy("127.0.0.1", private_broker.port)
    await proxy.start()
    proxy.reject_new = True  # every connection attempt is closed at once: an unreachable broker
    conn = await connect(BrokerSettings(url=proxy.url(), backoff_min=0.2, backoff_max=2.0),
                         wait=False)
    try:
        await asyncio.sleep(8.0)
        attempts = list(proxy.attempts)
        proxy.reject_new = False
        t0 = time.monotonic()
        assert await wait_until(lambda: conn.connected.is_set(), 10)
        took = time.monotonic() - t0
    finally:
        await conn.close()
        await proxy.stop()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) >= 4, attempts
    # bounded: never faster than backoff_min * 0.5, never slower than backoff_max * 1.5
    assert all(0.09 <= g <= 3.1 for g in gaps), gaps
    # grows with the outage: the later gaps are longer than the first ones
    assert statistics.mean(gaps[-2:]) > statistics.mean(gaps[:2]), gaps
    # jittered: not one fixed interval
    assert len({round(g, 2) for g in gaps}) > 1, gaps
    record(
        "reconnect backoff (broker unreachable 8 s)",
        injected="every connection attempt reset for 8 s",
        lost=0, rejected=0, recover_s=took,
        note=(f"{len(attempts)} attempts, gaps {min(gaps):.2f}-{max(gaps):.2f} s (jittered, "
              "growing with the outage, bounded by backoff_max); recovery: broker back until "
              "connected"),
        group="broker-loss",
    )


async def test_jittered_interval_grows_with_the_outage_and_is_bounded() -> None:
    conn = JitteredConnection(URL("amqp://guest:guest@127.0.0.1:1/"))
    conn.backoff_min, conn.backoff_max = 0.2, 10.0
    assert 0.1 <= conn.reconnect_interval < 0.3  # connected: the minimum, jittered
    now = time.monotonic()
    conn._down_since = now - 4.0
    samples = [conn.reconnect_interval for _ in range(200)]
    assert min(samples) >= 2.0 and max(samples) < 6.1
    assert statistics.pstdev(samples) > 0.2  # jittered
    conn._down_since = now - 3600
    assert max(conn.reconnect_interval for _ in range(200)) < 15.0
