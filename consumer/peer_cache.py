"""The peer cache: a node's local replica of every TLS session of the farm.

OpenSSL's session get-callback looks sessions up here synchronously, inside the handshake, so
``get`` must be fast and must never block; the replicator applies NEW/REMOVE events with ``put`` and
``remove``.

Consistency (DESIGN.md, "Consistency rules"):

* ``put`` is an idempotent upsert. For an id already held, the copy with the later ``event_time``
  wins (an older NEW replayed after a newer one is a no-op).
* ``remove`` drops the session and leaves a tombstone until ``max(expires, stored expires)``. While
  the tombstone lives, every ``put`` of that id is refused: session ids are random, so a NEW that
  arrives after a REMOVE (in any order of event times) is a replay and must not resurrect it. An
  expired tombstone is ignored whether or not ``sweep`` has reclaimed it yet, so behaviour never
  depends on when ``sweep`` runs.
* An expired session is never served: ``get`` drops it (counted in ``expirations``).
* ``discard``, expiry and LRU eviction are local and leave no tombstone.

Memory layout (the replica must cost at most ~2x the DER size per session, so there is no Python
object per entry beyond one ``bytes``):

* Each session is ONE immutable ``bytes`` record::

      [sid_len:u8][expires:f64][event_time:f64][origin:u16][sid_ctx:u16][session id][DER]

  ``origin`` and ``sid_ctx`` are indexes into small interned tables (a farm has a handful of node
  ids and one sid_ctx per service; at most 65,536 distinct values of each: a ``put`` of one
  more is refused, never raised, so a flood of contexts cannot stall replication). Session ids
  are 1-255 bytes. A ``CachedSession`` is built only when ``get`` hits.
* Records live in a dense entry array (``_recs``, a list) with parallel ``array`` columns: the low
  32 bits of the id's hash and the LRU doubly-linked list (``_prev``/``_next``, entry 0 is the list
  head; ``_next[0]`` is the least recently used). Free entries (``b""``) are chained through
  ``_next`` for reuse; the columns grow by chunks of 1/8.
* The id -> entry map is an open-addressing table (``_index``, an ``array('i')``, linear probing
  on the id's salted ``hash``, load factor <= 0.5, backward-shift deletion so no deleted markers
  pile up). It grows 4x below 2**20 slots and 2x above (fewer rehashes while warming); a growth
  is an O(n) pass in Python, about 0.25 us per session held. It never shrinks. A Python ``dict``
  would cost 60-120 bytes per entry (its 24-byte entries, the power-of-two sizing and the x3
  growth after churn) plus a separate 65-byte key object; this costs 20 + 4/load bytes.

Bounds: ``max_entries`` and ``max_bytes`` bound the live sessions; when a new session would exceed
either, the least recently used sessions leave first (``evictions``; a victim that had already
expired counts in ``expirations`` instead). ``get`` and ``put`` mark a session most recently used.
``get`` runs inside the handshake, so it only records the hit in a small log; the list surgery
happens before anything depends on the order (``put``, ``sweep``, ``items``: the replicator's
side), which keeps the order exactly LRU (see ``_promote``).
Tombstones have their own bound, ``max_tombstones``, separate from ``max_entries``: a burst of
revokes must not push live sessions out of the replica (default 100,000, about 200 bytes each: a
dict entry, the id, a float and a heap tuple). Past it, the tombstone closest to its own expiry is
dropped first (``tombstone_evictions``).

What ``bytes_used`` counts: per session, ``entry_bytes(len(session_id), len(der))`` =
``len(session_id) + len(der) + 74``, i.e. the record object (33-byte ``bytes`` header, 21-byte
fixed header, the id and the DER) plus its 20 bytes of per-entry columns (list pointer, hash, two
links). Not counted: the open-addressing index (4 bytes per slot, i.e. 8-32 bytes per session),
spare entries of the last column chunk, the interned tables, tombstones (bounded by count) and
allocator rounding.

``sweep`` reclaims expired sessions by scanning the entry array from a rotating cursor, at most
``budget`` entries per call, and then expired tombstones (oldest expiry first, at most ``budget``).

Not thread-safe: use it from one thread (the node's event loop).
"""

