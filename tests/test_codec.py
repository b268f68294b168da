"""The wire format: round trips, every rejection reason, the bus-key file, DER, ticket keys."""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionbus.schemas.codec import (
    DEFAULT_LIMITS,
    H_ORIGIN,
    H_TYPE,
    H_VERSION,
    DecodedBatch,
    Limits,
    decode_batch,
    decode_key_ring,
    encode_batch,
    encode_key_ring,
    encode_rows,
    event_row,
)
from sessionbus.schemas.errors import EnvelopeError, Reason
from sessionbus.schemas.events import (
    MAX_SESSION_ID,
    MAX_SID_CTX,
    SCHEMA_VERSION,
    EventType,
    GetResult,
    Rejected,
    RemoveReason,
    SessionEvent,
)
from sessionbus.schemas.sealing import (
    HEADER_SIZE,
    KEY_ID_SIZE,
    SEAL_OVERHEAD,
    BusKeyError,
    BusKeys,
    format_key_file,
    load_bus_keys,
    new_key,
    parse_key_file,
    write_new_key_file,
)
from sessionbus.schemas.session_der import DerError, parse_session
from sessionbus.schemas.ticket_keys import KeyRing, KeyState, TicketKey
from tests.helpers_der import der_integer, explicit, make_session_der, octets, tlv
from tests.helpers_keys import farm_keys

T0 = 1_800_000_000.0  # "now" of every decode below
CTX = b"svc-a"
ORIGIN = "node-a"
PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- helpers ----------------------------------------------------------------------------------


def aad(type_: str, origin: str, version: int = SCHEMA_VERSION) -> bytes:
    """The associated data as the design fixes it: the clear header fields and the routing
    key, msgpack'd."""
    key = f"keys.{origin}" if type_ == "keyring" else f"session.{type_}.{origin}"
    return msgpack.packb([version, type_, origin, key])  # type: ignore[no-any-return]


def new_event(
    sid: bytes = b"\x11" * 32,
    *,
    ctx: bytes = CTX,
    seq: int = 1,
    expires: float = T0 + 300,
    der: bytes | None = None,
    origin: str = ORIGIN,
) -> SessionEvent:
    if der is None:
        der = make_session_der(sid, ctx, int(T0), 300)
    return SessionEvent(EventType.NEW, origin, seq, T0 - 1, sid, ctx, expires, der=der)


def remove_event(sid: bytes = b"\x22" * 8, seq: int = 1) -> SessionEvent:
    return SessionEvent(
        EventType.REMOVE, ORIGIN, seq, T0, sid, CTX, T0 + 60, reason=RemoveReason.ALERT
    )


def rejected(
    call: Callable[[], Any], reason: Reason, *secrets: bytes, where: str = ""
) -> EnvelopeError:
    """Run ``call``, which must raise EnvelopeError(reason) quoting none of ``secrets``."""
    with pytest.raises(EnvelopeError) as info:
        call()
    exc = info.value
    assert exc.reason is reason, f"{where}: {exc.reason!r} ({exc}) instead of {reason!r}"
    assert_quotes_none(exc, *secrets)
    return exc


def assert_quotes_none(exc: BaseException, *secrets: bytes) -> None:
    text = f"{exc!s} {exc!r} {exc.args!r}"
    assert "\n" not in str(exc)
    for s in secrets:
        for form in (repr(s), s.hex(), base64.b64encode(s).decode(), s.decode("latin-1")):
            assert form not in text
    # No chained exception (whose message might quote bytes) shows in a traceback either.
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def keys_and_raw() -> tuple[BusKeys, bytes]:
    """Bus keys and the raw key they hold (for "never quoted" checks)."""
    raw = new_key()
    return BusKeys([raw]), raw


# --- strategies -------------------------------------------------------------------------------

node_ids = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,20}\Z")
session_ids = st.binary(min_size=1, max_size=64)
sid_ctxs = st.binary(max_size=32)
seqs = st.integers(min_value=0, max_value=2**63 - 1)
past_times = st.floats(min_value=0, max_value=T0, allow_nan=False, allow_infinity=False)
future_expiries = st.floats(
    min_value=T0 + 0.001, max_value=T0 + 10**8, allow_nan=False, allow_infinity=False
)


@st.composite
def session_batches(draw: st.DrawFn) -> tuple[list[SessionEvent], bytes]:
    """A batch of 1..20 events of one type from one origin, all of one service (sid_ctx)."""
    type_ = draw(st.sampled_from([EventType.NEW, EventType.GET, EventType.REMOVE]))
    origin = draw(node_ids)
    ctx = draw(sid_ctxs)
    events = []
    for _ in range(draw(st.integers(min_value=1, max_value=20))):
        sid, seq, t, exp = draw(session_ids), draw(seqs), draw(past_times), draw(future_expiries)
        if type_ is EventType.NEW:
            der = make_session_der(sid, ctx, int(t), draw(st.integers(1, 10**6)))
            ev = SessionEvent(type_, origin, seq, t, sid, ctx, exp, der=der)
        elif type_ is EventType.GET:
            hit = draw(st.sampled_from(GetResult)) is GetResult.HIT
            ev = SessionEvent(
                type_, origin, seq, t, sid, ctx, exp, hit=hit,
                session_origin=draw(st.none() | node_ids),
            )
        else:
            ev = SessionEvent(
                type_, origin, seq, t, sid, ctx, exp, reason=draw(st.sampled_from(RemoveReason))
            )
        events.append(ev)
    return events, ctx


