"""The TLS node: handshakes/s with replication on vs off, CPU per resumed vs full handshake, and
cross-node resumption in a 3-node farm.

Every node is a real ``sessionbus node`` process (TLS 1.2, ECDSA P-256 certificate, the built-in
HTTP answer, ``--metrics`` on loopback) on the real broker under a unique prefix. A node's
handshake counts come from its own ``sessionbus_handshakes_total`` metric, its CPU time from
``/proc/PID/stat`` (all threads), read at the start and end of each window.

1. Full handshakes/s of one node, replication on vs ``--no-replication``: the load is
   ``openssl s_time -new -tls1_2 -www /`` (C: a fresh handshake + one request per connection),
   ``CLIENTS`` processes at once (fixed concurrency), alternating between the two nodes in short
   windows so that a noisy neighbour hits both alike. Target: ratio >= 0.95.
2. Node CPU per resumed handshake vs per full handshake, on node B: sessions are made on node A
   (full handshakes), replicated to B through the bus, then resumed on B (B's get callback answers
   from its replica); the full-handshake windows are fresh handshakes on B. Same Python client
   (threads, blocking ``ssl``), same request, same concurrency in both. Target: ratio <= 0.4.
3. Cross-node resumption: nodes a, b, c; ``NEW_RATE`` new sessions/s round robin; each client
   reconnects to the next node 50 ms after its first connection ended, offering its session.
   Figure: % of those reconnections that resumed. Target: >= 99.9 %. Run again at
   ``LOW_RATE`` for comparison (what fails at 500/s on a saturated machine and what does not).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (
    AMQP_URL,
    Child,
    Children,
    bus_key_file,
    cpu_seconds,
    delete_topology,
    free_port,
    make_cert,
    quick,
    row,
    unique_prefix,
)

CLIENTS = 3  # s_time processes at once (part 1)
THREADS = 4  # Python client threads (part 2)
NEW_RATE = 500.0  # new sessions/s (part 3)
LOW_RATE = 100.0  # the same at a rate a busy 2-core machine sustains, to tell capacity from lag
RECONNECT_AFTER = 0.05

TARGET_ON_OFF = 0.95
TARGET_RESUMED_FULL = 0.4
TARGET_RESUMED_PCT = 99.9


def _sizes() -> dict[str, float]:
    if quick():
        return {"window": 1.5, "rounds": 3, "cpu_window": 3.0, "cpu_rounds": 2,
                "sessions": 200, "farm_s": 4.0}
    return {"window": 2.0, "rounds": 7, "cpu_window": 8.0, "cpu_rounds": 4, "sessions": 400,
            "farm_s": 10.0}


# --- nodes ------------------------------------------------------------------------------------


@dataclass
class NodeProc:
    node_id: str
    port: int
    metrics_port: int
    child: Child

    @property
    def pid(self) -> int:
        return self.child.pid

    def counters(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(("sessionbus_handshakes_total", "sessionbus_lookups_total",
                                "sessionbus_replica_sessions ",
                                "sessionbus_replication_lag_seconds_bucket",
                                "sessionbus_replication_lag_seconds_count")):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def snapshot(self) -> Snapshot:
        c = self.counters()
        return Snapshot(
            time.monotonic(), cpu_seconds(self.pid),
            c.get('sessionbus_handshakes_total{kind="full"}', 0.0),
            c.get('sessionbus_handshakes_total{kind="resumed"}', 0.0),
        )


@dataclass
class Snapshot:
    wall: float
    cpu: float
    full: float
    resumed: float


@dataclass
class Farm:
    prefix: str
    key_file: Path
    cert: Path
    key: Path
    children: Children = field(default_factory=Children)
    nodes: list[NodeProc] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_BUS_KEY_FILE": str(self.key_file),
                "SESSIONBUS_PREFIX": self.prefix, "SESSIONBUS_LOG_LEVEL": "info"}

    def start(self, node_id: str, replication: bool = True) -> NodeProc:
        port, mport = free_port(), free_port()
        args = ["-m", "sessionbus", "node", "--node-id", node_id, "--listen",
                f"127.0.0.1:{port}", "--cert", str(self.cert), "--key", str(self.key),
                "--metrics", f"127.0.0.1:{mport}"]
        if not replication:
            args.append("--no-replication")
        child = self.children.add(Child.python(args, self.env()))
        node = NodeProc(node_id, port, mport, child)
        self.nodes.append(node)
        return node

    def ready(self, node: NodeProc, replication: bool = True) -> None:
        node.child.wait_for("listening on", 60)
        if replication:
            node.child.wait_for("is warm", 60)

    def settle(self) -> None:
        """Wait out the warm-join replay's live margin (ReplicatorSettings.live_margin, 5 s).

        Until a batch sealed more than 5 s after a node declared its replica queue arrives, the
        node's stream replay stays subscribed and every event reaches it twice (stream + queue):
        a start-up cost, not the steady state this benchmark measures.
        """
        time.sleep(5.5)

    def queues(self) -> list[str]:
        return [f"{self.prefix}.replica.{n.node_id}" for n in self.nodes]


@contextlib.contextmanager
def farm() -> Any:
    prefix = unique_prefix()
    with tempfile.TemporaryDirectory(prefix="sbbench-") as tmp, bus_key_file(Path(tmp)) as kf:
        cert, key = make_cert(Path(tmp))
        f = Farm(prefix, kf, cert, key)
        try:
            yield f
        finally:
            f.children.stop_all()
            delete_topology(prefix, f.queues())


# --- Python TLS client ------------------------------------------------------------------------


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def connect(port: int, ctx: ssl.SSLContext,
            session: ssl.SSLSession | None = None) -> tuple[bool, ssl.SSLSession | None]:
    """One connection: handshake (offering ``session``), one request, read to EOF, close
    (without close_notify, as Python's client does)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        # Without it, a resumed TLS 1.2 handshake (client Finished, then the request: two small
        # writes with no reply between) waits ~40 ms for the server's delayed ACK (Nagle).
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        tls.sendall(_REQUEST)
        while tls.recv(4096):
            pass
        result = bool(tls.session_reused), tls.session
        tls.close()
        return result


def _loop_clients(threads: int, seconds: float, work: Any) -> int:
    """Run ``work(i)`` in ``threads`` threads for ``seconds``; returns how many calls finished."""
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def loop(t: int) -> None:
        i = t
        while time.monotonic() < stop:
            with contextlib.suppress(OSError):
                work(i)
                counts[t] += 1
            i += threads

    ts = [threading.Thread(target=loop, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts)


# --- 1. handshakes/s, replication on vs off ---------------------------------------------------


def _s_time(port: int, seconds: float) -> list[Child]:
    return [
        Child(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-tls1_2",
               "-www", "/", "-time", str(int(seconds) + 30)])
        for _ in range(CLIENTS)
    ]


def _window(node: NodeProc, seconds: float) -> tuple[float, float, float]:
    """(handshakes, seconds, node CPU seconds) of ``seconds`` of s_time load on ``node``."""
    loaders = _s_time(node.port, seconds)
    try:
        time.sleep(0.5)  # connect, ramp up
        a = node.snapshot()
        time.sleep(seconds)
        b = node.snapshot()
    finally:
        for c in loaders:
            c.stop(5)
    time.sleep(0.3)  # let the node finish what was in flight
    return b.full - a.full, b.wall - a.wall, b.cpu - a.cpu


def measure_on_off() -> dict[str, Any]:
    """Alternating windows on the two nodes; per-round ratios, so a burst of load from
    elsewhere on the machine spoils one round rather than the figure (the median is kept)."""
    sizes = _sizes()
    with farm() as f:
        on = f.start("bench-on")
        off = f.start("bench-off", replication=False)
        f.ready(on)
        f.ready(off, replication=False)
        f.settle()
        # warm both (code paths, first connections)
        _window(on, 1.0)
        _window(off, 1.0)
        rounds: list[dict[str, tuple[float, float, float]]] = []
        for r in range(int(sizes["rounds"])):
            order = (("off", off), ("on", on)) if r % 2 == 0 else (("on", on), ("off", off))
            rounds.append({name: _window(node, sizes["window"]) for name, node in order})

    def rate(w: tuple[float, float, float]) -> float:
        return w[0] / w[1] if w[1] else 0.0

    def cpu(w: tuple[float, float, float]) -> float:
        return w[2] / max(1.0, w[0]) * 1e6

    return {
        "on_rate": statistics.median(rate(x["on"]) for x in rounds),
        "off_rate": statistics.median(rate(x["off"]) for x in rounds),
        "ratio": statistics.median(
            rate(x["on"]) / rate(x["off"]) if rate(x["off"]) else 0.0 for x in rounds),
        "ratios": [round(rate(x["on"]) / rate(x["off"]), 3) if rate(x["off"]) else 0.0
                   for x in rounds],
        "on_cpu_us": statistics.median(cpu(x["on"]) for x in rounds),
        "off_cpu_us": statistics.median(cpu(x["off"]) for x in rounds),
    }


# --- 2. CPU per resumed (peer's session) vs per full handshake --------------------------------


def measure_cpu_per_handshake() -> dict[str, Any]:
    sizes = _sizes()
    ctx = client_context()
    with farm() as f:
        a, b = f.start("bench-a"), f.start("bench-b")
        f.ready(a)
        f.ready(b)
        f.settle()
        n = int(sizes["sessions"])
        sessions: list[ssl.SSLSession] = []
        lock = threading.Lock()

        def make(_: int) -> None:
            reused, s = connect(a.port, ctx)
            if s is not None and not reused:
                with lock:
                    sessions.append(s)

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(make, range(n)))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # replicated to B?
            if b.counters().get("sessionbus_replica_sessions", 0) >= len(sessions):
                break
            time.sleep(0.2)
        misses = [0]

        def resume(i: int) -> None:
            reused, _ = connect(b.port, ctx, sessions[i % len(sessions)])
            if not reused:
                misses[0] += 1

        def full(_: int) -> None:
            connect(b.port, ctx)

        _loop_clients(THREADS, 1.0, resume)  # warm-up
        _loop_clients(THREADS, 1.0, full)
        rounds = int(sizes["cpu_rounds"])
        per: list[dict[str, float]] = []
        n_full = n_resumed = 0.0
        for r in range(rounds):
            order = (("full", full), ("resumed", resume)) if r % 2 == 0 else (
                ("resumed", resume), ("full", full))
            got: dict[str, float] = {}
            for name, work in order:
                s0 = b.snapshot()
                _loop_clients(THREADS, sizes["cpu_window"] / rounds, work)
                s1 = b.snapshot()
                if name == "full":
                    n_full += s1.full - s0.full
                    got[name] = (s1.cpu - s0.cpu) / max(1.0, s1.full - s0.full) * 1e6
                else:
                    n_resumed += s1.resumed - s0.resumed
                    got[name] = (s1.cpu - s0.cpu) / max(1.0, s1.resumed - s0.resumed) * 1e6
            per.append(got)
    return {
        "full_cpu_us": statistics.median(x["full"] for x in per),
        "resumed_cpu_us": statistics.median(x["resumed"] for x in per),
        "ratio": statistics.median(x["resumed"] / x["full"] for x in per if x["full"]),
        "full_n": n_full, "resumed_n": n_resumed, "misses": misses[0],
        "sessions": len(sessions),
    }


