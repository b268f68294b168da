"""Bad input: random and mutated envelopes, to the decoder and to a live consumer.

Decoder (hypothesis): random bytes and headers, mutations of genuine messages (bit flips,
truncation, splices, key-id swaps, header changes) and authentic-but-garbage payloads (what a
buggy key holder could send).  Every message is either rejected with an ``EnvelopeError`` whose
reason is a ``schemas.errors.Reason``, or accepted, and accepted only if it is authentic (the
very bytes and clear headers the farm sealed); nothing raises anything else, nothing hangs (a
deadline per example).

Named cases, each with the reason it must be rejected for: oversize, truncated, wrong version,
replayed after expiry, forged (wrong bus key, bit flips, a farm key id on random bytes, a
plaintext session without a seal, a changed clear header) and cross-context sessions.

Live consumer: 10,000 fuzzed messages (every named case plus random mutations, generated from a
seed) published to a ``Replicator`` on the shared broker (unique name prefix).  The consumer stays
up, the rejected count grows by exactly the number sent (with the reasons the decoder predicts),
the dead-letter queue holds every one, and a genuine session sent after them is applied.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import aio_pika
import msgpack
import pytest
from aio_pika.abc import AbstractRobustConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.reliability_table import record
from sessionbus.bus.topology import Topology, declare_core, session_routing_key
from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.consumer.replicator import Replicator, ReplicatorSettings
from sessionbus.metrics import Metrics
from sessionbus.schemas.codec import (
    CONTENT_TYPE,
    H_ORIGIN,
    H_REASON,
    H_TYPE,
    H_VERSION,
    DecodedBatch,
    Limits,
    _aad,
    _routing_key,
    decode_batch,
    encode_rows,
)
from sessionbus.schemas.errors import EnvelopeError, Reason
from sessionbus.schemas.events import MAX_SESSION_ID, MAX_SID_CTX, EventType
from sessionbus.schemas.sealing import KEY_ID_SIZE, SEAL_OVERHEAD, BusKeys
from sessionbus.schemas.session_der import parse_session
from tests.helpers_der import make_session_der
from tests.helpers_keys import farm_keys

CTX = b"sessionbus-test"
OTHER_CTX = b"another-service"
ORIGIN = "node-x"
KEYS = farm_keys()  # the farm's (hypothesis tests cannot take function fixtures)
ATTACKER = farm_keys()  # a key the farm does not hold
# small, so oversize messages stay cheap to send (the replicator of the live test uses them too)
LIMITS = Limits(max_message_bytes=64 << 10, max_events=256)
REASONS = frozenset(r.value for r in Reason)

FUZZ = settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)


# --- genuine messages ------------------------------------------------------------------------


def new_row(sid: bytes | None = None, *, ctx: bytes = CTX, der_ctx: bytes | None = None,
            der_sid: bytes | None = None, expires: float | None = None, seq: int = 1) -> list[Any]:
    sid = sid if sid is not None else os.urandom(32)
    now = time.time()
    exp = now + 600 if expires is None else expires
    der = make_session_der(der_sid or sid, ctx if der_ctx is None else der_ctx, int(now), 600)
    return [seq, now, sid, ctx, exp, der, False]


def remove_row(sid: bytes | None = None, seq: int = 1) -> list[Any]:
    return [seq, time.time(), sid or os.urandom(32), CTX, time.time() + 600, "revoke"]


def normal(body: bytes, headers: Mapping[str, Any]) -> tuple[Any, ...]:
    """What authenticity covers: the body and the clear headers as the decoder reads them."""

    def text(v: Any) -> Any:
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else v

    v = headers.get(H_VERSION)
    return (bytes(body), (type(v), v), text(headers.get(H_TYPE)), text(headers.get(H_ORIGIN)))


# Every message this module sealed with the farm key, as ``normal`` sees it: the only ones the
# decoder may accept.
SEALED: set[tuple[Any, ...]] = set()


def seal(type_: EventType, rows: list[list[Any]], keys: BusKeys = KEYS,
         origin: str = ORIGIN) -> tuple[bytes, dict[str, Any]]:
    body, headers = encode_rows(type_, origin, rows, keys)
    if keys is KEYS:
        SEALED.add(normal(body, headers))
    return body, headers


def seal_payload(payload: Any, type_: str = "new", origin: str = ORIGIN,
                 ) -> tuple[bytes, dict[str, Any]]:
    """Seal any msgpack payload with the farm key: what a buggy key holder could publish."""
    aad = _aad(1, type_, origin, _routing_key(type_, origin))  # clear headers + routing key
    body = KEYS.seal(msgpack.packb(payload, use_bin_type=True), aad)
    headers = {H_VERSION: 1, H_TYPE: type_, H_ORIGIN: origin}
    SEALED.add(normal(body, headers))
    return body, headers


GENUINE: list[tuple[bytes, dict[str, Any]]] = [
    seal(EventType.NEW, [new_row(seq=i) for i in range(1, 4)]),
    seal(EventType.NEW, [new_row()]),
    seal(EventType.REMOVE, [remove_row(seq=i) for i in range(1, 3)]),
    seal(EventType.GET, [[1, time.time(), os.urandom(32), CTX, time.time() + 600, True, "a"]]),
]


def judge(body: bytes, headers: Mapping[str, Any], *, sid_ctx: bytes | None = CTX,
          now: float | None = None) -> DecodedBatch | Reason:
    """Decode; return the batch or the reason. Fails the test on any other exception, on a reason
    outside ``Reason``, and on an accepted message that is not authentic."""
    try:
        batch = decode_batch(body, headers, KEYS, sid_ctx=sid_ctx, limits=LIMITS, now=now)
    except EnvelopeError as exc:
        assert exc.reason.value in REASONS
        return exc.reason
    assert normal(body, headers) in SEALED, "accepted a message the farm did not seal"
    for r in batch.rejected:
        assert r.reason in REASONS
    for ev in batch.events:  # whatever was accepted passed every check
        assert isinstance(ev.session_id, bytes) and 0 < len(ev.session_id) <= MAX_SESSION_ID
        assert len(ev.sid_ctx) <= MAX_SID_CTX
        if ev.type is EventType.NEW:
            assert ev.der and ev.expires > time.time() - 1
            if sid_ctx is not None:
                assert ev.sid_ctx == sid_ctx
                assert parse_session(ev.der).session_id == ev.session_id
    return batch


# --- strategies ------------------------------------------------------------------------------

header_values = st.one_of(
    st.none(), st.integers(-3, 300), st.booleans(), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=20),
    st.sampled_from(["new", "get", "remove", "keyring", "node-x", "node-a", b"new", b"node-x"]),
)


@st.composite
def headers_st(draw: st.DrawFn) -> dict[str, Any]:
    h: dict[str, Any] = {H_VERSION: 1, H_TYPE: "new", H_ORIGIN: ORIGIN}
    for name in draw(st.lists(st.sampled_from([H_VERSION, H_TYPE, H_ORIGIN]), max_size=3)):
        if draw(st.booleans()):
            h.pop(name, None)
        else:
            h[name] = draw(header_values)
    if draw(st.booleans()):
        h[draw(st.text(min_size=1, max_size=10))] = draw(header_values)  # an unrelated header
    return h


Mutation = Callable[[bytes], bytes]


@st.composite
def mutations(draw: st.DrawFn, body: bytes) -> bytes:
    """One to three structural mutations of ``body`` (which may leave it unchanged)."""
    for _ in range(draw(st.integers(1, 3))):
        n = len(body)
        op = draw(st.sampled_from(
            ["flip", "set", "truncate", "extend", "delete", "insert", "splice", "key_id"]))
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            body = body[:i] + bytes([body[i] ^ (1 << draw(st.integers(0, 7)))]) + body[i + 1:]
        elif op == "set" and n:
            i = draw(st.integers(0, n - 1))
            body = body[:i] + bytes([draw(st.integers(0, 255))]) + body[i + 1:]
        elif op == "truncate":
            body = body[: draw(st.integers(0, n))]
        elif op == "extend":
            body = body + draw(st.binary(min_size=1, max_size=64))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            body = body[:i] + body[i + draw(st.integers(1, 16)):]
        elif op == "insert":
            i = draw(st.integers(0, n))
            body = body[:i] + draw(st.binary(min_size=1, max_size=16)) + body[i:]
        elif op == "splice":
            other = draw(st.sampled_from(GENUINE))[0]
            body = body[: draw(st.integers(0, n))] + other[draw(st.integers(0, len(other))):]
        elif op == "key_id":
            kid = draw(st.sampled_from([ATTACKER.seal_key_id, os.urandom(KEY_ID_SIZE)]))
            body = body[:1] + kid + body[1 + KEY_ID_SIZE:]
    return body


msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
              st.floats(allow_nan=True), st.text(max_size=12), st.binary(max_size=40)),
    lambda children: st.one_of(st.lists(children, max_size=8),
                               st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=30,
)


@st.composite
def rows_like(draw: st.DrawFn) -> list[Any]:
    """Rows close to real ones: the right length, fields drawn from plausible and wrong values."""
    now = time.time()
    sid = draw(st.one_of(st.binary(min_size=0, max_size=300), st.just(os.urandom(32))))
    fields = [
        st.one_of(st.integers(-5, 2**64 - 1), msgpack_values),  # seq
        st.one_of(st.just(now), st.floats(allow_nan=True), msgpack_values),  # time
        st.one_of(st.just(sid), msgpack_values),  # session id
        st.one_of(st.just(CTX), st.just(OTHER_CTX), st.binary(max_size=40)),  # sid_ctx
        st.one_of(st.just(now + 600), st.just(now - 1), st.floats(allow_nan=True)),  # expires
        st.one_of(st.just(make_session_der(sid or b"x", CTX, int(now), 600)),
                  st.binary(max_size=64), msgpack_values, st.sampled_from(["revoke", "x"])),
        st.one_of(st.booleans(), msgpack_values),
    ]
    n = draw(st.sampled_from([5, 6, 7, 8]))
    return [draw(f) for f in fields[:n]] + [None] * max(0, n - len(fields))


# --- decoder: properties ---------------------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=2048), headers=headers_st())
def test_random_envelopes_are_rejected_with_a_reason(body: bytes, headers: dict[str, Any]) -> None:
    assert isinstance(judge(body, headers), Reason)


@FUZZ
@given(data=st.data())
def test_mutated_genuine_envelopes_are_rejected_unless_unchanged(data: st.DataObject) -> None:
    body, headers = data.draw(st.sampled_from(GENUINE))
    mutated_body = data.draw(mutations(body)) if data.draw(st.booleans()) else body
    mutated_headers = data.draw(headers_st()) if data.draw(st.booleans()) else dict(headers)
    result = judge(mutated_body, mutated_headers)
    if normal(mutated_body, mutated_headers) in SEALED:
        assert isinstance(result, DecodedBatch)  # nothing that matters changed
    else:
        assert isinstance(result, Reason)


@FUZZ
@given(payload=msgpack_values, type_=st.sampled_from(["new", "get", "remove", "keyring"]))
def test_authentic_garbage_payloads_never_crash_the_decoder(payload: Any, type_: str) -> None:
    judge(*seal_payload(payload, type_))


@settings(FUZZ, max_examples=120)
@given(t=st.one_of(st.just(time.time()), msgpack_values),
       rows=st.lists(rows_like(), max_size=6), type_=st.sampled_from(["new", "get", "remove"]))
def test_authentic_batches_of_odd_rows_reject_each_bad_event(
    t: Any, rows: list[Any], type_: str,
) -> None:
    result = judge(*seal_payload([t, rows], type_))
    if isinstance(result, DecodedBatch):
        assert len(result.events) + len(result.rejected) == len(rows)


# --- decoder: named cases --------------------------------------------------------------------


def _flip(body: bytes, i: int) -> bytes:
    return body[:i] + bytes([body[i] ^ 0x40]) + body[i + 1:]


def named_case(name: str, rng: random.Random) -> tuple[bytes, dict[str, Any], Reason]:
    """A message of the named kind (one event at most) and the reason it must get."""
    h = {H_VERSION: 1, H_TYPE: "new", H_ORIGIN: ORIGIN}
    if name == "oversize":
        return rng.randbytes(LIMITS.max_message_bytes + 1 + rng.randrange(4096)), h, \
            Reason.OVERSIZE
    if name == "oversize-event-count":
        rows = [remove_row() for _ in range(LIMITS.max_events + 1)]
        return *seal(EventType.REMOVE, rows), Reason.OVERSIZE
    if name == "oversize-session":
        sid = os.urandom(32)
        der = make_session_der(sid, CTX, int(time.time()), 600,
                               master_key=rng.randbytes(LIMITS.max_event_bytes))
        return *seal(EventType.NEW, [[1, time.time(), sid, CTX, time.time() + 600, der, False]]), \
            Reason.OVERSIZE
    if name == "truncated":
        return rng.randbytes(rng.randrange(32)), h, Reason.TRUNCATED
    if name == "truncated-genuine":
        body, hh = seal(EventType.NEW, [new_row()])
        return body[: rng.randrange(SEAL_OVERHEAD, len(body))], hh, Reason.FORGED
    if name == "wrong-version":
        body, hh = seal(EventType.NEW, [new_row()])
        return body, {**hh, H_VERSION: rng.choice([0, 2, 3, 99, 255])}, Reason.VERSION
    if name == "missing-version":
        body, hh = seal(EventType.NEW, [new_row()])
        return body, {k: v for k, v in hh.items() if k != H_VERSION}, Reason.FIELD
    if name == "replayed-expired":
        # genuine when captured; replayed after the session expired
        return *seal(EventType.NEW, [new_row(expires=time.time() - rng.uniform(0.5, 3600))]), \
            Reason.EXPIRED
    if name == "forged-wrong-key":
        return *seal(EventType.NEW, [new_row()], ATTACKER), Reason.UNKNOWN_KEY
    if name == "forged-bit-flip":
        body, hh = seal(EventType.NEW, [new_row()])
        # any byte but the key id (which only selects a key: altered, it is unknown_key)
        i = rng.choice([0, *range(1 + KEY_ID_SIZE, len(body))])
        return _flip(body, i), hh, Reason.FORGED
    if name == "forged-farm-key-id":
        return (b"\x02" + KEYS.seal_key_id + rng.randbytes(rng.randrange(SEAL_OVERHEAD, 600)),
                h, Reason.FORGED)
    if name == "forged-plaintext":
        return msgpack.packb([time.time(), [new_row()]], use_bin_type=True), h, Reason.FORGED
    if name == "forged-header-type":
        body, hh = seal(EventType.NEW, [new_row()])
        return body, {**hh, H_TYPE: "remove"}, Reason.FORGED
    if name == "forged-header-origin":
        body, hh = seal(EventType.NEW, [new_row()])
        return body, {**hh, H_ORIGIN: "node-y"}, Reason.FORGED
    if name == "cross-context":
        return *seal(EventType.NEW, [new_row(ctx=OTHER_CTX)]), Reason.CONTEXT
    if name == "cross-context-der":
        return *seal(EventType.NEW, [new_row(der_ctx=OTHER_CTX)]), Reason.CONTEXT
    if name == "id-mismatch":
        return *seal(EventType.NEW, [new_row(der_sid=os.urandom(32))]), Reason.ID_MISMATCH
    if name == "authentic-malformed":
        body = KEYS.seal(b"\xc1" + rng.randbytes(8),
                         _aad(1, "new", ORIGIN, _routing_key("new", ORIGIN)))
        return body, h, Reason.MALFORMED
    if name == "authentic-bad-shape":
        return *seal_payload([time.time(), "not rows"]), Reason.FIELD
    raise ValueError(name)


NAMED = [
    "oversize", "oversize-event-count", "oversize-session", "truncated", "truncated-genuine",
    "wrong-version", "missing-version", "replayed-expired", "forged-wrong-key",
    "forged-bit-flip", "forged-farm-key-id", "forged-plaintext", "forged-header-type",
    "forged-header-origin", "cross-context", "cross-context-der", "id-mismatch",
    "authentic-malformed", "authentic-bad-shape",
]


def verdict(result: DecodedBatch | Reason) -> Reason | None:
    """The one reason a message is rejected for, or None if anything in it was accepted."""
    if isinstance(result, Reason):
        return result
    if result.events:
        return None
    reasons = {r.reason for r in result.rejected}
    return Reason(reasons.pop()) if len(reasons) == 1 else None


@pytest.mark.parametrize("name", NAMED)
def test_named_bad_input_is_rejected_for_its_reason(name: str) -> None:
    rng = random.Random(name)
    for _ in range(20):
        body, headers, want = named_case(name, rng)
        assert verdict(judge(body, headers)) is want, name


def test_every_single_bit_flip_of_a_genuine_new_is_forged() -> None:
    body, headers = seal(EventType.NEW, [new_row()])
    for i in range(len(body)):
        for bit in range(8):
            flipped = body[:i] + bytes([body[i] ^ (1 << bit)]) + body[i + 1:]
            # the key id only selects a key: altered, it names one nobody holds
            want = Reason.UNKNOWN_KEY if 1 <= i <= KEY_ID_SIZE else Reason.FORGED
            assert judge(flipped, headers) is want


def test_a_replayed_message_is_accepted_until_its_session_expires() -> None:
    """Replay of a genuine NEW is harmless while the session lives (idempotent upsert of the same
    session) and rejected after: a replay can never extend a session's life."""
    row = new_row(expires=time.time() + 60)
    body, headers = seal(EventType.NEW, [row])
    assert verdict(judge(body, headers)) is None
    assert verdict(judge(body, headers, now=time.time() + 61)) is Reason.EXPIRED


