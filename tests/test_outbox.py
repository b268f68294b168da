"""The outbox without a broker: bounded, drops GET first, batches keep each session's order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sessionbus.bus.topology import Topology
from sessionbus.metrics import Metrics
from sessionbus.producer.outbox import Outbox, OutboxSettings
from sessionbus.schemas.codec import DEFAULT_LIMITS, decode_batch, encode_rows
from sessionbus.schemas.events import EventType, RemoveReason
from tests.helpers_keys import farm_keys

KEYS = farm_keys()
METRICS = Metrics()  # this module's own registry: what its components count


def dropped(type_: str) -> float:
    return METRICS.value("sessionbus_events_dropped_total", {"type": type_})


def put(box: Outbox, type_: EventType, sid: bytes) -> None:
    if type_ is EventType.NEW:
        box.put_new(sid, b"ctx", 1e10, b"der")
    elif type_ is EventType.GET:
        box.put_get(sid, b"ctx", 1e10, True, "a")
    else:
        box.put_remove(sid, b"ctx", 1e10, RemoveReason.REVOKE)


def drain(box: Outbox, everything: bool = True) -> list[tuple[EventType, list[list[object]]]]:
    batches = []
    while (taken := box._take(everything)) is not None:
        batches.append(taken)
    return batches


def test_full_outbox_drops_get_first_and_counts() -> None:
    box = Outbox("node-a", Topology(), KEYS, OutboxSettings(capacity=10), metrics=METRICS)
    before = {t: dropped(t) for t in ("new", "get", "remove")}
    for i in range(6):
        put(box, EventType.GET, bytes([i]))
    for i in range(8):
        put(box, EventType.NEW, bytes([100 + i]))
    assert box.depth == 10
    assert dropped("get") - before["get"] == 4  # room for NEW came from statistics
    put(box, EventType.GET, b"late")  # full and the newcomer is a GET: it goes
    assert dropped("get") - before["get"] == 5
    for i in range(3):
        put(box, EventType.REMOVE, bytes([200 + i]))
    assert box.depth == 10
    batches = drain(box)
    kinds = {t: sum(len(rows) for tt, rows in batches if tt is t) for t in EventType}
    assert kinds[EventType.REMOVE] == 3 and kinds[EventType.GET] == 0
    assert kinds[EventType.NEW] == 7  # the oldest NEW made room once GETs were gone
    assert dropped("new") - before["new"] == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([EventType.NEW, EventType.GET, EventType.REMOVE]),
                          st.integers(0, 7)), max_size=300),
       st.integers(1, 20))
def test_batches_keep_every_sessions_order(events: list[tuple[EventType, int]],
                                           batch_max: int) -> None:
    box = Outbox("node-a", Topology(), KEYS,
                  OutboxSettings(batch_max=batch_max, get_batch_max=batch_max + 3), metrics=METRICS)
    for type_, s in events:
        put(box, type_, bytes([s]))
    # first what may go while GETs are held (a NEW or REMOVE behind an older GET of its
    # session takes the GETs with it), then the rest
    batches = drain(box, everything=False) + drain(box)
    assert all(0 < len(rows) <= (batch_max + 3 if t is EventType.GET else batch_max)
               for t, rows in batches)
    assert all(len({t}) == 1 for t, _ in batches)
    out = [(row[0], row[2]) for _, rows in batches for row in rows]
    assert sorted(seq for seq, _ in out) == list(range(1, len(events) + 1))  # each exactly once
    by_session: dict[bytes, list[int]] = {}
    for seq, sid in out:
        by_session.setdefault(sid, []).append(seq)  # type: ignore[arg-type]
    for seqs in by_session.values():
        assert seqs == sorted(seqs)


def test_new_batches_are_bounded_by_bytes_as_well() -> None:
    """Large sessions (client certificate chains) must not add up past receivers' limit."""


    box = Outbox("node-a", Topology(), KEYS, OutboxSettings(batch_bytes=64 * 1024), metrics=METRICS)
    for i in range(40):
        box.put_new(bytes([i]) * 32, b"ctx", 1e10, b"x" * 15_000, opaque=True)
    batches = drain(box)
    assert sum(len(rows) for _, rows in batches) == 40
    for _, rows in batches:
        assert sum(len(r[5]) for r in rows) <= 64 * 1024
        body, headers = encode_rows(EventType.NEW, "node-a", rows, KEYS)
        assert len(body) <= DEFAULT_LIMITS.max_message_bytes
        assert len(decode_batch(body, headers, KEYS).events) == len(rows)


