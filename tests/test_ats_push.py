"""The cache front's push subscription (servers/cache/push.py) without ATS: a real listener on a
replica, a client speaking the framed protocol. Replay on subscribe (own context only, opaque
entries never), live peer NEW and REMOVE, the front's own sessions not echoed, a bad subscribe
refused, and a subscriber that does not read dropped and counted."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest
from prometheus_client import CollectorRegistry

from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.metrics import CacheMetrics
from sessionbus.servers.cache.push import PushServer, frame
from sessionbus.servers.cache.store import OPAQUE_SID_CTX

CTX = b"websvc"


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readexactly(5), 5)
    kind, n = struct.unpack(">BI", head)
    return bytes([kind]), await asyncio.wait_for(reader.readexactly(n), 5)


def parse_new(payload: bytes) -> tuple[bytes, int, bytes]:
    n = payload[0]
    sid = payload[1:1 + n]
    (expires,) = struct.unpack(">Q", payload[1 + n:9 + n])
    return sid, expires, payload[9 + n:]


def put(cache: PeerCache, sid: bytes, *, ctx: bytes = CTX, origin: str = "peer") -> None:
    now = time.time()
    assert cache.put(sid, b"DER-" + sid, expires=now + 600, origin=origin, sid_ctx=ctx,
                     event_time=now)


@pytest.mark.deadline(30)
async def test_replay_then_live_new_and_remove() -> None:
    cache = PeerCache(max_entries=100, max_bytes=2**20)
    metrics = CacheMetrics(CollectorRegistry())
    put(cache, b"a" * 32)
    put(cache, b"b" * 32, origin="me")  # our own, from before a restart: replayed too
    put(cache, b"c" * 32, ctx=b"other")  # another service's: not for this subscriber
    put(cache, b"opaque-key", ctx=OPAQUE_SID_CTX)
    push = PushServer(cache, "me", metrics, opaque_sid_ctx=OPAQUE_SID_CTX)
    await push.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*push.address())
        writer.write(frame(b"S", CTX))
        replayed = []
        while (f := await read_frame(reader))[0] == b"N":
            replayed.append(parse_new(f[1]))
        assert f == (b"E", b"")
        assert sorted(sid for sid, _, _ in replayed) == [b"a" * 32, b"b" * 32]
        assert all(der == b"DER-" + sid and exp > time.time() for sid, exp, der in replayed)

        put(cache, b"d" * 32, origin="me")  # made through this front (the ATS itself): no echo
        put(cache, b"e" * 32)  # a peer's: pushed
        put(cache, b"f" * 32, ctx=b"other")  # another context: not pushed
        assert cache.remove(b"a" * 32, expires=time.time() + 600, event_time=time.time())
        kind, payload = await read_frame(reader)
        assert kind == b"N" and parse_new(payload)[0] == b"e" * 32
        assert await read_frame(reader) == (b"R", b"a" * 32)
        assert metrics.push_subscribers._value.get() == 1
        writer.close()
        await writer.wait_closed()
        for _ in range(50):
            if not push.subscribers:
                break
            await asyncio.sleep(0.02)
        assert not push.subscribers
    finally:
        await push.stop()
    # untapped: the replica is a plain PeerCache again
    assert "put" not in vars(cache) and "remove" not in vars(cache)


@pytest.mark.deadline(30)
async def test_bad_subscribe_and_a_subscriber_that_does_not_read() -> None:
    cache = PeerCache(max_entries=10_000, max_bytes=64 * 2**20)
    metrics = CacheMetrics(CollectorRegistry())
    push = PushServer(cache, "me", metrics, opaque_sid_ctx=OPAQUE_SID_CTX, max_buffer=64 * 1024)
    await push.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*push.address())
        writer.write(frame(b"X", b"nonsense"))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
        writer.close()

        # a small receive buffer, so the kernel does not absorb what the front sends
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(push.address())
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(frame(b"S", b""))  # every context
        assert await read_frame(reader) == (b"E", b"")
        # never read again: peers' sessions pile up until it is dropped
        now = time.time()
        for i in range(4000):
            cache.put(i.to_bytes(4, "big") * 8, b"x" * 4000, expires=now + 600, origin="peer",
                      sid_ctx=CTX, event_time=now)
            if not push.subscribers:
                break
            if i % 50 == 0:
                await asyncio.sleep(0)
        for _ in range(100):
            if not push.subscribers:
                break
            await asyncio.sleep(0.02)
        assert not push.subscribers
        assert metrics.push_dropped._value.get() == 2  # the bad subscribe and the non-reader
        writer.close()
    finally:
        await push.stop()
