"""A built-in consumer that sees the whole farm's lookups: how many resumptions crossed nodes.

A GET that hit a session made on another node is a handshake sessionbus saved; the ratio of
``cross`` to all lookups is the farm's figure of merit.
"""

from __future__ import annotations

from prometheus_client import Counter

from sessionbus.consumer.api import Consumer, Source
from sessionbus.schemas.events import EventType, SessionEvent

FARM_LOOKUPS = Counter(
    "sessionbus_farm_lookups_total",
    "Session lookups seen on the bus from every node: local hit, cross-node hit, miss",
    ["result"],
)
FARM_SESSIONS = Counter(
    "sessionbus_farm_events_total", "Events seen on the bus from every node", ["type"]
)
_LOCAL, _CROSS, _MISS = (FARM_LOOKUPS.labels(r) for r in ("local", "cross", "miss"))
_BY_TYPE = {t: FARM_SESSIONS.labels(t.value) for t in (EventType.NEW, EventType.GET,
                                                       EventType.REMOVE)}


async def _count(event: SessionEvent) -> None:
    _BY_TYPE[event.type].inc()
    if event.type is EventType.GET:
        if not event.hit:
            _MISS.inc()
        elif event.session_origin == event.origin:
            _LOCAL.inc()
        else:
            _CROSS.inc()


def farm_stats() -> Consumer:
    # Statistics only: a temporary queue, nothing piles up while no worker runs.
    return Consumer("farm-stats", _count, source=Source.EXCLUSIVE, retries=0, prefetch=256)
