"""Replay protection: a time window and, per sender, a sliding window over message counters.

Every sealed message carries its sender's salt (one per process start) and a counter (see
``sealing``).  A receiver keeps, per (origin, salt), the highest counter taken and a bitmap of the
``WINDOW`` counters below it: a counter taken before, or one below the bitmap, is a replay.  A
message sealed outside ``[now - lifetime - skew, now + skew]`` is refused whatever its counter, so
the table need only remember senders heard from within the lifetime; older entries are evicted
(safe: anything they sealed is stale by now).  Both tables are bounded and refuse, never raise.

The state belongs to one delivery path (one subscription): a receiver that restarts and replays the
stream rebuilds it from the stream itself, so a copy published after its original is refused again.
"""

from __future__ import annotations

from sessionbus.schemas.errors import EnvelopeError, Reason

WINDOW = 1024  # counters below the highest one that may still arrive (reordered) once


class Freshness:
    __slots__ = ("_origins", "_senders", "max_origins", "max_senders", "taken")

    def __init__(self, *, max_senders: int = 4096, max_origins: int = 1024) -> None:
        self.max_senders = max_senders
        self.max_origins = max_origins
        # (origin, salt) -> [highest counter, bitmap (bit i: highest - i taken), newest sent_at]
        self._senders: dict[tuple[str, bytes], list[float | int]] = {}
        self._origins: dict[str, int] = {}  # origin -> number of its senders in the table
        self.taken = 0

    def __len__(self) -> int:
        return len(self._senders)

    def check(self, origin: str, salt: bytes, counter: int, sent_at: float, now: float,
              lifetime: float, skew: float) -> None:
        """Take the message, or raise ``EnvelopeError`` (future, stale, replay, table_full)."""
        if sent_at > now + skew:
            raise EnvelopeError(Reason.FUTURE, f"sealed {sent_at - now:.0f}s ahead")
        if sent_at < now - lifetime - skew:
            raise EnvelopeError(Reason.STALE, f"sealed {now - sent_at:.0f}s ago")
        key = (origin, salt)
        entry = self._senders.get(key)
        if entry is None:
            self._admit(key, now - lifetime - skew)
            self._senders[key] = [counter, 1, sent_at]
            self._origins[origin] = self._origins.get(origin, 0) + 1
            self.taken += 1
            return
        high, bits = int(entry[0]), int(entry[1])
        if counter > high:
            shift = counter - high
            bits = ((bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            entry[0], entry[1] = counter, bits
        else:
            back = high - counter
            if back >= WINDOW or bits >> back & 1:
                raise EnvelopeError(Reason.REPLAY, f"counter {counter} of {origin} taken")
            entry[1] = bits | (1 << back)
        if sent_at > entry[2]:
            entry[2] = sent_at
        self.taken += 1

    def _admit(self, key: tuple[str, bytes], stale_before: float) -> None:
        if key[0] not in self._origins and len(self._origins) >= self.max_origins:
            self._evict(stale_before)
            if len(self._origins) >= self.max_origins:
                raise EnvelopeError(Reason.TABLE_FULL, "too many origins")
        if len(self._senders) >= self.max_senders:
            self._evict(stale_before)
            if len(self._senders) >= self.max_senders:
                raise EnvelopeError(Reason.TABLE_FULL, "too many senders")

    def _evict(self, stale_before: float) -> None:
        for k in [k for k, e in self._senders.items() if e[2] < stale_before]:
            del self._senders[k]
            left = self._origins[k[0]] - 1
            if left:
                self._origins[k[0]] = left
            else:
                del self._origins[k[0]]
