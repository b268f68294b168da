"""Real loopback handshakes through sessionbus.producer.openssl's hooks (no mocks).

Needs only the stdlib, cffi, pytest and the ``openssl`` CLI, so ``.ci/binding-matrix`` runs it
under every CPython on the machine (the pointer trick is per interpreter version).
"""

from __future__ import annotations

import gc
import logging
import os
import queue
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

from sessionbus.producer import openssl

pytestmark = pytest.mark.tls

TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3
SID_CTX = b"sessionbus-test"
TIMEOUT = 300


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("cert")
    certfile, keyfile = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(keyfile),
            "-out",
            str(certfile),
        ],
        check=True,
        capture_output=True,
    )
    return str(certfile), str(keyfile)


@pytest.fixture(autouse=True)
def _binding_usable() -> None:
    reason = openssl.binding_available()
    assert reason is None, reason


@dataclass
class Store:
    """The shared session store of a farm: session_id -> DER, plus what each node saw."""

    sessions: dict[bytes, bytes] = field(default_factory=dict)
    new: list[tuple[str, bytes]] = field(default_factory=list)
    get: list[tuple[str, bytes, bool]] = field(default_factory=list)
    removed: list[tuple[str, bytes]] = field(default_factory=list)


class NodeHooks:
    def __init__(self, name: str, store: Store) -> None:
        self.name, self.store = name, store
        self.expires: list[float] = []

    def on_new(self, session_id: bytes, der: bytes, expires_at: float) -> None:
        self.store.sessions[session_id] = der
        self.store.new.append((self.name, session_id))
        self.expires.append(expires_at)

    def on_get(self, session_id: bytes) -> bytes | None:
        der = self.store.sessions.get(session_id)
        self.store.get.append((self.name, session_id, der is not None))
        return der

    def on_remove(self, session_id: bytes) -> None:
        self.store.removed.append((self.name, session_id))  # informational: the store keeps it


class KeyRing:
    """Ticket keys: name -> (hmac, aes); one current name."""

    def __init__(self) -> None:
        self.keys: dict[bytes, tuple[bytes, bytes]] = {}
        self.current: bytes | None = None
        self.results: list[str] = []

    def rotate(self) -> bytes:
        name = os.urandom(16)
        self.keys[name] = (os.urandom(32), os.urandom(32))
        self.current = name
        return name

    def copy(self) -> KeyRing:
        ring = KeyRing()
        ring.keys, ring.current = dict(self.keys), self.current
        return ring

    def encrypt_key(self) -> tuple[bytes, bytes, bytes] | None:
        if self.current is None:
            return None
        hmac_key, aes_key = self.keys[self.current]
        return self.current, hmac_key, aes_key

    def decrypt_key(self, name: bytes) -> tuple[bytes, bytes, bool] | None:
        key = self.keys.get(name)
        return None if key is None else (key[0], key[1], name == self.current)

    def on_decrypt(self, result: str) -> None:
        self.results.append(result)


@dataclass
class Served:
    reused: bool
    version: str | None
    error: BaseException | None = None


