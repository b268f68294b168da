"""A real three-node RabbitMQ cluster: failover with nothing missed, while broker nodes fail.

Three private RabbitMQ nodes (``PrivateCluster``: loopback, own names and cookie, torn down by
PID) are joined and provisioned by the admin step.  Three TLS nodes (``sessionbus node``
processes) each get all three URLs.  A load generator (an outbox of its own, on all three URLs
too) publishes 5,000 NEW/REMOVE events at a steady rate, in three phases; in each phase one
fault strikes:

1. ``stop_app`` of the broker node TLS node c1 is connected to (back after 5 s);
2. SIGKILL of the broker node leading the session stream, with publishes in flight (booted
   again); a fourth TLS node is started while it is down and must warm-join and report ready;
3. SIGKILL of the broker node leading the dead-letter queue (booted again).

After each phase every replica must hold exactly the expected sessions (counts of live and
removed sessions, all outboxes empty) with no process restarted by hand, and the session stream
must hold every event the load generator's broker confirmed.  All along, ``openssl s_client``
makes a full handshake on one TLS node and resumes it on another, every 0.5 s; the nodes use
stateless tickets and a key publisher rotates every 6 s, so rotations strike during every fault
and no node may refuse a ticket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.reliability_table import record
from sessionbus.bus.connection import BrokerSettings, connect
from sessionbus.bus.topology import Topology, declare_admin
from sessionbus.consumer.subscription import StreamSource, Subscription
from sessionbus.metrics import Metrics
from sessionbus.producer.outbox import Outbox
from sessionbus.schemas.codec import decode_batch
from sessionbus.schemas.events import EventType, RemoveReason
from tests.farm_support import Proc, farm_files, free_port, s_client, unique_prefix
from tests.farm_support import start as start_proc
from tests.helpers_der import make_session_der
from tests.helpers_keys import keys_for
from tests.private_broker import PrivateBroker, PrivateCluster

pytestmark = [pytest.mark.slow, pytest.mark.tls]

SID_CTX = b"sessionbus"  # the nodes' default --service
EVENTS = 5_000
PHASES = 3
RATE = 110.0  # events per second, steady, while a fault strikes


def scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class TlsNode:
    name: str
    port: int
    metrics: int
    proc: Proc

    def broker_port(self) -> int | None:
        for key in scrape(self.metrics):
            m = re.match(r'sessionbus_broker_info\{host="127\.0\.0\.1:(\d+)"\}', key)
            if m:
                return int(m.group(1))
        return None


@dataclass
class Probe:
    """``openssl s_client``: a full handshake on one TLS node, resumed on another, every 0.5 s."""

    nodes: list[TlsNode]
    tmp: Path
    results: list[tuple[float, str, str, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        pairs = [(a, b) for a in self.nodes for b in self.nodes if a is not b]
        i = 0
        deadline = time.monotonic() + 900  # bounded whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            a, b = pairs[i % len(pairs)]
            i += 1
            sess = self.tmp / f"probe-{i % 2}.pem"
            t = time.monotonic()
            with contextlib.suppress(Exception):
                sess.unlink(missing_ok=True)
                s_client(a.port, "1.2", sess_out=sess)
                if sess.exists():
                    time.sleep(0.05)  # replication delay, generously
                    again = s_client(b.port, "1.2", sess_in=sess)
                    self.results.append((t, a.name, b.name, "Reused, TLS" in again))
            self._stop.wait(max(0.0, 0.5 - (time.monotonic() - t)))

    def window(self, t0: float, t1: float) -> list[tuple[float, str, str, bool]]:
        return [r for r in self.results if t0 <= r[0] <= t1]


class Load:
    """The load generator: NEW events of fresh synthetic sessions and REMOVEs of earlier ones."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.live: list[bytes] = []
        self.removed: set[bytes] = set()
        self.new_ids: list[bytes] = []
        self.sent = 0
        self.rng = random.Random(18)

    async def run(self, n: int, rate: float) -> None:
        t0 = time.monotonic()
        for i in range(n):
            if self.live and i % 4 == 3:
                sid = self.live.pop(self.rng.randrange(len(self.live)))
                self.removed.add(sid)
                self.outbox.put_remove(sid, SID_CTX, time.time() + 7200, RemoveReason.REVOKE)
            else:
                sid = os.urandom(32)
                self.live.append(sid)
                self.new_ids.append(sid)
                der = make_session_der(sid, SID_CTX, int(time.time()), 7200)
                self.outbox.put_new(sid, SID_CTX, time.time() + 7200, der)
            self.sent += 1
            ahead = t0 + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)


def queue_leader(broker: PrivateBroker, queue: str) -> str:
    out = broker.ctl("-q", "list_queues", "name", "leader", "--no-table-headers", timeout=60)
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == queue:
            return parts[1]
    raise AssertionError(f"no leader for {queue}: {out.stdout}{out.stderr}")