from __future__ import annotations

import heapq
import struct
import time
from array import array
from collections.abc import Callable, Iterator
from typing import NamedTuple

__all__ = ["CachedSession", "PeerCache"]

_HDR = struct.Struct("<BddHH")  # sid_len, expires, event_time, origin index, sid_ctx index
_SID_OFF = _HDR.size  # 21: the session id follows the header, then the DER
_HDR_PACK = _HDR.pack
_FIELDS_UNPACK = struct.Struct("<xddHH").unpack_from  # expires, event_time, origin, sid_ctx
_EXP_UNPACK = struct.Struct("<xd").unpack_from
_BYTES_OBJECT_OVERHEAD = 33  # sys.getsizeof(b"") on 64-bit CPython
_PER_ENTRY_COLUMNS = 8 + 4 + 4 + 4  # _recs pointer, _hashes, _prev, _next
_ACCOUNT_EXTRA = _BYTES_OBJECT_OVERHEAD + _PER_ENTRY_COLUMNS  # added to len(record)
_ENTRY_OVERHEAD = _ACCOUNT_EXTRA + _SID_OFF  # 74, added to len(session_id) + len(der)
_MAX_INTERNED = 1 << 16
_H32 = 0xFFFFFFFF
_MIN_SLOTS = 16
_FAST_GROWTH_SLOTS = 1 << 20  # grow the index 4x below this (fewer rehashes), 2x above it
_EMPTY = -1
_FREE = b""  # marks a free entry in _recs
_HITS_SIZE = 1 << 16  # ring of hits get() logs for _promote (256 KB)
_HITS_MASK = _HITS_SIZE - 1


class CachedSession(NamedTuple):
    """One session as ``PeerCache.get`` returns it (immutable)."""

    der: bytes  # serialized SSL_SESSION
    expires: float  # unix seconds
    origin: str  # node id that made it
    sid_ctx: bytes
    event_time: float  # when the origin saw it


# get() builds CachedSession with tuple.__new__: one C call, where NamedTuple's own __new__ is a
# Python function and a frozen dataclass's __init__ goes through object.__setattr__ per field.
_NEW = tuple.__new__


def _empty_slot(index: array[int], mask: int, h: int) -> int:
    """The first empty slot of the probe sequence of hash ``h`` (linear probing)."""
    i = h & mask
    while index[i] >= 0:
        i = (i + 1) & mask
    return i


