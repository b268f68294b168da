"""The farm's ticket-key ring as h2o's ``ticket-store: memcached`` reads it, served read-only.

h2o 2.2.5 (src/ssl.c, ``ticket_memcached_update_tickets``) fetches ``h2o:ssl-session-key`` every
60 s: a YAML sequence of ``{name, cipher, hash, key, not_before, not_after}`` (name 16 bytes hex;
key the cipher key then the HMAC key of the hash's block size, hex). It encrypts with the newest
entry whose ``not_before`` has passed, decrypts with any, and, if the newest entry began more than
a quarter of its ``lifetime`` ago or none encrypts, makes a key of its own and writes the ring
back. The farm's keys fit as they are: AES-256-CBC with HMAC-SHA256 is what every member uses,
and a 32-byte HMAC key is the same key as that key zero-padded to SHA-256's 64-byte block. So that
h2o never wants to write, the current key is served with ``not_before`` = now (the moment h2o
reads it): keys announced ahead keep their real start, so h2o switches when the farm does (within
its 60 s refresh; keep ``--announce-ahead`` above that).
"""

from __future__ import annotations

import math

from sessionbus.schemas.ticket_keys import KeyRing, KeyState

__all__ = ["H2O_TICKET_KEY", "H2oTicketRing", "render"]

H2O_TICKET_KEY = b"h2o:ssl-session-key"  # h2o's default ticket-memcached-key
_SHA256_BLOCK = 64


def render(ring: KeyRing, now: float) -> bytes | None:
    """The ring in h2o's YAML, or None when no key encrypts yet (h2o then keeps what it has)."""
    current = ring.current(now)
    if current is None:
        return None
    out = []
    for k in ring.live(now):
        if k.state(now) is KeyState.AHEAD and k is not current:
            not_before = math.ceil(k.encrypt_from)
        elif k is current:
            not_before = math.floor(now)
        else:
            not_before = min(math.floor(k.encrypt_from), math.floor(now) - 1)
        not_after = max(not_before, math.ceil(k.erase_at) - 1)
        key = k.aes_secret + k.hmac_secret.ljust(_SHA256_BLOCK, b"\0")
        out.append(
            f"- name: {k.name.hex()}\n  cipher: AES-256-CBC\n  hash: SHA256\n"
            f"  key: {key.hex()}\n  not_before: {not_before}\n  not_after: {not_after}\n"
        )
    return "".join(out).encode()


class H2oTicketRing:
    """Holds the newest ring (``KeyFollower(on_ring=...update)``) for the cache front."""

    def __init__(self) -> None:
        self.ring: KeyRing | None = None

    def update(self, ring: KeyRing) -> None:
        self.ring = ring

    def value(self, now: float) -> bytes | None:
        return None if self.ring is None else render(self.ring, now)
