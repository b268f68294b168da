"""One client connection of the cache front, whatever its protocol: limits, idle, backpressure.

The protocol subclasses (``memcache_protocol``, ``redis_protocol``) parse what arrives in
``data_received`` and answer from memory in the same call: nothing is awaited between a request
and its answer, so a client (httpd waits with no read timeout) is answered at once, always.

Bounds: at most ``max_connections`` open (one more is told so and closed), a partial line or value
never exceeds the protocol's own bound (checked by the subclass), a connection that sends nothing
for ``idle_timeout`` seconds is closed, and a client that stops reading its answers stops being
read (the transport's write buffer pauses reading), so no client can make the front hold more than
a bounded amount for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from producer import metrics
from producer.cache_store import Store
from schemas.codec import DEFAULT_LIMITS

log = logging.getLogger(__name__)

_COUNTERS: dict[tuple[str, str, str], Any] = {}  # label children, looked up once


def precreate(protocol: str) -> None:
    """Create the usual label combinations so dashboards see zeros, not gaps."""
    get, delete = ("get", "delete") if protocol == "memcache" else ("get", "del")
    for command, result in ((get, "hit"), (get, "miss"), ("set", "stored"),
                            ("set", "not_stored"), (delete, "deleted"), (delete, "not_found")):
        metrics.CACHE_REQUESTS.labels(protocol, command, result)
    metrics.CACHE_REQUEST_DURATION.labels(protocol)


@dataclass(frozen=True, slots=True)
class FrontLimits:
    max_connections: int = 1024
    max_line: int = 8192  # a command line (memcached) or a header/inline line (Redis)
    max_value: int = DEFAULT_LIMITS.max_event_bytes  # what one NEW event may carry
    max_keys: int = 256  # keys of one get, arguments of one Redis command
    # Longer than httpd's connection-pool TTL (MemcacheConnTTL/RedisConnPoolTTL, 15 s): httpd
    # takes a connection closed under it for a dead server and stops using the cache for a while.
    idle_timeout: float = 300.0


class Connections:
    """The open connections of every listener of one front (for the limit and the idle sweep)."""

    def __init__(self, limits: FrontLimits) -> None:
        self.limits = limits
        self.open: set[CacheConnection] = set()
        self.refused = 0

    def sweep_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        idle = [c for c in self.open if now - c.last_active > self.limits.idle_timeout]
        for c in idle:
            c.close()
        return len(idle)

    def close_all(self) -> None:
        for c in list(self.open):
            c.close()


class CacheConnection(asyncio.Protocol):
    protocol_name = "?"
    too_many = b""  # the line a connection over the limit gets before it is closed

    def __init__(self, store: Store, conns: Connections) -> None:
        self.store = store
        self.conns = conns
        self.limits = conns.limits
        self.transport: asyncio.Transport | None = None
        self.last_active = time.monotonic()
        self.closing = False
        self._buf = bytearray()
        self.out: list[bytes] = []  # answers of the data being handled, written at once
        self.observe = metrics.CACHE_REQUEST_DURATION.labels(self.protocol_name).observe

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if len(self.conns.open) >= self.limits.max_connections:
            self.conns.refused += 1
            self.count("connect", "refused")
            transport.write(self.too_many)
            self.closing = True
            transport.close()
            return
        self.conns.open.add(self)
        metrics.CACHE_CONNECTIONS.inc()
        # Large enough for a burst of pipelined answers, small enough to bound a non-reader.
        transport.set_write_buffer_limits(high=4 * (self.limits.max_value + 1024))

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.conns.open:
            self.conns.open.discard(self)
            metrics.CACHE_CONNECTIONS.dec()
        self.closing = True
        self._buf = bytearray()

    def pause_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.closing:
            return
        try:
            self.received(data)
        except Exception:  # a bug must cost one connection, never the front
            log.exception("%s connection failed", self.protocol_name)
            self.closing = True
        self.flush()

    # --- for subclasses ----------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        raise NotImplementedError

    def count(self, command: str, result: str) -> None:
        key = (self.protocol_name, command, result)
        child = _COUNTERS.get(key)
        if child is None:
            child = _COUNTERS[key] = metrics.CACHE_REQUESTS.labels(*key)
        child.inc()

    def fail(self, line: bytes, command: str = "malformed") -> None:
        """Answer ``line`` (after the answers before it) and close: the client sent something
        that cannot be understood, so nothing after it on this connection can be either."""
        self.count(command, "error")
        self.out.append(line)
        self.closing = True

    def flush(self) -> None:
        """Write the answers gathered so far; close if the connection is done."""
        transport = self.transport
        if transport is None:
            return
        if self.out:
            transport.write(b"".join(self.out))
            self.out.clear()
        if self.closing:
            self._buf = bytearray()
            transport.close()

    def close(self) -> None:
        self.closing = True
        self.flush()