def test_cross_context_sessions_are_rejected_only_where_contexts_are_checked() -> None:
    body, headers = seal(EventType.NEW, [new_row(ctx=OTHER_CTX)])
    assert verdict(judge(body, headers, sid_ctx=CTX)) is Reason.CONTEXT
    assert verdict(judge(body, headers, sid_ctx=OTHER_CTX)) is None  # that service's own nodes
    assert verdict(judge(body, headers, sid_ctx=None)) is None  # a cache front takes every one


# --- the live consumer -----------------------------------------------------------------------

LIVE_MESSAGES = 10_000
MUTATED = "mutated"  # random mutations of genuine one-event messages


def live_message(i: int, rng: random.Random) -> tuple[str, bytes, dict[str, Any], Reason]:
    """Message ``i`` of the live run: a named case, random bytes, or a random mutation."""
    pick = i % (len(NAMED) + 2)
    if pick < len(NAMED):
        name = NAMED[pick]
        body, headers, want = named_case(name, rng)
        return name, body, headers, want
    if pick == len(NAMED):
        h = {H_VERSION: 1, H_TYPE: rng.choice(["new", "remove"]), H_ORIGIN: ORIGIN}
        body = rng.randbytes(rng.randrange(0, 3000))
        return "random-bytes", body, h, verdict(judge(body, h))  # type: ignore[return-value]
    while True:  # a mutation that changes the body (an unchanged one would be accepted)
        body, headers = seal(EventType.NEW, [new_row()])
        mutated = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            if not mutated:
                break
            op = rng.randrange(4)
            j = rng.randrange(len(mutated))
            if op == 0:
                mutated[j] ^= 1 << rng.randrange(8)
            elif op == 1:
                del mutated[j: j + rng.randrange(1, 16)]
            elif op == 2:
                mutated[j:j] = rng.randbytes(rng.randrange(1, 16))
            else:
                mutated = mutated[:j]
        if bytes(mutated) != body:
            return MUTATED, bytes(mutated), headers, verdict(judge(bytes(mutated), headers))  # type: ignore[return-value]


