"""Real uvicorn, aiohttp and asyncio-streams servers (examples/) attached to the farm, on loopback.

A session made on one resumes on the other (TLS 1.2 and 1.3, stateful and stateless, CPython's
client and ``openssl s_client``); ``sessionbus revoke`` stops it resuming on both; with the broker
unreachable a server keeps serving and resumes locally; an unusable context fails at start.
``SESSIONBUS_TEST_LOOP=uvloop`` runs the servers on uvloop.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.farm_support import (
    REPO,
    Handshake,
    Proc,
    Processes,
    bus_env,
    client_context,
    free_port,
    make_cert,
    revoke,
    s_client,
)

pytestmark = [pytest.mark.broker, pytest.mark.tls, pytest.mark.slow]

SERVERS = {"aiohttp": "examples.aiohttp_server", "uvicorn": "examples.uvicorn_server",
           "streams": "examples.asyncio_streams"}
READY = {"aiohttp": "Running on", "uvicorn": "Uvicorn running on", "streams": "listening on"}
NODE_IDS = [f"{kind}-{x}" for kind in SERVERS for x in "ab"]
LOOP = os.environ.get("SESSIONBUS_TEST_LOOP", "asyncio")


def start_python(module: str, args: list[str], env: dict[str, str]) -> Proc:
    """``python -m module args`` with its output collected (tests.farm_support.Proc)."""
    popen = subprocess.Popen(
        [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, cwd=str(REPO),
    )
    proc = Proc([module, *args], popen)

    def read() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            proc.lines.append(line)

    proc._reader = threading.Thread(target=read, daemon=True)
    proc._reader.start()
    return proc


@dataclass
class PyFarm:
    env: dict[str, str]
    cert: Path
    key: Path
    procs: list[Proc] = field(default_factory=list)
    sessionbus: Processes = field(default_factory=Processes)

    def server(self, kind: str, node_id: str, tickets: str = "stateful",
               env: dict[str, str] | None = None, warm: bool = True) -> tuple[Proc, int]:
        port = free_port()
        p = start_python(SERVERS[kind], [
            "--node-id", node_id, "--port", str(port), "--cert", str(self.cert),
            "--key", str(self.key), "--tickets", tickets, "--loop", LOOP,
        ], {**self.env, **(env or {})})
        self.procs.append(p)
        p.wait_for(READY[kind])
        if warm:
            p.wait_for("is warm")
        if tickets == "stateless":
            p.wait_for("ticket key ring")
        return p, port

    def key_publisher(self) -> None:
        p = self.sessionbus.start(["keys", "--publisher-id", "keys-a", "--announce-ahead", "1"],
                                  self.env)
        p.wait_for("key publisher keys-a started")

    def stop(self) -> None:
        for p in reversed(self.procs):
            assert p.stop() == 0, p.output()  # a clean stop: the farm flushed and closed
        self.procs.clear()
        self.sessionbus.stop_all()


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[PyFarm]:
    cert, key = make_cert(tmp_path)
    with bus_env(tmp_path, *(f"replica.{n}" for n in NODE_IDS)) as env:
        f = PyFarm(env, cert, key)
        try:
            yield f
        finally:
            for p in f.procs:  # a failed test: stop what it started before the cleanup
                p.stop()
            f.sessionbus.stop_all()


def handshake(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> Handshake:
    """tests.farm_support.handshake with ``Connection: close``: these servers keep HTTP/1.1
    connections open otherwise."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            chunks = []
            while chunk := tls.recv(4096):
                chunks.append(chunk)
            return Handshake(tls.session_reused, tls.session, b"".join(chunks), tls.version())


def resumes_on(port: int, version: str, session: object, tries: int = 50) -> bool:
    """Replication is asynchronous: a few seconds of real handshakes."""
    ctx = client_context(version)
    for _ in range(tries):
        if handshake(port, ctx, session=session).reused:  # type: ignore[arg-type]
            return True
        time.sleep(0.1)
    return False