@st.composite
def ticket_keys(draw: st.DrawFn) -> TicketKey:
    published = draw(st.floats(min_value=0, max_value=4e9))
    encrypt_from = published + draw(st.floats(min_value=0, max_value=1e6))
    encrypt_until = encrypt_from + draw(st.floats(min_value=1, max_value=1e6))
    erase_at = encrypt_until + draw(st.floats(min_value=0, max_value=1e6))
    return TicketKey(
        name=draw(st.binary(min_size=16, max_size=16)),
        hmac_secret=draw(st.binary(min_size=32, max_size=32)),
        aes_secret=draw(st.binary(min_size=32, max_size=32)),
        published_at=published, encrypt_from=encrypt_from, encrypt_until=encrypt_until,
        erase_at=erase_at,
    )


key_rings = st.builds(
    KeyRing,
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    issued_at=st.floats(min_value=0, max_value=4e9),
    keys=st.lists(ticket_keys(), min_size=1, max_size=5).map(tuple),
)

ONE_KEY = farm_keys()  # hypothesis tests cannot take function-scoped fixtures


# --- round trips ------------------------------------------------------------------------------


@PROPERTY
@given(batch=session_batches(), batch_time=past_times)
def test_session_batch_round_trips(
    batch: tuple[list[SessionEvent], bytes], batch_time: float
) -> None:
    events, ctx = batch
    body, headers = encode_batch(events, ONE_KEY, now=batch_time)
    assert headers == {H_VERSION: SCHEMA_VERSION, H_TYPE: events[0].type.value,
                       H_ORIGIN: events[0].origin}
    out = decode_batch(body, headers, ONE_KEY, now=T0, sid_ctx=ctx)
    assert out.rejected == []
    # a REMOVE's tombstone lasts at most a session lifetime from now
    cap = T0 + DEFAULT_LIMITS.session_lifetime
    events = [dataclasses.replace(e, expires=min(e.expires, cap))
              if e.type is EventType.REMOVE else e for e in events]
    assert out.events == events
    assert (out.type, out.origin, out.time) == (events[0].type, events[0].origin, batch_time)
    # the receiver that does not check contexts (a worker) sees the same
    assert decode_batch(body, headers, ONE_KEY, now=T0).events == events


@PROPERTY
@given(ring=key_rings, origin=node_ids)
def test_key_ring_round_trips(ring: KeyRing, origin: str) -> None:
    body, headers = encode_key_ring(ring, origin, ONE_KEY, now=T0)
    assert headers[H_TYPE] == EventType.KEYRING.value
    assert decode_key_ring(body, headers, ONE_KEY, now=5e9) == ring


def test_amqp_bytes_headers_are_accepted(bus_keys: BusKeys) -> None:
    ev = new_event()
    body, headers = encode_batch([ev], bus_keys)
    as_bytes = {k: v.encode() if isinstance(v, str) else v for k, v in headers.items()}
    assert decode_batch(body, as_bytes, bus_keys, now=T0, sid_ctx=CTX).events == [ev]


def test_encoder_refuses_mixed_or_empty_batches(bus_keys: BusKeys) -> None:
    with pytest.raises(ValueError):
        encode_batch([], bus_keys)
    with pytest.raises(ValueError):
        encode_batch([new_event(), remove_event()], bus_keys)
    with pytest.raises(ValueError):
        encode_batch([new_event(), new_event(origin="node-b")], bus_keys)
    with pytest.raises(ValueError):
        encode_rows(EventType.KEYRING, ORIGIN, [], bus_keys)


def test_cross_type_decoding_is_refused(bus_keys: BusKeys) -> None:
    ring = KeyRing(seq=1, issued_at=T0, keys=(TicketKey.generate(T0, T0, T0 + 60, T0 + 120),))
    ring_body, ring_headers = encode_key_ring(ring, "publisher", bus_keys)
    rejected(lambda: decode_batch(ring_body, ring_headers, bus_keys, now=T0), Reason.TYPE)
    body, headers = encode_batch([new_event()], bus_keys)
    rejected(lambda: decode_key_ring(body, headers, bus_keys), Reason.TYPE)


def test_authentic_unknown_type_and_bad_origin(bus_keys: BusKeys) -> None:
    plain = msgpack.packb([T0, []])
    body = bus_keys.seal(plain, aad("bogus", ORIGIN))
    headers = {H_VERSION: SCHEMA_VERSION, H_TYPE: "bogus", H_ORIGIN: ORIGIN}
    rejected(lambda: decode_batch(body, headers, bus_keys), Reason.TYPE)
    body = bus_keys.seal(plain, aad("new", "Node.A*"))
    headers = {H_VERSION: SCHEMA_VERSION, H_TYPE: "new", H_ORIGIN: "Node.A*"}
    rejected(lambda: decode_batch(body, headers, bus_keys), Reason.FIELD)


# --- one bad event in a batch -------------------------------------------------------------------

GOOD_A, GOOD_B = new_event(b"\xaa" * 32, seq=1), new_event(b"\xbb" * 32, seq=3)
BAD_SID = b"\xcc" * 32
GOOD_ROW = event_row(new_event(BAD_SID, seq=2))