def test_gets_are_held_and_do_not_wake_the_publisher_one_by_one() -> None:
    box = Outbox("a", Topology("t"), KEYS,
                 OutboxSettings(batch_max=2, get_batch_max=4, get_linger=0.25), metrics=METRICS)
    put(box, EventType.GET, b"s1")
    assert box._wake.is_set()  # from empty: the publisher must start the hold
    assert 0.2 < box._hold() <= 0.25
    box._wake.clear()
    put(box, EventType.GET, b"s2")
    put(box, EventType.GET, b"s3")
    assert not box._wake.is_set()  # held GETs joining: nothing changes for the publisher
    put(box, EventType.GET, b"s4")
    assert box._wake.is_set() and box._hold() == 0.0  # a full batch goes at once
    box._wake.clear()
    drain(box)
    put(box, EventType.GET, b"s5")
    box._wake.clear()
    put(box, EventType.NEW, b"s6")
    assert box._wake.is_set() and box._hold() == 0.0  # NEW goes at once by default
    assert [(t, len(rows)) for t, rows in drain(box, everything=False)] == [(EventType.NEW, 1)]
    put(box, EventType.REMOVE, b"s5")  # behind a held GET of its session: the GET goes first
    assert [(t, len(rows)) for t, rows in drain(box, everything=False)] == [
        (EventType.GET, 1), (EventType.REMOVE, 1)]


def test_min_interval_spaces_messages_of_a_type_and_lets_the_first_go_at_once() -> None:
    box = Outbox("a", Topology("t"), KEYS, OutboxSettings(batch_max=3, min_interval=0.05),
                 metrics=METRICS)
    put(box, EventType.NEW, b"s1")
    assert box._wake.is_set() and box._hold() == 0.0  # after a quiet spell: at once
    assert [(t, len(r)) for t, r in drain(box, everything=False)] == [(EventType.NEW, 1)]
    box._wake.clear()
    put(box, EventType.NEW, b"s2")
    assert box._wake.is_set()  # from empty: the publisher must learn the next slot
    assert 0.0 < box._hold() <= 0.05  # a NEW message just left: wait for the next slot
    assert drain(box, everything=False) == []
    box._wake.clear()
    put(box, EventType.NEW, b"s3")
    assert not box._wake.is_set()  # it shares the slot s2 waits for
    put(box, EventType.REMOVE, b"s9")
    assert box._hold() == 0.0  # REMOVE has slots of its own
    assert [(t, len(r)) for t, r in drain(box, everything=False)] == [(EventType.REMOVE, 1)]
    put(box, EventType.NEW, b"s4")
    assert box._wake.is_set() and box._hold() == 0.0  # three NEWs: a full batch goes
    assert [(t, len(r)) for t, r in drain(box, everything=False)] == [(EventType.NEW, 3)]


def test_an_event_behind_an_older_one_of_its_session_waits_for_it() -> None:
    box = Outbox("a", Topology("t"), KEYS, OutboxSettings(min_interval=0.05), metrics=METRICS)
    put(box, EventType.REMOVE, b"s1")
    drain(box, everything=False)  # a REMOVE message just left
    put(box, EventType.REMOVE, b"s1")  # waits for REMOVE's next slot
    put(box, EventType.NEW, b"s1")  # NEW is due, but the older REMOVE of s1 goes first
    assert [t for t, _ in drain(box, everything=False)] == [EventType.REMOVE, EventType.NEW]


def test_waiting_events_are_due_after_the_interval() -> None:
    box = Outbox("a", Topology("t"), KEYS, OutboxSettings(min_interval=0.05), metrics=METRICS)
    put(box, EventType.REMOVE, b"s1")
    drain(box, everything=False)
    put(box, EventType.REMOVE, b"s2")
    assert box._hold() > 0.0
    box._last_taken[EventType.REMOVE] -= 0.06  # the last REMOVE message left 60 ms ago
    assert box._hold() == 0.0