class Node:
    """A TLS server on 127.0.0.1: handshake, send b"ok", wait for the client to go away."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.served: queue.Queue[Served] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            raw.settimeout(10)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms delayed-ACK stalls
            try:
                conn = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                raw.close()
                self.served.put(Served(False, None, exc))
                continue
            served = Served(bool(conn.session_reused), conn.version())
            try:
                conn.sendall(b"ok")
                if conn.recv(1) == b"":  # EOF; after a close_notify answer with ours
                    conn.unwrap()
            except (ssl.SSLError, OSError):
                pass
            conn.close()
            self.served.put(served)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone doesn't)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.close()


def server_ctx(cert: tuple[str, str], version: ssl.TLSVersion, *, stateful: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    ctx.minimum_version = ctx.maximum_version = version
    if stateful:
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


def cache_node(
    nodes: list[Node],
    cert: tuple[str, str],
    version: ssl.TLSVersion,
    name: str,
    store: Store,
    *,
    sid_ctx: bytes = SID_CTX,
) -> Node:
    ctx = server_ctx(cert, version, stateful=True)
    openssl.install_session_cache(ctx, NodeHooks(name, store), sid_ctx=sid_ctx, timeout=TIMEOUT)
    nodes.append(Node(ctx))
    return nodes[-1]


def ticket_node(
    nodes: list[Node], cert: tuple[str, str], version: ssl.TLSVersion, ring: KeyRing
) -> Node:
    ctx = server_ctx(cert, version, stateful=False)
    openssl.install_ticket_keys(ctx, ring)
    nodes.append(Node(ctx))
    return nodes[-1]


def client_ctx(version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def connect(
    node: Node,
    ctx: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    *,
    close_notify: bool = True,
) -> tuple[bool, ssl.SSLSession]:
    """One connection; returns (client saw a resumption, the session to offer next time)."""
    reused, new_session = _connect(node, ctx, session, close_notify=close_notify)
    assert new_session is not None
    return reused, new_session


def _connect(
    node: Node,
    ctx: ssl.SSLContext,
    session: ssl.SSLSession | None,
    *,
    close_notify: bool = True,
    want_session: bool = True,
) -> tuple[bool, ssl.SSLSession | None]:
    raw = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    try:
        assert tls.recv(2) == b"ok"  # also reads the TLS 1.3 NewSessionTickets sent before it
        reused = tls.session_reused
        # SSLSocket.session leaks ~5 KB per read before CPython 3.12.7/3.13.0 (gh-116810).
        new_session = tls.session if want_session else None
        if close_notify:
            tls.unwrap().close()
    finally:
        tls.close()
    served = node.served.get(timeout=10)
    assert served.error is None, served.error
    assert served.reused == reused
    return reused, new_session


VERSIONS = [pytest.param(TLS12, id="tls1.2"), pytest.param(TLS13, id="tls1.3")]


# --------------------------------------------------------------------------------- session cache


@pytest.mark.parametrize("version", VERSIONS)
def test_session_made_on_a_resumes_on_b(
    cert: tuple[str, str], nodes: list[Node], version: ssl.TLSVersion
) -> None:
    store = Store()
    a = cache_node(nodes, cert, version, "a", store)
    b = cache_node(nodes, cert, version, "b", store)
    client = client_ctx(version)

    reused, session = connect(a, client)
    assert not reused
    assert store.sessions and {n for n, _ in store.new} == {"a"}  # TLS 1.3: one per ticket
    for sid, der in store.sessions.items():
        assert openssl.session_der_id(der) == sid
        info = openssl.session_der_info(der)
        # The per-connection sid_ctx (3.13 would otherwise stamp "Python\0" on every session).
        assert info.sid_ctx == SID_CTX
        assert abs(info.expires_at - (time.time() + TIMEOUT)) < 5
    if version == TLS12:  # in TLS 1.3 the client's session.id is its own, not the ticket
        assert set(store.sessions) == {session.id}

    reused, session2 = connect(b, client, session)
    assert reused
    assert [(name, hit) for name, sid, hit in store.get] == [("b", True)]
    assert store.get[0][1] in {sid for name, sid in store.new if name == "a"}
    # ...and again on A, with whatever session B handed out.
    reused, _ = connect(a, client, session2)
    assert reused


def test_expires_at_reported_by_on_new(cert: tuple[str, str], nodes: list[Node]) -> None:
    store = Store()
    ctx = server_ctx(cert, TLS12, stateful=True)
    hooks = NodeHooks("a", store)
    openssl.install_session_cache(ctx, hooks, sid_ctx=SID_CTX, timeout=123)
    nodes.append(Node(ctx))
    now = time.time()
    connect(nodes[-1], client_ctx(TLS12))
    assert len(hooks.expires) == 1 and abs(hooks.expires[0] - (now + 123)) < 3


@pytest.mark.parametrize("version", VERSIONS)
def test_other_sid_ctx_never_resumes(
    cert: tuple[str, str], nodes: list[Node], version: ssl.TLSVersion
) -> None:
    store = Store()
    a = cache_node(nodes, cert, version, "a", store)
    other = cache_node(nodes, cert, version, "other", store, sid_ctx=b"another-service")
    client = client_ctx(version)
    _, session = connect(a, client)
    reused, _ = connect(other, client, session)
    assert not reused
    assert [(name, hit) for name, _, hit in store.get] == [("other", True)]  # found, refused


def test_expired_session_is_a_miss(cert: tuple[str, str], nodes: list[Node]) -> None:
    store = Store()
    ctx = server_ctx(cert, TLS12, stateful=True)
    openssl.install_session_cache(ctx, NodeHooks("a", store), sid_ctx=SID_CTX, timeout=1)
    nodes.append(Node(ctx))
    b = cache_node(nodes, cert, TLS12, "b", store)
    client = client_ctx(TLS12)
    _, session = connect(nodes[0], client)
    time.sleep(2.1)
    reused, _ = connect(b, client, session)
    assert not reused


@pytest.mark.parametrize("version", VERSIONS)
def test_no_close_notify_still_resumes_elsewhere(
    cert: tuple[str, str], nodes: list[Node], version: ssl.TLSVersion
) -> None:
    store = Store()
    a = cache_node(nodes, cert, version, "a", store)
    b = cache_node(nodes, cert, version, "b", store)
    client = client_ctx(version)
    _, session = connect(a, client, close_notify=False)
    # OpenSSL may report the session as removed (freed without close_notify): informational.
    reused, _ = connect(b, client, session, close_notify=False)
    assert reused
    reused, _ = connect(a, client, session, close_notify=False)
    assert reused


def test_callback_exception_is_a_logged_miss(
    cert: tuple[str, str], nodes: list[Node], caplog: pytest.LogCaptureFixture
) -> None:
    store = Store()
    a = cache_node(nodes, cert, TLS12, "a", store)

    class Broken(NodeHooks):
        def on_get(self, session_id: bytes) -> bytes | None:
            raise RuntimeError("secret-" + session_id.hex())

    ctx = server_ctx(cert, TLS12, stateful=True)
    openssl.install_session_cache(ctx, Broken("b", store), sid_ctx=SID_CTX, timeout=TIMEOUT)
    nodes.append(Node(ctx))
    client = client_ctx(TLS12)
    _, session = connect(a, client)
    with caplog.at_level(logging.ERROR, logger="sessionbus.producer.openssl"):
        reused, _ = connect(nodes[-1], client, session)
    assert not reused
    assert "get-session callback raised RuntimeError" in caplog.text
    assert session.id.hex() not in caplog.text  # type and frames only, never the message


def test_session_der_id_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        openssl.session_der_id(b"\x30\x03garbage")
    with pytest.raises(ValueError):
        openssl.session_der_id(b"")


# --------------------------------------------------------------------------------- ticket keys


@pytest.mark.parametrize("version", VERSIONS)
def test_ticket_keys_shared_and_rotated(
    cert: tuple[str, str], nodes: list[Node], version: ssl.TLSVersion
) -> None:
    ring_a = KeyRing()
    first = ring_a.rotate()
    ring_b = ring_a.copy()
    a = ticket_node(nodes, cert, version, ring_a)
    b = ticket_node(nodes, cert, version, ring_b)
    client = client_ctx(version)

    reused, session = connect(a, client)
    assert not reused and session.has_ticket
    reused, _ = connect(b, client, session)
    assert reused and ring_b.results == ["current"]

    # Rotation on B: a new current key, the first one decrypt-only.
    ring_b.rotate()
    reused, renewed = connect(b, client, session)
    assert reused and ring_b.results[-1] == "renewed"
    # The renewed ticket is under the new key: it still resumes once the old key is erased.
    del ring_b.keys[first]
    reused, _ = connect(b, client, renewed)
    assert reused and ring_b.results[-1] == "current"

    # A ticket under a key B never had (or erased) -> full handshake.
    reused, _ = connect(b, client, session)
    assert not reused and ring_b.results[-1] == "unknown"


def test_no_encrypt_key_issues_no_ticket(cert: tuple[str, str], nodes: list[Node]) -> None:
    ring = KeyRing()
    node = ticket_node(nodes, cert, TLS12, ring)
    _, session = connect(node, client_ctx(TLS12))
    assert not session.has_ticket


# --------------------------------------------------------------------------------- guard


def test_guard_version_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssl, "OPENSSL_VERSION_NUMBER", ssl.OPENSSL_VERSION_NUMBER + 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(openssl.BindingError, match="version mismatch"):
        openssl.install_ticket_keys(ctx, KeyRing())


@pytest.mark.skipif(
    sys.maxsize < 2**32 or hasattr(sys, "gettotalrefcount"),
    reason="offsets below are for 64-bit release builds",
)
@pytest.mark.parametrize("offset", [0, 8, 24], ids=["refcnt", "type", "next-field"])
def test_guard_wrong_offset(monkeypatch: pytest.MonkeyPatch, offset: int) -> None:
    # 0 reads the refcount (not a pointer), 8 the type object (readable, not an SSL_CTX), 24 the
    # next PySSLContext field (NULL with no ALPN set): each must fail the guard, never crash.
    monkeypatch.setattr(openssl, "_SSL_CTX_OFFSET", offset)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(openssl.BindingError, match="layout not recognised"):
        openssl.install_session_cache(ctx, NodeHooks("x", Store()), sid_ctx=SID_CTX, timeout=10)
    # Nothing half-installed, and the options are untouched.
    assert ctx.options == ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).options


def test_guard_rejects_non_context() -> None:
    with pytest.raises(TypeError):
        openssl.install_ticket_keys(object(), KeyRing())  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- lifetime


def test_collected_context_releases_its_callbacks() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    openssl.install_ticket_keys(ctx, KeyRing())
    count = len(openssl._installed)
    del ctx
    gc.collect()
    assert len(openssl._installed) == count - 1


def test_a_context_collected_inside_the_modules_own_lock_does_not_deadlock() -> None:
    """A context in a reference cycle is freed by the cyclic GC, which runs at whatever
    allocation triggers it: also one inside the module's locked sections (installing hooks on
    another context). Its finalizer must not wait for that lock."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    openssl.install_session_cache(ctx, NodeHooks("gc", Store()), sid_ctx=SID_CTX, timeout=60)
    ctx.cycle = ctx  # type: ignore[attr-defined]  # only the cyclic GC can free it
    count = len(openssl._installed)
    del ctx
    released = threading.Event()

    def collect_as_an_install_would() -> None:
        with openssl._hooks_lock:  # where install_session_cache allocates its callbacks
            gc.collect()
        released.set()

    # A thread, so a deadlock fails this test instead of hanging the run; if it does deadlock,
    # the thread keeps the lock and later installs in this process hang too.
    threading.Thread(target=collect_as_an_install_would, daemon=True).start()
    assert released.wait(10), "the finalizer deadlocked on the hooks lock"
    assert len(openssl._installed) == count - 1


