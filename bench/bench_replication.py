"""Replication: events/s from the producer API to applied in a replica, and lag at a fixed rate.

sessionbus: ``Outbox.put_new`` (300-byte DER sessions, confirms on, default ``OutboxSettings``) in
this process → RabbitMQ → ``Replicator`` + ``PeerCache`` in ANOTHER process (``python -m
bench.bench_replication --child sessionbus ...``), which validates, applies and records the time
each event was applied. Another process is the fair setting on 2 cores: the producer (a TLS node)
and a replica are different processes in a farm, and each gets its own core.

Baseline, in the same run and the same two processes: raw aio-pika, one persistent message per
event of the same size (8-byte time + 32-byte id + 300-byte DER), publisher confirms with 256
publishes in flight, a consumer with prefetch 256 that acks every 64th message with
``multiple=True`` (and any tail after 20 ms) and keeps each event in a dict.

Figures: events/s (first put → last applied in the replica), and replication lag (event time at
the producer → applied in the replica) p50/p99 at 2,000 events/s for a few seconds, after a
warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (
    AMQP_URL,
    SID_CTX,
    Child,
    Children,
    DerFactory,
    bus_key_file,
    cpu_seconds,
    delete_topology,
    percentile,
    quick,
    row,
    unique_prefix,
)

ORIGIN = "bench-origin"
REPLICA = "bench-replica"
DER_SIZE = 300
RAW_WINDOW = 256
RAW_PREFETCH = 256
RAW_ACK_EVERY = 64
LAG_RATE = 2000.0

TARGET_RATIO = 10.0
TARGET_EVENTS_PER_S = 100_000.0
TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0

_TIME = struct.Struct("<d")


def _sizes() -> dict[str, float]:
    if quick():
        return {"sb_events": 100_000, "raw_events": 8_000, "lag_seconds": 2.0, "warmup": 2_000}
    return {"sb_events": 300_000, "raw_events": 20_000, "lag_seconds": 4.0, "warmup": 4_000}


def raw_queue(prefix: str) -> str:
    return f"{prefix}.bench.raw"


# =============================================================================================
# The replica process


class _Recorder:
    """Counts applied events for the current ``expect`` command; optionally their lags."""

    def __init__(self) -> None:
        self.expected = 0
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.lags: list[float] | None = None
        self.waits: list[float] = []  # sessionbus: event time -> batch sealed (in the outbox)
        self.cpu0 = 0.0
        self.done = asyncio.Event()

    def arm(self, n: int, lag: bool) -> None:
        self.expected, self.count, self.first, self.last = n, 0, 0.0, 0.0
        self.lags = [] if lag else None
        self.waits = []
        self.cpu0 = cpu_seconds(os.getpid())
        self.done.clear()

    def applied(self, times: list[float], sealed: float | None = None) -> None:
        now = time.time()
        if not self.count:
            self.first = now
        self.count += len(times)
        self.last = now
        if self.lags is not None:
            self.lags.extend(now - t for t in times)
            if sealed is not None:
                self.waits.extend(sealed - t for t in times)
        if self.expected and self.count >= self.expected:
            self.done.set()

    def result(self, timed_out: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "result": True, "n": self.count, "first": self.first, "last": self.last,
            "cpu": cpu_seconds(os.getpid()) - self.cpu0, "timeout": timed_out,
        }
        if self.lags:
            ms = [x * 1000 for x in self.lags]
            out.update(p50=percentile(ms, 50), p99=percentile(ms, 99), max=max(ms),
                       mean=sum(ms) / len(ms))
        if self.lags and self.waits:
            ms = [x * 1000 for x in self.waits]
            out.update(wait_p50=percentile(ms, 50), wait_p99=percentile(ms, 99))
        return out


async def _commands(rec: _Recorder) -> None:
    """Read ``{"cmd": "expect", "n": N, "lag": bool, "timeout": s}`` lines from stdin."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "")

    threading.Thread(target=reader, daemon=True).start()
    while True:
        line = await lines.get()
        if not line:
            return
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            return
        rec.arm(int(cmd["n"]), bool(cmd.get("lag")))
        print(json.dumps({"armed": cmd.get("id", 0)}), flush=True)
        timed_out = False
        try:
            await asyncio.wait_for(rec.done.wait(), float(cmd.get("timeout", 60)))
        except TimeoutError:
            timed_out = True
        print(json.dumps(rec.result(timed_out)), flush=True)