# --- 3. cross-node resumption -----------------------------------------------------------------


def measure_cross_node(rate: float, seconds: float) -> dict[str, Any]:
    ctx = client_context()
    with farm() as f:
        nodes = [f.start(x) for x in ("bench-a", "bench-b", "bench-c")]
        for n in nodes:
            f.ready(n)
        f.settle()
        ports = [n.port for n in nodes]
        total = int(rate * seconds)
        lock = threading.Lock()
        res = {"resumed": 0, "not_resumed": 0, "first_failed": 0, "second_failed": 0,
               "first_reused": 0}
        late: list[float] = []
        first_done: list[float] = []

        def job(k: int) -> None:
            i = k % 3
            try:
                reused, session = connect(ports[i], ctx)
            except OSError:
                with lock:
                    res["first_failed"] += 1
                return
            t = time.monotonic()
            with lock:
                first_done.append(t)
                if reused:
                    res["first_reused"] += 1
            time.sleep(max(0.0, t + RECONNECT_AFTER - time.monotonic()))
            with lock:
                late.append(time.monotonic() - t - RECONNECT_AFTER)
            try:
                again, _ = connect(ports[(i + 1) % 3], ctx, session)
            except OSError:
                with lock:
                    res["second_failed"] += 1
                return
            with lock:
                res["resumed" if again else "not_resumed"] += 1

        start = time.monotonic()
        with ThreadPoolExecutor(64) as pool:
            for k in range(total):
                delay = start + k / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(job, k)
        span = (max(first_done) - start) if first_done else 0.0
        time.sleep(0.5)
        within = applied = 0.0
        for node in nodes:
            c = node.counters()
            within += c.get('sessionbus_replication_lag_seconds_bucket{le="0.05"}', 0.0)
            applied += c.get("sessionbus_replication_lag_seconds_count", 0.0)
    tried = res["resumed"] + res["not_resumed"] + res["second_failed"]
    return {**res, "tried": tried, "total": total,
            "new_rate": len(first_done) / span if span else 0.0,
            "pct": 100.0 * res["resumed"] / tried if tried else 0.0,
            "late_max_ms": max(late) * 1000 if late else 0.0,
            "lag_within_50ms_pct": 100.0 * within / applied if applied else 0.0}