def test_uninstall(cert: tuple[str, str], nodes: list[Node]) -> None:
    store = Store()
    ctx = server_ctx(cert, TLS12, stateful=True)
    openssl.install_session_cache(ctx, NodeHooks("a", store), sid_ctx=SID_CTX, timeout=TIMEOUT)
    openssl.uninstall(ctx)
    nodes.append(Node(ctx))
    connect(nodes[-1], client_ctx(TLS12))
    assert store.new == []


EXIT_SCRIPT = """
import socket, ssl, sys, threading
from sessionbus.producer import openssl

class Hooks:
    def on_new(self, session_id, der, expires_at): pass
    def on_get(self, session_id): return None
    def on_remove(self, session_id): pass

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
ctx.options |= ssl.OP_NO_TICKET
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
openssl.install_session_cache(ctx, Hooks(), sid_ctx=b"x", timeout=60)
listener = socket.create_server(("127.0.0.1", 0))
live = []
def serve():
    raw, _ = listener.accept()
    live.append(ctx.wrap_socket(raw, server_side=True))
thread = threading.Thread(target=serve)
thread.start()
client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client.check_hostname = False
client.verify_mode = ssl.CERT_NONE
live.append(client.wrap_socket(socket.create_connection(listener.getsockname()),
                               server_hostname="x"))
thread.join()
print("exiting with a live connection", flush=True)
"""


