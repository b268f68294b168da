"""Tests of sessionbus.consumer.peer_cache.PeerCache (plain, synchronous; no broker)."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sessionbus.consumer.peer_cache import CachedSession, PeerCache

CTX = b"service-ctx"
T0 = 1_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sid(k: int, length: int = 32) -> bytes:
    return k.to_bytes(4, "big") * (length // 4) + b"\x00" * (length % 4)


def make(**kwargs: object) -> tuple[PeerCache, FakeClock]:
    clock = FakeClock()
    return PeerCache(clock=clock, **kwargs), clock  # type: ignore[arg-type]


def put(
    cache: PeerCache,
    session_id: bytes,
    der: bytes = b"D" * 160,
    *,
    ttl: float = 300.0,
    origin: str = "node-a",
    sid_ctx: bytes = CTX,
    event_time: float = T0,
    now: float = T0,
) -> bool:
    return cache.put(
        session_id,
        der,
        expires=now + ttl,
        origin=origin,
        sid_ctx=sid_ctx,
        event_time=event_time,
    )


def lru_order(cache: PeerCache) -> list[bytes]:
    return [k for k, _ in cache.items()]


def check_invariants(cache: PeerCache) -> None:
    """White-box consistency of the index, the entry array and the LRU list."""
    held = [e for e, rec in enumerate(cache._recs) if rec]
    assert len(held) == len(cache)
    slots = [e for e in cache._index if e >= 0]
    assert sorted(slots) == held
    cache._promote()
    order: list[int] = []
    e = cache._next[0]
    while e:
        order.append(e)
        assert cache._next[cache._prev[e]] == e
        e = cache._next[e]
    assert sorted(order) == held
    total = 0
    for e in held:
        rec = cache._recs[e]
        n = rec[0]
        session_id = rec[21 : 21 + n]
        found = cache._find(session_id)
        assert found is not None and found[1] == e
        total += PeerCache.entry_bytes(n, len(rec) - 21 - n)
    assert total == cache.bytes_used


# ---------------------------------------------------------------------- basics


def test_put_get_roundtrip() -> None:
    cache, _ = make()
    assert put(cache, sid(1), b"der-1", origin="node-b", event_time=T0 - 2)
    got = cache.get(sid(1))
    assert got == CachedSession(b"der-1", T0 + 300, "node-b", CTX, T0 - 2)
    assert isinstance(got, CachedSession)
    with pytest.raises(AttributeError):  # immutable
        got.der = b"x"  # type: ignore[misc]
    assert hash(got) == hash(CachedSession(b"der-1", T0 + 300, "node-b", CTX, T0 - 2))
    assert cache.get(sid(2)) is None
    assert sid(1) in cache and sid(2) not in cache and "x" not in cache
    assert len(cache) == 1


def test_ids_of_different_lengths_and_prefixes_are_distinct() -> None:
    cache, _ = make()
    ids = [b"a", b"ab", b"abc", b"a" * 32, b"a" * 31, b"\x01", b"\x01\x01"]
    for k in ids:
        assert put(cache, k, k + b"-der")
    for k in ids:
        got = cache.get(k)
        assert got is not None and got.der == k + b"-der"
    assert cache.get(b"abcd") is None
    check_invariants(cache)


def test_invalid_session_id_rejected() -> None:
    cache, _ = make()
    with pytest.raises(ValueError):
        put(cache, b"")
    with pytest.raises(ValueError):
        put(cache, b"x" * 256)
    assert put(cache, b"x" * 255)


def test_upsert_is_idempotent() -> None:
    cache, _ = make()
    assert put(cache, sid(1))
    used = cache.bytes_used
    assert put(cache, sid(1))
    assert put(cache, sid(1))
    assert len(cache) == 1
    assert cache.bytes_used == used == PeerCache.entry_bytes(32, 160)
    assert cache.get(sid(1)) == CachedSession(b"D" * 160, T0 + 300, "node-a", CTX, T0)


def test_upsert_newer_event_replaces_older_event_is_ignored() -> None:
    cache, _ = make()
    assert put(cache, sid(1), b"old", event_time=T0 - 10)
    assert put(cache, sid(1), b"newer!", event_time=T0 - 5, ttl=400)
    got = cache.get(sid(1))
    assert got is not None and (got.der, got.expires) == (b"newer!", T0 + 400)
    assert cache.bytes_used == PeerCache.entry_bytes(32, 6)
    # an older NEW replayed late does not overwrite the newer copy
    assert put(cache, sid(1), b"old", event_time=T0 - 10)
    got = cache.get(sid(1))
    assert got is not None and got.der == b"newer!"


def test_put_of_expired_session_is_refused() -> None:
    cache, _ = make()
    assert not put(cache, sid(1), ttl=0)
    assert not put(cache, sid(1), ttl=-5)
    assert len(cache) == 0 and cache.bytes_used == 0


def test_put_larger_than_max_bytes_is_refused() -> None:
    cache, _ = make(max_bytes=PeerCache.entry_bytes(32, 100))
    assert put(cache, sid(1), b"x" * 100)
    assert not put(cache, sid(2), b"x" * 101)
    assert lru_order(cache) == [sid(1)]


def test_many_origins_and_contexts_are_interned() -> None:
    cache, _ = make()
    for k in range(50):
        put(cache, sid(k), origin=f"node-{k % 5}", sid_ctx=bytes([k % 3]) * 16)
    for k in range(50):
        got = cache.get(sid(k))
        assert got is not None
        assert (got.origin, got.sid_ctx) == (f"node-{k % 5}", bytes([k % 3]) * 16)
    assert len(cache._origins) == 5 and len(cache._ctxs) == 3


# ---------------------------------------------------------------------- remove and tombstones


def test_remove_then_older_put_stays_removed() -> None:
    cache, _ = make()
    put(cache, sid(1), event_time=T0 - 10)
    assert cache.remove(sid(1), expires=T0 + 300, event_time=T0 - 1)
    assert cache.get(sid(1)) is None
    assert cache.tombstones == 1
    # the NEW, replayed (older than the REMOVE), arrives again
    assert not put(cache, sid(1), event_time=T0 - 10)
    assert cache.get(sid(1)) is None and len(cache) == 0


def test_remove_then_newer_put_stays_removed_until_tombstone_expiry() -> None:
    cache, clock = make()
    put(cache, sid(1), ttl=300)
    assert cache.remove(sid(1), expires=T0 + 300, event_time=T0)
    assert not put(cache, sid(1), event_time=T0 + 50, ttl=600)
    clock.advance(299)
    assert not put(cache, sid(1), event_time=T0 + 299, ttl=600, now=clock.now)
    assert cache.get(sid(1)) is None
    clock.advance(1)  # the tombstone has expired (even before sweep reclaims it)
    assert put(cache, sid(1), b"again", event_time=clock.now, ttl=300, now=clock.now)
    got = cache.get(sid(1))
    assert got is not None and got.der == b"again"
    assert cache.tombstones == 0


def test_remove_before_any_put_blocks_the_later_put() -> None:
    cache, _ = make()
    assert not cache.remove(sid(1), expires=T0 + 300, event_time=T0)
    assert cache.tombstones == 1
    assert not put(cache, sid(1), event_time=T0 - 1)
    assert len(cache) == 0


def test_tombstone_lasts_until_the_later_of_both_expiries() -> None:
    cache, clock = make()
    put(cache, sid(1), ttl=500)
    assert cache.remove(sid(1), expires=T0 + 100, event_time=T0)
    clock.advance(200)
    assert not put(cache, sid(1), ttl=300, now=clock.now)
    clock.advance(300)  # T0 + 500: the stored session's expiry
    assert put(cache, sid(1), ttl=300, now=clock.now)


def test_remove_of_expired_session_counts_as_expiration() -> None:
    cache, clock = make()
    put(cache, sid(1), ttl=10)
    clock.advance(10)
    assert not cache.remove(sid(1), expires=T0 + 10, event_time=clock.now)
    assert len(cache) == 0 and cache.expirations == 1 and cache.bytes_used == 0
    assert cache.tombstones == 0  # nothing left to protect: any replay is expired too


def test_tombstone_expires_and_sweep_reclaims_it() -> None:
    cache, clock = make()
    for k in range(10):
        put(cache, sid(k), ttl=100 + k)
        cache.remove(sid(k), expires=T0 + 100 + k, event_time=T0)
    assert cache.tombstones == 10
    assert cache.sweep() == 0
    clock.advance(105)  # tombstones of k = 0..5 have expired
    assert cache.sweep() == 6
    assert cache.tombstones == 4
    assert cache.sweep(now=T0 + 1_000) == 4
    assert cache.tombstones == 0
    assert cache._tomb_heap == []


def test_tombstones_have_their_own_bound() -> None:
    cache, _ = make(max_entries=2, max_tombstones=3)
    for k in range(5):
        cache.remove(sid(k), expires=T0 + 100 + k, event_time=T0)
    assert cache.tombstones == 3
    assert cache.tombstone_evictions == 2
    # the ones closest to expiry left first
    assert sorted(cache._tomb) == sorted([sid(2), sid(3), sid(4)])
    # tombstones do not take room from sessions
    assert put(cache, sid(10)) and put(cache, sid(11))
    assert len(cache) == 2 and cache.evictions == 0


def test_repeated_removes_keep_the_heap_bounded() -> None:
    cache, _ = make()
    for r in range(1_000):
        cache.remove(sid(r % 10), expires=T0 + 100 + r, event_time=T0)
    assert cache.tombstones == 10
    assert len(cache._tomb_heap) <= 2 * 10 + 64 + 1


def test_discard_leaves_no_tombstone() -> None:
    cache, _ = make()
    put(cache, sid(1))
    cache.discard(sid(1))
    cache.discard(sid(2))  # absent: no-op
    assert len(cache) == 0 and cache.tombstones == 0 and cache.bytes_used == 0
    assert put(cache, sid(1))


# ---------------------------------------------------------------------- expiry


def test_expired_is_never_served() -> None:
    cache, clock = make()
    put(cache, sid(1), ttl=60)
    put(cache, sid(2), ttl=120)
    clock.advance(59.5)
    assert cache.get(sid(1)) is not None
    clock.advance(0.5)
    assert clock.now == T0 + 60  # now == expires: expired
    assert sid(1) not in cache
    assert cache.get(sid(1)) is None
    assert cache.expirations == 1
    assert len(cache) == 1
    assert [k for k, _ in cache.items()] == [sid(2)]
    clock.advance(1_000)
    assert list(cache.items()) == []  # items() never shows expired sessions either
    assert cache.get(sid(2)) is None
    assert cache.expirations == 2 and len(cache) == 0 and cache.bytes_used == 0


def test_sweep_drops_expired_sessions_with_bounded_work() -> None:
    cache, clock = make()
    for k in range(100):
        put(cache, sid(k), ttl=10 if k % 2 else 1_000)
    clock.advance(10)
    assert cache.sweep(budget=10) <= 10
    for _ in range(20):
        cache.sweep(budget=10)
    assert len(cache) == 50
    assert cache.expirations == 50
    assert all(int.from_bytes(k[:4], "big") % 2 == 0 for k, _ in cache.items())
    check_invariants(cache)


def test_get_at_exactly_expires_drops_the_session() -> None:
    cache, clock = make()
    put(cache, sid(1), ttl=1)
    clock.advance(1)
    assert clock.now == T0 + 1
    assert cache.get(sid(1)) is None
    assert (cache.expirations, len(cache)) == (1, 0)


# ---------------------------------------------------------------------- LRU bounds


def test_lru_eviction_by_entries() -> None:
    cache, _ = make(max_entries=3)
    for k in range(3):
        put(cache, sid(k))
    assert put(cache, sid(3))
    assert lru_order(cache) == [sid(1), sid(2), sid(3)]
    assert cache.evictions == 1
    assert put(cache, sid(4))
    assert lru_order(cache) == [sid(2), sid(3), sid(4)]
    assert cache.evictions == 2 and cache.expirations == 0


def test_get_moves_to_most_recently_used() -> None:
    cache, _ = make(max_entries=3)
    for k in range(3):
        put(cache, sid(k))
    assert cache.get(sid(0)) is not None
    assert lru_order(cache) == [sid(1), sid(2), sid(0)]
    put(cache, sid(3))
    assert cache.get(sid(1)) is None  # 1 was least recently used
    assert lru_order(cache) == [sid(2), sid(0), sid(3)]
    # several hits before the next put are applied in order
    cache.get(sid(2))
    cache.get(sid(0))
    cache.get(sid(2))
    put(cache, sid(4))
    assert lru_order(cache) == [sid(0), sid(2), sid(4)]


@pytest.mark.parametrize("drop", ["discard", "remove", "expire"])
def test_hit_then_drop_before_promotion_is_harmless(drop: str) -> None:
    """get() only logs the hit; a drop before the log is applied must not corrupt the list,
    also when the freed entry is reused by the next put."""
    cache, clock = make(max_entries=3)
    put(cache, sid(0), ttl=10)
    put(cache, sid(1), ttl=100)
    put(cache, sid(2), ttl=100)
    assert cache.get(sid(0)) is not None
    assert cache.get(sid(1)) is not None
    if drop == "discard":
        cache.discard(sid(0))
    elif drop == "remove":
        cache.remove(sid(0), expires=T0 + 10, event_time=T0)
    else:
        clock.advance(10)
        assert cache.get(sid(0)) is None
    put(cache, sid(3), now=clock.now)  # reuses the freed entry
    assert lru_order(cache) == [sid(2), sid(1), sid(3)]
    put(cache, sid(4), now=clock.now)
    assert lru_order(cache) == [sid(1), sid(3), sid(4)]
    check_invariants(cache)


def test_more_hits_than_the_log_holds_keeps_the_newest() -> None:
    cache, _ = make(max_entries=4)
    for k in range(4):
        put(cache, sid(k))
    cache.get(sid(0))  # overwritten in the hit log below: this promotion is lost
    for _ in range(70_000):
        cache.get(sid(1))
    cache.get(sid(2))
    assert lru_order(cache) == [sid(0), sid(3), sid(1), sid(2)]
    check_invariants(cache)


def test_put_of_existing_id_moves_it_to_most_recent() -> None:
    cache, _ = make(max_entries=3)
    for k in range(3):
        put(cache, sid(k))
    put(cache, sid(0))
    put(cache, sid(3))
    assert lru_order(cache) == [sid(2), sid(0), sid(3)]


def test_lru_eviction_by_bytes() -> None:
    one = PeerCache.entry_bytes(32, 100)
    cache, _ = make(max_bytes=3 * one)
    for k in range(3):
        put(cache, sid(k), b"x" * 100)
    assert cache.bytes_used == 3 * one
    cache.get(sid(0))
    assert put(cache, sid(3), b"x" * 100)
    assert lru_order(cache) == [sid(2), sid(0), sid(3)]
    assert cache.evictions == 1
    # a bigger session pushes out as many as needed, least recent first
    assert put(cache, sid(4), b"x" * 200)
    assert lru_order(cache) == [sid(3), sid(4)]
    assert cache.evictions == 3
    assert cache.bytes_used == one + PeerCache.entry_bytes(32, 200) <= 3 * one


def test_growing_an_existing_session_evicts_others_never_itself() -> None:
    one = PeerCache.entry_bytes(32, 100)
    cache, _ = make(max_bytes=3 * one)
    for k in range(3):
        put(cache, sid(k), b"x" * 100)
    assert put(cache, sid(0), b"y" * 250, event_time=T0 + 1)
    assert lru_order(cache) == [sid(2), sid(0)]
    assert cache.bytes_used <= 3 * one
    check_invariants(cache)


def test_expired_victim_counts_as_expiration() -> None:
    cache, clock = make(max_entries=2)
    put(cache, sid(0), ttl=10)
    put(cache, sid(1), ttl=100)
    clock.advance(20)
    put(cache, sid(2), now=clock.now)
    assert (cache.evictions, cache.expirations) == (0, 1)


def test_bytes_accounting_returns_to_zero() -> None:
    cache, clock = make(max_entries=50)
    rng = random.Random(7)
    for k in range(200):
        put(cache, sid(k), b"z" * rng.randrange(100, 260), ttl=rng.choice([10, 1_000]))
    assert cache.bytes_used > 0
    for k in range(0, 200, 3):
        cache.remove(sid(k), expires=T0 + 1_000, event_time=T0)
    for k in range(1, 200, 3):
        cache.discard(sid(k))
    clock.advance(20)
    cache.sweep()
    for k in range(200):
        cache.get(sid(k))
        cache.remove(sid(k), expires=T0 + 1_000, event_time=T0)
    assert len(cache) == 0
    assert cache.bytes_used == 0
    check_invariants(cache)


def test_bytes_used_is_documented_formula() -> None:
    cache, _ = make()
    put(cache, sid(1, 32), b"a" * 160)
    put(cache, sid(2, 16), b"b" * 130)
    assert cache.bytes_used == (32 + 160 + 74) + (16 + 130 + 74)
    assert PeerCache.entry_bytes(32, 160) == 32 + 160 + 74


def test_items_is_a_snapshot() -> None:
    cache, _ = make()
    for k in range(5):
        put(cache, sid(k))
    it = cache.items()
    cache.discard(sid(0))
    assert [k for k, _ in it] == [sid(k) for k in range(5)]


def ids_with_home(home: int, count: int, slots: int = 16) -> list[bytes]:
    """Ids whose first probe slot in a ``slots``-slot index is ``home`` (hashes are salted per
    process, so they are searched for at run time)."""
    out: list[bytes] = []
    k = 0
    while len(out) < count:
        candidate = b"wrap-%d" % k
        if hash(candidate) & (slots - 1) == home:
            out.append(candidate)
        k += 1
    return out


@pytest.mark.parametrize("seed", range(40))
def test_deletion_inside_clusters_that_wrap_around_the_index(seed: int) -> None:
    """Backward-shift deletion where a probe cluster runs past the last slot into slot 0."""
    rng = random.Random(seed)
    homes = [14, 15, 15, 14, 0, 13, 1, 15]
    pool = {h: ids_with_home(h, 8) for h in set(homes)}
    cache, _ = make(max_entries=7)  # 7 < 8 = the 16-slot index's load limit: no growth
    ids = []
    for n, h in enumerate(rng.sample(homes, 7)):
        ids.append(pool[h][n])
    for k in ids:
        assert put(cache, k)
    assert cache._mask == 15
    rng.shuffle(ids)
    while ids:
        gone = ids.pop()
        cache.discard(gone)
        assert cache.get(gone) is None
        for k in ids:
            assert cache.get(k) is not None, (seed, gone, ids)
        check_invariants(cache)


def test_randomised_against_model_with_growth_and_churn() -> None:
    """Thousands of operations over a few hundred ids: index growth, backward-shift deletion,
    entry reuse and evictions, checked against a simple model and the internal invariants."""
    clock = FakeClock()
    cache = PeerCache(max_entries=300, clock=clock)
    model: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
    rng = random.Random(1234)
    ids = [rng.randbytes(rng.choice([8, 16, 32])) for _ in range(600)]
    for step in range(20_000):
        k = rng.choice(ids)
        op = rng.random()
        if op < 0.5:
            der = rng.randbytes(rng.randrange(1, 40))
            if cache.put(k, der, expires=clock.now + 1e6, origin="o", sid_ctx=CTX, event_time=step):
                if k not in model and len(model) >= 300:
                    model.popitem(last=False)
                model[k] = (der, clock.now + 1e6)
                model.move_to_end(k)
        elif op < 0.8:
            got = cache.get(k)
            if k in model:
                model.move_to_end(k)
                assert got is not None and got.der == model[k][0]
            else:
                assert got is None
        else:
            cache.discard(k)
            model.pop(k, None)
        if step % 2_000 == 0:
            check_invariants(cache)
    assert lru_order(cache) == list(model)
    check_invariants(cache)


# ---------------------------------------------------------------------- property test

IDS = [b"a", b"ab", b"b" * 32, b"c" * 32, b"c" * 31, b"d" * 16, b"e" * 32]
ORIGINS = ["n1", "n2"]
CTXS = [b"ctx-1", b"ctx-2"]
MAX_ENTRIES = 4
MAX_BYTES = 3 * PeerCache.entry_bytes(32, 24)


class PeerCacheModel(RuleBasedStateMachine):
    """The cache against a dict-and-OrderedDict reference model of the same rules."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.cache = PeerCache(
            max_entries=MAX_ENTRIES, max_bytes=MAX_BYTES, clock=self.clock, max_tombstones=1_000
        )
        self.od: OrderedDict[bytes, CachedSession] = OrderedDict()
        self.tomb: dict[bytes, float] = {}

    def _bytes(self) -> int:
        return sum(PeerCache.entry_bytes(len(k), len(s.der)) for k, s in self.od.items())

    def _evict_lru(self) -> None:
        self.od.popitem(last=False)

    @rule(
        k=st.sampled_from(IDS),
        der_len=st.integers(0, 40),
        ttl=st.sampled_from([-1.0, 0.0, 1.0, 5.0, 30.0]),
        origin=st.sampled_from(ORIGINS),
        ctx=st.sampled_from(CTXS),
        event_dt=st.integers(-5, 5),
    )
    def put(
        self, k: bytes, der_len: int, ttl: float, origin: str, ctx: bytes, event_dt: int
    ) -> None:
        now = self.clock.now
        der = bytes([der_len]) * der_len
        new = CachedSession(der, now + ttl, origin, ctx, now + event_dt)
        got = self.cache.put(
            k, der, expires=new.expires, origin=origin, sid_ctx=ctx, event_time=new.event_time
        )
        expected = self._model_put(k, new, now)
        assert got == expected

    def _model_put(self, k: bytes, new: CachedSession, now: float) -> bool:
        if new.expires <= now:
            return False
        if k in self.tomb:
            if self.tomb[k] > now:
                return False
            del self.tomb[k]
        size = PeerCache.entry_bytes(len(k), len(new.der))
        if size > MAX_BYTES:
            return False
        if k in self.od:
            old = self.od[k]
            if old.event_time <= new.event_time or old.expires <= now:
                self.od[k] = new
            self.od.move_to_end(k)
            while self._bytes() > MAX_BYTES:
                self._evict_lru()
            return True
        while self.od and (len(self.od) >= MAX_ENTRIES or self._bytes() + size > MAX_BYTES):
            self._evict_lru()
        self.od[k] = new
        return True

    @rule(k=st.sampled_from(IDS), ttl=st.sampled_from([-1.0, 0.0, 2.0, 10.0, 40.0]))
    def remove(self, k: bytes, ttl: float) -> None:
        now = self.clock.now
        got = self.cache.remove(k, expires=now + ttl, event_time=now)
        until = now + ttl
        dropped = False
        if k in self.od:
            old = self.od.pop(k)
            until = max(until, old.expires)
            dropped = old.expires > now
        if until > now and (k not in self.tomb or until > self.tomb[k]):
            self.tomb[k] = until
        assert got == dropped

    @rule(k=st.sampled_from(IDS))
    def get(self, k: bytes) -> None:
        now = self.clock.now
        got = self.cache.get(k)
        expected = None
        if k in self.od:
            if self.od[k].expires <= now:
                del self.od[k]
            else:
                expected = self.od[k]
                self.od.move_to_end(k)
        assert got == expected

    @rule(k=st.sampled_from(IDS))
    def discard(self, k: bytes) -> None:
        self.cache.discard(k)
        self.od.pop(k, None)

    @rule()
    def sweep(self) -> None:
        now = self.clock.now
        self.cache.sweep()
        for k in [k for k, s in self.od.items() if s.expires <= now]:
            del self.od[k]
        for k in [k for k, until in self.tomb.items() if until <= now]:
            del self.tomb[k]

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0, 20.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)

    @rule(k=st.sampled_from(IDS))
    def contains(self, k: bytes) -> None:
        expected = k in self.od and self.od[k].expires > self.clock.now
        assert (k in self.cache) == expected

    @invariant()
    def agrees(self) -> None:
        assert len(self.cache) == len(self.od)
        assert self.cache.bytes_used == self._bytes()
        assert self.cache.tombstones == len(self.tomb)
        now = self.clock.now
        live = [(k, s) for k, s in self.od.items() if s.expires > now]
        assert list(self.cache.items()) == live
        assert self.cache.bytes_used <= MAX_BYTES and len(self.cache) <= MAX_ENTRIES


TestPeerCacheModel = PeerCacheModel.TestCase
TestPeerCacheModel.settings = settings(max_examples=500, stateful_step_count=60, deadline=None)