async def _child_sessionbus(prefix: str, key_file: str) -> None:
    from sessionbus.bus.connection import BrokerSettings, connect
    from sessionbus.bus.topology import Topology, declare_core
    from sessionbus.consumer.peer_cache import PeerCache
    from sessionbus.consumer.replicator import Replicator, ReplicatorSettings
    from sessionbus.schemas.codec import DecodedBatch
    from sessionbus.schemas.sealing import load_bus_keys

    rec = _Recorder()

    class BenchReplicator(Replicator):
        def apply(self, batch: DecodedBatch) -> list[tuple[int, str]] | None:
            failed = super().apply(batch)
            rec.applied([ev.time for ev in batch.events], batch.time)
            return failed

    topo = Topology(prefix=prefix)
    conn = await connect(BrokerSettings(url=AMQP_URL, name="sessionbus bench replica"))
    ch = await conn.channel()
    await declare_core(ch, topo)
    await ch.close()
    replicator = BenchReplicator(
        conn, topo, load_bus_keys(key_file), PeerCache(),
        ReplicatorSettings(node_id=REPLICA, sid_ctx=SID_CTX, replay=False),
    )
    await replicator.start()
    print(json.dumps({"ready": True}), flush=True)
    try:
        await _commands(rec)
    finally:
        await replicator.stop(5)
        await conn.close()


async def _child_raw(prefix: str) -> None:
    import aio_pika

    rec = _Recorder()
    store: dict[bytes, bytes] = {}
    conn = await aio_pika.connect_robust(AMQP_URL, client_properties={
        "connection_name": "sessionbus bench raw consumer"})
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=RAW_PREFETCH)
    queue = await ch.declare_queue(raw_queue(prefix), durable=True)
    unacked = 0
    last: Any = None
    unpack = _TIME.unpack_from

    async def on_message(message: Any) -> None:
        nonlocal unacked, last
        body = message.body
        store[body[8:40]] = body[40:]
        rec.applied([unpack(body)[0]])
        unacked += 1
        last = message
        if unacked >= RAW_ACK_EVERY:
            unacked = 0
            await message.ack(multiple=True)

    async def ack_tail() -> None:
        nonlocal unacked
        while True:
            await asyncio.sleep(0.02)
            if unacked and last is not None:
                unacked = 0
                await last.ack(multiple=True)

    await queue.consume(on_message)
    tail = asyncio.get_running_loop().create_task(ack_tail())
    print(json.dumps({"ready": True}), flush=True)
    try:
        await _commands(rec)
    finally:
        tail.cancel()
        with contextlib.suppress(Exception):
            await conn.close()


def child_main(argv: list[str]) -> None:
    mode, prefix = argv[0], argv[1]
    if mode == "sessionbus":
        asyncio.run(_child_sessionbus(prefix, argv[2]))
    else:
        asyncio.run(_child_raw(prefix))


# =============================================================================================
# The producer side (this process)


