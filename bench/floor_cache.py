"""A yardstick, not a product: the least a Python memcached server can do for Apache httpd.

``bench_httpd_cache`` runs httpd against it beside memcached and ``sessionbus cache``: it
answers httpd's ``get``/``set``/``delete``/``version`` from a dict, on the same kind of asyncio
selector loop the cache front uses, and does nothing else. No limits, no validation, no replica,
no metrics, no replication, and it trusts its client. What httpd's handshakes/s come to with it
is the most any cache front written in Python can reach on this machine; the distance from it to
``sessionbus cache`` is what the front's own work costs.

    python -m bench.floor_cache PORT     # listens on 127.0.0.1:PORT until killed
"""

from __future__ import annotations

import asyncio
import socket
import sys


class _Conn:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 store: dict[bytes, bytes]) -> None:
        self.loop, self.sock, self.store, self.buf = loop, sock, store, b""
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            return
        buf, out, store = self.buf + data, [], self.store
        while (nl := buf.find(b"\n")) >= 0:
            parts = buf[:nl].split()
            rest = buf[nl + 1 :]
            cmd = parts[0] if parts else b""
            if cmd == b"set":
                size = int(parts[4])
                if len(rest) < size + 2:
                    break  # the value is still arriving
                store[parts[1]] = rest[:size]
                out.append(b"STORED\r\n")
                rest = rest[size + 2 :]
            elif cmd == b"get":
                value = store.get(parts[1])
                out.append(b"END\r\n" if value is None else
                           b"VALUE %b 0 %d\r\n%b\r\nEND\r\n" % (parts[1], len(value), value))
            elif cmd == b"delete":
                gone = store.pop(parts[1], None) is not None
                out.append(b"DELETED\r\n" if gone else b"NOT_FOUND\r\n")
            elif cmd == b"version":
                out.append(b"VERSION 1.6.0-floor\r\n")
            else:
                out.append(b"ERROR\r\n")
            buf = rest
        self.buf = buf
        if out:
            self.sock.sendall(b"".join(out))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    store: dict[bytes, bytes] = {}
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)

    def accept() -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        _Conn(loop, sock, store)

    loop.add_reader(listener.fileno(), accept)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