class PeerCache:
    """Bounded LRU replica of the farm's TLS sessions, with tombstones for REMOVE.

    ``max_entries`` and ``max_bytes`` bound the sessions (``bytes_used``), ``max_tombstones``
    the tombstones; ``clock`` gives unix seconds (injectable for tests).
    """

    def __init__(
        self,
        *,
        max_entries: int = 1_000_000,
        max_bytes: int = 512 * 2**20,
        clock: Callable[[], float] = time.time,
        max_tombstones: int = 100_000,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if max_tombstones < 0:
            raise ValueError("max_tombstones must be >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_tombstones = max_tombstones
        self._clock = clock
        # counters read by the metrics layer
        self.evictions = 0
        self.expirations = 0
        self.tombstone_evictions = 0
        # interned origins and session id contexts
        self._origins: list[str] = []
        self._origin_ix: dict[str, int] = {}
        self._ctxs: list[bytes] = []
        self._ctx_ix: dict[bytes, int] = {}
        # dense entries; entry 0 is the LRU list head and never holds a record
        self._recs: list[bytes] = [_FREE]
        self._hashes = array("I", [0])
        self._prev = array("i", [0])
        self._next = array("i", [0])
        self._free = 0  # head of the free-entry chain (through _next), 0 = none
        self._count = 0
        self._bytes = 0
        # open-addressing index: slot -> entry, _EMPTY when free
        self._index = array("i", [_EMPTY]) * _MIN_SLOTS
        self._mask = _MIN_SLOTS - 1
        self._max_load = _MIN_SLOTS // 2
        self._cursor = 1  # sweep position in the entry array
        self._hits = array("i", [0]) * _HITS_SIZE  # ring: entries get() hit, not yet promoted
        self._nhits = 0  # hits logged since the last _promote (older ones past the ring are lost)
        # tombstones: id -> until, plus a lazy min-heap of (until, id)
        self._tomb: dict[bytes, float] = {}
        self._tomb_heap: list[tuple[float, bytes]] = []

    # ------------------------------------------------------------------ sizing

    @staticmethod
    def entry_bytes(session_id_len: int, der_len: int) -> int:
        """What one session adds to ``bytes_used``."""
        return session_id_len + der_len + _ENTRY_OVERHEAD

    @property
    def bytes_used(self) -> int:
        """Accounted bytes of the sessions held (see the module docstring)."""
        return self._bytes

    @property
    def tombstones(self) -> int:
        """Tombstones held (including expired ones ``sweep`` has not reclaimed yet)."""
        return len(self._tomb)

    def __len__(self) -> int:
        """Sessions held (tombstones excluded; an expired one counts until it is dropped)."""
        return self._count

    def __contains__(self, session_id: object) -> bool:
        """True if an unexpired session is held for the id (no LRU touch, no side effects)."""
        if not isinstance(session_id, bytes):
            return False
        found = self._find(session_id)
        if found is None:
            return False
        return bool(_EXP_UNPACK(self._recs[found[1]])[0] > self._clock())

    # ------------------------------------------------------------------ lookups

    def get(self, session_id: bytes) -> CachedSession | None:
        """The session, or None. Never returns an expired session; a hit becomes most recent."""
        # _probe inlined: this runs inside every resumed handshake, and the call would add
        # ~0.1 us to the ~2 us of bench row "peer_cache get() hit, 200,000 held".
        n = len(session_id)
        index = self._index
        recs = self._recs
        mask = self._mask
        i = hash(session_id) & mask
        while True:
            e = index[i]
            if e < 0:
                return None
            rec = recs[e]
            if rec[0] == n and rec.startswith(session_id, _SID_OFF):
                break
            i = (i + 1) & mask
        expires, event_time, oi, ci = _FIELDS_UNPACK(rec)
        if expires <= self._clock():
            self._drop(i, e)
            self.expirations += 1
            return None
        n_hits = self._nhits  # log the hit; the next _promote() makes it most recent
        self._hits[n_hits & _HITS_MASK] = e
        self._nhits = n_hits + 1
        return _NEW(CachedSession, (
            rec[_SID_OFF + n :], expires, self._origins[oi], self._ctxs[ci], event_time
        ))

    def items(self) -> Iterator[tuple[bytes, CachedSession]]:
        """A snapshot of the unexpired sessions, least recently used first. No LRU touch."""
        if self._nhits:
            self._promote()
        now = self._clock()
        out: list[tuple[bytes, CachedSession]] = []
        recs = self._recs
        nxt = self._next
        e = nxt[0]
        while e:
            rec = recs[e]
            expires, event_time, oi, ci = _FIELDS_UNPACK(rec)
            if expires > now:
                end = _SID_OFF + rec[0]
                session = CachedSession(
                    rec[end:], expires, self._origins[oi], self._ctxs[ci], event_time
                )
                out.append((rec[_SID_OFF:end], session))
            e = nxt[e]
        return iter(out)

    # ------------------------------------------------------------------ updates

    def put(
        self,
        session_id: bytes,
        der: bytes,
        *,
        expires: float,
        origin: str,
        sid_ctx: bytes,
        event_time: float,
    ) -> bool:
        """Upsert a session (idempotent); it becomes the most recently used.

        Returns False and stores nothing if it has expired (``expires <= now``), if a live
        tombstone exists for the id, if this one session is larger than ``max_bytes``, or if its
        origin or sid_ctx would be one more than the interned tables hold. For an
        id already held, the copy with the later ``event_time`` is kept (True either way).
        Raises ValueError for an id that is empty or longer than 255 bytes.
        """
        if self._nhits:
            self._promote()
        now = self._clock()
        if expires <= now:
            return False
        tomb = self._tomb
        if tomb:
            until = tomb.get(session_id)
            if until is not None:
                if until > now:
                    return False
                del tomb[session_id]  # an expired tombstone; its heap entry goes stale
        n = len(session_id)
        if not 0 < n < 256:
            raise ValueError("session id must be 1..255 bytes")
        size = n + len(der) + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        oi = self._origin_ix.get(origin)
        if oi is None:
            oi = self._intern_origin(origin)
        ci = self._ctx_ix.get(sid_ctx)
        if ci is None:
            ci = self._intern_ctx(sid_ctx)
        if oi < 0 or ci < 0:
            return False  # an interned table is full: refused like an oversize session
        h = hash(session_id)
        recs = self._recs
        i, e = self._probe(session_id)
        if e >= 0:
            old = recs[e]
            return self._update(e, old, n, session_id, der, expires, event_time, oi, ci)
        # A new id. Make room first; eviction and growth move index slots, so probe again after.
        if self._count >= self.max_entries or self._bytes + size > self.max_bytes:
            self._make_room(size)
            i = -1
        if self._count >= self._max_load:
            self._grow()
            i = -1
        index = self._index
        if i < 0:
            i = _empty_slot(index, self._mask, h)
        e = self._free or self._extend()
        nxt = self._next
        prev = self._prev
        self._free = nxt[e]
        recs[e] = _HDR_PACK(n, expires, event_time, oi, ci) + session_id + der
        self._hashes[e] = h & _H32
        index[i] = e
        m = prev[0]
        nxt[m] = e
        prev[e] = m
        nxt[e] = 0
        prev[0] = e
        self._count += 1
        self._bytes += size
        return True

    def remove(self, session_id: bytes, *, expires: float, event_time: float) -> bool:
        """Apply a REMOVE: drop the session and leave a tombstone.

        The tombstone lives until ``max(expires, stored session's expires)`` and blocks every
        later ``put`` of the id until then. Returns True if a live session was dropped.
        ``event_time`` is accepted for symmetry with ``put``: a REMOVE wins over a NEW whatever
        their event times (session ids are random, so a NEW after a REMOVE is a replay).
        """
        del event_time
        now = self._clock()
        until = expires
        dropped = False
        found = self._find(session_id)
        if found is not None:
            i, e = found
            stored_expires: float = _EXP_UNPACK(self._recs[e])[0]
            until = max(until, stored_expires)
            self._drop(i, e)
            if stored_expires > now:
                dropped = True
            else:
                self.expirations += 1
        if until > now and self.max_tombstones > 0:
            tomb = self._tomb
            old = tomb.get(session_id)
            if old is None or until > old:
                tomb[session_id] = until
                heapq.heappush(self._tomb_heap, (until, session_id))
                if old is None and len(tomb) > self.max_tombstones:
                    self._evict_tombstone()
                if len(self._tomb_heap) > 2 * len(tomb) + 64:
                    self._rebuild_tomb_heap()
        return dropped

    def discard(self, session_id: bytes) -> None:
        """Drop the session locally, leaving no tombstone (no-op if absent)."""
        found = self._find(session_id)
        if found is not None:
            self._drop(*found)

    def sweep(self, now: float | None = None, budget: int = 10_000) -> int:
        """Drop expired sessions and tombstones; bounded work. Returns how many were dropped.

        Examines at most ``budget`` entry positions (continuing where the previous call
        stopped, so repeated calls cover the whole cache) and reclaims at most ``budget``
        expired tombstones.
        """
        if self._nhits:
            self._promote()
        if now is None:
            now = self._clock()
        dropped = 0
        recs = self._recs
        size = len(recs)
        if self._count:
            e = self._cursor
            for _ in range(min(budget, size - 1)):
                if e >= size:
                    e = 1
                rec = recs[e]
                if rec and _EXP_UNPACK(rec)[0] <= now:
                    self._drop(self._slot_of(e), e)
                    self.expirations += 1
                    dropped += 1
                e += 1
            self._cursor = e
        heap = self._tomb_heap
        tomb = self._tomb
        reclaimed = 0
        while heap and heap[0][0] <= now and reclaimed < budget:
            until, sid = heapq.heappop(heap)
            if tomb.get(sid) == until:
                del tomb[sid]
                dropped += 1
            reclaimed += 1
        return dropped

    # ------------------------------------------------------------------ internals

    def _update(
        self,
        e: int,
        old: bytes,
        n: int,
        session_id: bytes,
        der: bytes,
        expires: float,
        event_time: float,
        oi: int,
        ci: int,
    ) -> bool:
        old_expires, old_event_time, _, _ = _FIELDS_UNPACK(old)
        if old_event_time <= event_time or old_expires <= self._clock():
            rec = _HDR_PACK(n, expires, event_time, oi, ci) + session_id + der
            if rec != old:
                self._recs[e] = rec
                self._bytes += len(rec) - len(old)
        # else: the copy held is newer; keep it (an older NEW replayed late)
        prev = self._prev
        if prev[0] != e:
            nxt = self._next
            p = prev[e]
            q = nxt[e]
            nxt[p] = q
            prev[q] = p
            m = prev[0]
            nxt[m] = e
            prev[e] = m
            nxt[e] = 0
            prev[0] = e
        if self._bytes > self.max_bytes:
            self._make_room(0)  # e is the most recent and fits alone: it is never the victim
        return True

    def _promote(self) -> None:
        """Apply the hits get() recorded, in order: each becomes the most recently used.

        get() runs inside the TLS handshake, so it only logs the entry in the ``_hits`` ring; the
        list surgery happens here, before anything depends on the order (put, sweep, items: the
        replicator's side), which keeps the order exactly LRU; get() itself does O(1) work. Only
        if more than ``_HITS_SIZE`` hits arrive with no such call in between are the oldest of
        them not promoted (the order is then approximate; what is held and served is never
        affected).
        """
        n_hits = self._nhits
        hits = self._hits
        if n_hits <= _HITS_SIZE:
            logged = hits[:n_hits]
        else:
            start = n_hits & _HITS_MASK
            logged = hits[start:] + hits[:start]
        self._nhits = 0
        prev = self._prev
        nxt = self._next
        recs = self._recs
        m = prev[0]
        for e in logged:
            # A logged entry dropped since (remove, discard, an expired get) is free now; it
            # cannot have been reused, since reuse happens only in put, which promotes first.
            if e != m and recs[e]:
                p = prev[e]
                q = nxt[e]  # != 0: only the most recent entry, m, has no successor
                nxt[p] = q
                prev[q] = p
                nxt[m] = e
                prev[e] = m
                nxt[e] = 0
                m = e
        prev[0] = m

    def _probe(self, session_id: bytes) -> tuple[int, int]:
        """The one probe of the index by session id: (slot, entry) where it is held, or
        (the empty slot that ends its probe sequence, -1)."""
        n = len(session_id)
        index = self._index
        recs = self._recs
        mask = self._mask
        i = hash(session_id) & mask
        while True:
            e = index[i]
            if e < 0:
                return i, -1
            rec = recs[e]
            if rec[0] == n and rec.startswith(session_id, _SID_OFF):
                return i, e
            i = (i + 1) & mask

    def _find(self, session_id: bytes) -> tuple[int, int] | None:
        """(index slot, entry) of session_id, or None."""
        i, e = self._probe(session_id)
        return None if e < 0 else (i, e)

    def _slot_of(self, e: int) -> int:
        """The index slot that points at entry e (e must be held)."""
        index = self._index
        mask = self._mask
        i = self._hashes[e] & mask
        while index[i] != e:
            i = (i + 1) & mask
        return i

    def _drop(self, i: int, e: int) -> None:
        """Remove entry e (at index slot i): index, LRU list, accounting, free chain."""
        recs = self._recs
        prev = self._prev
        nxt = self._next
        p = prev[e]
        q = nxt[e]
        nxt[p] = q
        prev[q] = p
        self._bytes -= len(recs[e]) + _ACCOUNT_EXTRA
        recs[e] = _FREE
        nxt[e] = self._free
        self._free = e
        self._count -= 1
        # backward-shift deletion (Knuth 6.4, algorithm R): no deleted markers are left behind
        index = self._index
        hashes = self._hashes
        mask = self._mask
        j = i
        while True:
            j = (j + 1) & mask
            f = index[j]
            if f < 0:
                break
            k = hashes[f] & mask
            # f stays if its home slot k lies cyclically in (i, j]; otherwise it fills the hole
            if (k <= i or k > j) if i <= j else (k <= i and k > j):
                index[i] = f
                i = j
        index[i] = _EMPTY

    def _make_room(self, size: int) -> None:
        """Evict least recently used sessions until one more session of ``size`` bytes fits
        (``size == 0``: until the byte bound holds again)."""
        nxt = self._next
        recs = self._recs
        max_entries = self.max_entries
        max_bytes = self.max_bytes
        now = self._clock()
        while self._count and (
            (size and self._count >= max_entries) or self._bytes + size > max_bytes
        ):
            e = nxt[0]
            if _EXP_UNPACK(recs[e])[0] <= now:
                self.expirations += 1
            else:
                self.evictions += 1
            self._drop(self._slot_of(e), e)

    def _extend(self) -> int:
        """Add a chunk of free entries; returns the first (the new head of the free chain)."""
        recs = self._recs
        start = len(recs)
        k = max(16, start >> 3)
        recs.extend([_FREE] * k)
        zeros = array("i", [0]) * k
        self._hashes.extend(array("I", [0]) * k)
        self._prev.extend(zeros)
        chain = array("i", range(start + 1, start + k + 1))
        chain[-1] = 0
        self._next.extend(chain)
        self._free = start
        return start

    def _grow(self) -> None:
        """Rebuild the index 4x larger (2x from 2**20 slots on): amortised O(1) per put."""
        slots = self._mask + 1
        slots *= 4 if slots < _FAST_GROWTH_SLOTS else 2
        index = array("i", [_EMPTY]) * slots
        mask = slots - 1
        hashes = self._hashes
        for e, rec in enumerate(self._recs):
            if rec:
                index[_empty_slot(index, mask, hashes[e])] = e
        self._index = index
        self._mask = mask
        self._max_load = slots // 2

    def _intern_origin(self, origin: str) -> int:
        if len(self._origins) >= _MAX_INTERNED:
            return -1
        oi = len(self._origins)
        self._origins.append(origin)
        self._origin_ix[origin] = oi
        return oi

    def _intern_ctx(self, sid_ctx: bytes) -> int:
        if len(self._ctxs) >= _MAX_INTERNED:
            return -1
        ci = len(self._ctxs)
        sid_ctx = bytes(sid_ctx)
        self._ctxs.append(sid_ctx)
        self._ctx_ix[sid_ctx] = ci
        return ci

    def _evict_tombstone(self) -> None:
        heap = self._tomb_heap
        tomb = self._tomb
        while heap:
            until, sid = heapq.heappop(heap)
            if tomb.get(sid) == until:
                del tomb[sid]
                self.tombstone_evictions += 1
                return

    def _rebuild_tomb_heap(self) -> None:
        heap = [(until, sid) for sid, until in self._tomb.items()]
        heapq.heapify(heap)
        self._tomb_heap = heap
