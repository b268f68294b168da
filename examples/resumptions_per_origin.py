"""A worked custom consumer: resumptions per node that made the session, as a Prometheus metric.

Run it from the repository's top directory (an import string resolves from the working
directory first), against the local farm (``bash ops/local-farm``), with the farm's bus key:

    export SESSIONBUS_BUS_KEY_FILE=farm/bus.key SESSIONBUS_ANY_ORIGIN_USERS=guest
    sessionbus worker --consumer examples.resumptions_per_origin:consumer --metrics 127.0.0.1:9430

(127.0.0.1:9430: the farm's key publisher has 9400, its worker 9401, its nodes 9402 and up.)

and read ``sessionbus_example_resumptions_total{session_origin="node-1",where="cross"}``: how often
sessions made on node-1 were resumed, on node-1 itself (``local``) or on another node
(``cross``: a full handshake sessionbus saved).  Node ids are bounded by the farm's size, so they
are fine as label values; session ids never are.
"""

from __future__ import annotations

from prometheus_client import Counter

from sessionbus.consumer.api import Consumer, EventType, SessionEvent

RESUMPTIONS = Counter(
    "sessionbus_example_resumptions_total",
    "Resumptions of sessions, by the node that made them and where they resumed",
    ["session_origin", "where"],
)


async def count_resumption(event: SessionEvent) -> None:
    if not event.hit or event.session_origin is None:
        return  # a miss: a full handshake, nothing resumed
    where = "local" if event.session_origin == event.origin else "cross"
    RESUMPTIONS.labels(event.session_origin, where).inc()


# GET events say whether a lookup hit and whose session it was. A durable queue of its own: the
# count survives worker restarts without missing events.
consumer = Consumer("resumptions-per-origin", count_resumption, types=(EventType.GET,))