# --- rows -------------------------------------------------------------------------------------


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    m = measure_on_off()
    on_cpu, off_cpu = m["on_cpu_us"], m["off_cpu_us"]
    rows.append(row(
        f"full handshakes/s of one node, replication on (base: off), {CLIENTS} s_time clients",
        m["on_rate"], "hs/s", m["off_rate"], f"ratio ≥{TARGET_ON_OFF}",
        m["ratio"] >= TARGET_ON_OFF, ratio=m["ratio"],
        note=f"medians of {len(m['ratios'])} alternating rounds (round ratios {m['ratios']}); "
        f"node CPU per full handshake (connection + one request): on {on_cpu:.0f} us, "
        f"off {off_cpu:.0f} us (off/on {off_cpu / on_cpu if on_cpu else 0:.3f})",
    ))
    c = measure_cpu_per_handshake()
    ratio = c["ratio"]
    rows.append(row(
        "node CPU per resumed handshake, session from a peer via the replica (base: full)",
        c["resumed_cpu_us"], "us", c["full_cpu_us"], f"ratio ≤{TARGET_RESUMED_FULL}",
        ratio <= TARGET_RESUMED_FULL, ratio=ratio,
        note=f"median of per-round ratios; {c['resumed_n']:.0f} resumed / {c['full_n']:.0f} "
        f"full handshakes measured on B "
        f"({c['sessions']} sessions made on A; {c['misses']} resumption attempts fell back to "
        f"a full handshake); per connection: accept, handshake, one request, close",
    ))
    sizes = _sizes()
    for rate, seconds, what in ((NEW_RATE, sizes["farm_s"], "target"),
                                (LOW_RATE, sizes["farm_s"] / 2, "for comparison")):
        x = measure_cross_node(rate, seconds)
        rows.append(row(
            f"cross-node resumption, 3 nodes, {rate:.0f} new sessions/s ({what}), reconnect to "
            f"another node after {RECONNECT_AFTER * 1000:.0f} ms", x["pct"], "%", None,
            f"≥{TARGET_RESUMED_PCT} %", x["pct"] >= TARGET_RESUMED_PCT and x["tried"] > 0,
            note=f"{x['resumed']}/{x['tried']} resumed; achieved {x['new_rate']:.0f} new/s; "
            f"failed connections: first {x['first_failed']}, second {x['second_failed']}; "
            f"reconnect started up to {x['late_max_ms']:.0f} ms late; replication lag <= 50 ms "
            f"for {x['lag_within_50ms_pct']:.1f} % of the events the nodes applied",
        ))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        os.environ["SESSIONBUS_BENCH_QUICK"] = "1"
    from bench.__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
