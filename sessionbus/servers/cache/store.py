"""What ``set``, ``get`` and ``delete`` of a memcached or Redis client mean to the farm.

The cache front keeps no store of its own: the node's replica (a ``PeerCache``) is the store, and
the outbox carries what changed to every peer.  Everything here is synchronous and touches memory
only, so the protocol servers answer at once whether or not the broker is reachable.

Keys:

* ``mod_ssl-sess:<hex id>`` (what Apache httpd's ``SSLSessionCache memcache:``/``redis:`` use) maps
  to the TLS session id. The value must be the session's DER (``i2d_SSL_SESSION``) carrying that
  id; its session id context is read from the DER and travels in the NEW event, and its expiry is
  the earliest of the client's expiry time, the DER's own time + timeout, and the cache's session
  lifetime. Such sessions are interchangeable with those a ``sessionbus node`` makes (OpenSSL on
  the resuming server still compares the session id context).
* ``h2o:ssl-session-cache:<base64url id>`` (h2o's ``cache-store: memcached`` with its default
  ``cache-memcached-prefix``) is the same TLS session id, and its value the base64url DER (h2o
  encodes both, without padding): stored and replicated as the DER, answered re-encoded.
* ``h2o:ssl-session-key`` (h2o's ``ticket-store: memcached``) is the farm's ticket-key ring in
  h2o's format, read-only, when the front follows the key stream (``h2o_tickets``); never stored.
* Any other key is an *opaque* session stored under its own name (at most 250 bytes, like
  memcached): the value is kept with the client's 32-bit flags in front
  (``flags:u32 big-endian | data``), replicated with the ``opaque`` flag and the reserved session id
  context ``OPAQUE_SID_CTX``, so the two kinds never answer for each other.

Opaque keys have session semantics, so that every replica agrees: a key is written once (a ``set``
of a key held with another value is refused: peers keep the first value they saw), a ``delete``
reaches every replica and leaves a tombstone, and a deleted key cannot be set again until the
deleted value would have expired. What TLS-session caches (httpd, h2o, ...) do fits this; a
general-purpose cache that overwrites keys does not.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from enum import StrEnum

from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.producer.outbox import Outbox
from sessionbus.schemas.events import MAX_SESSION_ID, RemoveReason
from sessionbus.schemas.session_der import DerError, parse_session
from sessionbus.servers.cache.h2o_tickets import H2O_TICKET_KEY, H2oTicketRing

__all__ = ["H2O_PREFIX", "MOD_SSL_PREFIX", "OPAQUE_SID_CTX", "SetResult", "Store", "session_key"]

MOD_SSL_PREFIX = b"mod_ssl-sess:"
H2O_PREFIX = b"h2o:ssl-session-cache:"  # h2o 2.2's lib/core/util.c + lib/common/memcached.c
# Session id context of opaque entries: no TLS server uses it (httpd's is 32 hex digits,
# a sessionbus node's is its service name), and it fits SSL_MAX_SID_CTX_LENGTH.
OPAQUE_SID_CTX = b"\x00sessionbus-opaque"
MAX_KEY = min(250, MAX_SESSION_ID)  # memcached's own key limit
_FLAGS_SIZE = 4
_PREFIX_LEN = len(MOD_SSL_PREFIX)
_H2O_PREFIX_LEN = len(H2O_PREFIX)
_MAX_TLS_ID = 32  # SSL_MAX_SSL_SESSION_ID_LENGTH


class SetResult(StrEnum):
    """Outcome of a set (also the ``result`` label of the requests metric)."""

    STORED = "stored"
    NOT_STORED = "not_stored"  # revoked/deleted id, or an opaque key held with another value
    INVALID = "invalid"  # a mod_ssl-sess key whose value is not that session's DER
    TOO_LARGE = "too_large"


def session_key(key: bytes) -> tuple[bytes, bool]:
    """(session id, opaque) for a client's key."""
    if key.startswith(MOD_SSL_PREFIX):
        h = key[_PREFIX_LEN:]
        if 2 <= len(h) <= 2 * _MAX_TLS_ID:
            try:  # on every get: unhexlify checks the digits and the even length in C
                return binascii.unhexlify(h), False
            except binascii.Error:
                pass
    elif key.startswith(H2O_PREFIX):
        sid = _b64url(key[_H2O_PREFIX_LEN:])
        if sid is not None and 1 <= len(sid) <= _MAX_TLS_ID:
            return sid, False
    return key, True


