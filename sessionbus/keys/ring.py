"""The ticket-key timeline the key publisher follows: pure functions of (ring held, now).

With ``R`` = rotate every, ``K`` = keep, ``M`` = announce ahead, key *i* has an encrypt window
``[t_i, t_i + R)`` and the windows follow each other back to back (``t_{i+1} = t_i + R``):

    published_at  = t_i - M          distributed, decrypt-only (ahead)
    encrypt_from  = t_i              nodes mint tickets with it
    encrypt_until = t_i + R          decrypt-only: tickets under it are accepted and renewed
    erase_at      = t_i + R + K*R    forgotten: its tickets get a full handshake

Why these edges:

* A key is on the bus at least ``M`` before any node may encrypt with it, so a ticket minted on
  any node decrypts on every node as long as a ring reaches every node within ``M`` (broker
  delivery, plus clock skew between nodes, plus, for ``sessionbus keyfile``, writing the files and
  reloading the server).  That includes the very first key of a farm: it encrypts only ``M``
  after it was published, so a fresh farm issues no tickets for its first ``M`` seconds.
* A ticket minted at the last instant of a key's window still decrypts for ``K*R`` seconds.  So a
  node's ticket lifetime (``sessionbus node --session-timeout``, which OpenSSL also sends as the
  ticket lifetime hint) must be at most ``K*R``: longer-lived tickets would be refused (full
  handshake, never a wrong resumption) once their key is erased.  Tickets under an old key are
  renewed under the current one, so an active client never reaches that edge.  (Only a key
  that encrypts past its window, because the publisher was down or late, gives the tickets it
  mints then less than ``K*R``.)
* With no publisher at all, nodes keep their last ring: its newest key encrypts until it is
  erased, more than ``K*R + M`` (2 h by default) after the last ring was published; after that
  they issue no tickets (full handshakes) until a publisher returns.

Defaults: ``R`` = 3600 s (hourly rotation, as common practice), ``K`` = 2, so ``K*R`` = 7200 s
equals the node's default ``--session-timeout``, and a key (hence whoever steals one) opens
tickets for at most ``R + K*R`` = 3 h after it started encrypting.  The ring holds at most
``K + 2`` = 4 keys (one ahead, the current, two old).  ``M`` = 60 s: far above broker
propagation (milliseconds) and an ordinary server reload, and short against ``R``.

:func:`advance` continues a ring it is given, whoever made it (this process, or a publisher that
died: it is read back from the key stream): it never changes a key already in the ring (neither
its secrets nor any of its times), only drops erased keys and adds the keys whose
``published_at`` has come.  The windows continue from the newest key's ``encrypt_until``.  When
that is already too close (a publisher that was down, or took over late) the new key starts ``M``
from now instead: the previous key keeps encrypting in between (``KeyRing.current`` keeps the
newest started key), so nothing breaks, and no key ever encrypts before it has been out for
``M``.  A publisher that wakes a little late would otherwise push each window back by its
lateness; it asks for keys ``early`` (a fraction of ``M``) ahead of time instead, which only
lengthens their announcement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sessionbus.schemas.ticket_keys import KeyRing, TicketKey

DEFAULT_ROTATE_EVERY = 3600.0
DEFAULT_KEEP = 2
DEFAULT_ANNOUNCE_AHEAD = 60.0
# The unchanged ring is published again at most this often (a node that starts reads the key
# stream's last chunk; see ``Timeline.refresh_every``).
MAX_REFRESH_EVERY = 60.0

KeyFactory = Callable[[float, float, float, float], TicketKey]


@dataclass(frozen=True, slots=True)
class Timeline:
    rotate_every: float = DEFAULT_ROTATE_EVERY  # R: length of each key's encrypt window
    keep: int = DEFAULT_KEEP  # K: encrypt windows a key still decrypts after its own
    announce_ahead: float = DEFAULT_ANNOUNCE_AHEAD  # M: on the bus this long before encrypting

    def __post_init__(self) -> None:
        if not self.rotate_every > 0:
            raise ValueError("rotate every must be positive")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError("keep must be an integer >= 1 (0 would break every ticket "
                             "minted just before a rotation)")
        if not 0 < self.announce_ahead <= self.rotate_every:
            raise ValueError("announce ahead must be positive and at most rotate every")

    @property
    def decrypt_window(self) -> float:
        """K*R: how long after its encrypt window a key still decrypts. The longest ticket
        lifetime (node ``--session-timeout``) that always resumes."""
        return self.keep * self.rotate_every

    @property
    def refresh_every(self) -> float:
        """How often the leader republishes an unchanged ring: min(R/4, 60 s)."""
        return min(self.rotate_every / 4, MAX_REFRESH_EVERY)

    def key_times(self, encrypt_from: float) -> tuple[float, float, float, float]:
        """(published_at, encrypt_from, encrypt_until, erase_at) of a key starting then."""
        until = encrypt_from + self.rotate_every
        return (encrypt_from - self.announce_ahead, encrypt_from, until,
                until + self.decrypt_window)


def _generate(published_at: float, encrypt_from: float, encrypt_until: float,
              erase_at: float) -> TicketKey:
    return TicketKey.generate(published_at, encrypt_from, encrypt_until, erase_at)


def _newest(keys: list[TicketKey]) -> TicketKey | None:
    return max(keys, key=lambda k: (k.encrypt_from, k.encrypt_until), default=None)


def advance(
    ring: KeyRing | None,
    now: float,
    timeline: Timeline,
    *,
    early: float = 0.0,
    generate: KeyFactory = _generate,
) -> tuple[KeyRing, float]:
    """The ring to hold at ``now`` after ``ring``, and when it next has to change.

    Drops keys whose ``erase_at`` has come, adds every key whose ``published_at`` is at most
    ``early`` seconds away, and keeps the others exactly as they are.  Publishing a key early
    only lengthens its announcement; a caller that sleeps until the returned time and wakes at
    most ``early`` late therefore keeps the windows exactly back to back (a late wake-up would
    start the next window late by as much).  Erasing is never early: a ticket keeps its whole
    decrypt window.

    Returns ``ring`` itself (the same object) when nothing changed; otherwise a new ring whose
    ``(issued_at, seq)`` is greater than ``ring``'s (what nodes order rings by), even if this
    host's clock is behind the previous publisher's.  ``generate`` makes a key from its four
    times (tests pass a deterministic one).
    """
    if early < 0:
        raise ValueError("early must not be negative")
    held = list(ring.keys) if ring is not None else []
    keys = [k for k in held if now < k.erase_at]
    added = 0
    while True:
        newest = _newest(keys)
        if newest is None:
            start = now + timeline.announce_ahead  # nothing to continue: a first key
        elif newest.encrypt_until - timeline.announce_ahead - early <= now:
            # Continue back to back, unless that would encrypt less than M after publishing.
            start = max(newest.encrypt_until, now + timeline.announce_ahead)
        else:
            break
        keys.append(generate(*timeline.key_times(start)))
        added += 1
    newest = _newest(keys)
    assert newest is not None
    next_change = min(
        [newest.encrypt_until - timeline.announce_ahead - early, *(k.erase_at for k in keys)]
    )
    if ring is not None and added == 0 and len(keys) == len(held):
        return ring, next_change
    keys.sort(key=lambda k: (k.encrypt_from, k.encrypt_until))
    if ring is None:
        return KeyRing(seq=1, issued_at=now, keys=tuple(keys)), next_change
    return (
        KeyRing(seq=ring.seq + 1, issued_at=max(now, ring.issued_at), keys=tuple(keys)),
        next_change,
    )


def newest(a: KeyRing | None, b: KeyRing | None) -> KeyRing | None:
    """The later of two rings by (issued_at, seq); ``a`` on a tie (what is held stays held)."""
    if a is None or b is None:
        return a or b
    return a if (a.issued_at, a.seq) >= (b.issued_at, b.seq) else b


def added_keys(before: KeyRing | None, after: KeyRing) -> int:
    """How many keys ``after`` holds that ``before`` did not (rotations published)."""
    names = {k.name for k in before.keys} if before is not None else set()
    return sum(1 for k in after.keys if k.name not in names)


def describe(ring: KeyRing, now: float) -> str:
    """A log-safe summary: counts by state and the current key's name prefix, never secrets."""
    counts: dict[str, int] = {}
    for k in ring.keys:
        state = k.state(now).value
        counts[state] = counts.get(state, 0) + 1
    current = ring.current(now)
    parts = [f"{n} {s}" for s, n in sorted(counts.items())]
    cur = f"current {current.name[:4].hex()}" if current is not None else "no current key"
    return f"ring {ring.seq}: {len(ring.keys)} keys ({', '.join(parts)}; {cur})"