def _with(index: int, value: Any) -> list[Any]:
    row = list(GOOD_ROW)
    row[index] = value
    return row


BAD_ROWS = {
    "seq is a string": (_with(0, "2"), Reason.FIELD),
    "seq is negative": (_with(0, -1), Reason.FIELD),
    "seq is a bool": (_with(0, True), Reason.FIELD),
    "time is NaN": (_with(1, float("nan")), Reason.FIELD),
    "session id is a str": (_with(2, "cc" * 16), Reason.FIELD),
    "session id is empty": (_with(2, b""), Reason.FIELD),
    "session id too long": (_with(2, b"\x01" * (MAX_SESSION_ID + 1)), Reason.FIELD),
    "sid_ctx too long": (_with(3, b"\x01" * (MAX_SID_CTX + 1)), Reason.FIELD),
    "expires is infinite": (_with(4, float("inf")), Reason.FIELD),
    "a REMOVE row in a NEW batch": (event_row(remove_event(BAD_SID)), Reason.FIELD),
    "not a list": ({"seq": 2}, Reason.FIELD),
    "der is a str": (_with(5, "der"), Reason.FIELD),
    "der is empty": (_with(5, b""), Reason.FIELD),
    "opaque flag is an int": (_with(6, 0), Reason.FIELD),
    "der is not DER": (_with(5, b"\x30\x03abc-not-der"), Reason.FIELD),
    "expired": (_with(4, T0 - 1), Reason.EXPIRED),
    "expires right now": (_with(4, T0), Reason.EXPIRED),
    "der of another session": (
        _with(5, make_session_der(b"\xdd" * 32, CTX, int(T0), 300)), Reason.ID_MISMATCH),
    "der of another context": (
        _with(5, make_session_der(BAD_SID, b"svc-b", int(T0), 300)), Reason.CONTEXT),
    "envelope of another context": (_with(3, b"svc-b"), Reason.CONTEXT),
    "opaque session on a TLS node": (_with(6, True), Reason.CONTEXT),
}