def routing_key_of(headers: Mapping[str, Any], default: str) -> str:
    """The routing key a sender of the message's type publishes on (the routing key is in the
    associated data: a REMOVE sent on the NEW key is forged)."""
    t = headers.get(H_TYPE)
    return session_routing_key(EventType(t), ORIGIN) if t in ("new", "get", "remove") else default


METRICS = Metrics()  # this module's own registry: what its components count


def rejected_total() -> dict[str, float]:
    return {r: METRICS.value("sessionbus_events_rejected_total", {"reason": r})
            for r in REASONS}


def dead_lettered_total() -> float:
    return sum(METRICS.value("sessionbus_messages_dead_lettered_total",
               {"reason": r}) for r in REASONS)


@pytest.mark.broker
@pytest.mark.slow
async def test_10000_fuzzed_messages_to_a_live_consumer(
    connection: AbstractRobustConnection, topology: Topology, declared_queues: list[str],
) -> None:
    rng = random.Random(20261123)
    messages = [live_message(i, rng) for i in range(LIVE_MESSAGES)]
    assert all(isinstance(m[3], Reason) for m in messages), "a fuzzed message would be accepted"
    want = Counter(m[3].value for m in messages)
    ch = await connection.channel()
    await declare_core(ch, topology)
    await ch.close()
    node = "fuzz-replica"
    replica = Replicator(connection, topology, KEYS, PeerCache(),
                         ReplicatorSettings(node_id=node, sid_ctx=CTX, replay=False),
                         limits=LIMITS, metrics=METRICS)
    before, dead_before = rejected_total(), dead_lettered_total()
    await replica.start()
    try:
        async with asyncio.timeout(240):
            t0 = time.monotonic()
            pub = await connection.channel(publisher_confirms=True)
            x = await pub.get_exchange(topology.sessions_exchange)
            key = session_routing_key(EventType.NEW, ORIGIN)
            for start in range(0, LIVE_MESSAGES, 256):
                await asyncio.gather(*(
                    x.publish(aio_pika.Message(body, headers=headers, content_type=CONTENT_TYPE,
                                     user_id="guest"),
                              routing_key_of(headers, key))
                    for _, body, headers, _ in messages[start:start + 256]
                ))
            t_sent = time.monotonic()

            def rejected_now() -> float:
                now = rejected_total()
                return sum(now[r] - before[r] for r in REASONS)

            while rejected_now() < LIVE_MESSAGES:
                await asyncio.sleep(0.1)
            t_done = time.monotonic()
            # the consumer is still up: a genuine session after all that is applied
            sid = os.urandom(32)
            body, headers = seal(EventType.NEW, [new_row(sid)])
            await x.publish(aio_pika.Message(body, headers=headers, content_type=CONTENT_TYPE,
                                     user_id="guest"),
                            key)
            while sid not in replica.cache:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # nothing more may be counted
            got = {r: v - before[r] for r, v in rejected_total().items()}
            assert sum(got.values()) == LIVE_MESSAGES
            assert {r: int(v) for r, v in got.items() if v} == dict(want)
            assert dead_lettered_total() - dead_before == LIVE_MESSAGES
            dead = await pub.declare_queue(topology.dead_queue, passive=True)
            assert dead.declaration_result.message_count == LIVE_MESSAGES
            # the copies carry their reason
            sample = await dead.get(no_ack=False, timeout=5)
            assert sample.headers[H_REASON] in REASONS
            await sample.nack(requeue=True)
            await pub.close()
    finally:
        await replica.stop(5)
    kinds = Counter(m[0] for m in messages)
    record(
        "bad input: 10,000 fuzzed messages to a live replicator",
        injected=(f"{LIVE_MESSAGES:,} messages: {len(NAMED)} named cases "
                  f"(~{kinds['oversize']} each), {kinds['random-bytes']} random, "
                  f"{kinds[MUTATED]} mutated genuine; published in {t_sent - t0:.1f} s"),
        lost=0, rejected=LIVE_MESSAGES, recover_s=None,
        note=("consumer stayed up (a genuine session after them applied); rejected = sent, by "
              "reason: " + ", ".join(f"{r} {n:,}" for r, n in want.most_common())
              + f"; dead-letter queue holds {LIVE_MESSAGES:,}; all judged "
              f"{t_done - t0:.1f} s after the first was sent"),
        group="bad-input",
    )
