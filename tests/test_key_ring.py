"""The ticket-key timeline (sessionbus.keys.ring): pure, no broker."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessionbus.keys.ring import (
    DEFAULT_ANNOUNCE_AHEAD,
    DEFAULT_KEEP,
    DEFAULT_ROTATE_EVERY,
    Timeline,
    added_keys,
    advance,
    describe,
)
from sessionbus.schemas.codec import decode_key_ring, encode_key_ring
from sessionbus.schemas.ticket_keys import KeyRing, KeyState, TicketKey
from tests.helpers_keys import farm_keys

T0 = 1_800_000_000.0


def run_on_time(tl: Timeline, start: float, until: float) -> list[tuple[float, KeyRing]]:
    """A publisher that wakes exactly at every change: [(time, ring held from then)]."""
    ring, nxt = advance(None, start, tl)
    out = [(start, ring)]
    while nxt < until:
        new, nxt2 = advance(ring, nxt, tl)
        assert nxt2 > nxt
        if new is not ring:
            out.append((nxt, new))
        ring, nxt = new, nxt2
    return out


def held_at(history: list[tuple[float, KeyRing]], t: float) -> KeyRing:
    ring = history[0][1]
    for when, r in history:
        if when <= t:
            ring = r
    return ring


def secret_forms(key: TicketKey) -> list[str]:
    forms = []
    for secret in (key.hmac_secret, key.aes_secret):
        forms += [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
                  base64.urlsafe_b64encode(secret).decode().rstrip("=")]
    return forms


# --- defaults and validation ---------------------------------------------------------------


def test_defaults_hourly_two_kept_one_minute_ahead() -> None:
    tl = Timeline()
    assert (tl.rotate_every, tl.keep, tl.announce_ahead) == (3600, 2, 60)
    assert (DEFAULT_ROTATE_EVERY, DEFAULT_KEEP, DEFAULT_ANNOUNCE_AHEAD) == (3600, 2, 60)
    # tickets live no longer than the decrypt-only window: the node's default session timeout
    assert tl.decrypt_window == 7200
    assert tl.refresh_every == 60
    assert Timeline(rotate_every=2, keep=2, announce_ahead=1).refresh_every == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rotate_every": 0},
        {"rotate_every": -1},
        {"keep": 0},
        {"keep": 1.5},
        {"keep": True},
        {"announce_ahead": 0},
        {"announce_ahead": 3601},
    ],
)
def test_timeline_rejects(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Timeline(**kwargs)  # type: ignore[arg-type]


def test_announce_ahead_may_equal_rotate_every() -> None:
    Timeline(rotate_every=10, keep=1, announce_ahead=10)


# --- the timeline ---------------------------------------------------------------------------


def test_first_key_is_announced_before_it_encrypts() -> None:
    tl = Timeline(rotate_every=3600, keep=2, announce_ahead=60)
    ring, nxt = advance(None, T0, tl)
    assert ring.seq == 1 and ring.issued_at == T0 and len(ring.keys) == 1
    (k,) = ring.keys
    assert (k.published_at, k.encrypt_from, k.encrypt_until, k.erase_at) == (
        T0, T0 + 60, T0 + 3660, T0 + 3660 + 7200
    )
    assert ring.current(T0) is None  # nobody encrypts during the first margin
    assert ring.current(T0 + 60) is k
    assert nxt == k.encrypt_until - 60  # the next key is due one margin before the rotation


def test_nothing_due_returns_the_same_ring() -> None:
    tl = Timeline(rotate_every=100, keep=2, announce_ahead=10)
    ring, nxt = advance(None, T0, tl)
    again, nxt2 = advance(ring, T0 + 5, tl)
    assert again is ring and nxt2 == nxt


@pytest.mark.parametrize(("r", "k", "m"), [(3600, 2, 60), (2, 2, 1), (10, 1, 10), (7, 3, 0.5)])
def test_steady_state_back_to_back_windows(r: float, k: int, m: float) -> None:
    tl = Timeline(rotate_every=r, keep=k, announce_ahead=m)
    history = run_on_time(tl, T0, T0 + 20 * r)
    all_keys: dict[bytes, TicketKey] = {}
    for when, ring in history:
        for key in ring.keys:
            # a key, once published, never changes (secrets or times)
            assert all_keys.setdefault(key.name, key) == key
            assert when < key.erase_at
        assert len(ring.keys) <= k + 2
        # with no publisher from here on, nodes still mint for more than K*R + M
        assert max(key.erase_at for key in ring.keys) > when + k * r + m
    keys = sorted(all_keys.values(), key=lambda x: x.encrypt_from)
    assert len(keys) >= 19
    for a, b in itertools.pairwise(keys):
        assert b.encrypt_from == a.encrypt_until  # back to back
    for key in keys[1:]:
        assert key.published_at == key.encrypt_from - m
        assert key.encrypt_until - key.encrypt_from == r
        assert key.erase_at == key.encrypt_until + k * r
    # seq and issue time only go up
    order = [(ring.issued_at, ring.seq) for _, ring in history]
    assert order == sorted(order) and len(set(order)) == len(order)


def test_every_ticket_decrypts_for_the_whole_decrypt_window() -> None:
    tl = Timeline(rotate_every=2, keep=2, announce_ahead=1)
    history = run_on_time(tl, T0, T0 + 40)
    step = 0.05
    t = T0 + 1.0
    while t < T0 + 30:
        minted_with = held_at(history, t).current(t)
        assert minted_with is not None and minted_with.state(t) is KeyState.CURRENT
        # announced at least one margin before it encrypts: every node has had it for M
        assert minted_with.published_at <= minted_with.encrypt_from - tl.announce_ahead
        u = t
        while u < t + tl.decrypt_window:
            assert held_at(history, u).by_name(minted_with.name, u) is not None, (t, u)
            u += 0.25
        t += step


def test_erased_keys_are_dropped() -> None:
    tl = Timeline(rotate_every=2, keep=2, announce_ahead=1)
    history = run_on_time(tl, T0, T0 + 30)
    first = history[0][1].keys[0]
    later = held_at(history, first.erase_at)
    assert first.name not in {k.name for k in later.keys}
    before = held_at(history, first.erase_at - 0.01)
    assert first.name in {k.name for k in before.keys}
    # a ticket under it now gets a full handshake
    assert later.by_name(first.name, first.erase_at) is None


def test_continues_a_ring_read_back_after_failover() -> None:
    """A second publisher decodes the ring from the stream and carries on its timeline."""
    tl = Timeline(rotate_every=10, keep=2, announce_ahead=2)
    history = run_on_time(tl, T0, T0 + 35)
    when, last = history[-1]
    bus = farm_keys(b"k" * 32)
    body, headers = encode_key_ring(last, "keys-a", bus)
    read_back = decode_key_ring(body, headers, bus, now=when)
    # the new leader takes over a little later, before anything is due
    t = when + 1
    same, nxt = advance(read_back, t, tl)
    assert same is read_back
    new, _ = advance(read_back, nxt, tl)
    assert new.seq == last.seq + 1 and new.issued_at >= last.issued_at
    old = {k.name: k for k in last.keys}
    for k in new.keys:
        if k.name in old:
            assert k == old[k.name]  # secrets and times unchanged
    assert added_keys(read_back, new) == 1
    newest_old = max(last.keys, key=lambda k: k.encrypt_from)
    (added,) = [k for k in new.keys if k.name not in old]
    assert added.encrypt_from == newest_old.encrypt_until  # no gap, no overlap
    assert added.published_at == added.encrypt_from - tl.announce_ahead


def test_waking_a_little_late_keeps_windows_back_to_back_with_early() -> None:
    tl = Timeline(rotate_every=10, keep=2, announce_ahead=2)
    ring, due = advance(None, T0, tl, early=0.5)
    (k1,) = ring.keys
    assert due == k1.encrypt_until - 2 - 0.5
    new, _ = advance(ring, due + 0.4, tl, early=0.5)  # woke 0.4 s late: still in time
    (k2,) = [k for k in new.keys if k.name != k1.name]
    assert k2.encrypt_from == k1.encrypt_until
    assert k2.encrypt_from - (due + 0.4) >= tl.announce_ahead  # on the bus for >= M
    # without the allowance the same late wake-up starts the next window late
    late, _ = advance(ring, k1.encrypt_until - 2 + 0.4, tl)
    (k2b,) = [k for k in late.keys if k.name != k1.name]
    assert k2b.encrypt_from == k1.encrypt_until + 0.4
    with pytest.raises(ValueError):
        advance(ring, T0, tl, early=-1)


def test_late_takeover_announces_a_full_margin_and_keeps_the_old_key_encrypting() -> None:
    tl = Timeline(rotate_every=10, keep=2, announce_ahead=2)
    ring, due = advance(None, T0, tl)
    (k1,) = ring.keys
    late = k1.encrypt_until + 3  # the new key was due at encrypt_until - 2: 5 s late
    new, _ = advance(ring, late, tl)
    (k2,) = [k for k in new.keys if k.name != k1.name]
    assert k2.published_at == late and k2.encrypt_from == late + tl.announce_ahead
    # until then the old key still encrypts, so nodes never run without a current key
    assert new.current(late) == k1 and new.current(late + 1.9) == k1
    assert new.current(late + 2) == k2
    assert due < late


def test_after_a_long_outage_a_new_timeline_starts() -> None:
    tl = Timeline(rotate_every=10, keep=1, announce_ahead=2)
    ring, _ = advance(None, T0, tl)
    much_later = T0 + 1000
    new, nxt = advance(ring, much_later, tl)
    assert new.seq == 2
    assert all(k.name not in {o.name for o in ring.keys} for k in new.keys)
    (k,) = new.keys
    assert k.encrypt_from == much_later + 2 and nxt == k.encrypt_until - 2


def test_rotate_every_changed_between_publishers() -> None:
    ring, nxt = advance(None, T0, Timeline(rotate_every=10, keep=1, announce_ahead=2))
    tl2 = Timeline(rotate_every=30, keep=2, announce_ahead=5)
    # announce-ahead grew: the next key is due earlier than the old publisher planned
    new, _ = advance(ring, nxt - 3, tl2)
    (k1,) = ring.keys
    (k2,) = [k for k in new.keys if k.name != k1.name]
    assert new.keys[0] == k1
    assert k2.encrypt_from == k1.encrypt_until and k2.encrypt_until - k2.encrypt_from == 30


def test_issue_time_never_goes_back_when_this_clock_is_behind() -> None:
    tl = Timeline(rotate_every=10, keep=1, announce_ahead=2)
    ring, _ = advance(None, T0, tl)
    ahead = KeyRing(seq=7, issued_at=T0 + 50, keys=ring.keys)
    new, _ = advance(ahead, T0 + 10, tl)  # the next key is due; this clock is 40 s behind
    assert new is not ahead and (new.issued_at, new.seq) > (ahead.issued_at, ahead.seq)


def test_summary_and_reprs_never_show_secrets() -> None:
    tl = Timeline(rotate_every=2, keep=2, announce_ahead=1)
    history = run_on_time(tl, T0, T0 + 10)
    for when, ring in history:
        text = describe(ring, when) + repr(ring) + str(ring) + repr(list(ring.keys))
        for key in ring.keys:
            for form in secret_forms(key):
                assert form not in text
    with pytest.raises(ValueError) as err:
        TicketKey(name=b"n" * 16, hmac_secret=b"s" * 31, aes_secret=b"a" * 32,
                  published_at=0, encrypt_from=1, encrypt_until=2, erase_at=3)
    assert "sss" not in str(err.value) and "aaa" not in str(err.value)


# --- property: any wake-up pattern that is never late ---------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    r=st.floats(min_value=1, max_value=10_000),
    k=st.integers(min_value=1, max_value=5),
    m_frac=st.floats(min_value=0.01, max_value=1.0),
    early_frac=st.sampled_from([0.0, 0.1, 0.25]),
    wakes=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=5, max_size=40),
)
def test_property_timeline_invariants(r: float, k: int, m_frac: float, early_frac: float,
                                      wakes: list[float]) -> None:
    tl = Timeline(rotate_every=r, keep=k, announce_ahead=r * m_frac)
    early = tl.announce_ahead * early_frac
    now = T0
    ring, nxt = advance(None, now, tl, early=early)
    seen: dict[bytes, TicketKey] = {k.name: k for k in ring.keys}
    for w in wakes:
        # wake anywhere between now and the next change, or up to ``early`` after it
        now = now + (nxt - now) * w if w < 1 else nxt + early * 0.99
        published_by = now
        new, nxt = advance(ring, now, tl, early=early)
        assert nxt > now
        for key in new.keys:
            if key.name not in seen:
                seen[key.name] = key
                # never encrypts before it has been on the bus for M
                assert key.encrypt_from - published_by >= tl.announce_ahead - 1e-5
                assert key.encrypt_from - key.published_at == pytest.approx(
                    tl.announce_ahead, abs=1e-5
                )
            assert seen[key.name] == key
            assert now < key.erase_at
        if now >= min(x.encrypt_from for x in seen.values()):
            assert new.current(now) is not None
        assert len(new.keys) <= k + 2
        ring = new
    # windows are back to back: no key ever started late
    keys = sorted(seen.values(), key=lambda x: x.encrypt_from)
    for a, b in itertools.pairwise(keys):
        assert b.encrypt_from == pytest.approx(a.encrypt_until, abs=1e-5)