@pytest.mark.parametrize("bad_row, reason", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_one_bad_event_costs_only_itself(
    bus_keys: BusKeys, bad_row: Any, reason: Reason
) -> None:
    rows = [event_row(GOOD_A), bad_row, event_row(GOOD_B)]
    body, headers = encode_rows(EventType.NEW, ORIGIN, rows, bus_keys, now=T0)
    out = decode_batch(body, headers, bus_keys, now=T0, sid_ctx=CTX)
    assert out.events == [GOOD_A, GOOD_B]
    sid = bad_row[2] if isinstance(bad_row, list) and isinstance(bad_row[2], bytes) else None
    assert out.rejected == [Rejected(1, reason.value, sid)]
    # what a batch shows (logs, metrics) never holds session bytes
    assert GOOD_A.der is not None
    assert GOOD_A.der.hex() not in repr(out) and repr(GOOD_A.der) not in repr(out)


def test_bad_get_and_remove_rows(bus_keys: BusKeys) -> None:
    good_get = SessionEvent(EventType.GET, ORIGIN, 1, T0, b"g" * 8, CTX, T0 + 5, hit=False)
    rows = [event_row(good_get), [2, T0, b"h" * 8, CTX, T0 + 5, "yes", ""],
            [3, T0, b"i" * 8, CTX, T0 + 5, True, "x" * 64]]
    out = decode_batch(*encode_rows(EventType.GET, ORIGIN, rows, bus_keys), bus_keys, now=T0)
    assert out.events == [good_get]
    assert out.rejected == [Rejected(1, "field", b"h" * 8), Rejected(2, "field", b"i" * 8)]

    good_rm = remove_event(b"r" * 8)
    rows = [[1, T0, b"q" * 8, CTX, T0 + 5, "expired"], event_row(good_rm),
            [3, T0, b"s" * 8, CTX, T0 + 5, 1]]
    out = decode_batch(*encode_rows(EventType.REMOVE, ORIGIN, rows, bus_keys), bus_keys, now=T0)
    assert out.events == [good_rm]
    assert [(r.index, r.reason) for r in out.rejected] == [(0, "field"), (2, "field")]


def test_opaque_session_accepted_where_contexts_are_not_checked(bus_keys: BusKeys) -> None:
    # A cache front stores what httpd hands it: not parsed, but only for receivers without sid_ctx.
    row = [1, T0, b"k" * 40, b"", T0 + 60, b"opaque bytes, not DER", True]
    body, headers = encode_rows(EventType.NEW, ORIGIN, [row], bus_keys)
    (ev,) = decode_batch(body, headers, bus_keys, now=T0).events
    assert ev.der == b"opaque bytes, not DER"
    out = decode_batch(body, headers, bus_keys, now=T0, sid_ctx=CTX)
    assert out.events == [] and out.rejected == [Rejected(0, "context", b"k" * 40)]


# --- whole-message rejections -------------------------------------------------------------------


def test_every_flipped_bit_is_forged(bus_keys: BusKeys) -> None:
    body, headers = encode_batch([remove_event(b"\x01" * 4)], bus_keys, now=T0)
    assert len(body) <= 256, "keep the loop small"
    assert decode_batch(body, headers, bus_keys, now=T0).events  # intact, it opens
    for bit in range(len(body) * 8):
        damaged = bytearray(body)
        damaged[bit // 8] ^= 1 << (bit % 8)
        # The key id only selects a key (an altered one names a key nobody holds); every other
        # bit is authenticated.
        in_kid = 8 <= bit < (1 + KEY_ID_SIZE) * 8
        rejected(partial(decode_batch, bytes(damaged), headers, bus_keys, now=T0),
                 Reason.UNKNOWN_KEY if in_kid else Reason.FORGED,
                 where=f"bit {bit} ({'key id' if in_kid else 'format/salt/counter/ct/tag'})")


def test_flipped_bits_in_a_new_event_are_forged() -> None:
    bus_keys, raw = keys_and_raw()
    ev = new_event()
    body, headers = encode_batch([ev], bus_keys, now=T0)
    assert ev.der is not None
    # every byte position once (a different bit each), DER and key never quoted
    for i in range(len(body)):
        damaged = bytearray(body)
        damaged[i] ^= 1 << (i % 8)
        rejected(partial(decode_batch, bytes(damaged), headers, bus_keys, now=T0),
                 Reason.UNKNOWN_KEY if 1 <= i <= KEY_ID_SIZE else Reason.FORGED, ev.der, raw,
                 where=f"byte {i}")


@pytest.mark.parametrize(
    "header, value",
    [(H_TYPE, "get"), (H_TYPE, "remove"), (H_TYPE, "keyring"), (H_ORIGIN, "node-b"),
     (H_ORIGIN, "node-a ")],
)
def test_tampered_clear_header_is_forged(bus_keys: BusKeys, header: str, value: str) -> None:
    body, headers = encode_batch([new_event()], bus_keys, now=T0)
    # relabelled as a ring, it is refused on the clear header before any key is tried
    rejected(lambda: decode_batch(body, {**headers, header: value}, bus_keys, now=T0),
             Reason.TYPE if value == "keyring" else Reason.FORGED)


def test_tampered_key_ring_header_is_forged(bus_keys: BusKeys) -> None:
    ring = KeyRing(seq=1, issued_at=T0, keys=(TicketKey.generate(T0, T0, T0 + 60, T0 + 120),))
    body, headers = encode_key_ring(ring, "publisher", bus_keys)
    rejected(lambda: decode_key_ring(body, {**headers, H_ORIGIN: "node-a"}, bus_keys),
             Reason.FORGED)


def test_unknown_bus_key() -> None:
    (bus_keys, raw), (other_bus_keys, other_raw) = keys_and_raw(), keys_and_raw()
    ev = new_event()
    assert ev.der is not None
    body, headers = encode_batch([ev], other_bus_keys, now=T0)
    exc = rejected(lambda: decode_batch(body, headers, bus_keys, now=T0), Reason.UNKNOWN_KEY,
                   ev.der, raw, other_raw)
    assert other_bus_keys.seal_key_id.hex() in str(exc)  # the id is what an operator needs


def test_unknown_schema_version(bus_keys: BusKeys) -> None:
    body, headers = encode_batch([new_event()], bus_keys, now=T0)
    rejected(lambda: decode_batch(body, {**headers, H_VERSION: 2}, bus_keys), Reason.VERSION)
    rejected(lambda: decode_batch(body, {**headers, H_VERSION: 0}, bus_keys), Reason.VERSION)
    # a version of the wrong type is a missing field, not a version
    rejected(lambda: decode_batch(body, {**headers, H_VERSION: "1"}, bus_keys), Reason.FIELD)
    rejected(lambda: decode_batch(body, {**headers, H_VERSION: True}, bus_keys), Reason.FIELD)


@pytest.mark.parametrize("drop", [None, "all", H_VERSION, H_TYPE, H_ORIGIN])
def test_missing_headers(bus_keys: BusKeys, drop: str | None) -> None:
    body, headers = encode_batch([new_event()], bus_keys, now=T0)
    if drop is None:
        hs: dict[str, Any] | None = None
    elif drop == "all":
        hs = {}
    else:
        hs = {k: v for k, v in headers.items() if k != drop}
    rejected(lambda: decode_batch(body, hs, bus_keys, now=T0), Reason.FIELD)


def test_oversize_message(bus_keys: BusKeys) -> None:
    body, headers = encode_batch([new_event()], bus_keys, now=T0)
    exact = Limits(max_message_bytes=len(body))
    assert decode_batch(body, headers, bus_keys, now=T0, limits=exact).events
    rejected(lambda: decode_batch(body, headers, bus_keys, now=T0,
                                  limits=Limits(max_message_bytes=len(body) - 1)),
             Reason.OVERSIZE)
    # the size check comes first: a huge body is not even opened
    rejected(lambda: decode_batch(b"\0" * 2048, None, bus_keys,
                                  limits=Limits(max_message_bytes=1024)), Reason.OVERSIZE)


def test_too_many_events(bus_keys: BusKeys) -> None:
    events = [remove_event(bytes([i + 1]) * 4, seq=i) for i in range(5)]
    body, headers = encode_batch(events, bus_keys, now=T0)
    assert len(decode_batch(body, headers, bus_keys, now=T0,
                            limits=Limits(max_events=5)).events) == 5
    rejected(lambda: decode_batch(body, headers, bus_keys, now=T0, limits=Limits(max_events=4)),
             Reason.OVERSIZE)


def test_oversize_der_is_rejected_alone(bus_keys: BusKeys) -> None:
    small_der = make_session_der(b"\x02" * 32, CTX, int(T0), 300)
    small = new_event(b"\x02" * 32, seq=2, der=small_der)
    # a session with more in it (think: a client certificate chain)
    big_der = make_session_der(b"\x01" * 32, CTX, int(T0), 300, master_key=os.urandom(400))
    big = new_event(b"\x01" * 32, seq=1, der=big_der)
    assert len(big_der) > len(small_der)
    body, headers = encode_batch([big, small], bus_keys, now=T0)
    limits = Limits(max_event_bytes=len(small_der))
    out = decode_batch(body, headers, bus_keys, now=T0, sid_ctx=CTX, limits=limits)
    assert out.events == [small]
    assert out.rejected == [Rejected(0, "oversize", big.session_id)]


def test_expired_session(bus_keys: BusKeys) -> None:
    ev = new_event(expires=T0 - 0.5)
    out = decode_batch(*encode_batch([ev], bus_keys), bus_keys, now=T0, sid_ctx=CTX)
    assert out.events == [] and out.rejected == [Rejected(0, "expired", ev.session_id)]
    # the same session one second earlier was fine: the receiver's clock decides
    out = decode_batch(*encode_batch([ev], bus_keys), bus_keys, now=T0 - 1, sid_ctx=CTX)
    assert out.events == [ev]


def test_der_session_id_mismatch(bus_keys: BusKeys) -> None:
    ev = new_event(b"\x01" * 32, der=make_session_der(b"\x02" * 32, CTX, int(T0), 300))
    out = decode_batch(*encode_batch([ev], bus_keys), bus_keys, now=T0)
    assert out.rejected == [Rejected(0, "id_mismatch", b"\x01" * 32)]


def test_other_session_id_context(bus_keys: BusKeys) -> None:
    ev = new_event(ctx=b"svc-b")  # DER and envelope agree, but it is another service's
    out = decode_batch(*encode_batch([ev], bus_keys), bus_keys, now=T0, sid_ctx=CTX)
    assert out.rejected == [Rejected(0, "context", ev.session_id)]
    assert decode_batch(*encode_batch([ev], bus_keys), bus_keys, now=T0,
                        sid_ctx=b"svc-b").events == [ev]


def test_plaintext_body_is_forged(bus_keys: BusKeys) -> None:
    ev = new_event()
    assert ev.der is not None
    plain = msgpack.packb([T0, [event_row(ev)]], use_bin_type=True)
    headers = {H_VERSION: SCHEMA_VERSION, H_TYPE: "new", H_ORIGIN: ORIGIN}
    rejected(lambda: decode_batch(plain, headers, bus_keys, now=T0), Reason.FORGED, ev.der)
    ring = KeyRing(seq=1, issued_at=T0, keys=(TicketKey.generate(T0, T0, T0 + 60, T0 + 120),))
    k = ring.keys[0]
    plain = msgpack.packb([T0, [1, T0, [[k.name, k.hmac_secret, k.aes_secret, k.published_at,
                                         k.encrypt_from, k.encrypt_until, k.erase_at]]]])
    headers = {H_VERSION: SCHEMA_VERSION, H_TYPE: "keyring", H_ORIGIN: "publisher"}
    rejected(lambda: decode_key_ring(plain, headers, bus_keys), Reason.FORGED,
             k.hmac_secret, k.aes_secret)


@pytest.mark.parametrize("keep", [0, 1, KEY_ID_SIZE, HEADER_SIZE, SEAL_OVERHEAD - 1])
def test_truncated_body(bus_keys: BusKeys, keep: int) -> None:
    body, headers = encode_batch([new_event()], bus_keys, now=T0)
    rejected(lambda: decode_batch(body[:keep], headers, bus_keys, now=T0), Reason.TRUNCATED)


def test_cut_short_but_longer_than_the_overhead_is_forged(bus_keys: BusKeys) -> None:
    body, headers = encode_batch([new_event()], bus_keys, now=T0)
    for keep in (SEAL_OVERHEAD, SEAL_OVERHEAD + 1, len(body) - 1):
        rejected(partial(decode_batch, body[:keep], headers, bus_keys, now=T0),
                 Reason.FORGED, where=f"{keep} bytes")


def test_authentic_garbage_payload(bus_keys: BusKeys) -> None:
    headers = {H_VERSION: SCHEMA_VERSION, H_TYPE: "new", H_ORIGIN: ORIGIN}
    not_msgpack = bus_keys.seal(b"\xc1\xc1\xc1", aad("new", ORIGIN))
    rejected(lambda: decode_batch(not_msgpack, headers, bus_keys), Reason.MALFORMED)
    for payload in ([T0], {"t": T0}, [T0, "rows"], ["t", []], 7):
        body = bus_keys.seal(msgpack.packb(payload), aad("new", ORIGIN))
        rejected(partial(decode_batch, body, headers, bus_keys), Reason.FIELD,
                 where=repr(payload))


@pytest.mark.parametrize(
    "ring_payload",
    [
        [1, T0, [{"name": b"n" * 16}]],  # a map where a row belongs
        [1, T0, [[b"n" * 16, b"h" * 31, b"a" * 32, 1, 2, 3, 4]]],  # short secret
        [1, T0, [[b"n" * 16, b"h" * 32, b"a" * 32, 1, 5, 3, 4]]],  # timeline out of order
        [1, T0, [[b"n" * 16, b"h" * 32, b"a" * 32, 1, 2, 3]]],  # missing erase_at
        ["1", T0, []],
        [1, None, []],
        {"seq": 1},
    ],
)
def test_authentic_bad_key_ring_is_field(bus_keys: BusKeys, ring_payload: Any) -> None:
    body = bus_keys.seal_ring(msgpack.packb([T0, ring_payload]), aad("keyring", "publisher"))
    headers = {H_VERSION: SCHEMA_VERSION, H_TYPE: "keyring", H_ORIGIN: "publisher"}
    rejected(lambda: decode_key_ring(body, headers, bus_keys), Reason.FIELD,
             b"h" * 31, b"a" * 32, b"h" * 32)


def test_error_messages_never_hold_der_or_key() -> None:
    """Every whole-message rejection of a NEW, gathered: none quotes the DER or a key."""
    bus_keys, raw = keys_and_raw()
    ev = new_event()
    assert ev.der is not None
    body, headers = encode_batch([ev], bus_keys, now=T0)
    secrets = [ev.der, raw]
    attempts: list[Callable[[], DecodedBatch]] = [
        lambda: decode_batch(body[:-1], headers, bus_keys),
        lambda: decode_batch(body[:10], headers, bus_keys),
        lambda: decode_batch(body, {**headers, H_TYPE: "get"}, bus_keys),
        lambda: decode_batch(body, {**headers, H_VERSION: 9}, bus_keys),
        lambda: decode_batch(body, None, bus_keys),
        lambda: decode_batch(body, headers, bus_keys, limits=Limits(max_message_bytes=8)),
        lambda: decode_batch(body, headers, BusKeys([new_key()])),
        lambda: decode_batch(msgpack.packb([T0, [event_row(ev)]]), headers, bus_keys),
    ]
    for attempt in attempts:
        with pytest.raises(EnvelopeError) as info:
            attempt()
        assert_quotes_none(info.value, *secrets)


# --- bus-key file ---------------------------------------------------------------------------------


def test_write_new_key_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "bus.key"
    old = os.umask(0)  # even with a permissive umask
    try:
        kid = write_new_key_file(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = load_bus_keys(path)
    assert keys.seal_key_id == kid and len(kid) == KEY_ID_SIZE
    assert kid.hex() in repr(keys)
    assert path.read_text().count("sbk1:") == 1


def test_write_new_key_file_does_not_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "bus.key"
    kid = write_new_key_file(path)
    before = path.read_bytes()
    with pytest.raises(BusKeyError) as info:
        write_new_key_file(path)
    assert str(path) in str(info.value) and "--force" in str(info.value)
    assert path.read_bytes() == before
    path.chmod(0o644)
    kid2 = write_new_key_file(path, force=True)
    assert kid2 != kid and path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # force also fixes the mode
    assert load_bus_keys(path).seal_key_id == kid2


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610, 0o601])
def test_load_refuses_a_file_others_can_use(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "bus.key"
    write_new_key_file(path)
    path.chmod(mode)
    with pytest.raises(BusKeyError) as info:
        load_bus_keys(path)
    assert str(path) in str(info.value) and "600" in str(info.value)
    path.chmod(0o400)
    load_bus_keys(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BusKeyError, match="does not exist"):
        load_bus_keys(tmp_path / "nope")


@pytest.mark.parametrize(
    "bad_line",
    [
        base64.b64encode(b"S" * 32).decode(),  # a key without its prefix
        "sbk1:" + base64.b64encode(b"S" * 31).decode(),  # wrong length
        "sbk1:" + base64.b64encode(b"S" * 33).decode(),
        "sbk1:SSSSSSSSSSSSSSSS!!notbase64",
        "sbk1:" + base64.b64encode(b"S" * 32).decode()[:-2],  # cut
        "SECRET-LOOKING garbage",
    ],
)
def test_malformed_key_line(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "bus.key"
    good = new_key()
    path.write_text(f"# comment\n\n{format_key_file([good]).splitlines()[1]}\n{bad_line}\n")
    path.chmod(0o600)
    with pytest.raises(BusKeyError) as info:
        load_bus_keys(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg and "line 4" in msg
    rest = msg.replace(str(path), "")  # (pytest names tmp_path after the test's id)
    assert "SSSS" not in rest and "SECRET" not in rest and bad_line not in rest
    assert base64.b64encode(good).decode() not in rest
    assert info.value.__cause__ is None


def test_key_file_without_keys(tmp_path: Path) -> None:
    with pytest.raises(BusKeyError, match="holds no key"):
        parse_key_file("# only a comment\n\n", "f")


def test_rotation_two_keys(tmp_path: Path) -> None:
    old, new = new_key(), new_key()
    path = tmp_path / "bus.key"
    path.write_text(format_key_file([old, new]))
    path.chmod(0o600)
    both = load_bus_keys(path)
    assert both.seal_key_id == BusKeys([old]).seal_key_id
    assert "2" in repr(both) and old.hex() not in repr(both) and new.hex() not in repr(both)
    ev = new_event()
    for sealer in (BusKeys([old]), BusKeys([new]), both):
        body, headers = encode_batch([ev], sealer)
        assert decode_batch(body, headers, both, now=T0).events == [ev]
    # what the two-key file seals, a node still on the old key alone opens; one on the new alone
    # does not (until the keys are swapped)
    body, headers = encode_batch([ev], both)
    assert decode_batch(body, headers, BusKeys([old]), now=T0).events == [ev]
    rejected(lambda: decode_batch(body, headers, BusKeys([new]), now=T0), Reason.UNKNOWN_KEY)


def test_bus_keys_refuses_bad_keys() -> None:
    with pytest.raises(BusKeyError):
        BusKeys([])
    with pytest.raises(BusKeyError):
        BusKeys([b"\0" * 31])


# --- session DER ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sid_len", [0, 1, 32, 64])
@pytest.mark.parametrize("ctx", [b"", b"x", b"c" * 32])
def test_parse_session(sid_len: int, ctx: bytes) -> None:
    sid = os.urandom(sid_len)
    der = make_session_der(sid, ctx, 1_700_000_000, 7200)
    f = parse_session(der)
    assert (f.session_id, f.sid_ctx, f.time, f.timeout) == (sid, ctx, 1_700_000_000, 7200)
    assert f.expires == 1_700_007_200.0


def test_parse_session_without_optional_fields() -> None:
    der = tlv(0x30, der_integer(1) + der_integer(0x0304) + octets(b"\x13\x01") + octets(b"id")
              + octets(b"m" * 48))
    f = parse_session(der)
    assert (f.session_id, f.time, f.timeout, f.sid_ctx, f.expires) == (b"id", None, None, b"",
                                                                      None)


def test_parse_session_skips_fields_it_does_not_need() -> None:
    body = (der_integer(1) + der_integer(0x0303) + octets(b"\xc0\x2f") + octets(b"sid")
            + octets(b"m" * 48) + explicit(1, der_integer(5)) + explicit(2, der_integer(-1))
            + explicit(3, tlv(0x30, b"\x05\x00" * 200)) + explicit(4, octets(b"ctx"))
            + explicit(5, der_integer(0)))
    f = parse_session(tlv(0x30, body))
    assert (f.session_id, f.time, f.timeout, f.sid_ctx) == (b"sid", 5, -1, b"ctx")


def test_session_der_fixture(session_der: Callable[..., bytes]) -> None:
    f = parse_session(session_der(b"abc", time=100, timeout=5))
    assert (f.session_id, f.sid_ctx, f.expires) == (b"abc", b"sessionbus-test", 105.0)
    assert len(parse_session(session_der()).session_id) == 32


GOOD_DER = make_session_der(b"\x05" * 32, CTX, 1_700_000_000, 300)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x30",
        b"\x30\x03garbage",
        b"\x04\x03abc",
        GOOD_DER + b"\0",  # trailing bytes
        b"\x30\x80" + GOOD_DER[2:],  # indefinite length
        b"\x30\x85" + b"\xff" * 5,  # length of 5 bytes
        tlv(0x30, der_integer(1) + der_integer(0x0303) + octets(b"c") + der_integer(7)),
        tlv(0x30, der_integer(1) + der_integer(0x0303) + octets(b"c") + octets(b"s")
            + explicit(1, octets(b"not an int"))),
        tlv(0x30, der_integer(1) + der_integer(0x0303) + octets(b"c") + octets(b"s")
            + explicit(4, der_integer(3))),
        tlv(0x30, der_integer(1) + der_integer(0x0303) + octets(b"c") + octets(b"s")
            + explicit(1, tlv(0x02, b"\x01" * 10))),  # an 80-bit time
        tlv(0x30, der_integer(1) + der_integer(0x0303) + octets(b"c") + octets(b"s")
            + explicit(2, tlv(0x02, b""))),
    ],
)
def test_parse_session_refuses_garbage(garbage: bytes) -> None:
    with pytest.raises(DerError):
        parse_session(garbage)


def test_parse_session_refuses_every_truncation() -> None:
    for n in range(len(GOOD_DER)):
        with pytest.raises(DerError):
            parse_session(GOOD_DER[:n])


@PROPERTY
@given(data=st.data())
def test_parse_session_raises_only_der_error(data: st.DataObject) -> None:
    damaged = bytearray(GOOD_DER)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(damaged) - 1))
        damaged[i] = data.draw(st.integers(0, 255))
    try:
        fields = parse_session(bytes(damaged))
    except DerError:
        return
    assert isinstance(fields.session_id, bytes) and isinstance(fields.sid_ctx, bytes)