def _b64url(text: bytes) -> bytes | None:
    """h2o's base64url without padding, strictly (None if not that)."""
    if b"+" in text or b"/" in text:  # altchars alone would still accept these
        return None
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error:
        return None


class Store:
    """The replica seen through a key/value protocol; ``outbox`` None means no replication."""

    def __init__(
        self,
        node_id: str,
        cache: PeerCache,
        outbox: Outbox | None,
        *,
        session_lifetime: float,
        max_value: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self.cache = cache
        self.outbox = outbox
        self.session_lifetime = session_lifetime
        # The largest record a NEW may carry (sessionbus.schemas.codec.Limits.max_event_bytes).
        self.max_value = max_value
        self._clock = clock
        self.h2o_tickets: H2oTicketRing | None = None  # set: serve the ring to h2o

    def set(self, key: bytes, flags: int, value: bytes, expires: float | None) -> SetResult:
        """Store ``value`` under ``key`` until ``expires`` (unix seconds; None: the lifetime).

        An expiry already past stores nothing (and drops a copy held here) but is "stored", as
        memcached answers for a negative exptime.
        """
        if key == H2O_TICKET_KEY:
            return SetResult.NOT_STORED  # h2o's own ticket keys never enter the farm
        sid, opaque = session_key(key)
        now = self._clock()
        limit = now + self.session_lifetime
        exp = limit if expires is None else min(expires, limit)
        if opaque:
            record = flags.to_bytes(_FLAGS_SIZE, "big") + value
            if len(record) > self.max_value:
                return SetResult.TOO_LARGE
            ctx = OPAQUE_SID_CTX
            held = self.cache.get(sid)
            if held is not None and held.der != record and exp > now:
                return SetResult.NOT_STORED
        else:
            if key.startswith(H2O_PREFIX):
                der = _b64url(value)
                if der is None:
                    return SetResult.INVALID
                value = der
            if len(value) > self.max_value:
                return SetResult.TOO_LARGE
            if flags:
                return SetResult.INVALID
            try:
                fields = parse_session(value)
            except DerError:
                return SetResult.INVALID
            if fields.session_id != sid or len(fields.sid_ctx) > 32:
                return SetResult.INVALID
            own = fields.expires
            if own is not None:
                exp = min(exp, own)
            record, ctx = value, fields.sid_ctx
        if exp <= now:
            self.cache.discard(sid)
            return SetResult.STORED
        if not self.cache.put(
            sid, record, expires=exp, origin=self.node_id, sid_ctx=ctx, event_time=now
        ):
            return SetResult.NOT_STORED
        if self.outbox is not None:
            self.outbox.put_new(sid, ctx, exp, record, opaque=opaque)
        return SetResult.STORED

    def get(self, key: bytes) -> tuple[int, bytes] | None:
        """(flags, value), or None. Never an expired, revoked or deleted session."""
        if key == H2O_TICKET_KEY:
            ring = None if self.h2o_tickets is None else self.h2o_tickets.value(self._clock())
            return None if ring is None else (0, ring)
        sid, opaque = session_key(key)
        found = self.cache.get(sid)
        outbox = self.outbox
        if found is None or (found.sid_ctx == OPAQUE_SID_CTX) is not opaque:
            if outbox is not None:
                outbox.put_get(sid, b"", 0.0, False, None)
            return None
        if outbox is not None:
            outbox.put_get(sid, found.sid_ctx, found.expires, True, found.origin)
        if opaque:
            der = found.der
            return int.from_bytes(der[:_FLAGS_SIZE], "big"), der[_FLAGS_SIZE:]
        if key.startswith(H2O_PREFIX):
            return 0, base64.urlsafe_b64encode(found.der).rstrip(b"=")
        return 0, found.der

    def delete(self, key: bytes) -> bool:
        """Remove farm-wide (a REMOVE with reason ``delete``). True if it was held here.

        A TLS session id not held here is still removed farm-wide (a peer may hold it: httpd
        deletes sessions it must not resume). An opaque key not held here is left alone, so a
        stray delete does not block that key for a whole lifetime.
        """
        sid, opaque = session_key(key)
        now = self._clock()
        found = self.cache.get(sid)
        if found is not None and (found.sid_ctx == OPAQUE_SID_CTX) is not opaque:
            found = None
        if found is None and opaque:
            return False
        if found is not None:
            exp, ctx = found.expires, found.sid_ctx
        else:
            exp, ctx = now + self.session_lifetime, b""
        self.cache.remove(sid, expires=exp, event_time=now)
        if self.outbox is not None:
            self.outbox.put_remove(sid, ctx, exp, RemoveReason.DELETE)
        return found is not None