def s_client_resumes_on(port: int, version: str, sess: Path, tries: int = 50) -> str:
    out = ""
    for _ in range(tries):
        out = s_client(port, version, sess_in=sess)
        if "Reused," in out:
            return out
        time.sleep(0.1)
    return out


@pytest.mark.deadline(150)
@pytest.mark.parametrize("tickets", ["stateful", "stateless"])
@pytest.mark.parametrize("kind", list(SERVERS))
def test_a_session_made_on_one_resumes_on_the_other(
    farm: PyFarm, kind: str, tickets: str, tmp_path: Path
) -> None:
    if tickets == "stateless":
        farm.key_publisher()
    _, pa = farm.server(kind, f"{kind}-a", tickets)
    _, pb = farm.server(kind, f"{kind}-b", tickets)
    for version in ("1.2", "1.3"):
        first = handshake(pa, client_context(version))
        for _ in range(30):  # stateless: the farm's first key encrypts once announced (1 s)
            if tickets == "stateful" or (first.session and first.session.has_ticket):
                break
            time.sleep(0.1)
            first = handshake(pa, client_context(version))
        assert not first.reused and f"node {kind}-a\n".encode() in first.body
        assert first.version == f"TLSv{version}" and first.session is not None
        if tickets == "stateless":
            assert first.session.has_ticket  # resumed from the ticket, under the farm's key
        assert resumes_on(pb, version, first.session), (version, kind, tickets)
        back = handshake(pa, client_context(version), session=first.session)
        assert back.reused and f"node {kind}-a\n".encode() in back.body
        sess = tmp_path / f"s-{version}.pem"
        out = s_client(pb, version, sess_out=sess)
        assert "New," in out and sess.exists(), out
        out = s_client_resumes_on(pa, version, sess)
        assert "Reused," in out, out
    farm.stop()


@pytest.mark.deadline(120)
def test_revoke_stops_resumption_on_both(farm: PyFarm) -> None:
    # one of each: the farm is one, whatever server a member is
    _, pa = farm.server("aiohttp", "aiohttp-a")
    _, pb = farm.server("uvicorn", "uvicorn-a")
    ctx = client_context("1.2")
    first = handshake(pa, ctx)
    assert first.session is not None
    assert resumes_on(pb, "1.2", first.session)
    done = revoke(farm.env, first.session.id)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        handshake(p, ctx, session=first.session).reused for p in (pa, pb)
    ):
        time.sleep(0.1)
    for port in (pa, pb):
        assert not handshake(port, ctx, session=first.session).reused
    farm.stop()


@pytest.mark.deadline(90)
@pytest.mark.parametrize("kind", list(SERVERS))
def test_with_the_broker_unreachable_it_serves_and_resumes_locally(
    farm: PyFarm, kind: str
) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # nothing listens there
    proc, port = farm.server(kind, f"{kind}-a", env={"SESSIONBUS_AMQP_URL": dead}, warm=False)
    for version in ("1.2", "1.3"):
        ctx = client_context(version)
        first = handshake(port, ctx)
        assert f"node {kind}-a\n".encode() in first.body and first.session is not None
        assert handshake(port, ctx, session=first.session).reused
    assert "is warm" not in proc.output()  # it really never reached a broker
    farm.stop()


@pytest.mark.deadline(60)
@pytest.mark.parametrize("kind", list(SERVERS))
def test_an_unusable_context_fails_at_start_with_one_line(farm: PyFarm, kind: str) -> None:
    # the process's ssl module reports another OpenSSL than the libssl mapped: attach refuses
    code = ("import ssl, runpy, sys; ssl.OPENSSL_VERSION_NUMBER += 1; "
            f"sys.argv = ['x', *sys.argv[1:]]; runpy.run_module({SERVERS[kind]!r}, "
            "run_name='__main__')")
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-c", code, "--node-id", f"{kind}-a", "--port", str(port),
         "--cert", str(farm.cert), "--key", str(farm.key), "--loop", LOOP],
        env={**os.environ, **farm.env}, cwd=str(REPO), capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 3, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot attach the farm to this SSLContext" in lines[0], out.stderr
    assert READY[kind] not in out.stdout  # it never listened