@PROPERTY
@given(blob=st.binary(max_size=300))
def test_parse_session_random_bytes(blob: bytes) -> None:
    try:
        fields = parse_session(b"\x30" + bytes([min(len(blob), 127)]) + blob[:127])
    except DerError:
        return
    assert len(fields.session_id) <= len(blob)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")
def test_helper_der_is_what_openssl_reads(tmp_path: Path) -> None:
    """The hand-made DER the tests use is a session OpenSSL itself accepts."""
    sid, ctx = os.urandom(32), b"svc-a\0"
    path = tmp_path / "s.der"
    path.write_bytes(make_session_der(sid, ctx, 1_700_000_000, 7200))
    out = subprocess.run(["openssl", "sess_id", "-inform", "DER", "-in", str(path), "-noout",
                          "-text"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"Session-ID: {sid.hex().upper()}" in out.stdout
    assert f"Session-ID-ctx: {ctx.hex().upper()}" in out.stdout
    assert "Timeout   : 7200" in out.stdout


# --- ticket keys ----------------------------------------------------------------------------------


def tkey(published: float, encrypt_from: float, encrypt_until: float, erase: float) -> TicketKey:
    return TicketKey.generate(published, encrypt_from, encrypt_until, erase)


def test_ticket_key_states_over_its_timeline() -> None:
    k = tkey(100, 200, 300, 500)
    timeline = {0: KeyState.AHEAD, 100: KeyState.AHEAD, 199.9: KeyState.AHEAD,
                200: KeyState.CURRENT, 299.9: KeyState.CURRENT, 300: KeyState.OLD,
                499.9: KeyState.OLD, 500: KeyState.ERASED, 10**10: KeyState.ERASED}
    assert {t: k.state(t) for t in timeline} == timeline


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": b"n" * 15},
        {"hmac_secret": b"h" * 16},
        {"aes_secret": b"a" * 33},
        {"encrypt_from": 50.0},  # before published
        {"encrypt_until": 200.0},  # empty encrypt window
        {"erase_at": 299.0},  # erased while encrypting
    ],
)
def test_ticket_key_refuses_bad_fields(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "name": b"n" * 16, "hmac_secret": b"h" * 32, "aes_secret": b"a" * 32,
        "published_at": 100.0, "encrypt_from": 200.0, "encrypt_until": 300.0, "erase_at": 500.0,
    }
    with pytest.raises(ValueError) as info:
        TicketKey(**{**fields, **kwargs})
    assert "hhhh" not in str(info.value) and "aaaa" not in str(info.value)


