"""The cache front's push subscription: the replica's sessions streamed to a TLS server (ATS).

A server that cannot ask the cache on every lookup (Traffic Server keeps its own session cache and
takes outside sessions with ``TSSslSessionInsert``) subscribes instead: it connects to the push
listener, says which session id context it serves, gets every live session of that context held
by the replica (a warm join), then every session a peer adds and every REMOVE, as they are
applied. Its own sessions it still stores through the memcached listener (``set
mod_ssl-sess:<hex id>``, ``delete``), so they are sealed and published like httpd's.

The protocol, framed both ways: ``type:u8 | length:u32 big-endian | payload``.

=====  =========  ==============================================================================
dir    type       payload
=====  =========  ==============================================================================
→      ``S``      subscribe: the session id context (0..32 bytes; empty: every context)
←      ``N``      a session: ``id_len:u8 | id | expires:u64 (unix s) | der``
←      ``R``      a REMOVE: the session id
←      ``E``      end of the replay: what follows is live
=====  =========  ==============================================================================

Sessions made by this front's own node id (the subscriber's own, stored through memcache) are not
pushed back. Everything runs on the event loop and only writes to transports: a subscriber that
does not read (more than ``max_buffer`` bytes waiting) is dropped and counted, and gets a fresh
replay when it reconnects. Nothing here logs session bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from typing import Any

from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.metrics import CacheMetrics
from sessionbus.servers.cache.access import AccessPolicy

__all__ = ["PushServer", "encode_new", "encode_remove", "frame"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">BI")
_EXPIRES = struct.Struct(">Q")
MAX_SUBSCRIBE = 64  # an S frame larger than this is refused
MAX_SID_CTX = 32


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind[0], len(payload)) + payload


def encode_new(session_id: bytes, expires: float, der: bytes) -> bytes:
    return frame(b"N", bytes([len(session_id)]) + session_id
                 + _EXPIRES.pack(max(int(expires), 0)) + der)


def encode_remove(session_id: bytes) -> bytes:
    return frame(b"R", session_id)


class _Subscriber(asyncio.Protocol):
    def __init__(self, server: PushServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.sid_ctx: bytes | None = None  # set once subscribed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        access = self.server.access
        sock = transport.get_extra_info("socket")
        reason = access.refusal(sock) if access is not None and sock is not None else None
        if reason is not None:  # the cache front's own access control, for the push too
            self.server.metrics.refused.labels(reason).inc()
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.sid_ctx is not None:
            return  # nothing more is expected from a subscriber
        self.buf += data
        if len(self.buf) < _HEADER.size:
            return
        kind, length = _HEADER.unpack_from(self.buf)
        if kind != ord("S") or length > MAX_SID_CTX or len(self.buf) > MAX_SUBSCRIBE:
            self.server.metrics.push_dropped.inc()
            log.warning("cache push: a bad subscribe; connection closed")
            self.abort()
            return
        if len(self.buf) < _HEADER.size + length:
            return
        self.sid_ctx = self.buf[_HEADER.size:_HEADER.size + length]
        self.buf = b""
        self.server.subscribe(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.unsubscribe(self)

    def send(self, data: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        if t.get_write_buffer_size() > self.server.max_buffer:
            self.server.metrics.push_dropped.inc()
            log.warning("cache push: a subscriber is not reading; dropped (it replays on "
                        "reconnect)")
            self.abort()
            return False
        t.write(data)
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop at once: a close would wait for the unread buffer to drain, holding it."""
        self.server.unsubscribe(self)
        if self.transport is not None:
            self.transport.abort()


class PushServer:
    """Push listener on ``cache``: taps the replica's ``put``/``remove`` (the replicator's and the
    front's own calls alike) and streams what changed to the subscribers."""

    def __init__(self, cache: PeerCache, node_id: str, metrics: CacheMetrics, *,
                 opaque_sid_ctx: bytes, max_buffer: int = 16 * 2**20,
                 access: AccessPolicy | None = None) -> None:
        self.cache = cache
        self.access = access
        self.metrics = metrics
        self.node_id = node_id
        self.opaque_sid_ctx = opaque_sid_ctx
        self.max_buffer = max_buffer
        self.subscribers: set[_Subscriber] = set()
        self._server: asyncio.Server | None = None
        self._untap: Callable[[], None] | None = None

    # --- the tap on the replica ------------------------------------------------------------

    def _tap(self) -> None:
        cache = self.cache
        put, remove = cache.put, cache.remove

        def tapped_put(session_id: bytes, der: bytes, **kw: Any) -> bool:
            stored = put(session_id, der, **kw)
            if stored and self.subscribers and kw.get("origin") != self.node_id:
                self.publish_new(session_id, kw["sid_ctx"], kw["expires"], der)
            return stored

        def tapped_remove(session_id: bytes, **kw: Any) -> bool:
            dropped = remove(session_id, **kw)
            if self.subscribers:
                self.publish_remove(session_id)
            return dropped

        cache.put = tapped_put  # type: ignore[method-assign]
        cache.remove = tapped_remove  # type: ignore[method-assign]

        def untap() -> None:
            del cache.put, cache.remove  # back to the class's methods

        self._untap = untap

    def publish_new(self, session_id: bytes, sid_ctx: bytes, expires: float, der: bytes) -> None:
        if sid_ctx == self.opaque_sid_ctx:
            return
        data = encode_new(session_id, expires, der)
        for s in list(self.subscribers):
            if (not s.sid_ctx or s.sid_ctx == sid_ctx) and s.send(data):
                self.metrics.push_events.labels("new").inc()

    def publish_remove(self, session_id: bytes) -> None:
        data = encode_remove(session_id)
        for s in list(self.subscribers):
            if s.send(data):
                self.metrics.push_events.labels("remove").inc()

    # --- subscribers --------------------------------------------------------------------------

    def subscribe(self, sub: _Subscriber) -> None:
        """Replay the replica's live sessions of the subscriber's context, then live."""
        n = 0
        for sid, s in self.cache.items():
            if s.sid_ctx == self.opaque_sid_ctx or (sub.sid_ctx and s.sid_ctx != sub.sid_ctx):
                continue
            if not sub.send(encode_new(sid, s.expires, s.der)):
                return
            n += 1
        if not sub.send(frame(b"E", b"")):
            return
        self.subscribers.add(sub)
        self.metrics.push_subscribers.set(len(self.subscribers))
        self.metrics.push_events.labels("new").inc(n)
        log.info("cache push: a subscriber joined (%d session(s) replayed)", n)

    def unsubscribe(self, sub: _Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            self.metrics.push_subscribers.set(len(self.subscribers))
            log.info("cache push: a subscriber left")

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        self._tap()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Subscriber(self), host, port)

    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for s in list(self.subscribers):
            s.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        if self._untap is not None:
            self._untap()
            self._untap = None
