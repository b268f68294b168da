"""A built-in consumer that sees the whole farm's lookups: how many resumptions crossed nodes.

A GET that hit a session made on another node is a handshake sessionbus saved; the ratio of
``cross`` to all lookups is the farm's figure of merit.
"""

from __future__ import annotations

from sessionbus.consumer.api import Consumer, Source
from sessionbus.metrics import Metrics
from sessionbus.schemas.events import EventType, SessionEvent


def farm_stats(metrics: Metrics) -> Consumer:
    """The consumer, counting into ``metrics`` (its families are made here, at boot)."""
    m = metrics.farm_stats
    local, cross, miss = (m.lookups.labels(r) for r in ("local", "cross", "miss"))
    by_type = {t: m.events.labels(t.value) for t in (EventType.NEW, EventType.GET,
                                                     EventType.REMOVE)}

    async def count(event: SessionEvent) -> None:
        by_type[event.type].inc()
        if event.type is EventType.GET:
            if not event.hit:
                miss.inc()
            elif event.session_origin == event.origin:
                local.inc()
            else:
                cross.inc()

    # Statistics only: a temporary queue, nothing piles up while no worker runs.
    return Consumer("farm-stats", count, source=Source.EXCLUSIVE, retries=0, prefetch=256)