async def stream_ids(url: str, topo: Topology, key_file: Path) -> tuple[set[bytes], set[bytes]]:
    """The load generator's NEW and REMOVE session ids the session stream holds."""
    keys = keys_for(key_file)
    conn = await connect(BrokerSettings(url=url))
    new: set[bytes] = set()
    rem: set[bytes] = set()

    def decode(body: bytes, headers: Mapping[str, Any]) -> int:
        batch = decode_batch(body, headers, keys, sid_ctx=SID_CTX)
        if batch.origin == "loadgen":
            (new if batch.type is EventType.NEW else rem).update(
                e.session_id for e in batch.events)
        return 0

    async def handle(_: int) -> None:
        return None

    sub: Subscription[int] = Subscription(conn, topo, StreamSource(topo.session_stream, "first"),
                                          decode, handle, prefetch=512, report_rejects=False)
    try:
        await sub.start()
        last, deadline = -1, time.monotonic() + 60
        while sub.handled != last and time.monotonic() < deadline:  # until a second is quiet
            last = sub.handled
            await asyncio.sleep(1.0)
    finally:
        await sub.stop(5)
        await conn.close()
    return new, rem


@pytest.mark.deadline(900)
async def test_three_tls_nodes_survive_each_broker_node_fault(tmp_path: Path) -> None:
    with PrivateCluster.start_or_skip(3) as cluster:
        await run_cluster_faults(cluster, tmp_path)


