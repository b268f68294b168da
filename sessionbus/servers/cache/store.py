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
* Any other key is an *opaque* session stored under its own name (at most 250 bytes, like
  memcached): the value is kept with the client's 32-bit flags in front
  (``flags:u32 big-endian | data``), replicated with the ``opaque`` flag and the reserved session id
  context ``OPAQUE_SID_CTX``, so the two kinds never answer for each other.

Opaque keys have session semantics, so that every replica agrees: a key is written once (a ``set``
of a key held with another value is refused: peers keep the first value they saw), a ``delete``
reaches every replica and leaves a tombstone, and a deleted key cannot be set again until the
deleted value would have expired. What TLS-session caches (httpd, h2o, ...) do fits this; a
general-purpose cache that overwrites keys does not.

A TLS session's set is *deferred* (``set_later``): the protocol answers STORED at once, and the DER
check, the store and the NEW event follow once the answers of that read are written, in a batch
(or before the next get or delete, so a client reads its own writes). A bad value then cannot be
answered with an error: it is counted by its outcome and dead-lettered into ``dead_sets`` (key,
size, reason: never the value, which may hold a master secret) with a log line.

``services`` (``--service``) is the allow-list of session id contexts stored and served: a set of
another context is refused, a get of one is a miss and a delete of one sends no REMOVE; each is
counted in ``sessionbus_cache_refused_total{reason="service"}``.
"""

from __future__ import annotations

import binascii
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.metrics import CacheMetrics, Metrics
from sessionbus.producer.outbox import Outbox
from sessionbus.schemas.events import MAX_SESSION_ID, RemoveReason
from sessionbus.schemas.session_der import DerError, parse_session

__all__ = ["MOD_SSL_PREFIX", "OPAQUE_SID_CTX", "DeadSet", "SetResult", "Store", "session_key"]

log = logging.getLogger(__name__)

MOD_SSL_PREFIX = b"mod_ssl-sess:"
# Session id context of opaque entries: no TLS server uses it (httpd's is 32 hex digits,
# a sessionbus node's is its service name), and it fits SSL_MAX_SID_CTX_LENGTH.
OPAQUE_SID_CTX = b"\x00sessionbus-opaque"
MAX_KEY = min(250, MAX_SESSION_ID)  # memcached's own key limit
_FLAGS_SIZE = 4
_PREFIX_LEN = len(MOD_SSL_PREFIX)
_MAX_TLS_ID = 32  # SSL_MAX_SSL_SESSION_ID_LENGTH
# Deferred sets held at most before they are handled in the request's own call (a pipelining
# client): they are handled after the answers of one read anyway; this bounds what they hold.
MAX_DEFERRED = 64
DEAD_SETS_KEPT = 64


class SetResult(StrEnum):
    """Outcome of a set (also the ``result`` label of the requests metric)."""

    STORED = "stored"
    NOT_STORED = "not_stored"  # revoked/deleted id, or an opaque key held with another value
    INVALID = "invalid"  # a mod_ssl-sess key whose value is not that session's DER
    TOO_LARGE = "too_large"
    REFUSED = "refused"  # a service context this front does not serve (--service)


@dataclass(frozen=True, slots=True)
class DeadSet:
    """A deferred set that was answered STORED and then failed validation: what is kept of it
    (never the value: it may hold a master secret)."""

    key: bytes
    size: int
    reason: SetResult
    at: float


def session_key(key: bytes) -> tuple[bytes, bool]:
    """(session id, opaque) for a client's key."""
    if key.startswith(MOD_SSL_PREFIX):
        h = key[_PREFIX_LEN:]
        if 2 <= len(h) <= 2 * _MAX_TLS_ID:
            try:  # on every get: unhexlify checks the digits and the even length in C
                return binascii.unhexlify(h), False
            except binascii.Error:
                pass
    return key, True


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
        services: frozenset[bytes] | None = None,
        defer: bool = True,
        metrics: CacheMetrics | None = None,
    ) -> None:
        self.node_id = node_id
        self.cache = cache
        self.outbox = outbox
        self.session_lifetime = session_lifetime
        # The largest record a NEW may carry (sessionbus.schemas.codec.Limits.max_event_bytes).
        self.max_value = max_value
        self._clock = clock
        # The session id contexts stored and served (None: every one); OPAQUE_SID_CTX stands
        # for the opaque keys.
        self.services = services
        self.metrics = metrics or Metrics().cache
        # Answer a TLS session's set at once, handle it after (issue 19); False: validate first
        # and answer with the outcome (a bad value gets an error).
        self.defer = defer
        # Deferred sets: (key, flags, value, expires, protocol, command), handled in order.
        self._deferred: list[tuple[bytes, int, bytes, float | None, str, str]] = []
        self.dead_sets: collections.deque[DeadSet] = collections.deque(maxlen=DEAD_SETS_KEPT)
        self._dead_logged_at = -60.0

    # --- deferred sets (issue 19) ------------------------------------------------------------

    def defers(self, key: bytes) -> bool:
        """True for a key whose set may be answered before it is handled: a TLS session's,
        whose value needs the DER check. Opaque sets are cheap and keep their exact answer
        (NOT_STORED for a key held with another value)."""
        return not session_key(key)[1]

    def set_later(self, key: bytes, flags: int, value: bytes, expires: float | None,
                  protocol: str, command: str = "set") -> None:
        """Take a set answered STORED already; it is validated, stored and published once the
        answers of this read are written (``after_answers``), or before the next get or delete
        (whichever comes first). Its outcome is
        counted under ``protocol``/``command``; a bad value is dead-lettered (``dead_sets``, a
        log line), since no answer can carry it any more."""
        deferred = self._deferred
        if len(deferred) >= MAX_DEFERRED:
            self.drain()
        deferred.append((key, flags, value, expires, protocol, command))

    def after_answers(self) -> None:
        """Handle the deferred sets now that the answers that took them are written. The
        connection calls it at the end of the callback that read them, not through call_soon:
        that would turn the loop once more per set (an epoll_wait and a handle)."""
        if self._deferred:
            self.drain()

    def drain(self) -> None:
        """Handle the deferred sets, in the order they came."""
        batch, self._deferred = self._deferred, []
        count = self.metrics.requests.count
        for key, flags, value, expires, protocol, command in batch:
            try:
                result = self.set(key, flags, value, expires)
            except Exception:  # a bug must cost this set, not the rest of the batch
                log.exception("a deferred set failed")
                count(protocol, command, "error")
                continue
            count(protocol, command, result.value)
            if result is SetResult.INVALID or result is SetResult.REFUSED:
                self._dead_letter(key, len(value), result)

    def _dead_letter(self, key: bytes, size: int, reason: SetResult) -> None:
        now = self._clock()
        self.dead_sets.append(DeadSet(key, size, reason, now))
        if now - self._dead_logged_at >= 10.0:  # a client repeating it must not flood the log
            self._dead_logged_at = now
            log.warning(
                "a set was answered STORED and then dropped: %s (key %r, %d bytes; "
                "sessionbus_cache_requests_total{command=\"set\",result=\"%s\"} counts them)",
                "not a TLS session DER with the key's session id" if reason is SetResult.INVALID
                else "its service context is not served here", key[:80], size, reason.value)

    def _refused(self) -> None:
        self.metrics.refused.labels("service").inc()

    def set(self, key: bytes, flags: int, value: bytes, expires: float | None) -> SetResult:
        """Store ``value`` under ``key`` until ``expires`` (unix seconds; None: the lifetime).

        An expiry already past stores nothing (and drops a copy held here) but is "stored", as
        memcached answers for a negative exptime.
        """
        sid, opaque = session_key(key)
        now = self._clock()
        limit = now + self.session_lifetime
        exp = limit if expires is None else min(expires, limit)
        if opaque:
            record = flags.to_bytes(_FLAGS_SIZE, "big") + value
            if len(record) > self.max_value:
                return SetResult.TOO_LARGE
            ctx = OPAQUE_SID_CTX
            if self.services is not None and ctx not in self.services:
                self._refused()
                return SetResult.REFUSED
            held = self.cache.get(sid)
            if held is not None and held.der != record and exp > now:
                return SetResult.NOT_STORED
        else:
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
            if self.services is not None and fields.sid_ctx not in self.services:
                self._refused()
                return SetResult.REFUSED
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
        if self._deferred:  # a client reads what it (or another) has just set
            self.drain()
        sid, opaque = session_key(key)
        found = self.cache.get(sid)
        outbox = self.outbox
        if found is None or (found.sid_ctx == OPAQUE_SID_CTX) is not opaque:
            if outbox is not None:
                outbox.put_get(sid, b"", 0.0, False, None)
            return None
        services = self.services
        if services is not None and found.sid_ctx not in services:
            self._refused()  # answered as a miss: nothing said about another service
            if outbox is not None:
                outbox.put_get(sid, b"", 0.0, False, None)
            return None
        if outbox is not None:
            outbox.put_get(sid, found.sid_ctx, found.expires, True, found.origin)
        if opaque:
            der = found.der
            return int.from_bytes(der[:_FLAGS_SIZE], "big"), der[_FLAGS_SIZE:]
        return 0, found.der

    def delete(self, key: bytes) -> bool:
        """Remove farm-wide (a REMOVE with reason ``delete``). True if it was held here.

        A TLS session id not held here is still removed farm-wide (a peer may hold it: httpd
        deletes sessions it must not resume). An opaque key not held here is left alone, so a
        stray delete does not block that key for a whole lifetime.
        """
        if self._deferred:
            self.drain()
        sid, opaque = session_key(key)
        now = self._clock()
        found = self.cache.get(sid)
        if found is not None and (found.sid_ctx == OPAQUE_SID_CTX) is not opaque:
            found = None
        if found is None and opaque:
            return False
        services = self.services
        if services is not None and (
            found.sid_ctx not in services if found is not None else True
        ):
            # Another service's session, or an id not held here, whose context cannot be
            # known: a farm-wide REMOVE is not this front's to send.
            self._refused()
            return False
        if found is not None:
            exp, ctx = found.expires, found.sid_ctx
        else:
            exp, ctx = now + self.session_lifetime, b""
        self.cache.remove(sid, expires=exp, event_time=now)
        if self.outbox is not None:
            self.outbox.put_remove(sid, ctx, exp, RemoveReason.DELETE)
        return found is not None
