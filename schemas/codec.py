"""msgpack encoding of event batches and key rings, sealing, and validation.

A message is an AMQP body (sealed, see ``sealing``) plus three clear headers: schema version,
event type and origin node.  The headers and the routing key are the AEAD's associated data.
Decoding raises ``EnvelopeError`` for faults of the whole message, and reports each bad event of
an otherwise good batch as ``Rejected`` so the good ones are still applied.

Order of checks: size, clear headers, the AEAD tag (and a ring's Ed25519 signature); only then
is anything of the body parsed.  For a message that came from the broker (the receiver passes
``delivery_headers(message)``), the sender is checked next: the broker-validated AMQP ``user_id``,
the envelope origin and the routing key's suffix must agree (``Reason.SENDER``), and the message
must be fresh (``schemas.freshness``).  ``user_id`` may differ from the origin only for users the
receiver names in ``BusKeys(any_origin_users=...)``, the dev/test allowance (``guest`` on a
loopback broker; the CLI refuses it for any other broker).
"""

from __future__ import annotations

import math
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from sessionbus.schemas.errors import EnvelopeError, Reason
from sessionbus.schemas.events import (
    MAX_SESSION_ID,
    MAX_SID_CTX,
    SCHEMA_VERSION,
    SUPPORTED_VERSIONS,
    EventType,
    Rejected,
    RemoveReason,
    SessionEvent,
    valid_node_id,
)
from sessionbus.schemas.freshness import Freshness
from sessionbus.schemas.rows import ROW_LENGTH, GetRow, NewRow, RemoveRow, Row
from sessionbus.schemas.sealing import BusKeys
from sessionbus.schemas.session_der import DerError, parse_session
from sessionbus.schemas.ticket_keys import KeyRing, TicketKey

CONTENT_TYPE = "application/vnd.msgpack"
H_VERSION = "sessionbus-version"
H_TYPE = "sessionbus-type"
H_ORIGIN = "sessionbus-origin"
H_REASON = "sessionbus-reject-reason"  # set on dead-lettered copies
# Set by the receiver, never by a sender: its value is a ``Delivery`` object, which no AMQP header
# value can be (``delivery_headers`` overwrites whatever a sender put under this name).
X_DELIVERY = "x-sessionbus-delivery"

_REMOVE_REASONS = {r.value: r for r in RemoveReason}


@dataclass(frozen=True, slots=True)
class Limits:
    # A batch of a few hundred ~300-byte events is ~100 KB; one session DER (with a client
    # certificate chain) stays far below 16 KiB.
    max_message_bytes: int = 1 << 20
    max_event_bytes: int = 16 << 10
    max_events: int = 4096
    # A REMOVE's expiry (its tombstone) is capped at now + this; messages sealed longer ago than
    # this are stale (a warm join replays this much of the stream).
    session_lifetime: float = 86400.0
    clock_skew: float = 120.0  # between any two hosts of the farm


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the broker said about a delivery (not the sender): routing key, validated user_id,
    and the receiving path's replay state."""

    routing_key: str
    user_id: str | None
    freshness: Freshness | None = None


def delivery_headers(message: Any, freshness: Freshness | None = None) -> dict[str, Any]:
    """The headers of an incoming aio-pika message, with its ``Delivery`` under ``X_DELIVERY``
    (replacing anything a sender put there): what a receiver passes to the decoders."""
    headers: dict[str, Any] = dict(message.headers or {})
    user = message.user_id
    if isinstance(user, bytes):
        user = user.decode("utf-8", "replace")
    headers[X_DELIVERY] = Delivery(str(message.routing_key or ""),
                                   user if isinstance(user, str) else None, freshness)
    return headers


def sender_user(url: str) -> str:
    """The broker username a connection URL logs in as: what every publish sets as ``user_id``
    (the broker refuses a publish whose user_id is not the connection's user)."""
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(url).username or "") or "guest"


