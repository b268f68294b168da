"""Session-ticket encryption keys (STEKs) and the ring the key publisher distributes.

A key's timeline, in absolute Unix seconds:

    published_at  <=  encrypt_from  <  encrypt_until  <=  erase_at

From ``published_at`` every node holds it (decrypt-only: announced ahead), from ``encrypt_from``
nodes mint tickets with it, after ``encrypt_until`` it only decrypts (tickets are renewed under the
current key), and at ``erase_at`` it is forgotten.  The ring never holds a key past ``erase_at``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum

NAME_SIZE = 16
HMAC_SIZE = 32
AES_SIZE = 32


class KeyState(StrEnum):
    AHEAD = "ahead"  # distributed, decrypt-only, not yet encrypting
    CURRENT = "current"  # the one that encrypts
    OLD = "old"  # decrypt-only, tickets it opens are renewed
    ERASED = "erased"


@dataclass(frozen=True, slots=True)
class TicketKey:
    name: bytes
    hmac_secret: bytes = field(repr=False)
    aes_secret: bytes = field(repr=False)
    published_at: float
    encrypt_from: float
    encrypt_until: float
    erase_at: float

    def __post_init__(self) -> None:
        if len(self.name) != NAME_SIZE:
            raise ValueError(f"ticket key name must be {NAME_SIZE} bytes")
        if len(self.hmac_secret) != HMAC_SIZE or len(self.aes_secret) != AES_SIZE:
            raise ValueError("ticket key secrets must be 32 bytes each")
        if not (self.published_at <= self.encrypt_from < self.encrypt_until <= self.erase_at):
            raise ValueError("ticket key timeline out of order")

    def __repr__(self) -> str:  # never the secrets
        return f"TicketKey(name={self.name.hex()}, encrypt_from={self.encrypt_from:.0f})"

    def state(self, now: float) -> KeyState:
        if now >= self.erase_at:
            return KeyState.ERASED
        if now >= self.encrypt_until:
            return KeyState.OLD
        if now >= self.encrypt_from:
            return KeyState.CURRENT
        return KeyState.AHEAD

    @classmethod
    def generate(
        cls, published_at: float, encrypt_from: float, encrypt_until: float, erase_at: float
    ) -> TicketKey:
        return cls(
            name=os.urandom(NAME_SIZE),
            hmac_secret=os.urandom(HMAC_SIZE),
            aes_secret=os.urandom(AES_SIZE),
            published_at=published_at,
            encrypt_from=encrypt_from,
            encrypt_until=encrypt_until,
            erase_at=erase_at,
        )


@dataclass(frozen=True, slots=True)
class KeyRing:
    """What the key publisher sends: every key that is not erased, with its timeline."""

    seq: int
    issued_at: float
    keys: tuple[TicketKey, ...]

    def live(self, now: float) -> list[TicketKey]:
        return [k for k in self.keys if k.state(now) is not KeyState.ERASED]

    def current(self, now: float) -> TicketKey | None:
        """The key that encrypts at ``now``: the newest one whose encrypt window has begun.

        Newest wins so that overlapping windows (a publisher that restarted) never leave two
        encrypting keys; a key past ``encrypt_until`` still encrypts if nothing newer has begun,
        which keeps a farm whose publisher went silent minting tickets under its last key.
        """
        started = [k for k in self.keys if k.encrypt_from <= now < k.erase_at]
        return max(started, key=lambda k: k.encrypt_from, default=None)

    def by_name(self, name: bytes, now: float) -> TicketKey | None:
        for k in self.keys:
            if k.name == name and now < k.erase_at:
                return k
        return None

    def newest_published_at(self) -> float | None:
        return max((k.published_at for k in self.keys), default=None)