def test_key_ring_current_picks_the_newest_started_key() -> None:
    a = tkey(0, 100, 200, 500)
    b = tkey(150, 200, 300, 600)
    c = tkey(250, 300, 400, 700)
    ring = KeyRing(seq=3, issued_at=250, keys=(c, a, b))  # order in the ring does not matter
    assert ring.current(50) is None
    assert ring.current(100) is a
    assert ring.current(199) is a
    assert ring.current(200) is b  # b has begun: newest wins though a is in its window...
    assert ring.current(350) is c
    # a publisher gone silent: the last key keeps encrypting after its window, until erased
    assert ring.current(650) is c
    assert ring.current(700) is None
    # overlapping windows (a restarted publisher): the newest one that has begun
    d = tkey(100, 120, 400, 800)
    assert KeyRing(seq=4, issued_at=130, keys=(a, d)).current(130) is d
    assert KeyRing(seq=4, issued_at=110, keys=(a, d)).current(110) is a


def test_key_ring_live_and_by_name() -> None:
    a, b = tkey(0, 100, 200, 500), tkey(150, 200, 300, 600)
    ring = KeyRing(seq=1, issued_at=0, keys=(a, b))
    assert ring.live(499) == [a, b] and ring.live(500) == [b] and ring.live(600) == []
    assert ring.by_name(a.name, 499) is a and ring.by_name(a.name, 500) is None
    assert ring.by_name(b"\0" * 16, 0) is None
    assert ring.newest_published_at() == 150