@dataclass(slots=True)
class DecodedBatch:
    type: EventType
    origin: str
    time: float
    events: list[SessionEvent] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def _aad(version: int, type_: str, origin: str, routing_key: str) -> bytes:
    return msgpack.packb([version, type_, origin, routing_key])  # type: ignore[no-any-return]


def _routing_key(type_: str, origin: str) -> str:
    """The routing key a sender of ``origin`` publishes ``type_`` on (``bus.topology``'s)."""
    if type_ == EventType.KEYRING.value:
        return f"keys.{origin}"
    return f"session.{type_}.{origin}"


def _headers(type_: EventType, origin: str) -> dict[str, Any]:
    return {H_VERSION: SCHEMA_VERSION, H_TYPE: type_.value, H_ORIGIN: origin}


def event_row(ev: SessionEvent) -> list[Any]:
    """The wire row of one event, as msgpack carries it (``rows``: the outbox builds the same
    rows directly)."""
    head = (ev.seq, ev.time, ev.session_id, ev.sid_ctx, ev.expires)
    row: Row
    if ev.type is EventType.NEW:
        row = NewRow(*head, ev.der or b"", False)
    elif ev.type is EventType.GET:
        row = GetRow(*head, bool(ev.hit), ev.session_origin or "")
    elif ev.type is EventType.REMOVE:
        row = RemoveRow(*head, (ev.reason or RemoveReason.REVOKE).value)
    else:
        raise ValueError(f"not a session event type: {ev.type}")
    return list(row)


