"""The cache front's memcached and Redis protocols, over real loopback connections.

No httpd and no broker (except the replication test at the end, marked ``broker``): the front runs
in-process with a recorder in place of the outbox, so every test also sees the events a request
makes. None of the bad inputs may stop the front or lose a stored session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from sessionbus.bus.connection import BrokerSettings
from sessionbus.bus.topology import Topology
from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.schemas.events import RemoveReason
from sessionbus.schemas.sealing import BusKeys, new_key
from sessionbus.schemas.session_der import parse_session
from sessionbus.servers.cache.access import AccessPolicy
from sessionbus.servers.cache.connection import FrontLimits
from sessionbus.servers.cache.front import CacheFront, CacheSettings
from sessionbus.servers.cache.store import OPAQUE_SID_CTX, Store
from tests.conftest import TEST_SID_CTX
from tests.helpers_der import make_session_der
from tests.helpers_keys import farm_keys

HTTPD_CTX = b"38049255d275b0b38e6e6c6da4c8b3a1"  # what httpd puts there: 32 hex digits
MAX_VALUE = 16 << 10


# --- fixtures -----------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Stands in for the outbox: records what the store would publish."""

    new: list[tuple[bytes, bytes, float, bytes, bool]] = field(default_factory=list)
    get: list[tuple[bytes, bytes, float, bool, str | None]] = field(default_factory=list)
    remove: list[tuple[bytes, bytes, float, RemoveReason]] = field(default_factory=list)

    def put_new(self, sid: bytes, ctx: bytes, expires: float, der: bytes,
                opaque: bool = False) -> None:
        self.new.append((sid, ctx, expires, der, opaque))

    def put_get(self, sid: bytes, ctx: bytes, expires: float, hit: bool,
                origin: str | None) -> None:
        self.get.append((sid, ctx, expires, hit, origin))

    def put_remove(self, sid: bytes, ctx: bytes, expires: float, reason: RemoveReason) -> None:
        self.remove.append((sid, ctx, expires, reason))


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Front:
    front: CacheFront
    events: Recorder
    clock: Clock

    @property
    def mc_port(self) -> int:
        return self.front.address("memcache")[1]

    @property
    def redis_port(self) -> int:
        return self.front.address("redis")[1]

    @property
    def store(self) -> Store:
        return self.front.store


async def make_front(limits: FrontLimits = FrontLimits(),  # noqa: B008
                     access: AccessPolicy = AccessPolicy(), defer: bool = True) -> Front:  # noqa: B008
    settings = CacheSettings(
        node_id="cache-test", memcache=("127.0.0.1", 0), redis=("127.0.0.1", 0),
        session_timeout=600, replication=False, limits=limits, access=access,
        defer_sets=defer,
    )
    f = CacheFront(settings, BrokerSettings(), BusKeys([new_key()]), Topology(prefix="unused"))
    clock = Clock()
    events = Recorder()
    f.cache = PeerCache(clock=clock)
    f.store = Store("cache-test", f.cache, events, session_lifetime=600,  # type: ignore[arg-type]
                    max_value=limits.max_value, clock=clock, services=access.services,
                    defer=defer, metrics=f.metrics.cache)
    await f.start()
    return Front(f, events, clock)


@pytest.fixture
async def front() -> AsyncIterator[Front]:
    f = await make_front()
    try:
        yield f
    finally:
        await f.front.stop(1)


@pytest.fixture
async def front_with() -> AsyncIterator[Callable[..., Any]]:
    made: list[Front] = []

    async def make(access: AccessPolicy = AccessPolicy(), defer: bool = True,  # noqa: B008
                   **limits: Any) -> Front:
        f = await make_front(FrontLimits(**limits), access, defer)
        made.append(f)
        return f

    try:
        yield make
    finally:
        for f in made:
            await f.front.stop(1)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until(self, suffix: bytes, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(suffix), timeout)

    async def line(self) -> bytes:
        return await self.until(b"\r\n")

    async def exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), 5)

    async def ask(self, data: bytes, suffix: bytes = b"\r\n") -> bytes:
        await self.send(data)
        return await self.until(suffix)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (whatever it sent before is skipped)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
                return True
        return False

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[int], Any]]:
    opened: list[Client] = []

    async def connect(port: int) -> Client:
        c = await Client.connect(port)
        opened.append(c)
        return c

    try:
        yield connect
    finally:
        for c in opened:
            c.close()


def tls_session(sid: bytes | None = None, ctx: bytes = HTTPD_CTX, timeout: int = 300) -> bytes:
    return make_session_der(sid or os.urandom(32), ctx, int(time.time()), timeout)


