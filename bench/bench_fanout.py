"""Fan-out cost as a farm grows: per-node classic queues (the old design) vs stream consumers (v2).

A PRIVATE broker (``tests/private_broker.py``: own node, loopback port, temp dir) so its Erlang VM
(``beam.smp``) CPU, read from ``/proc``, is this benchmark's alone. For N = 3, 10 and 30
replicas, in a few processes of the bench (each replica its own connection, as a TLS node has):

* old: N durable classic queues ``<prefix>.replica.<i>`` bound to the topic exchange with
  ``session.new.*``, each consumed (prefetch 256, ack every 64th with ``multiple``), raw aio-pika;
* v2: N consumers of the one stream bound to the same exchange (``x-stream-offset`` next,
  prefetch 256, the same acks), raw aio-pika.

The bench publishes E persistent messages of 400 bytes (one event each, the low-rate case where
every event is its own message) with confirms, 256 in flight, and waits until every replica has
them all. Figures, per published event: broker CPU (beam.smp user+system), and ingest CPU per
replica (the replica processes' CPU / N): the consumers do no decoding, so this is what
receiving the fan-out costs, not what sessionbus does with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import Child, Children, cpu_seconds, quick, row

SIZES = (3, 10, 30)
PROCESSES = 3  # replica processes per point (the consumers are spread over them)
BODY = 400
WINDOW = 256
PREFETCH = 256
ACK_EVERY = 64
IDLE_SECONDS = 2.0


def events() -> int:
    return 1500 if quick() else 4000


def old_queue(prefix: str, i: int) -> str:
    return f"{prefix}.replica.r{i}"


# --- replica processes ------------------------------------------------------------------------


async def _child(design: str, url: str, prefix: str, first: int, count: int) -> None:
    import aio_pika

    from sessionbus.bus.topology import Topology

    topo = Topology(prefix=prefix)
    got = [0] * count
    conns = []
    for k in range(count):
        conn = await aio_pika.connect(url, client_properties={
            "connection_name": f"bench fanout {design} {first + k}"})
        conns.append(conn)
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=PREFETCH)
        if design == "old":
            q = await ch.declare_queue(old_queue(prefix, first + k), durable=True)
            await q.bind(topo.sessions_exchange, "session.new.*")
            args: dict[str, Any] = {}
        else:
            q = await ch.get_queue(topo.session_stream, ensure=True)
            args = {"x-stream-offset": "next"}

        def on_message(message: Any, k: int = k) -> Any:
            got[k] += 1
            if got[k] % ACK_EVERY == 0:
                return message.ack(multiple=True)
            return None

        async def handler(message: Any, cb: Any = on_message) -> None:
            done = cb(message)
            if done is not None:
                await done

        await q.consume(handler, arguments=args)
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        want, deadline = cmd["want"], time.monotonic() + cmd["timeout"]
        while min(got) < want and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        print(json.dumps({"done": min(got) >= want, "got": sum(got)}), flush=True)
    for conn in conns:
        with contextlib.suppress(Exception):
            await conn.close()


# --- the broker's VM ---------------------------------------------------------------------------


def beam_pid(home: Path) -> int:
    """The beam.smp process of the private node (its command line names its own home dir)."""
    short = str(home).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"beam" in cmd.split(b"\0")[0] and short in cmd:
            return int(entry)
    raise RuntimeError(f"no beam.smp process with home {home}")


# --- one point ---------------------------------------------------------------------------------


async def _publish(url: str, prefix: str, n: int) -> None:
    import aio_pika

    from sessionbus.bus.topology import Topology

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        x = await ch.get_exchange(Topology(prefix=prefix).sessions_exchange, ensure=False)
        body = os.urandom(BODY)
        pending: set[asyncio.Future[Any]] = set()
        for _ in range(n):
            pending.add(asyncio.ensure_future(x.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                "session.new.bench")))
            if len(pending) >= WINDOW:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.wait(pending, timeout=60)
    finally:
        await conn.close()


def _idle(beam: int, procs: list[Child], seconds: float) -> tuple[float, float, float]:
    b0, c0, t0 = cpu_seconds(beam), sum(cpu_seconds(p.pid) for p in procs), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(beam) - b0, sum(cpu_seconds(p.pid) for p in procs) - c0,
            time.monotonic() - t0)


def point(broker: Any, beam: int, design: str, n: int, prefix: str) -> dict[str, float]:
    children = Children()
    url = broker.url
    try:
        per = [n // PROCESSES + (1 if i < n % PROCESSES else 0) for i in range(PROCESSES)]
        firsts = [sum(per[:i]) for i in range(PROCESSES)]
        procs = [children.add(Child.python(
            ["-m", "bench.bench_fanout", "--child", design, url, prefix, str(f), str(c)],
            stdin=True)) for f, c in zip(firsts, per, strict=True) if c]
        for p in procs:
            p.read_json("ready", 60)
        time.sleep(0.5)  # consumers settled
        # What the idle broker and replicas burn (timers, stats, heartbeats) over as long as a
        # point takes is subtracted: on a small run it is not small.
        idle_b, idle_c, idle_s = _idle(beam, procs, IDLE_SECONDS)
        e = events()
        cpu_b0, cpu_c0 = cpu_seconds(beam), sum(cpu_seconds(p.pid) for p in procs)
        t0 = time.monotonic()
        asyncio.run(_publish(url, prefix, e))
        marks = [len(p.lines) for p in procs]
        for p in procs:
            p.send({"cmd": "wait", "want": e, "timeout": 120})
        ok = all(p.read_json("done", 130, m)[1]["done"] for p, m in zip(procs, marks,
                                                                         strict=True))
        span = time.monotonic() - t0
        cpu_b = cpu_seconds(beam) - cpu_b0
        cpu_c = sum(cpu_seconds(p.pid) for p in procs) - cpu_c0
        for p in procs:
            p.send({"cmd": "quit"})
        if not ok:
            raise RuntimeError(f"{design} N={n}: not every replica got {e} messages")
        cpu_b = max(0.0, cpu_b - idle_b / idle_s * span)
        cpu_c = max(0.0, cpu_c - idle_c / idle_s * span)
        return {"broker_us": cpu_b / e * 1e6, "ingest_us": cpu_c / n / e * 1e6,
                "seconds": span, "idle_broker_pct": idle_b / idle_s * 100}
    finally:
        children.stop_all()


def measure() -> dict[str, dict[int, dict[str, float]]]:
    import contextlib as _c

    import pytest  # PrivateBroker.start_or_skip skips through pytest

    from sessionbus.bus.topology import Topology, declare_admin
    from tests.private_broker import PrivateBroker

    out: dict[str, dict[int, dict[str, float]]] = {"old": {}, "new": {}}
    with _c.ExitStack() as stack:
        try:
            broker = stack.enter_context(PrivateBroker.start_or_skip())
        except pytest.skip.Exception as exc:
            raise RuntimeError(str(exc)) from None
        beam = beam_pid(broker.dir)
        prefix = "sbbench-fanout"

        async def provision() -> None:
            import aio_pika

            conn = await aio_pika.connect(broker.url)
            ch = await conn.channel()
            await declare_admin(ch, Topology(prefix=prefix), cluster_size=1)
            await conn.close()

        asyncio.run(provision())
        for n in SIZES:
            for design in ("old", "new"):
                out[design][n] = point(broker, beam, design, n, prefix)

                async def drop(n: int = n) -> None:  # the old design's queues go each time
                    import aio_pika

                    conn = await aio_pika.connect(broker.url)
                    ch = await conn.channel()
                    for i in range(n):
                        await ch.queue_delete(old_queue(prefix, i))
                    await conn.close()

                if design == "old":
                    asyncio.run(drop())
    return out


def growth(figures: dict[int, dict[str, float]], key: str) -> float:
    """How the figure grows from the smallest to the largest farm (x for 10x replicas)."""
    lo, hi = figures[SIZES[0]][key], figures[SIZES[-1]][key]
    return hi / lo if lo else float("nan")


def table(m: dict[str, dict[int, dict[str, float]]]) -> str:
    lines = ["| replicas | broker CPU/event, old (per-node queues) | broker CPU/event, v2 "
             "(stream) | ingest CPU/event per replica, old | ingest CPU/event per replica, v2 |",
             "|---|---|---|---|---|"]
    for n in SIZES:
        o, s = m["old"][n], m["new"][n]
        lines.append(f"| {n} | {o['broker_us']:.0f} us | {s['broker_us']:.0f} us | "
                     f"{o['ingest_us']:.0f} us | {s['ingest_us']:.0f} us |")
    idle = max(f["idle_broker_pct"] for d in m.values() for f in d.values())
    lines.append(
        f"\n(idle CPU subtracted: the idle broker used up to {idle:.0f}% of a core)"
        f"\nfrom {SIZES[0]} to {SIZES[-1]} replicas: broker CPU/event x"
        f"{growth(m['old'], 'broker_us'):.1f} (old) vs x{growth(m['new'], 'broker_us'):.1f} "
        f"(v2); ingest CPU per replica x{growth(m['old'], 'ingest_us'):.1f} (old) vs "
        f"x{growth(m['new'], 'ingest_us'):.1f} (v2)")
    return "\n".join(lines)


def rows_from(m: dict[str, dict[int, dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for n in SIZES:
        o, s = m["old"][n], m["new"][n]
        rows.append(row(f"broker CPU per replicated event, {n} replicas: stream (base: "
                        f"{n} per-node classic queues)", s["broker_us"], "us", o["broker_us"],
                        "report", None,
                        note=f"ingest CPU/event per replica: stream {s['ingest_us']:.0f} us, "
                        f"queues {o['ingest_us']:.0f} us"))
    rows.append(row(
        f"broker CPU/event growth {SIZES[0]} -> {SIZES[-1]} replicas: stream (base: queues)",
        growth(m["new"], "broker_us"), "x", growth(m["old"], "broker_us"), "report", None,
        note=table(m).split("\n\n")[-1]))
    return rows


def run() -> list[dict[str, Any]]:
    m = measure()
    print(table(m), flush=True)
    return rows_from(m)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.child:
        design, url, prefix, first, count = args.child
        asyncio.run(_child(design, url, prefix, int(first), int(count)))
        return
    if args.quick:
        os.environ["SESSIONBUS_BENCH_QUICK"] = "1"
    from bench.__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