def test_ticket_key_repr_hides_secrets() -> None:
    k = tkey(0, 100, 200, 500)
    ring = KeyRing(seq=1, issued_at=0, keys=(k,))
    for text in (repr(k), str(k), repr(ring), str(ring)):
        assert k.name.hex() in text
        for secret in (k.hmac_secret, k.aes_secret):
            assert secret.hex() not in text and repr(secret) not in text


def test_what_the_outbox_queues_decodes_to_the_events_it_was_given(bus_keys: BusKeys) -> None:
    """The row layout (``schemas.rows``) is written once; the outbox builds rows directly and
    the codec reads them: a drift between the two fails here."""
    from sessionbus.bus.topology import Topology
    from sessionbus.producer.outbox import Outbox

    box = Outbox("node-r", Topology("t"), bus_keys)
    sid = os.urandom(32)
    der = make_session_der(sid, CTX, int(time.time()), 300)
    expires = time.time() + 300
    box.put_new(sid, CTX, expires, der)
    box.put_get(sid, CTX, expires, True, "node-q")
    box.put_remove(sid, CTX, expires, RemoveReason.ALERT)
    decoded = {}
    for type_, queue in box._queues.items():
        body, headers = encode_rows(type_, "node-r", list(queue), bus_keys)
        batch = decode_batch(body, headers, bus_keys, sid_ctx=CTX)
        assert not batch.rejected
        (decoded[type_],) = batch.events
    new, get, remove = decoded[EventType.NEW], decoded[EventType.GET], decoded[EventType.REMOVE]
    assert (new.session_id, new.sid_ctx, new.der, new.origin) == (sid, CTX, der, "node-r")
    assert (get.hit, get.session_origin, get.session_id) == (True, "node-q", sid)
    assert (remove.reason, remove.session_id) == (RemoveReason.ALERT, sid)
    assert new.seq < get.seq < remove.seq and new.expires == get.expires == expires
