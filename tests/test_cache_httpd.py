"""Real Apache httpd servers sharing TLS sessions through ``sessionbus cache`` over the real broker.

Two httpd servers from Debian's apache2 package, started with their own config on loopback ports:
one keeps its sessions in a ``sessionbus cache`` through ``SSLSessionCache memcache:``, the other in
another ``sessionbus cache`` through ``redis:``. A session made on either resumes on the other
(``openssl s_client -sess_out``/``-sess_in`` says "Reused"), for TLS 1.2 and 1.3; ``sessionbus
revoke`` makes one resume nowhere; and a cache whose broker is unreachable still answers at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
from yarl import URL

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
from tests.httpd_support import FARM_SERVER_NAME, Httpd, apache2_binary, has_redis_module

pytestmark = [pytest.mark.peers, pytest.mark.broker, pytest.mark.tls]
T = TypeVar("T")

if apache2_binary() is None:
    pytest.skip("Debian's apache2 (with mod_ssl and mod_socache_memcache) is not installed: "
                "apt-get install apache2", allow_module_level=True)
if not has_redis_module():
    pytest.skip("this apache2 has no mod_socache_redis", allow_module_level=True)


def _access() -> list[str]:
    """The cache's access control as ops/httpd/cache.env sets it: httpd's service context only
    (the MD5 hex of its ServerName:port, as docs/operations.md says), and, where httpd's children
    run as www-data (as root), only that user."""
    args = ["--service", hashlib.md5(FARM_SERVER_NAME.encode()).hexdigest()]
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            pwd.getpwnam("www-data")
            args += ["--allow-uid", "www-data"]
    return args


ACCESS = _access()


@dataclass
class Farm:
    directory: Path
    prefix: str
    key_file: Path
    cert: Path
    key: Path
    procs: Processes = field(default_factory=Processes)
    caches: list[str] = field(default_factory=list)
    servers: list[Httpd] = field(default_factory=list)

    def env(self, amqp_url: str = AMQP_URL) -> dict[str, str]:
        return {"SESSIONBUS_AMQP_URL": amqp_url, "SESSIONBUS_BUS_KEY_FILE": str(self.key_file),
                "SESSIONBUS_PREFIX": self.prefix}

    def cache(self, node_id: str, protocol: str, amqp_url: str = AMQP_URL) -> tuple[Proc, int]:
        port = free_port()
        self.caches.append(node_id)
        p = self.procs.start(["cache", "--node-id", node_id, f"--{protocol}",
                              f"127.0.0.1:{port}", "--session-timeout", "600", *ACCESS],
                             self.env(amqp_url))
        p.wait_for("listening")
        p.wait_for("is warm")
        return p, port

    def httpd(self, name: str, cache: str) -> Httpd:
        d = self.directory / name
        d.mkdir()
        h = Httpd(d, self.cert, self.key, cache, threads=10)
        self.servers.append(h)
        return h.start()

    def pair(self) -> tuple[Httpd, Httpd]:
        """httpd "m" through a memcache cache, httpd "r" through a redis cache."""
        _, mport = self.cache("cache-m", "memcache")
        _, rport = self.cache("cache-r", "redis")
        return (self.httpd("m", f"memcache:127.0.0.1:{mport}"),
                self.httpd("r", f"redis:127.0.0.1:{rport}"))

    def revoke(self, session_id: bytes) -> subprocess.CompletedProcess[str]:
        return revoke(self.env(), session_id)


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Farm]:
    key_file, cert, key = farm_files(tmp_path)
    f = Farm(tmp_path, provisioned_prefix(), key_file, cert, key)
    try:
        yield f
    finally:
        for h in f.servers:
            h.stop()
        f.procs.stop_all()
        delete_topology(f.prefix, [f"{f.prefix}.replica.{n}" for n in f.caches])


def new_session(server: Httpd, version: str, sess: Path) -> str:
    out = s_client(server.port, version, sess_out=sess)
    assert "New," in out and sess.exists(), out
    return out


def resumes(server: Httpd, version: str, sess: Path, tries: int = 1) -> bool:
    """Whether ``server`` resumes the saved session; replication is asynchronous, so ``tries``
    attempts 0.1 s apart (each one a real handshake)."""
    for i in range(tries):
        if "Reused," in s_client(server.port, version, sess_in=sess):
            return True
        if i + 1 < tries:
            time.sleep(0.1)
    return False


def server_session_id(out: str, sess: Path, version: str) -> bytes:
    """The id the server keeps the session under: TLS 1.2's Session-ID; in TLS 1.3 with
    stateful tickets, the ticket (s_client's "Session-ID" is then the client's own random id)."""
    if version == "1.2":
        m = re.search(r"Session-ID: ([0-9A-F]+)", out)
        assert m, out
        return bytes.fromhex(m.group(1))
    text = subprocess.run(["openssl", "sess_id", "-in", str(sess), "-text", "-noout"],
                          capture_output=True, text=True, timeout=10, check=True).stdout
    block = text.split("TLS session ticket:", 1)[1]
    rows = re.findall(r"^\s*[0-9a-f]{4} - ((?:[0-9a-f]{2}[ -]){1,16})", block, re.M)
    ticket = bytes.fromhex("".join(r.replace("-", " ") for r in rows).replace(" ", ""))
    assert len(ticket) == 32, text
    return ticket


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_session_made_on_either_httpd_resumes_on_the_other(
    farm: Farm, version: str, tmp_path: Path
) -> None:
    hm, hr = farm.pair()
    for src, dst in ((hm, hr), (hr, hm)):
        sess = tmp_path / f"{version}-{src.port}.pem"
        new_session(src, version, sess)
        assert resumes(dst, version, sess, tries=50), f"not resumed on the peer ({version})"
        assert resumes(src, version, sess), "not resumed where it was made"


def test_a_cache_started_later_holds_the_farms_sessions(farm: Farm, tmp_path: Path) -> None:
    hm, hr = farm.pair()
    made = []
    for i, (server, version) in enumerate(((hm, "1.2"), (hr, "1.3"))):
        sess = tmp_path / f"early-{i}.pem"
        new_session(server, version, sess)
        made.append((sess, version))
    time.sleep(0.5)  # published (the cache's outbox lingers a little)
    _, late_port = farm.cache("cache-late", "memcache")  # warm: replayed the session stream
    late = farm.httpd("late", f"memcache:127.0.0.1:{late_port}")
    for sess, version in made:
        assert resumes(late, version, sess, tries=20), f"TLS {version} session not replayed"


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_revoked_session_resumes_on_no_httpd(farm: Farm, version: str, tmp_path: Path) -> None:
    hm, hr = farm.pair()
    sess = tmp_path / "sess.pem"
    out = new_session(hm, version, sess)
    assert resumes(hr, version, sess, tries=50)
    sid = server_session_id(out, sess, version)
    done = farm.revoke(sid)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (resumes(hm, version, sess) or
                                           resumes(hr, version, sess)):
        time.sleep(0.1)
    for server in (hm, hr):
        assert not resumes(server, version, sess), "a revoked session resumed"
    # the servers serve on: a new session still resumes across
    other = tmp_path / "other.pem"
    new_session(hm, version, other)
    assert resumes(hr, version, other, tries=50)


class Proxy:
    """A TCP proxy to the broker that a test can cut (connections reset, port closed) and
    restore on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        self._listener = s
        t = threading.Thread(target=self._accept, args=(s,), daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(5)
        self._threads = [t for t in self._threads if t.is_alive()]


def test_cache_answers_while_its_broker_is_unreachable(farm: Farm, tmp_path: Path) -> None:
    broker = URL(AMQP_URL)
    proxy = Proxy((broker.host or "127.0.0.1", broker.port or 5672))
    proxy.start()
    try:
        url = str(broker.with_host("127.0.0.1").with_port(proxy.port))
        cut_proc, mport = farm.cache("cache-m", "memcache", amqp_url=url)
        _, rport = farm.cache("cache-r", "redis")
        hm = farm.httpd("m", f"memcache:127.0.0.1:{mport}")
        hr = farm.httpd("r", f"redis:127.0.0.1:{rport}")
        ctx = client_context("1.2")
        before = [_timed(lambda: handshake(hm.port, ctx))[1] for _ in range(5)]

        proxy.stop()  # the broker is gone for cache-m
        time.sleep(0.5)
        made: list[Path] = []
        during: list[float] = []
        for i in range(5):
            sess = tmp_path / f"outage-{i}.pem"
            out, took = _timed(partial(new_session, hm, "1.2", sess))
            during.append(took)
            made.append(sess)
            assert "New," in out
            # httpd resumes locally: the cache answers from memory
            hs, took = _timed(partial(s_client, hm.port, "1.2", sess_in=sess))
            during.append(took)
            assert "Reused," in hs, hs
        # a Python client's handshakes, to compare with the ones before the outage
        quick = [_timed(lambda: handshake(hm.port, ctx))[1] for _ in range(5)]
        assert max(quick) < max(1.0, 10 * max(before)), (before, quick)
        assert max(during) < 3.0, during
        # the peer has not heard of them
        assert not resumes(hr, "1.2", made[0])

        proxy.start()  # the broker is back: what was made meanwhile reaches the peer
        deadline = time.monotonic() + 45
        pending = list(made)
        while pending and time.monotonic() < deadline:
            pending = [s for s in pending if not resumes(hr, "1.2", s)]
            if pending:
                time.sleep(0.5)
        assert not pending, f"{len(pending)} sessions made during the outage never reached " \
            f"the peer:\n{cut_proc.output()[-3000:]}"
        cut_proc.stop()  # while its broker is reachable: a clean, quick stop
    finally:
        proxy.stop()


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.monotonic()
    result = fn()
    return result, time.monotonic() - t0
