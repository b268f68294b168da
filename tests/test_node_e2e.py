"""TLS nodes as separate processes over the real broker: sessions made on one resume on others."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.farm_support import (
    AMQP_URL,
    Proc,
    Processes,
    client_context,
    delete_topology,
    farm_files,
    free_port,
    handshake,
    provisioned_prefix,
    revoke,
    s_client,
)
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.tls]


@dataclass
class Farm:
    prefix: str
    key_file: Path
    cert: Path
    key: Path
    procs: Processes
    nodes: list[str]

    def env(self) -> dict[str, str]:
        return {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_BUS_KEY_FILE": str(self.key_file),
                "SESSIONBUS_PREFIX": self.prefix}

    def node(self, node_id: str, *extra: str, amqp_url: str | None = None) -> tuple[Proc, int]:
        port = free_port()
        env = self.env()
        if amqp_url:
            env["SESSIONBUS_AMQP_URL"] = amqp_url
        self.nodes.append(node_id)  # before waiting: a node that fails still gets cleaned up
        p = self.procs.start(
            ["node", "--node-id", node_id, "--listen", f"127.0.0.1:{port}", "--cert",
             str(self.cert), "--key", str(self.key), *extra], env,
        )
        p.wait_for("listening on")
        if amqp_url is None:
            p.wait_for("is warm")
        return p, port

    def revoke(self, session_id: bytes) -> subprocess.CompletedProcess[str]:
        return revoke(self.env(), session_id)


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Farm]:
    key_file, cert, key = farm_files(tmp_path)
    f = Farm(provisioned_prefix(), key_file, cert, key, Processes(), [])
    try:
        yield f
    finally:
        f.procs.stop_all()
        delete_topology(f.prefix, [f"{f.prefix}.replica.{n}" for n in f.nodes])


def resumed_on(port: int, version: str, session: object, attempts: int = 50) -> bool:
    """Replication is asynchronous: try for a few seconds (each try is a real handshake)."""
    ctx = client_context(version)
    for _ in range(attempts):
        if handshake(port, ctx, session=session).reused:  # type: ignore[arg-type]
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_session_made_on_a_resumes_on_b_and_c(farm: Farm, version: str) -> None:
    _, pa = farm.node("node-a")
    _, pb = farm.node("node-b")
    _, pc = farm.node("node-c")
    ctx = client_context(version)
    first = handshake(pa, ctx)
    assert not first.reused and first.body.endswith(b"node node-a\n")
    assert first.session is not None
    assert resumed_on(pb, version, first.session)
    again = handshake(pc, ctx, session=first.session)
    assert again.reused or resumed_on(pc, version, first.session)
    # a client that closes without close_notify (Python's default) did not revoke anything
    assert handshake(pa, ctx, session=first.session).reused


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_s_client_resumes_across_nodes(farm: Farm, version: str,
                                               tmp_path: Path) -> None:
    _, pa = farm.node("node-a")
    _, pb = farm.node("node-b")
    sess = tmp_path / "sess.pem"
    out = s_client(pa, version, sess_out=sess)
    assert "New," in out and sess.exists()
    for _ in range(50):
        out = s_client(pb, version, sess_in=sess)
        if "Reused," in out:
            break
        time.sleep(0.1)
    assert "Reused," in out, out


def test_revoked_session_resumes_nowhere(farm: Farm) -> None:
    _, pa = farm.node("node-a")
    _, pb = farm.node("node-b")
    ctx = client_context("1.2")
    first = handshake(pa, ctx)
    assert first.session is not None
    assert resumed_on(pb, "1.2", first.session)
    done = farm.revoke(first.session.id)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not handshake(pa, ctx, session=first.session).reused and not handshake(
            pb, ctx, session=first.session
        ).reused:
            break
        time.sleep(0.1)
    for port in (pa, pb):
        assert not handshake(port, ctx, session=first.session).reused


def test_other_service_never_resumes(farm: Farm) -> None:
    _, pa = farm.node("node-a")
    _, px = farm.node("node-x", "--service", "other-service")
    ctx = client_context("1.2")
    first = handshake(pa, ctx)
    assert first.session is not None
    time.sleep(1.0)  # give replication every chance
    for _ in range(5):
        assert not handshake(px, ctx, session=first.session).reused


class ThreadedProxy:
    """tests.tcp_proxy.TcpProxy on an event loop of its own, driven from a sync test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = TcpProxy("127.0.0.1", 5672)
        self.call(self.proxy.start())

    def call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def close(self) -> None:
        self.call(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_node_serves_without_broker_and_catches_up_after(farm: Farm) -> None:
    proxy = ThreadedProxy()
    try:
        pa_proc, pa = farm.node("node-a", amqp_url=proxy.proxy.url())
        pa_proc.wait_for("is warm")
        _, pb = farm.node("node-b")
        assert proxy.call(proxy.proxy.pause()) >= 1  # node-a's broker connection is gone
        ctx = client_context("1.2")
        made = []
        for _ in range(5):  # full handshakes complete with no broker
            h = handshake(pa, ctx)
            assert h.body.endswith(b"node node-a\n") and h.session is not None
            made.append(h.session)
        assert handshake(pa, ctx, session=made[0]).reused  # local resumption still works
        assert not handshake(pb, ctx, session=made[1]).reused  # node-b cannot know them yet
        proxy.call(proxy.proxy.resume())
        # the outbox kept them: once node-a reconnects they reach node-b with no restart
        for session in made[1:]:
            assert resumed_on(pb, "1.2", session, attempts=150)
    finally:
        proxy.close()