def mc_key(der: bytes) -> bytes:
    return b"mod_ssl-sess:" + parse_session(der).session_id.hex().encode()


def mc_set(key: bytes, value: bytes, exptime: int = 299, flags: int = 0,
           trailer: bytes = b" ") -> bytes:
    """A set as httpd sends it (note the space before CRLF)."""
    return b"set %b %d %d %d%b\r\n%b\r\n" % (key, flags, exptime, len(value), trailer, value)


def requests(f: Front, command: str, result: str, protocol: str = "memcache") -> float:
    return f.front.metrics.value(
        "sessionbus_cache_requests_total",
        {"protocol": protocol, "command": command, "result": result},
    )


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


async def assert_serving(f: Front, key: bytes, der: bytes) -> None:
    """The front still answers, and still holds ``key`` (it lost nothing)."""
    c = await Client.connect(f.mc_port)
    try:
        got = await c.ask(b"get " + key + b"\r\n", b"END\r\n")
        assert got == b"VALUE %b 0 %d\r\n%b\r\nEND\r\n" % (key, len(der), der)
    finally:
        c.close()


# --- memcached: what httpd sends ----------------------------------------------------------------


async def test_httpd_set_get_delete(front: Front, clients: Any) -> None:
    c = await clients(front.mc_port)
    der = tls_session()
    key = mc_key(der)
    sid = parse_session(der).session_id
    assert await c.ask(mc_set(key, der)) == b"STORED\r\n"
    sent = front.events.new[-1]
    assert sent[0] == sid and sent[1] == HTTPD_CTX and sent[3] == der and sent[4] is False
    assert 297 < sent[2] - time.time() <= 300
    got = await c.ask(b"get " + key + b"\r\n", b"END\r\n")
    assert got == b"VALUE %b 0 %d\r\n%b\r\nEND\r\n" % (key, len(der), der)
    assert front.events.get[-1][:2] == (sid, HTTPD_CTX)
    assert front.events.get[-1][3:] == (True, "cache-test")
    assert await c.ask(b"version\r\n") == b"VERSION 1.6.0-sessionbus\r\n"
    assert await c.ask(b"delete " + key + b" 0\r\n") == b"DELETED\r\n"
    assert front.events.remove[-1][0] == sid
    assert front.events.remove[-1][3] is RemoveReason.DELETE
    assert await c.ask(b"get " + key + b"\r\n", b"END\r\n") == b"END\r\n"
    assert front.events.get[-1][0] == sid and front.events.get[-1][3] is False
    # a deleted session never comes back, whoever stores it again. The set is answered at
    # once (deferred, issue 19), so it is STORED on the wire, counted not_stored, never served.
    not_stored = requests(front, "set", "not_stored")
    assert await c.ask(mc_set(key, der)) == b"STORED\r\n"
    assert await c.ask(b"get " + key + b"\r\n", b"END\r\n") == b"END\r\n"
    assert requests(front, "set", "not_stored") == not_stored + 1
    await c.send(b"quit\r\n")
    assert await c.closed()


async def test_get_several_keys_and_flags(front: Front, clients: Any) -> None:
    c = await clients(front.mc_port)
    a, b = tls_session(), tls_session()
    assert await c.ask(mc_set(mc_key(a), a)) == b"STORED\r\n"
    assert await c.ask(mc_set(b"other:key", b"opaque value", flags=42, trailer=b"")) == (
        b"STORED\r\n")
    assert front.events.new[-1][1] == OPAQUE_SID_CTX and front.events.new[-1][4] is True
    miss = mc_key(b)
    got = await c.ask(b"get %b %b other:key\r\n" % (mc_key(a), miss), b"END\r\n")
    assert got == (b"VALUE %b 0 %d\r\n%b\r\n" % (mc_key(a), len(a), a)
                   + b"VALUE other:key 42 12\r\nopaque value\r\nEND\r\n")
    assert [e[3] for e in front.events.get[-3:]] == [True, False, True]


async def test_noreply_and_legacy_delete_forms(front: Front, clients: Any) -> None:
    c = await clients(front.mc_port)
    await c.send(b"set k1 0 0 2 noreply\r\nv1\r\ndelete k1 noreply\r\ndelete k1 0 noreply\r\n")
    assert await c.ask(b"get k1\r\n", b"END\r\n") == b"END\r\n"
    assert await c.ask(b"delete nothing\r\n") == b"NOT_FOUND\r\n"
    assert await c.ask(b"delete nothing 0\r\n") == b"NOT_FOUND\r\n"
    # memcached refuses a non-zero time: bad format, and the connection is closed
    await c.send(b"delete nothing 10\r\n")
    assert (await c.line()).startswith(b"CLIENT_ERROR bad command line format")
    assert await c.closed()


