"""``sessionbus keys`` with stateless-ticket nodes, as separate processes over the real broker.

Nodes run with ``--no-replication`` so that a resumption can only come from a ticket (no session
cache is shared): what resumes here resumes through the farm's key ring.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import ssl
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sessionbus.bus.connection import BrokerSettings, connect
from sessionbus.bus.topology import Topology
from sessionbus.consumer.subscription import StreamSource, Subscription
from sessionbus.schemas.codec import decode_key_ring, encode_key_ring
from sessionbus.schemas.errors import EnvelopeError
from sessionbus.schemas.sealing import write_new_key_file
from sessionbus.schemas.ticket_keys import KeyRing
from tests.farm_support import (
    AMQP_URL,
    Proc,
    Processes,
    client_context,
    delete_topology,
    free_port,
    handshake,
    make_cert,
    provisioned_prefix,
)
from tests.helpers_keys import keys_for

pytestmark = [pytest.mark.broker, pytest.mark.tls]

VERSIONS = ("1.2", "1.3")
# Short rotation: a new key every 2 s, announced 1 s ahead.
FAST = ("--rotate-every", "2", "--announce-ahead", "1")


@dataclass
class KeysFarm:
    prefix: str
    key_file: Path
    cert: Path
    key: Path
    procs: Processes
    nodes: list[str] = field(default_factory=list)
    metrics_pages: list[str] = field(default_factory=list)
    cmdlines: list[bytes] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_BUS_KEY_FILE": str(self.key_file),
                "SESSIONBUS_PREFIX": self.prefix}

    def _start(self, args: list[str]) -> Proc:
        p = self.procs.start(args, self.env())
        with contextlib.suppress(OSError):
            self.cmdlines.append(Path(f"/proc/{p.pid}/cmdline").read_bytes())
        return p

    def publisher(self, pid: str, *extra: str) -> tuple[Proc, int]:
        mport = free_port()
        p = self._start(["keys", "--publisher-id", pid, *extra,
                         "--metrics", f"127.0.0.1:{mport}", "--log-level", "debug"])
        p.wait_for(f"key publisher {pid} started")
        return p, mport

    def node(self, node_id: str) -> tuple[Proc, int, int]:
        port, mport = free_port(), free_port()
        p = self._start(["node", "--node-id", node_id, "--listen", f"127.0.0.1:{port}",
                         "--cert", str(self.cert), "--key", str(self.key),
                         "--tickets", "stateless", "--no-replication",
                         "--metrics", f"127.0.0.1:{mport}", "--log-level", "debug"])
        p.wait_for("listening on")
        p.wait_for("ticket key ring")  # the ring arrived from the key stream's last chunk
        self.nodes.append(node_id)
        return p, port, mport

    def scrape(self, mport: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            page: str = r.read().decode()
        self.metrics_pages.append(page)
        return page


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[KeysFarm]:
    key_file = tmp_path / "bus.key"
    write_new_key_file(key_file)
    cert, key = make_cert(tmp_path)
    f = KeysFarm(provisioned_prefix(), key_file, cert, key, Processes())
    try:
        yield f
    finally:
        f.procs.stop_all()
        delete_topology(f.prefix, [f"{f.prefix}.replica.{n}" for n in f.nodes])


def metric(page: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + labels + '}' if labels else '')} (\S+)$",
                  page, re.M)
    assert m is not None, f"{name}{{{labels}}} not on the page"
    return float(m.group(1))


def ticket(port: int, version: str, timeout: float = 10.0) -> ssl.SSLSession:
    """A session with a ticket from ``port`` (a new farm's first key is announced first)."""
    ctx = client_context(version)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = handshake(port, ctx)
        if h.session is not None and h.session.has_ticket:
            return h.session
        time.sleep(0.1)
    raise AssertionError(f"no TLS {version} ticket from port {port} within {timeout}s")


@dataclass
class Client:
    """Keeps resuming across nodes with the newest ticket it got, counting what happened."""

    ports: list[int]
    sessions: dict[str, ssl.SSLSession]
    resumed: int = 0
    failures: list[str] = field(default_factory=list)
    new_tickets: int = 0
    _n: int = 0

    def step(self) -> None:
        port = self.ports[self._n % len(self.ports)]
        self._n += 1
        for version in VERSIONS:
            h = handshake(port, client_context(version), session=self.sessions[version])
            if not h.reused:
                self.failures.append(f"TLS {version} on port {port} at {time.time():.2f}")
            else:
                self.resumed += 1
            if h.session is not None and h.session.has_ticket:
                if h.session.id != self.sessions[version].id or h.session.time != \
                        self.sessions[version].time:
                    self.new_tickets += 1
                self.sessions[version] = h.session


def read_rings(prefix: str, key_file: Path, timeout: float = 10.0) -> list[KeyRing]:
    """Every ring on the key stream, decoded with the bus key (the test holds it)."""
    keys = keys_for(key_file)

    async def go() -> list[KeyRing]:
        rings: list[KeyRing] = []
        conn = await connect(BrokerSettings(url=AMQP_URL, name="sessionbus-tests"))

        async def handle(ring: KeyRing) -> None:
            rings.append(ring)

        def decode(body: bytes, headers: Mapping[str, Any]) -> KeyRing:
            return decode_key_ring(body, headers, keys)

        topo = Topology(prefix=prefix)
        sub: Subscription[KeyRing] = Subscription(
            conn, topo, StreamSource(topo.key_stream, "first"), decode, handle,
        )
        try:
            await sub.start()
            deadline = time.monotonic() + timeout
            last = -1
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                if len(rings) == last and rings:
                    break
                last = len(rings)
            await sub.stop(5)
        finally:
            await conn.close()
        return rings

    return asyncio.run(go())


def secret_forms(secret: bytes) -> list[bytes]:
    """Raw, hex and base64 forms (base64 at each of the three alignments inside a longer blob)."""
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        forms.append(enc(secret).rstrip(b"="))
        for shift in (1, 2):
            forms.append(enc(b"\0" * shift + secret)[4:-4])
        forms.append(enc(secret)[:-4])
    return forms


# --------------------------------------------------------------------------------------------


def test_ticket_minted_on_a_resumes_on_b_tls13_and_tls12(farm: KeysFarm) -> None:
    _, pm = farm.publisher("keys-a", "--announce-ahead", "1")
    _, pa, ma = farm.node("node-a")
    _, pb, mb = farm.node("node-b")
    for version in VERSIONS:
        session = ticket(pa, version)
        again = handshake(pb, client_context(version), session=session)
        assert again.reused, version
        assert again.body.endswith(b"node node-b\n")
        assert handshake(pa, client_context(version), session=session).reused
    assert metric(farm.scrape(mb), "sessionbus_ticket_decryptions_total",
                  'result="current"') >= 2
    page = farm.scrape(pm)
    assert metric(page, "sessionbus_key_leader") == 1
    assert metric(page, "sessionbus_ticket_keys") >= 1
    assert metric(farm.scrape(ma), "sessionbus_ticket_keys") >= 1


@pytest.mark.slow
def test_rotations_never_fail_a_resumption(farm: KeysFarm) -> None:
    keep, rotate = 3, 2.0
    _, pm = farm.publisher("keys-a", *FAST, "--keep", str(keep))
    _, pa, ma = farm.node("node-a")
    _, pb, mb = farm.node("node-b")
    oldest = {v: ticket(pa, v) for v in VERSIONS}
    minted = time.time()
    client = Client([pa, pb], dict(oldest))
    start_rotations = metric(farm.scrape(pm), "sessionbus_key_rotations_total")
    rotations = 0.0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and rotations < 4:
        client.step()
        time.sleep(0.05)
        rotations = metric(farm.scrape(pm), "sessionbus_key_rotations_total") - start_rotations
    assert rotations >= 4, f"only {rotations} rotations"
    assert client.failures == [], client.failures
    assert client.resumed >= 40
    renewed = sum(metric(farm.scrape(m), "sessionbus_ticket_decryptions_total",
                         'result="renewed"') for m in (ma, mb))
    assert renewed >= 3, "tickets under the previous key were not renewed"
    print(f"rotations {rotations:.0f}, resumptions {client.resumed}, renewed {renewed:.0f}, "
          f"new tickets {client.new_tickets}")

    # A node started now, several rotations later, resumes a ticket minted before it started.
    fresh = dict(client.sessions)
    _, pc, mc = farm.node("node-c")
    for version in VERSIONS:
        assert handshake(pc, client_context(version), session=fresh[version]).reused, version

    # A ticket older than its key's decrypt-only window gets a full handshake.
    erased_by = minted + rotate + keep * rotate + 0.3
    while time.time() < erased_by:
        time.sleep(0.1)
    unknown_before = metric(farm.scrape(mc), "sessionbus_ticket_decryptions_total",
                            'result="unknown"')
    for version in VERSIONS:
        h = handshake(pc, client_context(version), session=oldest[version])
        assert not h.reused, version
        assert h.session is not None and h.session.has_ticket  # and a fresh ticket
    assert metric(farm.scrape(mc), "sessionbus_ticket_decryptions_total",
                  'result="unknown"') == unknown_before + 2


@pytest.mark.slow
def test_failover_and_no_publisher_and_no_key_material_anywhere(farm: KeysFarm) -> None:
    pa_keys, ma_keys = farm.publisher("keys-a", *FAST, "--keep", "2")
    pa_keys.wait_for("leading")
    pb_keys, mb_keys = farm.publisher("keys-b", *FAST, "--keep", "2")
    pb_keys.wait_for("standing by")
    assert metric(farm.scrape(mb_keys), "sessionbus_key_leader") == 0
    _, pa, ma = farm.node("node-a")
    _, pb, mb = farm.node("node-b")
    client = Client([pa, pb], {v: ticket(pa, v) for v in VERSIONS})
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:  # let the first leader rotate a couple of times
        client.step()
        if metric(farm.scrape(ma_keys), "sessionbus_key_rotations_total") >= 2:
            break
        time.sleep(0.05)

    # SIGKILL the leader: the standby takes the lock and carries on rotating.
    killed = time.monotonic()
    os.kill(pa_keys.pid, signal.SIGKILL)
    took_over = None
    deadline = killed + 10
    while time.monotonic() < deadline:
        client.step()
        if metric(farm.scrape(mb_keys), "sessionbus_key_leader") == 1:
            took_over = time.monotonic() - killed
            break
        time.sleep(0.05)
    assert took_over is not None, pb_keys.output()
    assert took_over < 5
    pb_keys.wait_for("continuing ring")  # it read the ring back: no new timeline
    deadline = time.monotonic() + 10
    rotations = 0.0
    while time.monotonic() < deadline and rotations < 2:
        client.step()
        time.sleep(0.05)
        rotations = metric(farm.scrape(mb_keys), "sessionbus_key_rotations_total")
    assert rotations >= 2, "rotation did not go on after the failover"
    assert client.failures == [], client.failures
    print(f"failover took {took_over:.2f}s; resumptions {client.resumed}")

    # No publisher at all: nodes keep resuming with their last ring.
    for m in (ma, mb):
        farm.scrape(m)
    farm.scrape(mb_keys)
    os.kill(pb_keys.pid, signal.SIGKILL)
    before = client.resumed
    stop_at = time.monotonic() + 3
    while time.monotonic() < stop_at:
        client.step()
        time.sleep(0.05)
    assert client.failures == [], client.failures
    assert client.resumed - before >= 10
    for m in (ma, mb):
        farm.scrape(m)

    # Key material appears nowhere: read the real secrets from the key stream.
    rings = read_rings(farm.prefix, farm.key_file)
    secrets = {s for r in rings for k in r.keys for s in (k.hmac_secret, k.aes_secret)}
    n_keys = len(secrets) // 2
    print(f"rings read {len(rings)}, seqs {sorted({r.seq for r in rings})}, keys {n_keys}")
    assert n_keys >= 4, "expected several rotations' keys on the key stream"
    # exception text on a damaged ring, under the right bus key
    bad_errors = []
    keys = keys_for(farm.key_file)
    for ring in rings[:1]:
        body, headers = encode_key_ring(ring, "keys-a", keys)
        for damaged in (body[:-1] + bytes([body[-1] ^ 1]), body[:40]):
            with pytest.raises(EnvelopeError) as err:
                decode_key_ring(damaged, headers, keys)
            bad_errors.append(f"{err.value!s} {err.value!r}")
    farm.procs.stop_all()  # the readers have every line now
    outputs = [p.output().encode("utf-8", "surrogateescape") for p in farm.procs.procs]
    places = {
        "logs": b"\n".join(outputs),
        "metrics": "\n".join(farm.metrics_pages).encode(),
        "argv": b"\n".join(farm.cmdlines),
        "exceptions": "\n".join(bad_errors).encode(),
    }
    assert len(farm.cmdlines) == 4 and all(b"sessionbus" in c for c in farm.cmdlines)
    assert b"leading" in places["logs"] and b"sessionbus_key_leader" in places["metrics"]
    for where, text in places.items():
        for secret in secrets:
            for form in secret_forms(secret):
                assert form not in text, f"key material in {where}"


@pytest.mark.slow
def test_frozen_leader_loses_the_lock_and_cannot_publish_after_it_wakes(
    farm: KeysFarm,
) -> None:
    """SIGSTOP the leader: the broker drops its lock connection when the (short) heartbeat
    times out, the standby takes over, and the old leader, woken, publishes nothing more."""
    timeline = ("--rotate-every", "4", "--announce-ahead", "1", "--keep", "2")
    pa_keys, ma_keys = farm.publisher("keys-a", *timeline)
    pa_keys.wait_for("published ring")
    pb_keys, mb_keys = farm.publisher("keys-b", *timeline)
    pb_keys.wait_for("standing by")
    page = farm.scrape(ma_keys)
    published = sum(metric(page, "sessionbus_key_rings_published_total", f'reason="{r}"')
                    for r in ("change", "refresh"))
    frozen = time.monotonic()
    os.kill(pa_keys.pid, signal.SIGSTOP)
    try:
        took_over = None
        while time.monotonic() < frozen + 15:
            if metric(farm.scrape(mb_keys), "sessionbus_key_leader") == 1:
                took_over = time.monotonic() - frozen
                break
            time.sleep(0.1)
        assert took_over is not None, pb_keys.output()
    finally:
        os.kill(pa_keys.pid, signal.SIGCONT)
    pa_keys.wait_for("lost the lock", timeout=15)
    time.sleep(0.5)
    page = farm.scrape(ma_keys)
    assert metric(page, "sessionbus_key_leader") == 0
    assert sum(metric(page, "sessionbus_key_rings_published_total", f'reason="{r}"')
               for r in ("change", "refresh")) == published
    assert metric(farm.scrape(mb_keys), "sessionbus_key_leader") == 1
    print(f"frozen leader replaced after {took_over:.2f}s")
