"""OpenSSL's session-cache callbacks → the node's replica and NEW/GET/REMOVE events.

Everything here runs inside a handshake, on the event loop: it touches memory only (the replica,
the outbox's deque), never the network.

The remove callback is not a revocation: OpenSSL also calls it whenever a connection is freed
without the server having sent close_notify, which on asyncio is every client that drops TCP.
So it only marks the session; the node propagates a REMOVE when the connection that used the
session ended in a TLS error (a fatal alert), and never for a plain EOF.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.metrics import Metrics
from sessionbus.producer.outbox import Outbox
from sessionbus.schemas.events import RemoveReason
from sessionbus.schemas.session_der import DerError, parse_session

_MARKS = 4096
_TLS1_3 = 0x0304  # sessions OpenSSL invalidated recently, waiting for their connection's verdict


class SessionHooks:
    """Implements ``sessionbus.producer.openssl.SessionCallbacks`` for one node."""

    def __init__(
        self, node_id: str, sid_ctx: bytes, cache: PeerCache, outbox: Outbox | None,
        *, stateless_tickets: bool = False, metrics: Metrics | None = None,
    ) -> None:
        self.node_id = node_id
        # With stateless tickets OpenSSL still calls the new callback for every TLS 1.3 ticket
        # it issues, but resumes those from the ticket itself: caching them is waste.
        self._skip_tls13 = stateless_tickets
        self.sid_ctx = sid_ctx
        self.cache = cache
        self.outbox = outbox  # None: replication off (a lone node, or the benchmark's baseline)
        self._marked: OrderedDict[bytes, None] = OrderedDict()
        m = (metrics or Metrics()).node
        self._hit = m.lookups.labels("hit")
        self._miss = m.lookups.labels("miss")
        self._removes_propagated = m.removes_propagated

    def on_new(self, session_id: bytes, der: bytes, expires_at: float) -> None:
        if self._skip_tls13 and _is_tls13(der):
            return
        self.cache.put(
            session_id, der, expires=expires_at, origin=self.node_id, sid_ctx=self.sid_ctx,
            event_time=time.time(),
        )
        if self.outbox is not None:
            self.outbox.put_new(session_id, self.sid_ctx, expires_at, der)

    def on_get(self, session_id: bytes) -> bytes | None:
        found = self.cache.get(session_id)
        if found is None or found.sid_ctx != self.sid_ctx:
            self._miss.inc()
            if self.outbox is not None:
                self.outbox.put_get(session_id, self.sid_ctx, 0.0, False, None)
            return None
        self._hit.inc()
        if self.outbox is not None:
            self.outbox.put_get(session_id, self.sid_ctx, found.expires, True, found.origin)
        return found.der

    def on_remove(self, session_id: bytes) -> None:
        marked = self._marked
        marked[session_id] = None
        if len(marked) > _MARKS:
            marked.popitem(last=False)

    def connection_failed(self, session_id: bytes) -> bool:
        """The connection that used ``session_id`` ended in a TLS error.

        If OpenSSL invalidated the session, it must not resume anywhere: drop it here and
        publish a REMOVE.  Returns True when it did.
        """
        if self._marked.pop(session_id, False) is False:
            return False
        found = self.cache.get(session_id)
        expires = found.expires if found else time.time() + 86400.0
        self.revoke(session_id, expires, RemoveReason.ALERT)
        self._removes_propagated.inc()
        return True

    def revoke(self, session_id: bytes, expires: float, reason: RemoveReason) -> None:
        self.cache.remove(session_id, expires=expires, event_time=time.time())
        if self.outbox is not None:
            self.outbox.put_remove(session_id, self.sid_ctx, expires, reason)


def _is_tls13(der: bytes) -> bool:
    try:
        return parse_session(der).ssl_version == _TLS1_3
    except DerError:
        return False