async def test_unknown_commands_answer_error_and_keep_the_connection(
    front: Front, clients: Any
) -> None:
    c = await clients(front.mc_port)
    assert await c.ask(b"stats\r\n") == b"ERROR\r\n"
    assert await c.ask(b"\r\n") == b"ERROR\r\n"
    assert await c.ask(b"gets foo\r\n") == b"ERROR\r\n"
    # a storage command we do not serve: its value is read and dropped, so we stay in step
    assert await c.ask(b"add k 0 0 5\r\nhello\r\n") == b"ERROR\r\n"
    assert await c.ask(b"version\r\n") == b"VERSION 1.6.0-sessionbus\r\n"


async def test_expiry(front: Front, clients: Any) -> None:
    c = await clients(front.mc_port)
    der = tls_session()
    key = mc_key(der)
    assert await c.ask(mc_set(key, der, exptime=5)) == b"STORED\r\n"
    assert await c.ask(b"get " + key + b"\r\n", b"END\r\n") != b"END\r\n"
    front.clock.offset = 6.0  # 6 s later: expired, never served
    assert await c.ask(b"get " + key + b"\r\n", b"END\r\n") == b"END\r\n"
    front.clock.offset = 0.0
    # an exptime already past stores nothing (memcached: negative means expired at once)
    other = tls_session()
    assert await c.ask(mc_set(mc_key(other), other, exptime=-1)) == b"STORED\r\n"
    assert await c.ask(b"get " + mc_key(other) + b"\r\n", b"END\r\n") == b"END\r\n"
    # the session's own lifetime (time + timeout in the DER) caps the client's exptime
    short = tls_session(timeout=2)
    assert await c.ask(mc_set(mc_key(short), short, exptime=299)) == b"STORED\r\n"
    assert front.events.new[-1][2] <= time.time() + 2
    # exptime 0 (none) and far-future absolute times are capped by the cache's lifetime (600 s)
    assert await c.ask(mc_set(b"forever", b"x", exptime=0)) == b"STORED\r\n"
    assert front.events.new[-1][2] <= time.time() + 600


async def test_revoked_session_is_not_served(front: Front, clients: Any) -> None:
    c = await clients(front.mc_port)
    der = tls_session()
    key = mc_key(der)
    assert await c.ask(mc_set(key, der)) == b"STORED\r\n"
    # what the replicator does with `sessionbus revoke`'s REMOVE
    front.store.cache.remove(parse_session(der).session_id, expires=time.time() + 3600,
                             event_time=time.time())
    assert await c.ask(b"get " + key + b"\r\n", b"END\r\n") == b"END\r\n"


async def test_session_values_must_be_that_session(front: Front, clients: Any) -> None:
    """A bad value is answered STORED (the set is deferred, issue 19; it was CLIENT_ERROR
    before), then counted as invalid and dead-lettered, and never stored or published."""
    c = await clients(front.mc_port)
    der = tls_session()
    wrong = tls_session()  # another session's DER under this key
    invalid = requests(front, "set", "invalid")
    for value in (b"not a DER", wrong):
        assert await c.ask(mc_set(mc_key(der), value)) == b"STORED\r\n"
    assert await c.ask(mc_set(mc_key(der), der, flags=1)) == b"STORED\r\n"
    assert await c.ask(b"get " + mc_key(der) + b"\r\n", b"END\r\n") == b"END\r\n"
    assert requests(front, "set", "invalid") == invalid + 3
    dead = list(front.store.dead_sets)[-3:]
    assert [d.key for d in dead] == [mc_key(der)] * 3
    assert [d.size for d in dead] == [9, len(wrong), len(der)]
    assert not front.events.new
    assert await c.ask(mc_set(mc_key(der), der)) == b"STORED\r\n"  # still usable
    assert (await c.ask(b"get " + mc_key(der) + b"\r\n", b"END\r\n")).startswith(b"VALUE")
    assert len(front.events.new) == 1


