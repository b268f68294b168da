"""h2o's memcached keys in the cache front's store: ``h2o:ssl-session-cache:<base64url id>`` with a
base64url DER value (h2o 2.2.5's lib/core/util.c and lib/common/memcached.c), no broker."""

from __future__ import annotations

import base64

from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.servers.cache.store import H2O_PREFIX, SetResult, Store, session_key
from tests.conftest import TEST_SID_CTX, SessionDerFactory


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")  # what h2o_base64_encode(..., 1) writes


def store() -> Store:
    return Store("cache-h", PeerCache(), None, session_lifetime=600, max_value=64 << 10)


def test_h2o_key_is_the_tls_session_id() -> None:
    sid = bytes(range(32))
    assert session_key(H2O_PREFIX + b64url(sid)) == (sid, False)
    assert session_key(H2O_PREFIX + b64url(b"\x07")) == (b"\x07", False)
    for bad in (b"not base64!", b"A", b"", b64url(bytes(33)), b"AAAA+/+/"):  # +/ is not url-safe
        assert session_key(H2O_PREFIX + bad) == (H2O_PREFIX + bad, True)


def test_h2o_value_is_stored_as_the_der_and_answered_as_h2o_wrote_it(
    session_der: SessionDerFactory,
) -> None:
    s = store()
    sid = bytes(range(1, 33))
    der = session_der(session_id=sid)
    key = H2O_PREFIX + b64url(sid)
    assert s.set(key, 0, b64url(der), None) is SetResult.STORED
    held = s.cache.get(sid)
    assert held is not None and held.der == der and held.sid_ctx == TEST_SID_CTX
    assert s.get(key) == (0, b64url(der))
    # the same session answers httpd's key too, and a REMOVE by id (revoke) reaches it
    assert s.get(b"mod_ssl-sess:" + sid.hex().encode()) == (0, der)
    assert s.delete(key)
    assert s.get(key) is None


def test_h2o_value_must_be_that_sessions_der(session_der: SessionDerFactory) -> None:
    s = store()
    sid = bytes(range(2, 34))
    key = H2O_PREFIX + b64url(sid)
    assert s.set(key, 0, session_der(session_id=sid), None) is SetResult.INVALID  # raw, not b64
    assert s.set(key, 0, b64url(session_der()), None) is SetResult.INVALID  # another id
    assert s.set(key, 0, b"%%%%", None) is SetResult.INVALID
    assert s.get(key) is None
