"""Who may use a cache front: loopback peers, the uids allowed (read from /proc/net/tcp), the
service contexts it serves.

The memcached and Redis protocols have no authentication, and a cache front holds every session's
master secret. So by default it listens on loopback only and refuses a peer that is not on
loopback; optionally it serves only clients whose socket belongs to one of a few uids (httpd's
``www-data``). The owner of the peer's socket is read from ``/proc/net/tcp`` and
``/proc/net/tcp6``, as identd does: a loopback connection's other end is a socket of this host,
and its line there names the uid that opened it. A peer whose socket is not found (another
network namespace, closed meanwhile) is refused. The per-context allow-list is enforced by the
store (``Store(services=...)``).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "OPAQUE_SERVICE", "AccessPolicy", "is_loopback", "listens_on_loopback", "peer_uid",
    "service_context",
]

# How ``--service`` names the opaque (non-TLS-session) keys; no TLS server's context starts
# with "@" (httpd's is 32 hex digits, a sessionbus node's its service name).
OPAQUE_SERVICE = "@opaque"
_PROC_FILES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    allow_remote: bool = False  # serve peers that are not on loopback
    uids: frozenset[int] | None = None  # None: any local user
    services: frozenset[bytes] | None = None  # None: every context (Store enforces it)

    def refusal(self, sock: socket.socket) -> str | None:
        """Why this accepted connection must be refused (a metric label), or None."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None if self.uids is None else "uid"  # (no unix listeners today)
        peer = sock.getpeername()[0]
        local = is_loopback(peer)
        if not local and not self.allow_remote:
            return "remote"
        if self.uids is None:
            return None
        if not local:
            return "uid"  # only a loopback peer's uid can be known
        uid = peer_uid(sock)
        return None if uid is not None and uid in self.uids else "uid"


def is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listens_on_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback one ("" and 0.0.0.0 are not)."""
    if not host:
        return False
    if is_loopback(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(is_loopback(str(info[4][0])) for info in infos)


def service_context(name: str) -> bytes:
    """A ``--service`` value as the session id context it names."""
    if name == OPAQUE_SERVICE:
        from sessionbus.servers.cache.store import OPAQUE_SID_CTX

        return OPAQUE_SID_CTX
    ctx = name.encode()
    if not 0 < len(ctx) <= 32:  # SSL_MAX_SID_CTX_LENGTH
        raise ValueError(f"{name!r} is not a session id context (1 to 32 bytes)")
    return ctx


def _hex(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    """An address as /proc/net/tcp{,6} spells it: each 32-bit word in host byte order, then
    the port, big-endian."""
    words = struct.unpack(f"={len(addr.packed) // 4}I", addr.packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def _candidates(host: str, port: int) -> set[str]:
    """Every spelling of one address there: an IPv4 peer of a dual-stack listener is
    ::ffff:a.b.c.d on this side and may be a plain IPv4 socket on its own."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    out = {_hex(addr, port)}
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        out.add(_hex(addr.ipv4_mapped, port))
    elif isinstance(addr, ipaddress.IPv4Address):
        out.add(_hex(ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed), port))
    return out


def peer_uid(sock: socket.socket, files: tuple[Path, ...] = _PROC_FILES) -> int | None:
    """The uid owning the other end of a loopback TCP connection, or None if not found."""
    peer = sock.getpeername()
    me = sock.getsockname()
    peers, mine = _candidates(peer[0], peer[1]), _candidates(me[0], me[1])
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            fields = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if len(fields) > 7 and fields[1] in peers and fields[2] in mine:
                try:
                    return int(fields[7])
                except ValueError:
                    return None
    return None
