"""h2o's ``ticket-store: memcached`` served the farm's key ring read-only by ``sessionbus cache
--h2o-tickets``: the format (h2o 2.2.5's src/ssl.c) and, for real, tickets that two h2o and a
``sessionbus node --tickets stateless`` mint resume on each other."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.schemas.ticket_keys import KeyRing, TicketKey
from sessionbus.servers.cache.h2o_tickets import H2O_TICKET_KEY, H2oTicketRing, render
from sessionbus.servers.cache.store import SetResult, Store
from tests.farm_support import Processes, bus_env, client_context, free_port, make_cert
from tests.h2o_support import H2o, h2o_binary
from tests.test_h2o import memcached_get

NOW = 1_800_000_000.0


def ring(*offsets: tuple[float, float, float]) -> KeyRing:
    """Keys encrypting from NOW+a until NOW+b, erased at NOW+c."""
    keys = tuple(TicketKey.generate(NOW + a - 60, NOW + a, NOW + b, NOW + c)
                 for a, b, c in offsets)
    return KeyRing(seq=1, issued_at=NOW, keys=keys)


def parse(yaml: bytes) -> list[dict[str, str]]:
    """h2o's entries (the subset of YAML render writes)."""
    entries: list[dict[str, str]] = []
    for line in yaml.decode().splitlines():
        k, _, v = line.lstrip("- ").partition(": ")
        if line.startswith("- "):
            entries.append({})
        entries[-1][k] = v
    return entries


def h2o_would_write(entries: list[dict[str, str]], now: float, lifetime: int) -> bool:
    """h2o's update_tickets (src/ssl.c): drop expired, then write if no key encrypts or the
    newest began more than lifetime/4 ago."""
    live = sorted((e for e in entries if now <= int(e["not_after"])),
                  key=lambda e: -int(e["not_before"]))
    encrypting = next((e for e in live if int(e["not_before"]) <= now), None)
    return encrypting is None or int(live[0]["not_before"]) + lifetime // 4 < now


def test_render_is_h2os_format_with_the_farms_secrets() -> None:
    r = ring((-7200, -3600, 3600), (-3600, 0.5, 7200), (30, 3630, 10800))  # old, current, ahead
    entries = parse(render(r, NOW) or b"")
    assert [bytes.fromhex(e["name"]) for e in entries] == [k.name for k in r.keys]
    for e, k in zip(entries, r.keys, strict=True):
        assert (e["cipher"], e["hash"]) == ("AES-256-CBC", "SHA256")
        key = bytes.fromhex(e["key"])  # cipher key, then the HMAC key padded to SHA-256's block
        assert key == k.aes_secret + k.hmac_secret + bytes(32)
        assert int(e["not_after"]) == int(k.erase_at) - 1
    old, current, ahead = (int(e["not_before"]) for e in entries)
    assert old < current == int(NOW) < ahead == int(NOW) + 30
    # the key h2o picks to encrypt is the farm's current one, and h2o never wants to write
    live = sorted(entries, key=lambda e: -int(e["not_before"]))
    assert next(e for e in live if int(e["not_before"]) <= NOW)["name"] == r.keys[1].name.hex()
    for lifetime in (60, 600, 3600):
        assert not h2o_would_write(entries, NOW, lifetime)


def test_no_current_key_serves_nothing() -> None:
    assert render(ring((30, 3630, 10800)), NOW) is None  # the first key is still announced


def test_the_ring_is_read_only_and_h2os_own_keys_never_stored() -> None:
    s = Store("cache-t", PeerCache(), None, session_lifetime=600, max_value=64 << 10,
              clock=lambda: NOW)
    assert s.get(H2O_TICKET_KEY) is None  # not following the key stream: a miss
    s.h2o_tickets = H2oTicketRing()
    assert s.get(H2O_TICKET_KEY) is None  # no ring yet
    s.h2o_tickets.update(ring((-10, 3600, 7200)))
    found = s.get(H2O_TICKET_KEY)
    assert found is not None and found[1].startswith(b"- name: ")
    assert s.set(H2O_TICKET_KEY, 0, b"- name: 00\n", None) is SetResult.NOT_STORED
    assert len(s.cache) == 0