def encode_rows(
    type_: EventType,
    origin: str,
    rows: Sequence[Sequence[Any]],
    keys: BusKeys,
    *,
    now: float | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Seal a batch of wire rows (see ``event_row``) of one type from one origin."""
    if type_ not in (EventType.NEW, EventType.GET, EventType.REMOVE):
        raise ValueError(f"not a session event type: {type_}")
    plain = msgpack.packb([_time.time() if now is None else now, rows], use_bin_type=True)
    aad = _aad(SCHEMA_VERSION, type_.value, origin, _routing_key(type_.value, origin))
    body = keys.seal(plain, aad)
    return body, _headers(type_, origin)


def encode_batch(
    events: Sequence[SessionEvent], keys: BusKeys, *, now: float | None = None
) -> tuple[bytes, dict[str, Any]]:
    if not events:
        raise ValueError("empty batch")
    type_, origin = events[0].type, events[0].origin
    if any(e.type is not type_ or e.origin != origin for e in events):
        raise ValueError("a batch holds events of one type from one origin")
    return encode_rows(type_, origin, [event_row(e) for e in events], keys, now=now)


def _open(
    body: bytes, headers: Mapping[str, Any] | None, keys: BusKeys, limits: Limits,
    *, ring: bool = False,
) -> tuple[str, str, Any, Delivery | None, int, bytes]:
    """(type, origin, payload, delivery, counter, salt): authenticated, sender checked, parsed."""
    if len(body) > limits.max_message_bytes:
        raise EnvelopeError(Reason.OVERSIZE, f"{len(body)} bytes")
    headers = headers or {}
    version = headers.get(H_VERSION)
    if type(version) is not int:
        raise EnvelopeError(Reason.FIELD, "schema version header missing")
    if version not in SUPPORTED_VERSIONS:
        raise EnvelopeError(Reason.VERSION, f"schema version {version}")
    type_, origin = headers.get(H_TYPE), headers.get(H_ORIGIN)
    if isinstance(type_, bytes):
        type_ = type_.decode("utf-8", "replace")
    if isinstance(origin, bytes):
        origin = origin.decode("utf-8", "replace")
    if not isinstance(type_, str) or not isinstance(origin, str):
        raise EnvelopeError(Reason.FIELD, "type or origin header missing")
    if (type_ == EventType.KEYRING.value) is not ring:
        # A ring where sessions go or the reverse: refused on the clear header, unopened.
        raise EnvelopeError(Reason.TYPE, "a key ring on the session exchange" if not ring
                            else "expected a key ring")
    delivery = headers.get(X_DELIVERY)
    if not isinstance(delivery, Delivery):
        delivery = None  # decoded in-process (tests, tools), not received from a broker
    canonical = _routing_key(type_, origin)
    routing_key = canonical if delivery is None else delivery.routing_key
    aad = _aad(version, type_, origin, routing_key)
    # Authentication (and a ring's signature) before anything of the body is parsed.
    counter, salt = 0, b""
    if ring:
        plain = keys.open_ring(body, aad)
    else:
        opened = keys.open_session(body, aad)
        plain, counter, salt = opened.plaintext, opened.counter, opened.salt
    if delivery is not None:
        if routing_key != canonical:
            raise EnvelopeError(Reason.SENDER, "routing key does not match the origin")
        if delivery.user_id != origin and delivery.user_id not in keys.any_origin_users:
            raise EnvelopeError(Reason.SENDER, "user_id does not match the origin")
    # Authentic from here on: what follows catches bugs of key holders, not attackers.
    try:
        payload = msgpack.unpackb(plain, raw=False, strict_map_key=True)
    except Exception:
        raise EnvelopeError(Reason.MALFORMED, "payload is not msgpack") from None
    if type_ not in EventType._value2member_map_:
        raise EnvelopeError(Reason.TYPE, "unknown event type")
    if not valid_node_id(origin):
        raise EnvelopeError(Reason.FIELD, "origin is not a node id")
    return type_, origin, payload, delivery, counter, salt


def _num(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def decode_batch(
    body: bytes,
    headers: Mapping[str, Any] | None,
    keys: BusKeys,
    *,
    now: float | None = None,
    sid_ctx: bytes | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> DecodedBatch:
    """Open and validate a session-event message.

    ``sid_ctx``: when given, NEW events of another session id context (or opaque ones) are
    rejected with ``context``: a TLS node can use only its own service's sessions.
    """
    type_name, origin, payload, delivery, counter, salt = _open(body, headers, keys, limits)
    type_ = EventType(type_name)
    if type_ is EventType.KEYRING:
        raise EnvelopeError(Reason.TYPE, "a key ring on the session exchange")
    if (
        not isinstance(payload, list)
        or len(payload) != 2
        or not _num(payload[0])
        or not isinstance(payload[1], list)
    ):
        raise EnvelopeError(Reason.FIELD, "batch is not [time, events]")
    rows: list[Any] = payload[1]
    if len(rows) > limits.max_events:
        raise EnvelopeError(Reason.OVERSIZE, f"{len(rows)} events")
    now = _time.time() if now is None else now
    if delivery is not None and delivery.freshness is not None:
        delivery.freshness.check(origin, salt, counter, float(payload[0]), now,
                                 limits.session_lifetime, limits.clock_skew)
    out = DecodedBatch(type=type_, origin=origin, time=float(payload[0]))
    for i, row in enumerate(rows):
        try:
            out.events.append(_event(type_, origin, row, now, sid_ctx, limits))
        except EnvelopeError as exc:
            sid = row[2] if isinstance(row, list) and len(row) > 2 else None
            out.rejected.append(
                Rejected(i, exc.reason.value, sid if isinstance(sid, bytes) else None)
            )
    return out


def _event(
    type_: EventType,
    origin: str,
    row: Any,
    now: float,
    want_ctx: bytes | None,
    limits: Limits,
) -> SessionEvent:
    if not isinstance(row, list) or len(row) != ROW_LENGTH[type_]:
        raise EnvelopeError(Reason.FIELD, "event row shape")
    seq, t, sid, ctx, expires = row[:5]
    if (
        type(seq) is not int
        or seq < 0
        or not _num(t)
        or not _num(expires)
        or not isinstance(sid, bytes)
        or not 0 < len(sid) <= MAX_SESSION_ID
        or not isinstance(ctx, bytes)
        or len(ctx) > MAX_SID_CTX
    ):
        raise EnvelopeError(Reason.FIELD, "event header fields")
    if type_ is EventType.NEW:
        der, opaque = row[5], row[6]
        if not isinstance(der, bytes) or not der or type(opaque) is not bool:
            raise EnvelopeError(Reason.FIELD, "session bytes")
        if len(der) > limits.max_event_bytes:
            raise EnvelopeError(Reason.OVERSIZE, "session bytes")
        if expires <= now:
            raise EnvelopeError(Reason.EXPIRED)
        if want_ctx is not None and (opaque or ctx != want_ctx):
            raise EnvelopeError(Reason.CONTEXT)
        if not opaque:
            try:
                fields = parse_session(der)
            except DerError:
                raise EnvelopeError(Reason.FIELD, "session DER") from None
            if fields.session_id != sid:
                raise EnvelopeError(Reason.ID_MISMATCH)
            if fields.sid_ctx != ctx:
                raise EnvelopeError(Reason.CONTEXT, "DER sid_ctx differs from envelope")
        return SessionEvent(type_, origin, seq, float(t), sid, ctx, float(expires), der=der)
    if type_ is EventType.GET:
        hit, sorigin = row[5], row[6]
        if type(hit) is not bool or not isinstance(sorigin, str) or len(sorigin) > 63:
            raise EnvelopeError(Reason.FIELD, "get result")
        return SessionEvent(
            type_, origin, seq, float(t), sid, ctx, float(expires), hit=hit,
            session_origin=sorigin or None,
        )
    reason = _REMOVE_REASONS.get(row[5]) if isinstance(row[5], str) else None
    if reason is None:
        raise EnvelopeError(Reason.FIELD, "remove reason")
    # A tombstone lasts no longer than a session can: an absurd expiry would stay forever.
    capped = min(float(expires), now + limits.session_lifetime)
    return SessionEvent(type_, origin, seq, float(t), sid, ctx, capped, reason=reason)


# --- key ring -------------------------------------------------------------------------------


def encode_key_ring(
    ring: KeyRing, origin: str, keys: BusKeys, *, now: float | None = None
) -> tuple[bytes, dict[str, Any]]:
    rows = [
        [k.name, k.hmac_secret, k.aes_secret, k.published_at, k.encrypt_from, k.encrypt_until,
         k.erase_at]
        for k in ring.keys
    ]
    plain = msgpack.packb(
        [_time.time() if now is None else now, [ring.seq, ring.issued_at, rows]],
        use_bin_type=True,
    )
    kind = EventType.KEYRING.value
    body = keys.seal_ring(plain, _aad(SCHEMA_VERSION, kind, origin, _routing_key(kind, origin)))
    return body, _headers(EventType.KEYRING, origin)


def decode_key_ring(
    body: bytes,
    headers: Mapping[str, Any] | None,
    keys: BusKeys,
    *,
    limits: Limits = DEFAULT_LIMITS,
    now: float | None = None,
) -> KeyRing:
    """Open a key ring: sealed under a ring key, signed by a trusted signer (checked before it is
    parsed), issued no later than now + the clock skew."""
    type_name, _origin, payload, _d, _c, _s = _open(body, headers, keys, limits, ring=True)
    if type_name != EventType.KEYRING.value:
        raise EnvelopeError(Reason.TYPE, "expected a key ring")
    try:
        _t, (seq, issued_at, rows) = payload
        ring_keys = tuple(
            TicketKey(
                name=r[0], hmac_secret=r[1], aes_secret=r[2], published_at=float(r[3]),
                encrypt_from=float(r[4]), encrypt_until=float(r[5]), erase_at=float(r[6]),
            )
            for r in rows
        )
        if type(seq) is not int or not _num(issued_at):
            raise ValueError
    except (TypeError, ValueError, IndexError, KeyError):
        # never chain: the original exception could quote key bytes
        raise EnvelopeError(Reason.FIELD, "key ring fields") from None
    now = _time.time() if now is None else now
    if issued_at > now + limits.clock_skew:
        raise EnvelopeError(Reason.FUTURE, f"ring issued {issued_at - now:.0f}s ahead")
    return KeyRing(seq=seq, issued_at=float(issued_at), keys=ring_keys)
