"""The Redis protocol (RESP2), as much of it as a TLS session cache needs.

What Apache httpd's mod_socache_redis sends (seen here): ``SETEX key secs value``, ``GET key`` and
``DEL key`` on database 0, with no AUTH.  Served here (command names in any case, as Redis does):

* ``SETEX key seconds value``, ``SET key value [EX seconds | PX milliseconds]``: ``+OK`` (for a
  ``mod_ssl-sess:`` session at once, validated after: see ``store``), or ``-ERR`` when an opaque
  value is not stored, for a bad expiry or option, a key over 250 bytes or a value over the limit
  (an over-long value is read and discarded: the connection stays usable).
* ``GET key``: the value or the null bulk string; ``DEL key [key ...]``: the number removed.
* ``PING [message]``, ``SELECT 0`` (any other database: ``-ERR DB index is out of range``),
  ``QUIT`` (``+OK``, then close).
* anything else: ``-ERR unknown command``.

Requests are RESP arrays of bulk strings, or inline commands (words separated by spaces, as
``redis-cli`` and telnet send; no quoting).  A request that breaks the protocol (a bad length, a
missing CRLF, a header line too long, more arguments or bytes than the limits) gets one
``-ERR Protocol error`` line and the connection is closed, as Redis does.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from sessionbus.servers.cache.connection import CacheConnection, Connections
from sessionbus.servers.cache.store import MAX_KEY, SetResult, Store

__all__ = ["RedisConnection"]

OK = b"+OK\r\n"
NULL = b"$-1\r\n"
_NOT_INT = b"-ERR value is not an integer or out of range\r\n"
_SYNTAX = b"-ERR syntax error\r\n"
_KEY_TOO_LONG = b"-ERR key longer than %d bytes\r\n" % MAX_KEY
_STORE_REPLY = {
    SetResult.STORED: OK,
    SetResult.NOT_STORED: b"-ERR not stored: the key was deleted or revoked, or is held with "
    b"another value\r\n",
    SetResult.INVALID: b"-ERR not a TLS session DER with the key's session id\r\n",
    SetResult.TOO_LARGE: b"-ERR value too large\r\n",
    SetResult.REFUSED: b"-ERR this cache does not serve that service context\r\n",
}


def _uint(b: bytes) -> int | None:
    return int(b) if b.isdigit() and len(b) <= 18 else None


def _int(b: bytes) -> int | None:
    return -int(b[1:]) if b[:1] == b"-" and b[1:].isdigit() and len(b) <= 19 else _uint(b)


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _wrong_args(name: bytes) -> bytes:
    return b"-ERR wrong number of arguments for '%b' command\r\n" % name


class RedisConnection(CacheConnection):
    protocol_name = "redis"
    too_many = b"-ERR max number of clients reached\r\n"
    denied = b"-NOPERM this client may not use this cache\r\n"

    def __init__(self, sock: socket.socket, store: Store, conns: Connections) -> None:
        self._argc = 0  # arguments of the current request still to read (0: between requests)
        self._args: list[bytes] = []
        self._bulk = -1  # length of the bulk string being read; -1: its "$len" line comes next
        self._skip = 0  # bytes of an over-long argument (and its CRLF) still to discard
        self._oversize = False
        self._size = 0  # bytes the current request holds
        limits = conns.limits
        self._max_args = limits.max_keys + 1
        self._max_request = limits.max_value + limits.max_keys * (MAX_KEY + 8)
        self._commands: dict[bytes, Callable[[list[bytes]], None]] = {
            b"get": self._get, b"set": self._set, b"setex": self._setex, b"del": self._del,
            b"ping": self._ping, b"select": self._select, b"quit": self._quit,
        }
        super().__init__(sock, store, conns)  # last: it may start serving

    def received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        end = len(buf)
        pos = 0
        while not (self.closing or self.paused):
            if self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
                if self._skip:
                    break
                self._argc -= 1
                if self._argc == 0:
                    self._run()
                continue
            if self._argc == 0:
                if pos >= end:
                    break
                line, nxt = self._line(buf, pos, end)
                if line is None:
                    break
                pos = nxt
                if line[:1] == b"*":
                    count = _int(line[1:])
                    if count is None or count > self._max_args:
                        self.fail(b"-ERR Protocol error: invalid multibulk length\r\n")
                        break
                    if count > 0:
                        self._argc, self._args, self._size = count, [], 0
                    continue
                args = line.split()  # an inline command
                if args:
                    if len(args) > self._max_args:
                        self.fail(b"-ERR Protocol error: too many arguments\r\n")
                        break
                    self._args = args
                    self._run()
                continue
            if self._bulk < 0:
                if pos >= end:
                    break
                if buf[pos] != 0x24:  # "$"
                    self.fail(b"-ERR Protocol error: expected '$', got '%b'\r\n"
                              % _printable(bytes(buf[pos : pos + 1])))
                    break
                line, nxt = self._line(buf, pos, end)
                if line is None:
                    break
                size = _uint(line[1:])
                if size is None:
                    self.fail(b"-ERR Protocol error: invalid bulk length\r\n")
                    break
                pos = nxt
                if size > self.limits.max_value:
                    self._oversize = True
                    self._skip = size + 2
                    continue
                self._size += size
                if self._size > self._max_request:
                    self.fail(b"-ERR Protocol error: request too large\r\n")
                    break
                self._bulk = size
                continue
            stop = pos + self._bulk + 2
            if stop > end:
                break
            if buf[stop - 2 : stop] != b"\r\n":
                self.fail(b"-ERR Protocol error: bulk string not followed by CRLF\r\n")
                break
            self._args.append(bytes(buf[pos : stop - 2]))
            pos = stop
            self._bulk = -1
            self._argc -= 1
            if self._argc == 0:
                self._run()
        if self.closing:
            return
        del buf[:pos]

    def resume(self) -> None:
        self.received(b"")

    def _line(self, buf: bytearray, pos: int, end: int) -> tuple[bytes | None, int]:
        """The line at ``pos`` (without CR LF) and where the next begins; None if incomplete."""
        max_line = self.limits.max_line
        nl = buf.find(b"\n", pos, pos + max_line + 2)
        if nl < 0:
            if end - pos > max_line:
                self.fail(b"-ERR Protocol error: too big request line\r\n")
            return None, pos
        stop = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
        return bytes(buf[pos:stop]), nl + 1

    # --- commands ------------------------------------------------------------------------------

    def _run(self) -> None:
        self._run_command()
        self.spent()

    def _run_command(self) -> None:
        args = self._args
        oversize = self._oversize
        self._args, self._oversize, self._size = [], False, 0
        name = args[0].lower() if args else b""
        handler = self._commands.get(name)
        if oversize:
            self.count(name.decode() if handler else "unknown", SetResult.TOO_LARGE.value)
            self.out.append(b"-ERR value too large (at most %d bytes)\r\n" % self.limits.max_value)
            return
        if handler is None:
            self.count("unknown", "error")
            self.out.append(b"-ERR unknown command '%b'\r\n" % _printable(name[:64]))
            return
        t0 = time.perf_counter()
        handler(args)
        self.observe(time.perf_counter() - t0)

    def _get(self, args: list[bytes]) -> None:
        if len(args) != 2:
            self._error("get", _wrong_args(b"get"))
            return
        key = args[1]
        found = self.store.get(key) if len(key) <= MAX_KEY else None
        if found is None:
            self.count("get", "miss")
            self.out.append(NULL)
        else:
            self.count("get", "hit")
            self.out.append(_bulk(found[1]))
            self.out_size += len(found[1])

    def _set(self, args: list[bytes]) -> None:
        if len(args) < 3:
            self._error("set", _wrong_args(b"set"))
            return
        now = time.time()
        expires: float | None = None
        i = 3
        while i < len(args):
            opt = args[i].upper()
            if opt not in (b"EX", b"PX") or expires is not None or i + 1 >= len(args):
                self._error("set", _SYNTAX)
                return
            n = _int(args[i + 1])
            if n is None:
                self._error("set", _NOT_INT)
                return
            if n <= 0:
                self._error("set", b"-ERR invalid expire time in 'set' command\r\n")
                return
            expires = now + (n if opt == b"EX" else n / 1000.0)
            i += 2
        self._store(args[1], args[2], expires)

    def _setex(self, args: list[bytes]) -> None:
        if len(args) != 4:
            self._error("setex", _wrong_args(b"setex"))
            return
        n = _int(args[2])
        if n is None:
            self._error("setex", _NOT_INT)
            return
        if n <= 0:
            self._error("setex", b"-ERR invalid expire time in 'setex' command\r\n")
            return
        self._store(args[1], args[3], time.time() + n, "setex")

    def _store(self, key: bytes, value: bytes, expires: float | None,
               command: str = "set") -> None:
        if len(key) > MAX_KEY or not key:
            self._error(command, _KEY_TOO_LONG)
            return
        store = self.store
        if store.defer and store.defers(key):
            store.set_later(key, 0, value, expires, self.protocol_name, command)
            self.out.append(OK)  # counted by its outcome when handled
            return
        result = store.set(key, 0, value, expires)
        self.count(command, result.value)
        self.out.append(_STORE_REPLY[result])

    def _del(self, args: list[bytes]) -> None:
        if len(args) < 2:
            self._error("del", _wrong_args(b"del"))
            return
        deleted = 0
        for key in args[1:]:
            if len(key) <= MAX_KEY and self.store.delete(key):
                deleted += 1
        self.count("del", "deleted" if deleted else "not_found")
        self.out.append(b":%d\r\n" % deleted)

    def _ping(self, args: list[bytes]) -> None:
        if len(args) > 2:
            self._error("ping", _wrong_args(b"ping"))
            return
        self.count("ping", "ok")
        self.out.append(b"+PONG\r\n" if len(args) == 1 else _bulk(args[1]))
        self.out_size += len(args[-1])

    def _select(self, args: list[bytes]) -> None:
        if len(args) != 2:
            self._error("select", _wrong_args(b"select"))
            return
        db = _int(args[1])
        if db is None:
            self._error("select", _NOT_INT)
        elif db != 0:
            self._error("select", b"-ERR DB index is out of range\r\n")
        else:
            self.count("select", "ok")
            self.out.append(OK)

    def _quit(self, args: list[bytes]) -> None:
        self.count("quit", "ok")
        self.out.append(OK)
        self.closing = True

    def _error(self, command: str, line: bytes) -> None:
        self.count(command, "error")
        self.out.append(line)


def _printable(b: bytes) -> bytes:
    return bytes(c if 0x20 < c < 0x7F and c not in b"'\\" else 0x3F for c in b)
