"""Prometheus metrics of the producer side: TLS nodes, the outbox, the cache front, key publisher.

Shared ones (broker connection, replica, ticket-key age) live in ``sessionbus.consumer.metrics``.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge

from sessionbus.consumer.metrics import LAG_BUCKETS
from sessionbus.schemas.events import SESSION_EVENT_TYPES
from sessionbus.servers.cache.request_stats import RequestStats

HANDSHAKES = Counter("sessionbus_handshakes_total", "Completed TLS handshakes", ["kind"])
LOOKUPS = Counter(
    "sessionbus_lookups_total", "Session lookups from OpenSSL's get callback", ["result"]
)
REMOVES_PROPAGATED = Counter(
    "sessionbus_removes_propagated_total",
    "Sessions OpenSSL invalidated after a fatal error, published as REMOVE",
)
EVENTS_PUBLISHED = Counter(
    "sessionbus_events_published_total", "Events confirmed by the broker", ["type"]
)
EVENTS_DROPPED = Counter(
    "sessionbus_events_dropped_total", "Events dropped because the outbox was full", ["type"]
)
MESSAGES_RETURNED = Counter(
    "sessionbus_messages_returned_total",
    "Published messages no queue took (unroutable); NEW/REMOVE ones are sent again",
    ["type"],
)
PUBLISH_FAILURES = Counter(
    "sessionbus_publish_failures_total",
    "Batches whose publish failed and will be sent again", ["reason"],
)
OUTBOX_DEPTH = Gauge("sessionbus_outbox_depth", "Events waiting to be published")
OUTBOX_CAPACITY = Gauge("sessionbus_outbox_capacity", "Events the outbox holds at most")
OUTBOX_BLOCKED = Gauge(
    "sessionbus_outbox_blocked",
    "1 while events wait and the last publish attempt failed (no channel, nack, return)",
)

TICKET_DECRYPTIONS = Counter(
    "sessionbus_ticket_decryptions_total", "Session tickets presented to this node, by result",
    ["result"],
)
KEY_ROTATIONS = Counter("sessionbus_key_rotations_total", "Ticket key rotations published")
KEY_LEADER = Gauge("sessionbus_key_leader", "1 while this key publisher is the one rotating")
KEY_RINGS_PUBLISHED = Counter(
    "sessionbus_key_rings_published_total",
    "Ticket key rings the leader published: on a change, or the unchanged ring again",
    ["reason"],
)

# sessionbus_cache_requests_total{protocol,command,result} and
# sessionbus_cache_request_duration_seconds{protocol}, counted without locks (request_stats).
CACHE_STATS = RequestStats(
    "sessionbus_cache_requests_total", "sessionbus_cache_request_duration_seconds", LAG_BUCKETS
)
REGISTRY.register(CACHE_STATS)
CACHE_CONNECTIONS = Gauge("sessionbus_cache_connections", "Open cache front connections")

for _t in SESSION_EVENT_TYPES:
    EVENTS_PUBLISHED.labels(_t.value)
    EVENTS_DROPPED.labels(_t.value)
    MESSAGES_RETURNED.labels(_t.value)
for _k in ("full", "resumed"):
    HANDSHAKES.labels(_k)
for _r in ("hit", "miss"):
    LOOKUPS.labels(_r)
for _r in ("current", "renewed", "unknown"):
    TICKET_DECRYPTIONS.labels(_r)
for _r in ("timeout", "nack", "returned", "connection"):
    PUBLISH_FAILURES.labels(_r)
for _r in ("change", "refresh"):
    KEY_RINGS_PUBLISHED.labels(_r)
