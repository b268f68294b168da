"""The farm's ticket-key ring as OpenSSL's ticket-key callback sees it (``openssl.TicketKeys``).

Encrypt with the current key; decrypt with any key not erased; a ticket under a key other than
the current one is accepted and renewed; an unknown or erased key means a full handshake.
"""

from __future__ import annotations

import time

from sessionbus.metrics import Metrics
from sessionbus.schemas.ticket_keys import KeyRing


class RingTicketKeys:
    def __init__(self, ring: KeyRing | None = None, metrics: Metrics | None = None) -> None:
        self.ring = ring
        decryptions = (metrics or Metrics()).node.ticket_decryptions
        self._results = {r: decryptions.labels(r) for r in ("current", "renewed", "unknown")}

    def update(self, ring: KeyRing) -> None:
        self.ring = ring

    def encrypt_key(self) -> tuple[bytes, bytes, bytes] | None:
        if self.ring is None:
            return None  # no ring yet: issue no ticket (clients fall back to session ids)
        key = self.ring.current(time.time())
        return None if key is None else (key.name, key.hmac_secret, key.aes_secret)

    def decrypt_key(self, name: bytes) -> tuple[bytes, bytes, bool] | None:
        if self.ring is None:
            return None
        now = time.time()
        key = self.ring.by_name(name, now)
        if key is None:
            return None
        current = self.ring.current(now)
        return key.hmac_secret, key.aes_secret, current is not None and current.name == key.name

    def on_decrypt(self, result: str) -> None:
        counter = self._results.get(result)
        if counter is not None:
            counter.inc()