# --- for real -----------------------------------------------------------------------------------

CACHES = ("cache-t-a", "cache-t-b")


@dataclass
class TicketFarm:
    directory: Path
    env: dict[str, str]
    cert: Path
    key: Path
    procs: Processes = field(default_factory=Processes)
    servers: list[H2o] = field(default_factory=list)

    def h2o(self, name: str) -> tuple[H2o, int]:
        port = free_port()
        p = self.procs.start(["cache", "--node-id", name, "--memcache", f"127.0.0.1:{port}",
                              "--h2o-tickets"], self.env)
        p.wait_for("listening")
        p.wait_for("ticket key ring")
        deadline = time.monotonic() + 15  # h2o's first fetch must find a key that encrypts
        while memcached_get(port, H2O_TICKET_KEY) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        d = self.directory / name
        d.mkdir()
        h = H2o(d, self.cert, self.key, port, tickets=True)
        self.servers.append(h)
        return h.start(), port


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[TicketFarm]:
    if h2o_binary() is None:
        pytest.skip("Debian's h2o is not installed: apt-get install h2o")
    cert, key = make_cert(tmp_path)
    with bus_env(tmp_path, *(f"replica.{c}" for c in CACHES), "replica.node-t") as env:
        f = TicketFarm(tmp_path, env, cert, key)
        try:
            yield f
        finally:
            for h in f.servers:
                h.stop()
            f.procs.stop_all()


def ticket_from(port: int, version: str) -> ssl.SSLSession:
    ctx = client_context(version)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        s = connect(port, ctx)
        if s[1] is not None and s[1].has_ticket:
            return s[1]
        time.sleep(0.2)
    raise AssertionError(f"no TLS {version} ticket from {port}")


def connect(port: int, ctx: ssl.SSLContext,
            session: ssl.SSLSession | None = None) -> tuple[bool, ssl.SSLSession | None]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while tls.recv(4096):  # the answer, and TLS 1.3's tickets with it
            pass
        return tls.session_reused, tls.session


def decrypted(metrics_port: int) -> float:
    """The node's sessionbus_ticket_decryptions_total{result="current"}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('sessionbus_ticket_decryptions_total{result="current"}'):
                return float(line.split()[-1])
    raise AssertionError("no sessionbus_ticket_decryptions_total on the node's page")


@pytest.mark.peers
@pytest.mark.broker
@pytest.mark.tls
@pytest.mark.deadline(150)
def test_two_h2o_and_a_node_follow_one_ring(farm: TicketFarm) -> None:
    keys = farm.procs.start(["keys", "--publisher-id", "keys-t", "--announce-ahead", "1"],
                            farm.env)
    keys.wait_for("key publisher keys-t started")
    (a, _), (b, _) = farm.h2o(CACHES[0]), farm.h2o(CACHES[1])
    node_port, metrics_port = free_port(), free_port()
    node = farm.procs.start(["node", "--node-id", "node-t", "--listen", f"127.0.0.1:{node_port}",
                             "--cert", str(farm.cert), "--key", str(farm.key),
                             "--tickets", "stateless", "--no-replication",
                             "--metrics", f"127.0.0.1:{metrics_port}"], farm.env)
    node.wait_for("listening on")
    node.wait_for("ticket key ring")
    for version in ("1.2", "1.3"):
        ctx = client_context(version)
        # a ticket one h2o minted resumes on the other: the key is the farm's, not h2o's own
        for made, other in ((a, b), (b, a)):
            t = ticket_from(made.port, version)
            assert connect(other.port, ctx, t)[0], (version, made.port, other.port)
        # the node holds the same key and decrypts h2o's ticket; it does not resume it, since
        # h2o sets no session id context and the node's is its --service (another service)
        before = decrypted(metrics_port)
        assert not connect(node_port, ctx, ticket_from(a.port, version))[0]
        assert decrypted(metrics_port) == before + 1
