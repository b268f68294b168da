"""Forgery: a session injected by someone without the bus key never resumes anywhere.

The attacker has broker credentials (it can publish to the sessions exchange with a node's routing
key) but not the bus key.  It makes a real TLS session against a server it controls (Python's
``ssl`` with the project's OpenSSL binding, the farm's session id context ``sessionbus``, its own
certificate) so that it knows the session's master secret, and wraps the session's DER in a
valid-looking NEW envelope: sealed under a key of its own, sent as plaintext without a seal, and
sealed under its key but labelled with the farm key's id (which any bus reader sees).  Two
``sessionbus node`` processes receive them; a client offering that session to either node gets a
full handshake, and the messages are rejected (``unknown_key``/``forged``) and dead-lettered.

The positive control makes the negative meaningful: the very same session sealed under the farm's
real key does resume on the nodes, so it was only the seal that kept the attacker out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest

from bench.reliability_table import record
from sessionbus.bus.connection import BrokerSettings, connect
from sessionbus.bus.topology import Topology, session_routing_key
from sessionbus.producer import openssl
from sessionbus.schemas.codec import CONTENT_TYPE, H_REASON, encode_rows
from sessionbus.schemas.events import EventType
from sessionbus.schemas.sealing import (
    KEY_ID_SIZE,
    BusKeys,
    new_key,
    write_new_key_file,
)
from tests.farm_support import (
    AMQP_URL,
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

SERVICE = b"sessionbus"  # the nodes' session id context (their default --service)
NODES = ("node-a", "node-b")


class Capture:
    """``openssl.SessionCallbacks`` of the attacker's server: keeps every session it makes."""

    def __init__(self) -> None:
        self.sessions: dict[bytes, tuple[bytes, float]] = {}

    def on_new(self, session_id: bytes, der: bytes, expires_at: float) -> None:
        self.sessions[session_id] = (der, expires_at)

    def on_get(self, session_id: bytes) -> bytes | None:
        return None

    def on_remove(self, session_id: bytes) -> None:
        pass