async def run_cluster_faults(cluster: PrivateCluster, tmp_path: Path) -> None:
    topo = Topology(prefix=unique_prefix())
    admin = await connect(BrokerSettings(url=cluster.urls[0]))
    ch = await admin.channel()
    await declare_admin(ch, topo, cluster_size=3)
    await ch.close()
    await admin.close()
    key_file, cert, key = farm_files(tmp_path)
    urls = ",".join(cluster.urls)
    env = {"SESSIONBUS_AMQP_URL": urls, "SESSIONBUS_BUS_KEY_FILE": str(key_file),
           "SESSIONBUS_PREFIX": topo.prefix}
    nodes: list[TlsNode] = []

    def start_node(name: str) -> TlsNode:
        port, mport = free_port(), free_port()
        proc = start_proc(["node", "--node-id", name, "--listen", f"127.0.0.1:{port}",
                           "--cert", str(cert), "--key", str(key), "--tickets", "stateless",
                           "--metrics", f"127.0.0.1:{mport}"], env=env)
        node = TlsNode(name, port, mport, proc)
        nodes.append(node)
        return node

    metrics = Metrics()
    lg_conn = await connect(BrokerSettings(url=urls, name="sbtest loadgen"))
    outbox = Outbox("loadgen", topo, keys_for(key_file), metrics=metrics)
    publisher = asyncio.get_running_loop().create_task(outbox.run(lg_conn))
    load = Load(outbox)
    probe: Probe | None = None
    rows: list[dict[str, Any]] = []
    keys_metrics = free_port()
    # Rotating every 6 s (announced 2 s ahead): several rotations strike during each fault.
    publisher_proc = start_proc(["keys", "--publisher-id", "keys-a", "--rotate-every", "6",
                                 "--announce-ahead", "2", "--keep", "4",
                                 "--metrics", f"127.0.0.1:{keys_metrics}"], env=env)

    def rotations() -> float:
        return scrape(keys_metrics).get("sessionbus_key_rotations_total", 0.0)

    try:
        publisher_proc.wait_for("key publisher keys-a started", 30)
        for n in ("c1", "c2", "c3"):
            start_node(n)
        for node in nodes:
            node.proc.wait_for("listening on", 30)
        await wait_for(lambda: all(ready(n.metrics) for n in nodes), 30, "three nodes ready")
        probe = Probe(list(nodes), tmp_path)
        probe.start()
        per_phase = EVENTS // PHASES

        async def phase(fault: str, strike: Any) -> None:
            t0 = time.monotonic()
            loading = asyncio.get_running_loop().create_task(
                load.run(per_phase if fault != "dlx" else EVENTS - 2 * per_phase, RATE))
            await asyncio.sleep(3.0)  # publishes in flight when it strikes
            t_fault = time.monotonic()
            rotations0 = await asyncio.to_thread(rotations)
            back_at = await strike()
            rotated = await asyncio.to_thread(rotations) - rotations0
            await loading
            assert await outbox.flush(60), "the load generator's events were not all confirmed"
            t_conv = await converge(nodes, load, 90)
            t_end = time.monotonic()
            window = probe.window(t_fault, t_end) if probe else []
            failed = [r for r in window if not r[3]]
            late = [r for r in failed if r[0] > back_at + 5.0]
            refused = await asyncio.to_thread(lambda: sum(
                scrape(n.metrics).get('sessionbus_ticket_decryptions_total{result="unknown"}', 0)
                for n in nodes))
            rows.append({"fault": fault, "probes": len(window), "failed": len(failed),
                         "late": len(late), "converged_s": t_conv - back_at,
                         "phase_s": t_end - t0, "rotations": rotated, "refused": refused})
            assert rotated >= 1, "no key rotation during the fault"
            assert refused == 0, f"{refused} tickets refused"
            assert window, "no probe ran during the fault"
            assert not late, f"resumption still failing 5 s after the broker came back: {late}"

        async def stop_app_of_c1() -> float:
            port = nodes[0].broker_port()
            assert port is not None
            victim = cluster.node_of_port(port)
            await asyncio.to_thread(victim.stop_app)
            await asyncio.sleep(5.0)
            await asyncio.to_thread(victim.start_app)
            return time.monotonic()

        async def kill_stream_leader() -> float:
            leader = await asyncio.to_thread(queue_leader, cluster.nodes[0], topo.session_stream)
            victim = next(n for n in cluster.nodes if n.name == leader)
            await asyncio.to_thread(victim.kill)
            # a TLS node started while the broker node is down: warm join, ready
            late = start_node("c4")
            late.proc.wait_for("listening on", 30)
            # ready includes "ticket key ring held": it got the ring from a live broker node
            await wait_for(lambda: ready(late.metrics), 30, "c4 ready while a broker node is down")
            await asyncio.sleep(2.0)
            await asyncio.to_thread(victim.boot_again)
            return time.monotonic()

        async def kill_dlx_leader() -> float:
            live = [n for n in cluster.nodes if n.vm_pid() is not None]
            leader = await asyncio.to_thread(queue_leader, live[0], topo.dead_queue)
            victim = next(n for n in cluster.nodes if n.name == leader)
            await asyncio.to_thread(victim.kill)
            await asyncio.sleep(5.0)
            await asyncio.to_thread(victim.boot_again)
            return time.monotonic()

        await phase("stop_app", stop_app_of_c1)
        await phase("stream leader", kill_stream_leader)
        await phase("dlx", kill_dlx_leader)
        assert load.sent == EVENTS
        # every confirmed event is in the session stream
        new, rem = await stream_ids(cluster.urls[1], topo, key_file)
        missing_new = set(load.new_ids) - new
        missing_rem = load.removed - rem
        assert not missing_new and not missing_rem, (len(missing_new), len(missing_rem))
        for node in nodes:
            assert node.proc.popen.poll() is None, f"{node.name} exited:\n{node.proc.output()}"
    finally:
        if probe is not None:
            probe.stop()
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await publisher
        with contextlib.suppress(Exception):
            await lg_conn.close()
        for node in nodes:
            node.proc.stop()
        publisher_proc.stop()
        for row in rows:
            print("cluster fault", row)
    probes = probe.results if probe else []
    for row in rows:
        record(
            f"cluster: {row['fault']} (3 broker nodes, 3 TLS nodes)",
            injected={"stop_app": "stop_app of the broker node c1 used, 5 s",
                      "stream leader": "SIGKILL of the session stream's leader node, publishes "
                                       "in flight; a TLS node started meanwhile",
                      "dlx": "SIGKILL of the dead-letter queue's leader node"}[row["fault"]],
            lost=0, rejected=0, recover_s=row["converged_s"],
            note=(f"{row['probes']} cross-node s_client resumptions (stateless tickets) during "
                  f"the fault, {row['failed']} not reused, none later than 5 s after the node's "
                  f"return; {row['rotations']:.0f} key rotations meanwhile, 0 tickets refused; "
                  "every replica equal to the expected set"),
            group="broker-loss",
        )
    print(f"probes: {len(probes)}, reused {sum(r[3] for r in probes)}")


async def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(cond):
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.2)


async def converge(nodes: list[TlsNode], load: Load, timeout: float) -> float:
    """Wait until every replica holds exactly the expected sessions; returns when."""
    deadline = time.monotonic() + timeout
    last: dict[str, tuple[float, float]] = {}
    while True:
        pages = await asyncio.to_thread(lambda: [scrape(n.metrics) for n in nodes])
        own = sum(p.get('sessionbus_events_published_total{type="new"}', 0.0) for p in pages)
        want_live = len(load.live) + own
        want_removed = float(len(load.removed))
        last = {n.name: (p.get("sessionbus_replica_sessions", -1.0),
                         p.get("sessionbus_replica_tombstones", -1.0))
                for n, p in zip(nodes, pages, strict=True)}
        empty = all(p.get("sessionbus_outbox_depth", 1.0) == 0 for p in pages)
        if empty and all(v == (want_live, want_removed) for v in last.values()):
            return time.monotonic()
        assert time.monotonic() < deadline, (
            f"replicas never converged: want {(want_live, want_removed)}, have {last}")
        await asyncio.sleep(0.25)
