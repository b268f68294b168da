"""One client connection of the cache front, whatever its protocol: limits, idle, backpressure.

The protocol subclasses (``memcache_protocol``, ``redis_protocol``) parse what arrives in
``received`` and answer from memory in the same call: nothing is awaited between a request and
its answer, so a client (httpd waits with no read timeout) is answered at once, always.

Connections are served straight from the event loop's selector (``loop.add_reader``) on
non-blocking sockets, not through asyncio transports and protocols. The cache front shares a core
with httpd, so every microsecond it spends per request is taken from handshakes: a transport
costs about 20 µs more per request than the two system calls it wraps (a 256 KiB receive buffer
allocated per read, the write path's bookkeeping), which was a third of the front's cost per get.
What a transport also did is done here: TCP_NODELAY, answers that do not fit the socket buffer are
kept and written when it drains, and a connection whose unwritten answers exceed a bound stops
being read until they drain.

Bounds: at most ``max_connections`` open (one more is told so and closed), a partial line or value
never exceeds the protocol's own bound (checked by the subclass), a connection that sends nothing
for ``idle_timeout`` seconds is closed, and a client that stops reading its answers stops being
read, so no client can make the front hold more than a bounded amount for it. That output budget
is checked after every command (``spent``), not once per read: a read of small requests can ask
for megabytes of answers (pipelined multi-gets), so parsing pauses (``spill``) once the answers
not yet taken exceed ``max_unwritten``, and resumes where it stopped when they are written.

Access (``access.AccessPolicy``) is checked once, when a connection is accepted: a peer that is
not on loopback, or whose socket's uid is not allowed, gets one line and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from sessionbus.metrics import CacheMetrics, Metrics
from sessionbus.schemas.codec import DEFAULT_LIMITS
from sessionbus.servers.cache.access import AccessPolicy
from sessionbus.servers.cache.store import Store

log = logging.getLogger(__name__)

_READ_SIZE = 65536
_SEND_BUFFER = 128 << 10  # the kernel doubles it
_MAX_ANSWERS = 64  # answers gathered before they are written, whatever their size
# accept() errors that mean "out of a resource for now", not "this listener is broken".
_ACCEPT_PAUSE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_ACCEPT_PAUSE = 1.0  # seconds


def precreate(stats: CacheMetrics, protocol: str) -> None:
    """Create the usual label combinations so dashboards see zeros, not gaps."""
    get, delete = ("get", "delete") if protocol == "memcache" else ("get", "del")
    stats.requests.precreate(protocol, (
        (get, "hit"), (get, "miss"), ("set", "stored"), ("set", "not_stored"),
        (delete, "deleted"), (delete, "not_found"),
    ))


@dataclass(frozen=True, slots=True)
class FrontLimits:
    max_connections: int = 1024
    max_line: int = 8192  # a command line (memcached) or a header/inline line (Redis)
    max_value: int = DEFAULT_LIMITS.max_event_bytes  # what one NEW event may carry
    max_keys: int = 256  # keys of one get, arguments of one Redis command
    # Longer than httpd's connection-pool TTL (MemcacheConnTTL/RedisConnPoolTTL, 15 s): httpd
    # takes a connection closed under it for a dead server and stops using the cache for a while.
    idle_timeout: float = 300.0

    @property
    def max_unwritten(self) -> int:
        """Answers held for a client that does not read, before it stops being read: room for
        a burst of pipelined answers with values, small enough to bound a non-reader."""
        return 4 * (self.max_value + 1024)


class Connections:
    """The open connections of every listener of one front (for the limit and the idle sweep)."""

    def __init__(self, limits: FrontLimits, metrics: CacheMetrics | None = None,
                 access: AccessPolicy = AccessPolicy()) -> None:  # noqa: B008
        self.limits = limits
        self.metrics = metrics or Metrics().cache
        self.access = access
        self.open: set[CacheConnection] = set()
        self.refused = 0
        self._logged_at = -60.0

    def log_refusal(self, protocol: str, reason: str) -> None:
        """One line per 10 s at most: a client retrying must not flood the log."""
        now = time.monotonic()
        if now - self._logged_at >= 10.0:
            self._logged_at = now
            log.warning("%s: refused a client (%s; sessionbus_cache_refused_total counts "
                        "them all)", protocol,
                        "not on loopback" if reason == "remote" else "its uid is not allowed")

    def sweep_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        idle = [c for c in self.open if now - c.last_active > self.limits.idle_timeout]
        for c in idle:
            c.close()
        return len(idle)

    def close_all(self) -> None:
        for c in list(self.open):
            c.abort()


class Listener:
    """A listening socket whose connections become ``factory(sock)`` on the running loop."""

    def __init__(
        self, sock: socket.socket, factory: Callable[[socket.socket], object],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self._sock = sock
        self._factory = factory
        self._on_failure = on_failure
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._accept)

    @classmethod
    def bind(cls, host: str, port: int, factory: Callable[[socket.socket], object],
             on_failure: Callable[[BaseException], None], backlog: int = 1024) -> Listener:
        last: OSError | None = None
        for family, type_, proto, _, addr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(addr)
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return cls(sock, factory, on_failure)
        raise last or OSError(f"cannot listen on {host}:{port}")

    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def _accept(self) -> None:
        # A listener that cannot accept is a front that serves nobody: it stops listening and
        # the process ends (the supervisor), rather than a front that looks up and answers none.
        try:
            self._accept_some()
        except Exception as exc:
            self.close()
            self._on_failure(exc)

    def _accept_some(self) -> None:
        for _ in range(64):  # bounded: other ready sockets get their turn
            try:
                sock, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                    log.warning("cannot accept connections (%s); pausing %.0f s",
                                errno.errorcode.get(exc.errno or 0, exc.errno), _ACCEPT_PAUSE)
                    self._loop.remove_reader(self._fd)
                    self._loop.call_later(_ACCEPT_PAUSE, self._resume)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            try:
                self._factory(sock)
            except Exception:  # one connection's set-up must not stop the listener
                log.exception("cannot set up a connection")
                sock.close()

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._fd)
            self._sock.close()


class CacheConnection:
    protocol_name = "?"
    too_many = b""  # the line a connection over the limit gets before it is closed
    denied = b""  # the line a connection its access control refuses gets before it is closed

    def __init__(self, sock: socket.socket, store: Store, conns: Connections) -> None:
        self.store = store
        self.conns = conns
        self.limits = conns.limits
        self.last_active = time.monotonic()
        self.closing = False
        self._buf = bytearray()
        self.out: list[bytes] = []  # answers of the data being handled, written at once
        # Value bytes in ``out`` (the parsers add them): with the count of answers, what the
        # output budget is checked against after every command (``spent``).
        self.out_size = 0
        # Parsing stopped after a command because its answers exceed the budget; it goes on
        # (``resume``) once they are written. Reading stops meanwhile.
        self.paused = False
        self._stats = conns.metrics
        self.observe = functools.partial(self._stats.requests.observe, self.protocol_name)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._unwritten = bytearray()
        self._reading = False
        self._open = True
        sock.setblocking(False)
        if len(conns.open) >= self.limits.max_connections:
            conns.refused += 1
            self.count("connect", "refused")
            self._refuse(self.too_many)
            return
        try:
            refusal = conns.access.refusal(sock)
        except OSError:  # the peer is already gone
            refusal = "remote"
        if refusal is not None:
            conns.metrics.refused.labels(refusal).inc()
            self.count("connect", "denied")
            conns.log_refusal(self.protocol_name, refusal)
            self._refuse(self.denied)
            return
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A fixed send buffer instead of one autotuned up to 4 MiB: a client that asks and
        # does not read then costs the front (and the kernel) at most this plus its budget of
        # answers, not 4 MiB of answers made for nothing (x 1,024 connections).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        conns.open.add(self)
        self._stats.connections.inc()
        self._start_reading()

    def _refuse(self, line: bytes) -> None:
        with contextlib.suppress(OSError):  # best effort: it is closed either way
            self._sock.send(line)
        self._open = False
        self.closing = True
        self._sock.close()

    # --- the selector's callbacks --------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if not data:  # the client closed its end
            self.abort()
            return
        self.last_active = time.monotonic()
        try:
            self.received(data)
        except Exception:  # a bug must cost one connection, never the front
            log.exception("%s connection failed", self.protocol_name)
            self.closing = True
        self.flush()
        self.store.after_answers()

    def _on_writable(self) -> None:
        pending = self._unwritten
        try:
            n = self._sock.send(pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        del pending[:n]
        if pending:
            return
        self._loop.remove_writer(self._fd)
        if self.closing:
            self.abort()
        elif self.paused:
            self._resume()
        elif not self._reading:
            self._start_reading()

    def _resume(self) -> None:
        self.paused = False
        try:
            self.resume()
        except Exception:
            log.exception("%s connection failed", self.protocol_name)
            self.closing = True
        self.flush()
        self.store.after_answers()
        if self._open and not (self.paused or self.closing or self._reading or self._unwritten):
            self._start_reading()

    # --- for subclasses ----------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        raise NotImplementedError

    def resume(self) -> None:
        """Go on where ``spill`` paused: the rest of a command, then the data kept unparsed."""
        raise NotImplementedError

    def spent(self) -> bool:
        """After each command: True (and paused) if the answers so far exceed the output
        budget and cannot all be written now. Checked per command, so that a read of small
        requests whose answers are large (pipelined multi-gets) costs at most the budget plus
        one command's answer, not a whole read's worth of answers."""
        if self.out_size <= self.limits.max_unwritten and len(self.out) < _MAX_ANSWERS:
            return False
        return self.spill()

    def spill(self) -> bool:
        """Write the answers gathered so far; if what the client has not taken exceeds the
        budget, pause (stop parsing and reading) until it has: True."""
        self._write_out()
        self.out_size = 0
        if self._open and len(self._unwritten) > self.limits.max_unwritten:
            self.paused = True
            self._stop_reading()
            return True
        return False

    def count(self, command: str, result: str) -> None:
        self._stats.requests.count(self.protocol_name, command, result)

    def fail(self, line: bytes, command: str = "malformed") -> None:
        """Answer ``line`` (after the answers before it) and close: the client sent something
        that cannot be understood, so nothing after it on this connection can be either."""
        self.count(command, "error")
        self.out.append(line)
        self.closing = True

    def flush(self) -> None:
        """Write the answers gathered so far; close once they are written if the connection is
        done."""
        if not self._open:
            self.out.clear()
            return
        if self.out:
            self._write_out()
            unwritten = self._unwritten
            if unwritten and len(unwritten) > self.limits.max_unwritten and self._reading:
                self._stop_reading()
        if self.closing:
            self._buf = bytearray()
            if self._unwritten:
                self._stop_reading()  # what is queued still goes out, then the socket closes
            else:
                self.abort()

    def _write_out(self) -> None:
        out = self.out
        if not out or not self._open:
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_size = 0
        if self._unwritten:
            self._unwritten += data
            return
        try:
            n = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.abort()
            return
        if n < len(data):
            self._unwritten += memoryview(data)[n:]
            self._loop.add_writer(self._fd, self._on_writable)

    def close(self) -> None:
        """Close after the answers already queued are written (a stuck client: see abort)."""
        if self.closing and self._unwritten:
            self.abort()  # asked twice (the idle sweep): it is not reading, stop waiting
            return
        self.closing = True
        self.flush()

    def abort(self) -> None:
        """Close now, dropping anything unwritten."""
        if not self._open:
            return
        self._open = False
        self.closing = True
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._unwritten:
            self._loop.remove_writer(self._fd)
            self._unwritten = bytearray()
        self._buf = bytearray()
        self._sock.close()
        self.conns.open.discard(self)
        self._stats.connections.dec()

    def _start_reading(self) -> None:
        self._reading = True
        self._loop.add_reader(self._fd, self._on_readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