def test_exit_with_live_connections_is_clean(cert: tuple[str, str]) -> None:
    # The server connection is freed during interpreter shutdown without close_notify, which
    # calls the remove callback: without the atexit reset this died with SIGSEGV/SIGILL here.
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", EXIT_SCRIPT, *cert],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert "exiting with a live connection" in done.stdout


# --------------------------------------------------------------------------------- memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_resumptions_do_not_leak(cert: tuple[str, str], nodes: list[Node]) -> None:
    store = Store()
    a = cache_node(nodes, cert, TLS12, "a", store)
    b = cache_node(nodes, cert, TLS12, "b", store)
    client = client_ctx(TLS12)
    _, session = connect(a, client)

    def resume(n: int) -> None:
        for _ in range(n):
            reused, _ = _connect(b, client, session, want_session=False)
            assert reused
        store.get.clear()

    resume(300)  # warm-up: allocator arenas, lazily created objects
    before = _rss()
    start = time.perf_counter()
    resume(3000)
    elapsed = time.perf_counter() - start
    grown = _rss() - before
    print(f"3000 resumptions in {elapsed:.2f}s, RSS grew {grown / 1024:.0f} KiB")
    # copy=1 in the get callback leaks ~1 KB per resumption, i.e. ~3 MB here.
    assert grown < 1024 * 1024, f"RSS grew {grown} bytes over 3000 resumptions"
