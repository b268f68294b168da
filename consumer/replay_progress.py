"""Warm-join progress: offsets replayed and remaining, as a gauge and a log line every few seconds.

The replay's own subscription already records the last offset it handled; this only reads it
(nothing on the apply path), against the stream's end measured once when the replay begins (the
first offset of the stream's last chunk: exact to within one chunk). A replay that is over
within ``interval`` logs nothing here: only a slow one is worth a line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import Gauge

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0


async def stream_end(connection: AbstractRobustConnection, stream: str,
                     timeout: float = 5.0) -> int | None:
    """The offset of the first message of ``stream``'s last chunk; None if empty or unknown."""
    try:
        channel = await connection.channel()
    except Exception:
        return None
    try:
        await channel.set_qos(prefetch_count=1)
        # Not the declare's message count: it lags the stream by seconds. An empty stream
        # delivers nothing, and the wait below times out.
        queue = await channel.declare_queue(stream, passive=True)
        got: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

        async def first(message: AbstractIncomingMessage) -> None:
            offset = (message.headers or {}).get("x-stream-offset")
            if not got.done():
                got.set_result(offset if isinstance(offset, int) else None)

        tag = await queue.consume(first, arguments={"x-stream-offset": "last"})
        try:
            return await asyncio.wait_for(got, timeout)
        except TimeoutError:
            return None
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
    except Exception as exc:  # progress is informative: never fail a replay over it
        log.debug("cannot measure the end of %s: %s", stream, type(exc).__name__)
        return None
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


class ReplayProgress:
    """Reports a replay's progress until ``done`` is set.

    ``offset()`` is the last offset the replay handled (None before the first); ``end`` the
    stream's end when the replay began (``stream_end``); ``gauge`` has a ``state`` label
    (``ReplicaMetrics.replay_offsets``)."""

    def __init__(self, name: str, offset: Callable[[], int | None], done: asyncio.Event,
                 gauge: Gauge, end: int | None = None,
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.name = name
        self._gauge = gauge
        self._offset = offset
        self._done = done
        self.end = end
        self.interval = interval
        self.first: int | None = None
        self._started = time.monotonic()

    def sample(self) -> tuple[int, int | None]:
        """(replayed, remaining) now, and the gauges set to them."""
        offset = self._offset()
        if offset is not None and self.first is None:
            self.first = offset
        replayed = 0 if offset is None or self.first is None else offset - self.first + 1
        remaining = None if offset is None or self.end is None else max(0, self.end - offset)
        self._gauge.labels("replayed").set(replayed)
        if remaining is not None:
            self._gauge.labels("remaining").set(remaining)
        return replayed, remaining

    async def run(self, end: Awaitable[int | None] | None = None) -> None:
        """Report until done; ``end``, if given, is awaited first for ``self.end``."""
        if end is not None:
            self.end = await end
        while not self._done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), self.interval)
            replayed, remaining = self.sample()
            if self._done.is_set():
                break
            left = "unknown" if remaining is None else str(remaining)
            log.info("%s: warm join %.0f s in: %d offsets replayed, %s remaining", self.name,
                     time.monotonic() - self._started, replayed, left)
        self._gauge.labels("remaining").set(0)
