"""The memcached text protocol, as much of it as a TLS session cache needs.

What Apache httpd's mod_socache_memcache sends (seen here, see DESIGN.md): ``set <key> 0 <exptime>
<bytes> \\r\\n`` (a trailing space before the CRLF), ``get <key>``, ``delete <key> 0`` (the legacy
time argument, always ``0``), ``version`` and ``quit``.  Served here:

* ``set <key> <flags> <exptime> <bytes> [noreply]`` then the value and CRLF. A ``mod_ssl-sess:``
  session's set is answered ``STORED`` at once and validated after (see ``store``: a bad value is
  counted and dead-lettered; ``--sync-sets`` answers ``CLIENT_ERROR``/``NOT_STORED`` instead). An
  opaque key's: ``STORED``, ``NOT_STORED`` (deleted, or held with another value), or a
  ``CLIENT_ERROR`` for a service context not served. A value over the limit:
  ``SERVER_ERROR object too large for cache`` with the value read and discarded, as memcached
  does (the connection stays usable).
* ``get <key> [<key> ...]``: ``VALUE <key> <flags> <bytes>`` + value for each hit, then ``END``
  (a multi-get pauses whenever its answers exceed the output budget, until the client reads).
* ``delete <key> [0] [noreply]``: ``DELETED`` or ``NOT_FOUND``.
* ``version``: ``VERSION ...``; ``quit``: close.
* other storage commands (``add``, ``replace``, ``append``, ``prepend``, ``cas``): their value is
  read and discarded, then ``ERROR``; any other well-formed command word: ``ERROR``.

What cannot be understood (a command line that is too long, not a command word, a known command
with bad arguments, a value not followed by CRLF) gets one ``CLIENT_ERROR`` line and the connection
is closed: nothing after it on that connection can be trusted to be in step.  Lines end in LF with
an optional CR before it, as memcached accepts.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from sessionbus.servers.cache.connection import CacheConnection, Connections
from sessionbus.servers.cache.store import MAX_KEY, SetResult, Store

__all__ = ["MemcacheConnection"]

VERSION_LINE = b"VERSION 1.6.0-sessionbus\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
_RELATIVE_MAX = 30 * 86400  # memcached: a larger exptime is an absolute unix time
_MAX_FLAGS = 0xFFFFFFFF
_OTHER_STORAGE = frozenset((b"add", b"replace", b"append", b"prepend", b"cas"))
_PROTOCOL = "memcache"
# Metric label tuples of the usual outcomes, made once (see RequestStats.record).
_GET_HIT = (_PROTOCOL, "get", "hit")
_GET_MISS = (_PROTOCOL, "get", "miss")
_DELETED = (_PROTOCOL, "delete", "deleted")
_NOT_FOUND = (_PROTOCOL, "delete", "not_found")
_SET_RESULT = {r: (_PROTOCOL, "set", r.value) for r in SetResult}
_perf_counter = time.perf_counter
_STORE_REPLY = {
    SetResult.STORED: b"STORED\r\n",
    SetResult.NOT_STORED: b"NOT_STORED\r\n",
    SetResult.INVALID: b"CLIENT_ERROR not a TLS session DER with the key's session id\r\n",
    SetResult.TOO_LARGE: b"SERVER_ERROR object too large for cache\r\n",
    SetResult.REFUSED: b"CLIENT_ERROR this cache does not serve that service context\r\n",
}


@dataclass(slots=True)
class _PendingSet:
    key: bytes
    flags: int
    exptime: int
    size: int
    noreply: bool


def _uint(b: bytes) -> int | None:
    return int(b) if b.isdigit() and len(b) <= 20 else None


def _int(b: bytes) -> int | None:
    return -int(b[1:]) if b[:1] == b"-" and b[1:].isdigit() else _uint(b)


def expiry(exptime: int, now: float) -> float | None:
    """memcached's exptime as unix seconds: 0 none (None), negative already expired, up to 30
    days relative, beyond that absolute."""
    if exptime == 0:
        return None
    if exptime < 0:
        return now - 1.0
    if exptime <= _RELATIVE_MAX:
        return now + exptime
    return float(exptime)


class MemcacheConnection(CacheConnection):
    protocol_name = _PROTOCOL
    too_many = b"SERVER_ERROR too many open connections\r\n"
    denied = b"SERVER_ERROR access denied\r\n"

    def __init__(self, sock: socket.socket, store: Store, conns: Connections) -> None:
        self._pending: _PendingSet | None = None
        self._swallow = 0  # bytes of a refused value (and its CRLF) still to discard
        self._get_rest: tuple[list[bytes], int] | None = None  # a multi-get paused mid-way
        self._record = conns.metrics.requests.record
        super().__init__(sock, store, conns)  # last: it may start serving

    def received(self, data: bytes) -> None:
        if self._swallow:
            n = min(self._swallow, len(data))
            self._swallow -= n
            if self._swallow:
                return
            data = data[n:]
        # Requests are parsed from ``data`` itself; only an incomplete one is kept in _buf
        # (httpd's requests arrive whole, so copying each into a buffer was wasted work).
        buf = self._buf
        if buf:
            buf += data
            pending = self._pending
            if pending is not None and len(buf) < pending.size + 2:
                return  # a value still arriving: O(1) per chunk, whatever its size
            data = bytes(buf)
            buf.clear()
        end = len(data)
        pos = 0
        max_line = self.limits.max_line
        while not (self.closing or self.paused):
            pending = self._pending
            if pending is not None:
                stop = pos + pending.size + 2
                if stop > end:
                    break
                if data[stop - 2 : stop] != b"\r\n":
                    self.fail(b"CLIENT_ERROR bad data chunk\r\n", "set")
                    break
                self._pending = None
                self._set(pending, data[pos : stop - 2])
                pos = stop
                self.spent()
                continue
            nl = data.find(b"\n", pos, pos + max_line + 2)
            if nl < 0:
                if end - pos > max_line:
                    self.fail(b"CLIENT_ERROR line too long\r\n")
                break
            line = data[pos : nl - 1 if nl > pos and data[nl - 1] == 13 else nl]
            pos = nl + 1
            self._command(line)
            self.spent()
            if self._swallow:
                n = min(self._swallow, end - pos)
                self._swallow -= n
                pos += n
                if self._swallow:
                    break
        if self.closing:
            return
        if pos < end:
            buf += memoryview(data)[pos:]

    def resume(self) -> None:
        rest = self._get_rest
        if rest is not None:
            self._get_rest = None
            self._get_keys(*rest)
            if self.paused:
                return
        self.received(b"")

    # --- commands ------------------------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        parts = line.split()
        if not parts:
            self.count("unknown", "error")
            self.out.append(b"ERROR\r\n")
            return
        cmd = parts[0]
        if cmd == b"get":
            self._get(parts)
        elif cmd == b"set":
            self._parse_set(parts)
        elif cmd == b"delete":
            self._delete(parts)
        elif cmd == b"version":
            self.count("version", "ok")
            self.out.append(VERSION_LINE)
        elif cmd == b"quit":
            self.count("quit", "ok")
            self.closing = True
        elif cmd in _OTHER_STORAGE:
            size = _uint(parts[4]) if len(parts) >= 5 else None
            if size is None:
                self.fail(BAD_FORMAT)
                return
            self.count("unknown", "error")
            self.out.append(b"ERROR\r\n")
            self._swallow = size + 2
        elif cmd.isalpha() and len(cmd) <= 32:
            self.count("unknown", "error")
            self.out.append(b"ERROR\r\n")
        else:
            self.fail(BAD_FORMAT)

    def _get(self, parts: list[bytes]) -> None:
        t0 = _perf_counter()
        n = len(parts) - 1
        if n == 1:  # what httpd sends: one key, answered in one piece
            key = parts[1]
            if len(key) > MAX_KEY:
                self.fail(BAD_FORMAT, "get")
                return
            found = self.store.get(key)
            if found is None:
                self.out.append(b"END\r\n")
                self._record(_GET_MISS, _perf_counter() - t0)
            else:
                flags, value = found
                self.out.append(
                    b"VALUE %b %d %d\r\n%b\r\nEND\r\n" % (key, flags, len(value), value)
                )
                self.out_size += len(value)
                self._record(_GET_HIT, _perf_counter() - t0)
            return
        if not 0 < n <= self.limits.max_keys:
            self.fail(BAD_FORMAT, "get")
            return
        keys = parts[1:]
        for key in keys:
            if len(key) > MAX_KEY:
                self.fail(BAD_FORMAT, "get")
                return
        self._get_keys(keys, 0)
        self.observe(_perf_counter() - t0)

    def _get_keys(self, keys: list[bytes], i: int) -> None:
        """Answer keys[i:] of a multi-get, pausing (see ``spill``) whenever the answers exceed
        the output budget: one get of 256 large values is megabytes."""
        out = self.out
        get = self.store.get
        budget = self.limits.max_unwritten
        while i < len(keys):
            key = keys[i]
            i += 1
            found = get(key)
            if found is None:
                self.count("get", "miss")
                continue
            flags, value = found
            out.append(b"VALUE %b %d %d\r\n%b\r\n" % (key, flags, len(value), value))
            self.count("get", "hit")
            self.out_size += len(value)
            if self.out_size > budget and self.spill():
                self._get_rest = (keys, i)
                return
        out.append(b"END\r\n")

    def _parse_set(self, parts: list[bytes]) -> None:
        n = len(parts)
        noreply = n == 6 and parts[5] == b"noreply"
        if n != 5 and not noreply:
            self.fail(BAD_FORMAT, "set")
            return
        key = parts[1]
        flags, exptime, size = _uint(parts[2]), _int(parts[3]), _uint(parts[4])
        if (
            flags is None or flags > _MAX_FLAGS or exptime is None or size is None
            or len(key) > MAX_KEY
        ):
            self.fail(BAD_FORMAT, "set")
            return
        if size > self.limits.max_value:
            self.count("set", SetResult.TOO_LARGE.value)
            if not noreply:
                self.out.append(_STORE_REPLY[SetResult.TOO_LARGE])
            self._swallow = size + 2
            return
        self._pending = _PendingSet(key, flags, exptime, size, noreply)

    def _set(self, p: _PendingSet, value: bytes) -> None:
        t0 = _perf_counter()
        store = self.store
        if store.defer and store.defers(p.key):
            store.set_later(p.key, p.flags, value, expiry(p.exptime, time.time()), _PROTOCOL)
            if not p.noreply:
                self.out.append(b"STORED\r\n")
            self.observe(_perf_counter() - t0)  # counted by its outcome when handled
            return
        result = store.set(p.key, p.flags, value, expiry(p.exptime, time.time()))
        if not p.noreply:
            self.out.append(_STORE_REPLY[result])
        self._record(_SET_RESULT[result], _perf_counter() - t0)

    def _delete(self, parts: list[bytes]) -> None:
        t0 = _perf_counter()
        rest = parts[2:]
        noreply = bool(rest) and rest[-1] == b"noreply"
        if noreply:
            rest = rest[:-1]
        if len(parts) < 2 or len(parts[1]) > MAX_KEY or rest not in ([], [b"0"]):
            self.fail(
                b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n",
                "delete",
            )
            return
        deleted = self.store.delete(parts[1])
        if not noreply:
            self.out.append(b"DELETED\r\n" if deleted else b"NOT_FOUND\r\n")
        self._record(_DELETED if deleted else _NOT_FOUND, _perf_counter() - t0)