class AttackerServer:
    """A TLS server the attacker controls, on a thread: answers one HTTP request per connection."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.capture = Capture()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.options |= ssl.OP_NO_TICKET  # stateful: TLS 1.2 ids, TLS 1.3 tickets as ids
        openssl.install_session_cache(self.ctx, self.capture, sid_ctx=SERVICE, timeout=7200)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError):
                raw.settimeout(5)
                with self.ctx.wrap_socket(raw, server_side=True) as tls:
                    data = b""
                    while b"\r\n\r\n" not in data and (chunk := tls.recv(4096)):
                        data += chunk
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close"
                                b"\r\n\r\nattacker\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        openssl.uninstall(self.ctx)


@dataclass
class Farm:
    prefix: str
    key_file: Path
    cert: Path
    key: Path
    procs: Processes
    ports: dict[str, int]

    def env(self) -> dict[str, str]:
        return {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_BUS_KEY_FILE": str(self.key_file),
                "SESSIONBUS_PREFIX": self.prefix}


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Farm]:
    key_file = tmp_path / "bus.key"
    write_new_key_file(key_file)
    cert, key = make_cert(tmp_path)
    f = Farm(provisioned_prefix(), key_file, cert, key, Processes(), {})
    try:
        for node in NODES:
            port = free_port()
            p = f.procs.start(["node", "--node-id", node, "--listen", f"127.0.0.1:{port}",
                               "--cert", str(cert), "--key", str(key)], f.env())
            f.ports[node] = port
            p.wait_for("listening on")
        for p in f.procs.procs:
            p.wait_for("is warm")
        yield f
    finally:
        f.procs.stop_all()
        delete_topology(f.prefix, [f"{f.prefix}.replica.{n}" for n in NODES])


def new_rows(sessions: dict[bytes, tuple[bytes, float]]) -> list[list[Any]]:
    now = time.time()
    return [[i + 1, now, sid, SERVICE, expires, der, False]
            for i, (sid, (der, expires)) in enumerate(sessions.items())]


def forgeries(rows: list[list[Any]], origin: str, farm_key_id: bytes,
              ) -> list[tuple[str, bytes, dict[str, Any]]]:
    """NEW envelopes an attacker without the bus key can make, as (kind, body, headers)."""
    attacker = BusKeys([new_key()])
    sealed, headers = encode_rows(EventType.NEW, origin, rows, attacker)
    plain = msgpack.packb([time.time(), rows], use_bin_type=True)
    borrowed_id = sealed[:1] + farm_key_id + sealed[1 + KEY_ID_SIZE:]
    return [("sealed under the attacker's key", sealed, headers),
            ("plaintext, no seal", plain, headers),
            ("attacker's seal under the farm key's id", borrowed_id, headers)]


async def publish(prefix: str, messages: list[tuple[str, bytes, dict[str, Any]]]) -> None:
    conn = await connect(BrokerSettings(url=AMQP_URL))
    try:
        ch = await conn.channel(publisher_confirms=True)
        x = await ch.get_exchange(Topology(prefix=prefix).sessions_exchange)
        for key, body, headers in messages:
            await x.publish(aio_pika.Message(body, headers=headers, content_type=CONTENT_TYPE,
                                             user_id="guest"),
                            key, mandatory=True, timeout=10)
    finally:
        await conn.close()


async def dead_letters(prefix: str) -> list[dict[str, Any]]:
    """The headers of every message in the dead-letter queue (left in place)."""
    conn = await connect(BrokerSettings(url=AMQP_URL))
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(Topology(prefix=prefix).dead_queue, passive=True)
        out = []
        for _ in range(q.declaration_result.message_count):
            m = await q.get(no_ack=False, timeout=5, fail=False)
            if m is None:
                break
            out.append(dict(m.headers))
        await ch.close()  # unacked: back in the queue
        return out
    finally:
        await conn.close()


def offered(port: int, version: str, session: ssl.SSLSession, tries: int) -> list[bool]:
    ctx = client_context(version)
    result = []
    for _ in range(tries):
        result.append(handshake(port, ctx, session=session).reused)
        time.sleep(0.05)
    return result


def resumes(port: int, version: str, session: ssl.SSLSession, timeout: float = 10.0) -> bool:
    ctx = client_context(version)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handshake(port, ctx, session=session).reused:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_session_injected_without_the_bus_key_never_resumes(
    farm: Farm, version: str, tmp_path: Path,
) -> None:
    own = tmp_path / "attacker"
    own.mkdir()
    server = AttackerServer(*make_cert(own))  # the attacker's own certificate and key
    try:
        made = handshake(server.port, client_context(version))
    finally:
        server.close()
    assert made.body.endswith(b"attacker\n") and made.session is not None
    sessions = server.capture.sessions
    assert sessions and all(openssl.session_der_info(der).sid_ctx == SERVICE
                            for der, _ in sessions.values())
    farm_keys = keys_for(farm.key_file)
    rows = new_rows(sessions)

    # --- the forgeries: each under node-a's and node-b's routing key -------------------------
    messages = []
    for origin in NODES:
        for _kind, body, headers in forgeries(rows, origin, farm_keys.seal_key_id):
            messages.append((session_routing_key(EventType.NEW, origin), body, headers))
    t0 = time.monotonic()
    asyncio.run(publish(farm.prefix, messages))
    # A node skips its own origin's live messages unopened, so each forgery is judged by the
    # other node: one dead-lettered copy per message.
    deadline = time.monotonic() + 20
    dead: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(dead) < len(messages):
        time.sleep(0.2)
        dead = asyncio.run(dead_letters(farm.prefix))
    t_judged = time.monotonic() - t0
    reasons = Counter(str(h[H_REASON]) for h in dead)
    assert reasons == {"unknown_key": 2, "forged": 4}, reasons
    sources = Counter(str(h["sessionbus-source"]) for h in dead)
    assert sources == {f"{farm.prefix}.sessions.stream": len(messages)}, sources  # v2: one stream
    judges = Counter(str(h["sessionbus-rejected-by"]) for h in dead)
    assert judges == {n: 3 for n in NODES}, judges
    time.sleep(0.5)  # every chance to (wrongly) apply them
    for node, port in farm.ports.items():
        assert not any(offered(port, version, made.session, 5)), f"resumed on {node}"

    # --- positive control: the same session under the farm's real key resumes ---------------
    genuine = []
    for origin in NODES:
        body, headers = encode_rows(EventType.NEW, origin, rows, farm_keys)
        genuine.append((session_routing_key(EventType.NEW, origin), body, headers))
    asyncio.run(publish(farm.prefix, genuine))
    for node, port in farm.ports.items():
        assert resumes(port, version, made.session), f"control: no resumption on {node}"
    record(
        f"forged session injection (TLS {version})",
        injected=(f"a real session from an attacker's server, as NEW {len(messages)} times: "
                  "sealed under the attacker's key, plaintext, attacker's seal under the farm "
                  "key id; routing keys of both nodes"),
        lost=0, rejected=len(messages), recover_s=None,
        note=(f"0 of 10 handshakes offering it resumed (2 nodes x 5); rejected as "
              f"unknown_key {reasons['unknown_key']}, forged {reasons['forged']}, all "
              f"dead-lettered within {t_judged:.1f} s; control: the same session sealed with the "
              "farm key resumed on both nodes"),
        group="forgery",
    )