async def test_sync_sets_answer_a_bad_value_with_an_error(front_with: Any,
                                                          clients: Any) -> None:
    """--sync-sets: the old contract, validated before the answer."""
    f = await front_with(defer=False)
    c = await clients(f.mc_port)
    der = tls_session()
    for value in (b"not a DER", tls_session()):
        got = await c.ask(mc_set(mc_key(der), value))
        assert got.startswith(b"CLIENT_ERROR not a TLS session")
    assert await c.ask(mc_set(mc_key(der), der, flags=1)) != b"STORED\r\n"
    assert await c.ask(mc_set(mc_key(der), der)) == b"STORED\r\n"
    assert await c.ask(b"delete " + mc_key(der) + b" 0\r\n") == b"DELETED\r\n"
    assert await c.ask(mc_set(mc_key(der), der)) == b"NOT_STORED\r\n"
    assert len(f.events.new) == 1


async def test_opaque_keys_are_written_once(front: Front, clients: Any) -> None:
    c = await clients(front.mc_port)
    assert await c.ask(mc_set(b"k", b"one")) == b"STORED\r\n"
    assert await c.ask(mc_set(b"k", b"one")) == b"STORED\r\n"
    assert await c.ask(mc_set(b"k", b"two")) == b"NOT_STORED\r\n"
    assert await c.ask(b"get k\r\n", b"END\r\n") == b"VALUE k 0 3\r\none\r\nEND\r\n"
    # a mod_ssl-sess key that is not hex is an opaque key like any other
    assert await c.ask(mc_set(b"mod_ssl-sess:zz", b"v")) == b"STORED\r\n"
    assert front.events.new[-1][0] == b"mod_ssl-sess:zz" and front.events.new[-1][4] is True
    # a key of 250 bytes is fine, 251 is not
    assert await c.ask(mc_set(b"x" * 250, b"v")) == b"STORED\r\n"
    assert front.events.new[-1][0] == b"x" * 250
    await c.send(mc_set(b"x" * 251, b"v"))
    assert (await c.line()).startswith(b"CLIENT_ERROR")
    assert await c.closed()


# --- memcached: bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"set k x 0 3\r\nabc\r\n",  # flags not a number
    b"set k 0 0\r\n",  # too few arguments
    b"set k 0 0 -3\r\n",  # negative length
    b"set k 0 0 3 extra junk\r\n",
    b"get\r\n",
    b"\x80\x01\x00\x05binary protocol\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03TLS hello\r\n",
    b"GET / HTTP/1.1\r\n",
])
async def test_garbage_gets_an_error_line_and_is_closed(
    front: Front, clients: Any, garbage: bytes
) -> None:
    der = tls_session()
    good = await clients(front.mc_port)
    assert await good.ask(mc_set(mc_key(der), der)) == b"STORED\r\n"
    bad = await clients(front.mc_port)
    await bad.send(garbage)
    line = await bad.line()
    assert line.startswith((b"CLIENT_ERROR", b"ERROR")), line
    if line.startswith(b"CLIENT_ERROR"):
        assert await bad.closed()
    # the front serves on, on the connection it had and on new ones, and lost nothing
    got = await good.ask(b"get " + mc_key(der) + b"\r\n", b"END\r\n")
    assert got.startswith(b"VALUE")
    await assert_serving(front, mc_key(der), der)


async def test_overlong_line_and_bad_data_chunk_close_the_connection(
    front: Front, clients: Any
) -> None:
    c = await clients(front.mc_port)
    await c.send(b"get " + b"k" * 9000)  # no newline, past the line bound
    assert (await c.line()).startswith(b"CLIENT_ERROR")
    assert await c.closed()
    c = await clients(front.mc_port)
    await c.send(b"set k 0 0 3\r\nabcXY")  # the value is not followed by CRLF
    assert await c.line() == b"CLIENT_ERROR bad data chunk\r\n"
    assert await c.closed()
    c = await clients(front.mc_port)
    assert await c.ask(b"get k\r\n", b"END\r\n") == b"END\r\n"


async def test_oversize_value_is_refused_and_the_connection_stays_usable(
    front: Front, clients: Any
) -> None:
    c = await clients(front.mc_port)
    big = os.urandom(MAX_VALUE + 1)
    await c.send(b"set big 0 0 %d \r\n" % len(big))
    assert await c.line() == b"SERVER_ERROR object too large for cache\r\n"
    for i in range(0, len(big), 1000):  # the value trickles in: read and dropped
        await c.send(big[i : i + 1000])
    await c.send(b"\r\n")
    assert await c.ask(b"get big\r\n", b"END\r\n") == b"END\r\n"
    assert not front.events.new
    # the largest allowed value fits (a session with a long certificate chain)
    fits = os.urandom(MAX_VALUE - 4)  # opaque values keep 4 bytes of flags in front
    assert await c.ask(mc_set(b"fits", fits)) == b"STORED\r\n"
    got = await c.ask(b"get fits\r\n", b"END\r\n")
    assert got.endswith(fits + b"\r\nEND\r\n")