class _Remote:
    """Talks to a replica child: arm it for N events, then wait for its result."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self._next = 0
        self._seq = 0

    def arm(self, n: int, lag: bool, timeout: float) -> None:
        self._seq += 1
        self.child.send({"cmd": "expect", "n": n, "lag": lag, "timeout": timeout,
                         "id": self._seq})
        i, _ = self.child.read_json("armed", 30, self._next)
        self._next = i + 1

    async def result(self, timeout: float) -> dict[str, Any]:
        i, res = await asyncio.to_thread(self.child.read_json, "result", timeout, self._next)
        self._next = i + 1
        return res


async def _sessionbus_runs(prefix: str, key_file: Path, remote: _Remote,
                           sizes: dict[str, float]) -> dict[str, Any]:
    from sessionbus.bus.connection import BrokerSettings, connect
    from sessionbus.bus.topology import Topology
    from sessionbus.producer.outbox import Outbox
    from sessionbus.schemas.sealing import load_bus_keys

    conn = await connect(BrokerSettings(url=AMQP_URL, name="sessionbus bench producer"))
    outbox = Outbox(ORIGIN, Topology(prefix=prefix), load_bus_keys(key_file))
    publisher = asyncio.get_running_loop().create_task(outbox.run(conn))
    factory = DerFactory(DER_SIZE)
    expires = factory.expires
    put = outbox.put_new
    half = outbox._s.capacity // 2
    out: dict[str, Any] = {}
    try:
        # warm-up: channels open, code paths hot
        n = int(sizes["warmup"])
        remote.arm(n, False, 60)
        for sid, der in factory.sessions(n):
            put(sid, SID_CTX, expires, der)
        await remote.result(60)

        # throughput
        n = int(sizes["sb_events"])
        sessions = factory.sessions(n)
        remote.arm(n, False, 120)
        cpu0 = cpu_seconds(os.getpid())
        t0 = time.time()
        i = 0
        while i < n:
            if outbox.depth > half:
                await asyncio.sleep(0.001)
                continue
            end = min(n, i + 2048)
            for sid, der in sessions[i:end]:
                put(sid, SID_CTX, expires, der)
            i = end
            await asyncio.sleep(0)
        res = await remote.result(150)
        await outbox.flush(10)
        res["producer_cpu"] = cpu_seconds(os.getpid()) - cpu0
        res["t0"] = t0
        out["throughput"] = res
        del sessions

        # lag at a fixed rate
        n = int(LAG_RATE * sizes["lag_seconds"])
        sessions = factory.sessions(n)
        remote.arm(n, True, sizes["lag_seconds"] + 60)
        start = time.monotonic()
        done = 0
        while done < n:
            due = min(n, int((time.monotonic() - start) * LAG_RATE) + 1)
            while done < due:
                sid, der = sessions[done]
                put(sid, SID_CTX, expires, der)
                done += 1
            await asyncio.sleep(0.0005)
        out["lag"] = await remote.result(60)
    finally:
        await outbox.flush(10)
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        await conn.close()
    return out


async def _raw_runs(prefix: str, remote: _Remote, sizes: dict[str, float]) -> dict[str, Any]:
    import aio_pika

    conn = await aio_pika.connect_robust(AMQP_URL, client_properties={
        "connection_name": "sessionbus bench raw producer"})
    ch = await conn.channel(publisher_confirms=True)
    exchange = ch.default_exchange
    key = raw_queue(prefix)
    window = asyncio.Semaphore(RAW_WINDOW)
    tasks: set[asyncio.Task[None]] = set()
    factory = DerFactory(DER_SIZE)
    pack = _TIME.pack
    persistent = aio_pika.DeliveryMode.PERSISTENT

    async def publish(body: bytes) -> None:
        try:
            await exchange.publish(aio_pika.Message(body, delivery_mode=persistent), key)
        finally:
            window.release()

    async def send(sid: bytes, der: bytes) -> None:
        await window.acquire()
        task = asyncio.get_running_loop().create_task(publish(pack(time.time()) + sid + der))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    out: dict[str, Any] = {}
    try:
        n = int(sizes["warmup"]) // 4
        remote.arm(n, False, 60)
        for sid, der in factory.sessions(n):
            await send(sid, der)
        await remote.result(60)

        n = int(sizes["raw_events"])
        sessions = factory.sessions(n)
        remote.arm(n, False, 120)
        cpu0 = cpu_seconds(os.getpid())
        t0 = time.time()
        for sid, der in sessions:
            await send(sid, der)
        res = await remote.result(150)
        res["producer_cpu"] = cpu_seconds(os.getpid()) - cpu0
        res["t0"] = t0
        out["throughput"] = res

        n = int(LAG_RATE * sizes["lag_seconds"])
        sessions = factory.sessions(n)
        remote.arm(n, True, sizes["lag_seconds"] + 60)
        start = time.monotonic()
        done = 0
        while done < n:
            due = min(n, int((time.monotonic() - start) * LAG_RATE) + 1)
            while done < due:
                await send(*sessions[done])
                done += 1
            await asyncio.sleep(0.0005)
        out["lag"] = await remote.result(60)
        if tasks:
            await asyncio.wait(list(tasks), timeout=10)
    finally:
        await conn.close()
    return out


def _rate(res: dict[str, Any]) -> float:
    span = res["last"] - res["t0"]
    return res["n"] / span if span > 0 else 0.0


def measure() -> dict[str, Any]:
    sizes = _sizes()
    prefix = unique_prefix()
    children = Children()
    with tempfile.TemporaryDirectory(prefix="sbbench-") as tmp, bus_key_file(Path(tmp)) as kf:
        try:
            sb = children.add(Child.python(
                ["-m", "bench.bench_replication", "--child", "sessionbus", prefix, str(kf)],
                stdin=True))
            sb.read_json("ready", 60)
            sb_res = asyncio.run(_sessionbus_runs(prefix, kf, _Remote(sb), sizes))
            sb.send({"cmd": "quit"})
            sb.stop()
            raw = children.add(Child.python(
                ["-m", "bench.bench_replication", "--child", "raw", prefix], stdin=True))
            raw.read_json("ready", 60)
            raw_res = asyncio.run(_raw_runs(prefix, _Remote(raw), sizes))
            raw.send({"cmd": "quit"})
        finally:
            children.stop_all()
            delete_topology(prefix, [f"{prefix}.replica.{REPLICA}", raw_queue(prefix)])
    return {"sessionbus": sb_res, "raw": raw_res}


def rows_from(m: dict[str, Any]) -> list[dict[str, Any]]:
    sb, raw = m["sessionbus"], m["raw"]
    sb_rate, raw_rate = _rate(sb["throughput"]), _rate(raw["throughput"])
    ratio = sb_rate / raw_rate if raw_rate else 0.0

    def us_per_event(res: dict[str, Any]) -> str:
        n = max(1, res["n"])
        return (f"CPU/event: producer {res['producer_cpu'] / n * 1e6:.1f} us, "
                f"replica {res['cpu'] / n * 1e6:.1f} us")

    rows = [
        row("replication events/s, producer API -> applied in a replica in another process "
            "(base: raw aio-pika)", sb_rate, "ev/s", raw_rate, f"ratio ≥{TARGET_RATIO:g}",
            ratio >= TARGET_RATIO,
            note=f"sessionbus {us_per_event(sb['throughput'])}; raw "
            f"{us_per_event(raw['throughput'])}"),
        row("replication events/s, absolute", sb_rate, "ev/s", None,
            f"≥{TARGET_EVENTS_PER_S:,.0f}", sb_rate >= TARGET_EVENTS_PER_S),
    ]
    sl, rl = sb["lag"], raw["lag"]
    saturated = raw_rate < LAG_RATE
    for q, target in (("p50", TARGET_P50_MS), ("p99", TARGET_P99_MS)):
        note = (f"of which waiting in the outbox (event time -> batch sealed): "
                f"{sl.get('wait_' + q, float('nan')):.2f} ms; max {sl.get('max', 0):.1f} ms")
        if saturated:
            note += (f"; the raw pipeline peaks at {raw_rate:,.0f} ev/s here, below "
                     f"{LAG_RATE:,.0f}/s, so its lag is mostly queueing")
        rows.append(row(
            f"replication lag {q} at {LAG_RATE:,.0f} events/s (base: raw aio-pika)", sl.get(q),
            "ms", rl.get(q), f"≤{target:g} ms", sl.get(q) is not None and sl[q] <= target,
            note=note,
        ))
    return rows


def run() -> list[dict[str, Any]]:
    return rows_from(measure())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.child:
        child_main(args.child)
        return
    if args.quick:
        os.environ["SESSIONBUS_BENCH_QUICK"] = "1"
    from bench.__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
