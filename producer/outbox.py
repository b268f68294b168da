"""A bounded in-process queue of events and the task that publishes it in confirmed batches.

``put_*`` run inside OpenSSL callbacks on the event loop: they only append to a deque.  The
publisher takes up to ``batch_max`` events of one type (or what arrived within ``linger``), seals
them into one message, and publishes with confirms, several batches in flight.  A batch whose
publish fails (broker gone, timeout, nack) goes back to the front and is sent again after the
connection returns: the receivers' idempotent apply makes a resend after a lost confirm harmless.

When full, GET events (statistics) are dropped first, then the oldest NEW; a REMOVE (a revocation)
is dropped only when nothing else is left.  Every drop is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import cast

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aiormq.exceptions import DeliveryError, PublishError

from sessionbus.bus.connection import BROKER_ERRORS
from sessionbus.bus.topology import Topology, session_routing_key
from sessionbus.metrics import Metrics
from sessionbus.schemas.codec import CONTENT_TYPE, encode_rows, sender_user
from sessionbus.schemas.events import EventType, RemoveReason
from sessionbus.schemas.rows import GetRow, NewRow, RemoveRow, Row
from sessionbus.schemas.sealing import BusKeys

log = logging.getLogger(__name__)

# put_get builds its row in one C call (tuple.__new__), not through GetRow's Python __new__: a
# cache front queues one per get (bench row httpd_cache "resumed 1.2 handshakes/s").
_new_row = tuple.__new__

_PRIORITY = (EventType.NEW, EventType.REMOVE, EventType.GET)
_ROW_OVERHEAD = 128  # msgpack framing, id, sid_ctx, times of one row, generously
# What a full outbox drops to make room for an incoming event of each type (oldest first); an
# incoming GET never displaces anything.
_DROP_ORDER: dict[EventType, tuple[EventType, ...]] = {
    EventType.GET: (),
    EventType.NEW: (EventType.GET, EventType.NEW),
    EventType.REMOVE: (EventType.GET, EventType.NEW),
}


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    capacity: int = 100_000
    batch_max: int = 256
    # GET rows are small (no session), and a message per few hundred lookups was, on a busy
    # cache front, a large part of what replication cost it.
    get_batch_max: int = 1024
    linger: float = 0.002  # seconds a partial batch waits for company while one is in flight
    get_linger: float = 0.25  # seconds GET events (statistics) may wait to travel together
    # At most one NEW (and one REMOVE) message per this many seconds (0: no limit). An event
    # after a quiet spell goes at once; under load, events wait for the next slot and share it,
    # so the CPU publishing costs stays bounded whatever the session rate. A cache front shares
    # its core with the server it serves and uses 50 ms.
    min_interval: float = 0.0
    # Session bytes per message, well under receivers' limit (codec.Limits, 1 MiB).
    batch_bytes: int = 512 * 1024
    in_flight: int = 8  # batches awaiting confirms at once
    publish_timeout: float = 10.0


class Outbox:
    def __init__(
        self,
        origin: str,
        topology: Topology,
        keys: BusKeys,
        settings: OutboxSettings = OutboxSettings(),
        metrics: Metrics | None = None,
    ) -> None:
        self.origin = origin
        self._topo = topology
        self._keys = keys
        self._s = settings
        self._queues: dict[EventType, deque[Row]] = {t: deque() for t in _PRIORITY}
        self._gets = self._queues[EventType.GET]
        self._depth = 0
        self._seq = 0
        self._batches = 0
        self._wake = asyncio.Event()
        self._in_flight = 0
        self._last_taken = {t: 0.0 for t in _PRIORITY}  # when a batch of each type last left
        self._idle = asyncio.Event()
        self._idle.set()
        self._channel: AbstractChannel | None = None
        self.blocked = False  # events wait and the last publish attempt failed
        self._m = (metrics or Metrics()).outbox
        self._published = {t: self._m.published.labels(t.value) for t in _PRIORITY}
        self._dropped = {t: self._m.dropped.labels(t.value) for t in _PRIORITY}
        self._m.track(lambda: self._depth, settings.capacity, lambda: self.blocked)

    @property
    def depth(self) -> int:
        return self._depth

    # --- producer API (synchronous, O(1), never blocks) ------------------------------------

    def put_new(self, session_id: bytes, sid_ctx: bytes, expires: float, der: bytes,
                opaque: bool = False) -> None:
        self._put(EventType.NEW, NewRow(self._next_seq(), time.time(), session_id, sid_ctx,
                                        expires, der, opaque))

    def put_get(self, session_id: bytes, sid_ctx: bytes, expires: float, hit: bool,
                session_origin: str | None) -> None:
        # _put written out for GET: a cache front calls this on every get.
        if self._depth >= self._s.capacity and not self._make_room(EventType.GET):
            return
        self._seq += 1
        gets = self._gets
        gets.append(_new_row(GetRow, (self._seq, time.time(), session_id, sid_ctx, expires, hit,
                                      session_origin or "")))
        self._depth += 1
        # An event joining held events changes nothing for the publisher until the batch is
        # full: waking it per event (a timer and a task each time) cost a cache front more CPU
        # than answering the request.
        if self._depth == 1:
            self._idle.clear()  # set only while empty (see run), so only from empty
            self._wake.set()
        elif len(gets) >= self._s.get_batch_max:
            self._wake.set()

    def put_remove(self, session_id: bytes, sid_ctx: bytes, expires: float,
                   reason: RemoveReason) -> None:
        self._put(EventType.REMOVE, RemoveRow(self._next_seq(), time.time(), session_id,
                                              sid_ctx, expires, reason.value))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _put(self, type_: EventType, row: Row) -> None:
        """Queue a NEW or REMOVE row."""
        if self._depth >= self._s.capacity and not self._make_room(type_):
            return
        q = self._queues[type_]
        q.append(row)
        self._depth += 1
        if self._depth == 1:
            self._idle.clear()
        # from empty, its slot may be due now; later events share that slot
        if not self._s.min_interval or len(q) == 1 or len(q) >= self._s.batch_max:
            self._wake.set()

    def _make_room(self, incoming: EventType) -> bool:
        """Drop one queued event for ``incoming``, or refuse it. Statistics go first, then
        sessions that merely fill caches (NEW), and revocations (REMOVE) last of all."""
        order = _DROP_ORDER[incoming]
        for victim in order:
            q = self._queues[victim]
            if q:
                q.popleft()
                self._dropped[victim].inc()
                self._depth -= 1
                return True
        self._dropped[incoming].inc()
        return False

    # --- publisher ------------------------------------------------------------------------

    async def flush(self, timeout: float) -> bool:
        """Wait until everything put so far is confirmed. False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _hold(self) -> float:
        """Seconds to keep events back so they travel in few messages (0: something is due).

        GETs are statistics: nobody waits for them, and one message per resumption would cost
        a node more than the resumption saved, so they wait ``get_linger`` (or until
        ``get_batch_max`` of them are queued). A NEW or REMOVE waits for its type's next slot
        (``min_interval`` after the last message of that type; 0: none). A full batch never
        waits."""
        now = time.time()
        waits: list[float] = []
        gets = self._queues[EventType.GET]
        if gets:
            waits.append(self._get_wait(gets, now))
        for t in (EventType.NEW, EventType.REMOVE):
            q = self._queues[t]
            if q:
                waits.append(self._slot_wait(t, q, now))
        return max(0.0, min(waits)) if waits else 0.0

    def _slot_wait(self, type_: EventType, q: deque[Row], now: float) -> float:
        if not self._s.min_interval or len(q) >= self._s.batch_max:
            return 0.0
        return self._last_taken[type_] + self._s.min_interval - now

    def _get_wait(self, gets: deque[Row], now: float) -> float:
        if len(gets) >= self._s.get_batch_max:
            return 0.0
        oldest: float = gets[0].time
        return oldest + self._s.get_linger - now

    def _take(self, everything: bool = False) -> tuple[EventType, list[Row]] | None:
        """The next batch: of the types that are due (see ``_hold``; all if ``everything``),
        from the one whose oldest event is oldest, as many as may go.

        Batches are per type (routing keys are), yet the events of one session must leave in
        the order they happened (a consumer sees NEW, GET..., REMOVE in that order).  So a batch
        stops before an event whose session has an older event still waiting in another type's
        queue; when that cuts it to nothing, the oldest events go first, due or not.  Only the
        other queues' events older than the batch's last are looked at.
        """
        now = time.time()
        heads: list[tuple[int, EventType]] = []
        due: list[tuple[int, EventType]] = []
        for t, q in self._queues.items():
            if not q:
                continue
            heads.append((q[0].seq, t))
            wait = self._get_wait(q, now) if t is EventType.GET else self._slot_wait(t, q, now)
            if everything or wait <= 0:
                due.append((q[0].seq, t))
        if not due:
            return None
        taken = self._take_from(min(due)[1])
        if taken is None:  # its first event waits behind an older one of the same session
            taken = self._take_from(min(heads)[1])
        if taken is not None:
            self._last_taken[taken[0]] = now
        return taken

    def _take_from(self, type_: EventType) -> tuple[EventType, list[Row]] | None:
        q = self._queues[type_]
        n = min(len(q), self._s.get_batch_max if type_ is EventType.GET else self._s.batch_max)
        candidate = list(itertools.islice(q, n))
        if type_ is EventType.NEW:
            # Bound the message by bytes too: receivers refuse messages over their limit, and
            # sessions with client certificates can be a few KB each.
            size = 0
            for i, row in enumerate(candidate):
                size += len(cast(NewRow, row).der) + _ROW_OVERHEAD
                if size > self._s.batch_bytes and i:
                    candidate = candidate[:i]
                    break
        last_seq = candidate[-1].seq
        older: dict[bytes, int] = {}
        for t, other in self._queues.items():
            if t is type_:
                continue
            for row in other:
                if row.seq > last_seq:
                    break
                seen = older.get(row.session_id)
                if seen is None or row.seq < seen:
                    older[row.session_id] = row.seq
        if older:
            for i, row in enumerate(candidate):
                first = older.get(row.session_id)
                if first is not None and first < row.seq:
                    candidate = candidate[:i]
                    break
        if not candidate:
            return None
        for _ in candidate:
            q.popleft()
        self._depth -= len(candidate)
        return type_, candidate

    def _give_back(self, type_: EventType, rows: list[Row]) -> None:
        self._queues[type_].extendleft(reversed(rows))
        self._depth += len(rows)
        # Over capacity after a give-back: trim in the same order as _put would have.
        while self._depth > self._s.capacity:
            victim = next(t for t in _DROP_ORDER[EventType.REMOVE] + (EventType.REMOVE,)
                          if self._queues[t])
            self._queues[victim].pop()
            self._dropped[victim].inc()
            self._depth -= 1

    async def run(self, connection: AbstractRobustConnection) -> None:
        """Publish forever (until cancelled)."""
        slots = asyncio.Semaphore(self._s.in_flight)
        exchange: AbstractExchange | None = None
        user_id = sender_user(str(getattr(connection, "url", "")))  # the broker checks it
        failed = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        crashed: list[BaseException] = []  # a publish that raised something not the broker's

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                crashed.append(task.exception())  # type: ignore[arg-type]
                self._wake.set()

        async def publish(type_: EventType, rows: list[Row],
                          exchange: AbstractExchange) -> None:
            try:
                body, headers = encode_rows(type_, self.origin, rows, self._keys)
                self._batches += 1
                msg = aio_pika.Message(
                    body, headers=headers, content_type=CONTENT_TYPE,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=f"{self.origin}.{self._batches}", user_id=user_id,
                )
                await asyncio.wait_for(
                    exchange.publish(
                        msg, session_routing_key(type_, self.origin),
                        mandatory=type_ is not EventType.GET,
                    ),
                    self._s.publish_timeout,
                )
            except BROKER_ERRORS as exc:
                reason = (
                    "timeout" if isinstance(exc, TimeoutError)
                    else "returned" if isinstance(exc, PublishError)
                    else "nack" if isinstance(exc, DeliveryError)
                    else "connection"
                )
                if reason == "returned":
                    self._m.returned.labels(type_.value).inc()
                self._m.publish_failures.labels(reason).inc()
                log.warning("publish of %d %s events failed (%s); will resend", len(rows),
                            type_.value, type(exc).__name__)
                self._give_back(type_, rows)
                self._set_blocked(True)
                failed.set()
            else:
                self._published[type_].inc(len(rows))
                self._set_blocked(False)
            finally:
                self._in_flight -= 1
                slots.release()
                if self._depth == 0 and self._in_flight == 0:
                    self._idle.set()
                self._wake.set()

        while True:
            if crashed:
                raise crashed[0]  # a bug: the supervisor logs it and ends the process
            if self._depth == 0:
                self._wake.clear()
                if self._in_flight == 0:
                    self._idle.set()
                    self._set_blocked(False)
                await self._wake.wait()
                continue
            if failed.is_set() or exchange is None:
                exchange = None
                await connection.connected.wait()
                try:
                    exchange = await self._open(connection)
                except BROKER_ERRORS as exc:
                    log.warning("cannot open publishing channel: %s", type(exc).__name__)
                    self._set_blocked(True)
                    await asyncio.sleep(0.5)
                    continue
                failed.clear()
            hold = self._hold()
            if hold > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), hold)
                continue
            if self._depth < self._s.batch_max and self._in_flight and not self._s.min_interval:
                # Nagle-like: while a batch is on its way, let the next one fill a little;
                # with nothing in flight, send at once (low latency at low rates).
                await asyncio.sleep(self._s.linger)
            await slots.acquire()
            taken = self._take()
            if taken is None:
                slots.release()
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(publish(*taken, exchange))
            tasks.add(task)
            task.add_done_callback(done)
            if failed.is_set():
                await asyncio.sleep(0.2)  # the connection is going: let it go before retrying

    def _set_blocked(self, blocked: bool) -> None:
        self.blocked = blocked

    async def _open(self, connection: AbstractRobustConnection) -> AbstractExchange:
        if self._channel is not None:  # one publishing channel at a time
            with contextlib.suppress(*BROKER_ERRORS):
                await asyncio.wait_for(self._channel.close(), 2)
        # on_return_raises: a mandatory message the broker returns (no queue took it: the
        # stream not back yet after a restart, say) fails its publish and is resent; without it
        # aio-pika resolves the confirm as a success and the batch was lost.
        self._channel = channel = await connection.channel(publisher_confirms=True,
                                                           on_return_raises=True)
        # Nothing is declared or checked here: a publish to a missing exchange fails (and is
        # resent), and nothing this channel needs lives on a broker node other than the
        # exchange's (the DLX, the dead queue are not involved in publishing).
        return await channel.get_exchange(self._topo.sessions_exchange, ensure=False)