async def test_pipelined_and_fragmented_requests(front: Front, clients: Any) -> None:
    c = await clients(front.mc_port)
    ders = [tls_session() for _ in range(50)]
    batch = b"".join(mc_set(mc_key(d), d) for d in ders)
    batch += b"".join(b"get " + mc_key(d) + b"\r\n" for d in ders)
    batch += b"version\r\n"
    await c.send(batch)
    for _ in ders:
        assert await c.line() == b"STORED\r\n"
    for d in ders:
        assert await c.until(b"END\r\n") == b"VALUE %b 0 %d\r\n%b\r\nEND\r\n" % (
            mc_key(d), len(d), d)
    assert await c.line() == b"VERSION 1.6.0-sessionbus\r\n"
    # one byte at a time
    d = tls_session()
    for b in mc_set(mc_key(d), d) + b"get " + mc_key(d) + b"\r\n":
        c.writer.write(bytes([b]))
        await c.writer.drain()
    assert await c.line() == b"STORED\r\n"
    assert (await c.until(b"END\r\n")).startswith(b"VALUE")


async def test_client_that_disconnects_mid_value(front: Front, clients: Any) -> None:
    der = tls_session()
    keeper = await clients(front.mc_port)
    assert await keeper.ask(mc_set(mc_key(der), der)) == b"STORED\r\n"
    for cut in (0, 1, 20, len(der) // 2, len(der), len(der) + 1):
        c = await Client.connect(front.mc_port)
        other = tls_session()
        head = b"set %b 0 299 %d \r\n" % (mc_key(other), len(other))
        await c.send(head + (other + b"\r\n")[:cut])
        c.close()
        await asyncio.sleep(0.05)
        assert other not in [e[3] for e in front.events.new]
    await assert_serving(front, mc_key(der), der)
    assert len(front.events.new) == 1
    # and mid-line
    c = await Client.connect(front.mc_port)
    await c.send(b"get mod_ssl-se")
    c.close()
    await assert_serving(front, mc_key(der), der)


# --- limits --------------------------------------------------------------------------------------


async def test_connection_limit(front_with: Any, clients: Any) -> None:
    f = await front_with(max_connections=2)
    a = await clients(f.mc_port)
    b = await clients(f.redis_port)
    assert await a.ask(b"version\r\n") == b"VERSION 1.6.0-sessionbus\r\n"
    assert await b.ask(b"PING\r\n") == b"+PONG\r\n"
    c = await clients(f.mc_port)
    assert await c.line() == b"SERVER_ERROR too many open connections\r\n"
    assert await c.closed()
    r = await clients(f.redis_port)
    assert await r.line() == b"-ERR max number of clients reached\r\n"
    assert await r.closed()
    a.close()
    for _ in range(50):  # the slot frees as soon as the front sees the close
        await asyncio.sleep(0.02)
        if len(f.front.connections.open) < 2:
            break
    d = await clients(f.mc_port)
    assert await d.ask(b"version\r\n") == b"VERSION 1.6.0-sessionbus\r\n"


async def test_idle_connections_are_closed(front_with: Any, clients: Any) -> None:
    f = await front_with(idle_timeout=0.3)
    idle = await clients(f.mc_port)
    busy = await clients(f.mc_port)
    assert await idle.ask(b"version\r\n") == b"VERSION 1.6.0-sessionbus\r\n"
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        assert await busy.ask(b"version\r\n") == b"VERSION 1.6.0-sessionbus\r\n"
        await asyncio.sleep(0.05)
    assert await idle.closed(1.0)
    assert await busy.ask(b"version\r\n") == b"VERSION 1.6.0-sessionbus\r\n"


async def small_window_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose receive buffer stays small: loopback autotunes it up to 32 MB here, which
    would absorb everything a test means to leave unread."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=1 << 16)


async def test_a_client_that_does_not_read_costs_only_itself(front: Front, clients: Any) -> None:
    der = tls_session(ctx=TEST_SID_CTX)
    other = await clients(front.mc_port)
    assert await other.ask(mc_set(mc_key(der), der)) == b"STORED\r\n"
    _, hog = await small_window_client(front.mc_port)
    request = b"get " + mc_key(der) + b"\r\n"
    # ~6 MB of answers it never reads: the front stops reading from it instead of buffering
    hog.write(request * 20_000)
    # until the front has filled the hog's socket (bounded: a loaded machine takes longer)
    for _ in range(100):
        await asyncio.sleep(0.1)
        held_now = [c for c in front.front.connections.open if c._unwritten]
        if held_now and not held_now[0]._reading:
            break
    (held,) = [c for c in front.front.connections.open if c._unwritten]
    assert not held._reading
    # what it holds for the hog: its bound plus the answers to one read of requests
    assert len(held._unwritten) <= front.front.settings.limits.max_unwritten + 512 * 1024
    for _ in range(20):
        assert (await other.ask(request, b"END\r\n")).startswith(b"VALUE")
    hog.transport.abort()
    await assert_serving(front, mc_key(der), der)


async def test_a_slow_reader_gets_every_answer_once_it_reads(front: Front, clients: Any) -> None:
    """Answers that do not fit the socket are kept and written as the client drains them;
    reading stops meanwhile and resumes after, with nothing lost or reordered."""
    der = tls_session(ctx=TEST_SID_CTX)
    other = await clients(front.mc_port)
    assert await other.ask(mc_set(mc_key(der), der)) == b"STORED\r\n"
    request = b"get " + mc_key(der) + b"\r\n"
    answer = await other.ask(request, b"END\r\n")
    reader, writer = await small_window_client(front.mc_port)
    try:
        n = 20_000  # ~6 MB of answers: more than the server's socket buffer (4 MB at most)
        writer.write(request * n + b"version\r\n")
        for _ in range(100):  # the front fills the socket and stops reading (bounded wait)
            await asyncio.sleep(0.1)
            slow = [conn for conn in front.front.connections.open if conn._unwritten]
            if slow and not slow[0]._reading:
                break
        slow = [conn for conn in front.front.connections.open if conn._unwritten]
        assert len(slow) == 1 and not slow[0]._reading
        assert (await other.ask(request, b"END\r\n")) == answer  # others are served meanwhile
        expected = answer * n + b"VERSION 1.6.0-sessionbus\r\n"
        assert await asyncio.wait_for(reader.readexactly(len(expected)), 30) == expected
        writer.write(request)  # and it reads again
        assert await asyncio.wait_for(reader.readexactly(len(answer)), 5) == answer
    finally:
        writer.close()


async def test_metrics_count_requests_and_connections(front: Front, clients: Any) -> None:
    registry = front.front.metrics.registry

    def count(command: str, result: str) -> float:
        value = registry.get_sample_value(
            "sessionbus_cache_requests_total",
            {"protocol": "memcache", "command": command, "result": result},
        )
        return value or 0.0

    hits, misses = count("get", "hit"), count("get", "miss")
    stored, deleted = count("set", "stored"), count("delete", "deleted")
    observed_before = registry.get_sample_value(
        "sessionbus_cache_request_duration_seconds_count", {"protocol": "memcache"}
    ) or 0.0
    before = front.front.metrics.value("sessionbus_cache_connections")
    c = await clients(front.mc_port)
    der = tls_session()
    await c.ask(mc_set(mc_key(der), der))
    await c.ask(b"get " + mc_key(der) + b" nope\r\n", b"END\r\n")  # several keys
    assert count("get", "hit") == hits + 1 and count("get", "miss") == misses + 1
    await c.ask(b"get " + mc_key(der) + b"\r\n", b"END\r\n")  # one key, as httpd asks
    await c.ask(b"get nope\r\n", b"END\r\n")
    assert count("get", "hit") == hits + 2 and count("get", "miss") == misses + 2
    assert await c.ask(b"delete " + mc_key(der) + b" 0\r\n") == b"DELETED\r\n"
    assert count("set", "stored") == stored + 1 and count("delete", "deleted") == deleted + 1
    assert front.front.metrics.value("sessionbus_cache_connections") == before + 1
    observed = registry.get_sample_value(
        "sessionbus_cache_request_duration_seconds_count", {"protocol": "memcache"}
    )
    assert observed is not None and observed >= observed_before + 5
    inf = registry.get_sample_value(
        "sessionbus_cache_request_duration_seconds_bucket", {"protocol": "memcache", "le": "+Inf"}
    )
    assert inf == observed


# --- Redis -------------------------------------------------------------------------------------


async def test_redis_what_httpd_sends(front: Front, clients: Any) -> None:
    c = await clients(front.redis_port)
    der = tls_session()
    key = mc_key(der)
    assert await c.ask(resp(b"SETEX", key, b"299", der)) == b"+OK\r\n"
    assert front.events.new[-1][1] == HTTPD_CTX and front.events.new[-1][4] is False
    await c.send(resp(b"GET", key))
    assert await c.line() == b"$%d\r\n" % len(der)
    assert await c.exactly(len(der) + 2) == der + b"\r\n"
    assert await c.ask(resp(b"DEL", key)) == b":1\r\n"
    assert front.events.remove[-1][3] is RemoveReason.DELETE
    assert await c.ask(resp(b"GET", key)) == b"$-1\r\n"
    # what memcached stored, Redis serves: one store
    m = await clients(front.mc_port)
    other = tls_session()
    assert await m.ask(mc_set(mc_key(other), other)) == b"STORED\r\n"
    await c.send(resp(b"get", mc_key(other)))
    assert await c.line() == b"$%d\r\n" % len(other)


async def test_redis_commands(front: Front, clients: Any) -> None:
    c = await clients(front.redis_port)
    assert await c.ask(resp(b"PING")) == b"+PONG\r\n"
    assert await c.ask(resp(b"PING", b"hi")) == b"$2\r\n"
    assert await c.line() == b"hi\r\n"
    assert await c.ask(resp(b"SELECT", b"0")) == b"+OK\r\n"
    assert await c.ask(resp(b"SELECT", b"1")) == b"-ERR DB index is out of range\r\n"
    assert await c.ask(resp(b"SET", b"a", b"1", b"EX", b"100")) == b"+OK\r\n"
    assert 99 < front.events.new[-1][2] - time.time() <= 100
    assert await c.ask(resp(b"set", b"b", b"2", b"px", b"1500")) == b"+OK\r\n"
    assert 1 < front.events.new[-1][2] - time.time() <= 1.5
    assert await c.ask(resp(b"SET", b"c", b"3")) == b"+OK\r\n"  # the cache's lifetime
    assert await c.ask(resp(b"SET", b"d", b"4", b"NX")) == b"-ERR syntax error\r\n"
    assert (await c.ask(resp(b"SET", b"d", b"4", b"EX", b"0"))).startswith(b"-ERR invalid expire")
    assert (await c.ask(resp(b"SET", b"d", b"4", b"EX", b"x"))).startswith(b"-ERR value is not")
    assert (await c.ask(resp(b"SETEX", b"d", b"-5", b"4"))).startswith(b"-ERR invalid expire")
    assert (await c.ask(resp(b"SETEX", b"d", b"4"))).startswith(b"-ERR wrong number")
    assert await c.ask(resp(b"DEL", b"a", b"b", b"nope")) == b":2\r\n"
    assert await c.ask(resp(b"GET", b"c")) == b"$1\r\n"
    assert await c.line() == b"3\r\n"
    assert await c.ask(resp(b"FLUSHALL")) == b"-ERR unknown command 'flushall'\r\n"
    assert (await c.ask(resp(b"AUTH", b"pw"))).startswith(b"-ERR unknown command")
    # inline commands, as telnet sends them
    assert await c.ask(b"PING\r\n") == b"+PONG\r\n"
    assert await c.ask(b"GET c\n") == b"$1\r\n"
    assert await c.line() == b"3\r\n"
    assert await c.ask(b"*0\r\nPING\r\n") == b"+PONG\r\n"  # an empty array is no command
    assert await c.ask(resp(b"QUIT")) == b"+OK\r\n"
    assert await c.closed()


async def test_redis_pipelined_and_fragmented(front: Front, clients: Any) -> None:
    c = await clients(front.redis_port)
    ders = [tls_session() for _ in range(30)]
    batch = b"".join(resp(b"SETEX", mc_key(d), b"100", d) for d in ders)
    batch += b"".join(resp(b"GET", mc_key(d)) for d in ders)
    await c.send(batch)
    for _ in ders:
        assert await c.line() == b"+OK\r\n"
    for d in ders:
        assert await c.line() == b"$%d\r\n" % len(d)
        assert await c.exactly(len(d) + 2) == d + b"\r\n"
    d = tls_session()
    for b in resp(b"SETEX", mc_key(d), b"100", d):
        c.writer.write(bytes([b]))
        await c.writer.drain()
    assert await c.line() == b"+OK\r\n"


@pytest.mark.parametrize("garbage", [
    b"*2\r\n$3\r\nGET\r\n:5\r\n",  # not a bulk string
    b"*x\r\n",  # bad array length
    b"*2\r\n$3\r\nGET\r\n$-7\r\n",  # bad bulk length
    b"*2\r\n$3\r\nGETXX\r\n",  # bulk not followed by CRLF
    b"*100000\r\n",  # too many arguments
    b"\x16\x03\x01" + b"x" * 9000,  # a TLS hello, and no line end for a long while
])
async def test_redis_protocol_errors_close_the_connection(
    front: Front, clients: Any, garbage: bytes
) -> None:
    der = tls_session()
    good = await clients(front.redis_port)
    assert await good.ask(resp(b"SETEX", mc_key(der), b"100", der)) == b"+OK\r\n"
    bad = await clients(front.redis_port)
    await bad.send(garbage)
    assert (await bad.line()).startswith(b"-ERR Protocol error")
    assert await bad.closed()
    assert (await good.ask(resp(b"GET", mc_key(der)))).startswith(b"$")
    await assert_serving(front, mc_key(der), der)


async def test_redis_oversize_and_disconnect_mid_bulk(front: Front, clients: Any) -> None:
    c = await clients(front.redis_port)
    big = os.urandom(MAX_VALUE + 100)
    got = await c.ask(resp(b"SETEX", b"big", b"100", big))
    assert got.startswith(b"-ERR value too large")
    assert await c.ask(resp(b"GET", b"big")) == b"$-1\r\n"  # still in step
    assert (await c.ask(resp(b"SET", b"k" * 251, b"v"))).startswith(b"-ERR key longer")
    der = tls_session()
    assert await c.ask(resp(b"SETEX", mc_key(der), b"100", der)) == b"+OK\r\n"
    gone = await Client.connect(front.redis_port)
    other = tls_session()
    await gone.send(resp(b"SETEX", mc_key(other), b"100", other)[:-40])
    gone.close()
    await asyncio.sleep(0.05)
    assert await c.ask(resp(b"GET", mc_key(other))) == b"$-1\r\n"
    await assert_serving(front, mc_key(der), der)


# --- replication between two fronts over the real broker ---------------------------------------


@pytest.mark.broker
async def test_two_fronts_replicate_over_the_broker(amqp_url: str) -> None:
    prefix = f"sbtest-{uuid.uuid4().hex[:10]}"
    keys = farm_keys()
    topo = Topology(prefix=prefix)
    from tests.farm_support import provision

    await asyncio.to_thread(provision, prefix, amqp_url)  # the admin step (roles only look)
    fronts = [
        CacheFront(CacheSettings(node_id=n, memcache=("127.0.0.1", 0), redis=("127.0.0.1", 0),
                                 session_timeout=600),
                   BrokerSettings(url=amqp_url), keys, topo)
        for n in ("cache-a", "cache-b")
    ]
    try:
        for f in fronts:
            await f.start()
        for f in fronts:
            assert await f.wait_bus_ready(20)
        a = await Client.connect(fronts[0].address("memcache")[1])
        b = await Client.connect(fronts[1].address("memcache")[1])
        rb = await Client.connect(fronts[1].address("redis")[1])
        der = tls_session()
        assert await a.ask(mc_set(mc_key(der), der)) == b"STORED\r\n"
        assert await a.ask(mc_set(b"app:token", b"opaque", flags=7)) == b"STORED\r\n"
        got = b""
        for _ in range(100):
            got = await b.ask(b"get " + mc_key(der) + b" app:token\r\n", b"END\r\n")
            if got.count(b"VALUE") == 2:
                break
            await asyncio.sleep(0.05)
        assert got == (b"VALUE %b 0 %d\r\n%b\r\n" % (mc_key(der), len(der), der)
                       + b"VALUE app:token 7 6\r\nopaque\r\nEND\r\n")
        await rb.send(resp(b"GET", b"app:token"))
        assert await rb.line() == b"$6\r\n" and await rb.line() == b"opaque\r\n"
        # a delete on B reaches A
        assert await b.ask(b"delete " + mc_key(der) + b" 0\r\n") == b"DELETED\r\n"
        for _ in range(100):
            got = await a.ask(b"get " + mc_key(der) + b"\r\n", b"END\r\n")
            if got == b"END\r\n":
                break
            await asyncio.sleep(0.05)
        assert got == b"END\r\n"
        for c in (a, b, rb):
            c.close()
    finally:
        for f in fronts:
            await f.stop(2)
        from tests.farm_support import delete_topology

        await asyncio.to_thread(
            delete_topology, prefix, [])  # v2: no per-node queues


# --- the command line ----------------------------------------------------------------------------


def test_cache_command_needs_a_listener(capsys: pytest.CaptureFixture[str]) -> None:
    from sessionbus.cli import main

    assert main(["cache", "--node-id", "cache-1"]) == 3
    assert "--memcache" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["cache", "--node-id", "cache-1", "--memcache", "nowhere"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["cache", "--node-id", "Not_An_Id", "--memcache", "127.0.0.1:11311"])
    assert exc.value.code == 2
