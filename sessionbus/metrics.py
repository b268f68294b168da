"""Every Prometheus family sessionbus exports, grouped by the capability that owns it.

Nothing registers at import.  A process makes one :class:`Metrics` on the registry it serves (the
CLI passes prometheus_client's global one; tests and embedding programs pass their own) and hands
it to its components; a group's families are registered the first time a component asks for the
group, at boot.  So each role exports exactly the families of what it runs, plus
``sessionbus_build_info``.

Base units, ``_total`` on counters, bounded label values only (event types, reason codes,
outcomes, configured consumer names): never a session id, node address or key.
"""

from __future__ import annotations

import math
import platform
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sessionbus.schemas.errors import Reason
from sessionbus.schemas.events import SESSION_EVENT_TYPES
from sessionbus.schemas.ticket_keys import KeyRing
from sessionbus.servers.cache.request_stats import RequestStats

__all__ = [
    "LAG_BUCKETS",
    "BusMetrics",
    "CacheMetrics",
    "ConsumerMetrics",
    "DeliveryMetrics",
    "FarmStatsMetrics",
    "KeyRingMetrics",
    "KeyfileMetrics",
    "Metrics",
    "NodeMetrics",
    "OutboxMetrics",
    "PublisherMetrics",
    "Readiness",
    "ReplicaMetrics",
    "TaskMetrics",
    "serve_metrics",
]

# Sub-millisecond buckets: replication inside one data centre should be well under 1 ms.
LAG_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
)
OUTCOMES = ("applied", "skipped", "rejected")


class TaskMetrics:
    """Supervised background tasks (``sessionbus.tasks``)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.failures = Counter(
            "sessionbus_task_failures_total",
            "Background tasks that failed (the process then exits non-zero), by task", ["task"],
            registry=r,
        )


class BusMetrics:
    """The broker connection every role has."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.connected = Gauge(
            "sessionbus_broker_connected", "1 while connected to RabbitMQ", registry=r
        )
        self.reconnects = Counter(
            "sessionbus_broker_reconnects_total", "Reconnections to RabbitMQ", registry=r
        )
        self.node = Info(
            "sessionbus_broker",
            "The broker node this process uses (host:port only, never credentials)", registry=r,
        )
        self._up = False
        self._ever = False

    def broker_state(self, connected: bool, host: str = "") -> None:
        """Record the connection coming or going (to ``host``, "host:port"); a return after a
        loss counts as a reconnect."""
        if connected and host:
            self.node.info({"host": host})
        if connected and not self._up and self._ever:
            self.reconnects.inc()
        self._up = connected
        self._ever = self._ever or connected
        self.connected.set(1 if connected else 0)


class DeliveryMetrics:
    """What a subscription (replica, consumer, key follower) took off the bus."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.events_consumed = Counter(
            "sessionbus_events_consumed_total", "Events received from the bus, by type and outcome",
            ["type", "outcome"], registry=r,
        )
        self.events_rejected = Counter(
            "sessionbus_events_rejected_total",
            "Messages or events that failed validation, by reason", ["reason"], registry=r,
        )
        self.dead_lettered = Counter(
            "sessionbus_messages_dead_lettered_total",
            "Messages copied to the dead-letter exchange, by reason", ["reason"], registry=r,
        )
        self.dead_letters_lost = Counter(
            "sessionbus_dead_letters_lost_total",
            "Rejected messages whose dead-letter copy could not be kept (best effort: no DLX, "
            "timeout, backlog full)", registry=r,
        )
        # Every bounded label combination, so dashboards see zeros, not gaps.
        for t in SESSION_EVENT_TYPES:
            for o in OUTCOMES:
                self.events_consumed.labels(t.value, o)
        for reason in Reason:
            self.events_rejected.labels(reason.value)
            self.dead_lettered.labels(reason.value)


class ReplicaView(Protocol):
    """What the replica gauges read from a replica (``PeerCache``) at scrape time."""

    def __len__(self) -> int: ...
    @property
    def bytes_used(self) -> int: ...
    @property
    def tombstones(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def expirations(self) -> int: ...


class _ReplicaCollector(Collector):
    # Read from the replica when scraped: no gauge to keep in step, in one place for the node
    # and the cache front alike.
    def __init__(self, replica: ReplicaView) -> None:
        self._replica = replica

    def collect(self) -> Iterator[Metric]:
        r = self._replica
        yield GaugeMetricFamily("sessionbus_replica_sessions", "Live sessions in the replica",
                                value=len(r))
        yield GaugeMetricFamily("sessionbus_replica_bytes", "Bytes the replica accounts for",
                                value=r.bytes_used)
        yield GaugeMetricFamily("sessionbus_replica_tombstones", "Removed sessions remembered",
                                value=r.tombstones)
        yield CounterMetricFamily(
            "sessionbus_replica_evictions",
            "Sessions evicted to stay within the replica's bounds", value=r.evictions,
        )
        yield CounterMetricFamily(
            "sessionbus_replica_expirations", "Sessions dropped because they expired",
            value=r.expirations,
        )


class ReplicaMetrics:
    """A replica of the farm's sessions (a node's, a cache front's) and its replication."""

    def __init__(self, r: CollectorRegistry) -> None:
        self._registry = r
        self._watched = False
        self.lag = Histogram(
            "sessionbus_replication_lag_seconds",
            "Event time at the origin to applied in this replica", buckets=LAG_BUCKETS, registry=r,
        )
        self.caught_up = Gauge(
            "sessionbus_replay_caught_up",
            "1 once the warm-join replay of the session stream reached live", registry=r,
        )
        self.replay_offsets = Gauge(
            "sessionbus_replay_offsets",
            "Warm-join replay of the session stream: offsets replayed so far, and remaining to "
            "the stream's end when the replay began", ["state"], registry=r,
        )
        for state in ("replayed", "remaining"):
            self.replay_offsets.labels(state)
        # Connected is not ready: after a (re)connect the bus is checked and channels restored.
        self.bus_ready = Gauge(
            "sessionbus_bus_ready",
            "1 while connected, the bus checked and every subscription restored (what /ready "
            "reports)", registry=r,
        )
        self.subscribed = Gauge(
            "sessionbus_replica_subscribed", "1 while the replica follows the session stream live",
            registry=r,
        )

    def watch(self, replica: ReplicaView) -> None:
        """Export ``replica``'s size and counters (once per process: one replica per role)."""
        if self._watched:
            raise RuntimeError("a replica is already exported on this registry")
        self._registry.register(_ReplicaCollector(replica))
        self._watched = True


class OutboxMetrics:
    """The outbox: events a process publishes (node, cache front, revoke)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.published = Counter(
            "sessionbus_events_published_total", "Events confirmed by the broker", ["type"],
            registry=r,
        )
        self.dropped = Counter(
            "sessionbus_events_dropped_total", "Events dropped because the outbox was full",
            ["type"], registry=r,
        )
        self.returned = Counter(
            "sessionbus_messages_returned_total",
            "Published messages no queue took (unroutable); NEW/REMOVE ones are sent again",
            ["type"], registry=r,
        )
        self.publish_failures = Counter(
            "sessionbus_publish_failures_total",
            "Batches whose publish failed and will be sent again", ["reason"], registry=r,
        )
        self.depth = Gauge("sessionbus_outbox_depth", "Events waiting to be published", registry=r)
        self.capacity = Gauge(
            "sessionbus_outbox_capacity", "Events the outbox holds at most", registry=r
        )
        self.blocked = Gauge(
            "sessionbus_outbox_blocked",
            "1 while events wait and the last publish attempt failed (no channel, nack, return)",
            registry=r,
        )
        # The outboxes of this process (normally one): the gauges add theirs up at scrape time,
        # so no gauge reads "the last outbox built".
        self._depths: list[Callable[[], int]] = []
        self._capacities: list[int] = []
        self._blocked: list[Callable[[], bool]] = []
        self.depth.set_function(lambda: sum(d() for d in self._depths))
        self.blocked.set_function(lambda: float(any(b() for b in self._blocked)))
        for t in SESSION_EVENT_TYPES:
            self.published.labels(t.value)
            self.dropped.labels(t.value)
            self.returned.labels(t.value)
        for reason in ("timeout", "nack", "returned", "connection"):
            self.publish_failures.labels(reason)

    def track(self, depth: Callable[[], int], capacity: int,
              blocked: Callable[[], bool] | None = None) -> None:
        self._depths.append(depth)
        if blocked is not None:
            self._blocked.append(blocked)
        self._capacities.append(capacity)
        self.capacity.set(sum(self._capacities))


class NodeMetrics:
    """A TLS node's handshakes, lookups and tickets (the OpenSSL callbacks)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.handshakes = Counter(
            "sessionbus_handshakes_total", "Completed TLS handshakes", ["kind"], registry=r
        )
        self.lookups = Counter(
            "sessionbus_lookups_total", "Session lookups from OpenSSL's get callback", ["result"],
            registry=r,
        )
        self.removes_propagated = Counter(
            "sessionbus_removes_propagated_total",
            "Sessions OpenSSL invalidated after a fatal error, published as REMOVE", registry=r,
        )
        self.ticket_decryptions = Counter(
            "sessionbus_ticket_decryptions_total",
            "Session tickets presented to this node, by result", ["result"], registry=r,
        )
        for kind in ("full", "resumed"):
            self.handshakes.labels(kind)
        for result in ("hit", "miss"):
            self.lookups.labels(result)
        for result in ("current", "renewed", "unknown"):
            self.ticket_decryptions.labels(result)


class KeyRingMetrics:
    """The ticket-key ring a process holds (node, keyfile, key publisher), read at scrape time:
    keys leave the ring and its newest key ages between rings."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.keys = Gauge("sessionbus_ticket_keys", "Ticket keys held (not erased)", registry=r)
        self.newest_age = Gauge(
            "sessionbus_ticket_key_newest_age_seconds",
            "Seconds since the newest ticket key held was published (grows if the publisher is "
            "silent); NaN while no key is held",
            registry=r,
        )
        self._ring_of: Callable[[], KeyRing | None] = lambda: None
        self._watching = False
        self.keys.set_function(self._keys)
        self.newest_age.set_function(self._age)

    def watch(self, ring_of: Callable[[], KeyRing | None]) -> None:
        """Export the ring ``ring_of()`` returns (once per registry: one ring per process)."""
        if self._watching:
            raise RuntimeError("a key ring is already exported on this registry")
        self._ring_of, self._watching = ring_of, True

    def _keys(self) -> float:
        ring = self._ring_of()
        return 0.0 if ring is None else float(len(ring.live(time.time())))

    def _age(self) -> float:
        ring = self._ring_of()
        newest = None if ring is None else ring.newest_published_at()
        return math.nan if newest is None else max(0.0, time.time() - newest)


class PublisherMetrics:
    """The key publisher's rotations and leadership."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.rotations = Counter(
            "sessionbus_key_rotations_total", "Ticket key rotations published", registry=r
        )
        self.leader = Gauge(
            "sessionbus_key_leader", "1 while this key publisher is the one rotating", registry=r
        )
        self.rings_published = Counter(
            "sessionbus_key_rings_published_total",
            "Ticket key rings the leader published: on a change, or the unchanged ring again",
            ["reason"], registry=r,
        )
        for reason in ("change", "refresh"):
            self.rings_published.labels(reason)


class KeyfileMetrics:
    """``sessionbus keyfile``: the files it writes and the command it runs."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.writes = Counter("sessionbus_keyfile_writes_total", "Key files rewritten", registry=r)
        self.command_failures = Counter(
            "sessionbus_keyfile_command_failures_total", "--on-change commands that failed",
            registry=r,
        )
        self.announce_ahead_short = Gauge(
            "sessionbus_keyfile_announce_ahead_short",
            "1 while the ring announces keys less far ahead than the server's known reload "
            "latency (ATS: ~10 s)", registry=r,
        )


class CacheMetrics:
    """The cache front's requests (counted without locks, see ``request_stats``) and clients."""

    def __init__(self, r: CollectorRegistry) -> None:
        # sessionbus_cache_requests_total{protocol,command,result} and
        # sessionbus_cache_request_duration_seconds{protocol}.
        self.requests = RequestStats(
            "sessionbus_cache_requests_total", "sessionbus_cache_request_duration_seconds",
            LAG_BUCKETS,
        )
        r.register(self.requests)
        self.connections = Gauge(
            "sessionbus_cache_connections", "Open cache front connections", registry=r
        )
        # the push subscription (servers/cache/push.py, Traffic Server's plugin)
        self.push_subscribers = Gauge(
            "sessionbus_cache_push_subscribers", "Push subscribers connected", registry=r
        )
        self.push_events = Counter(
            "sessionbus_cache_push_events_total",
            "Sessions (new, replays included) and removes pushed to subscribers", ["type"],
            registry=r,
        )
        for t in ("new", "remove"):
            self.push_events.labels(t)
        self.push_dropped = Counter(
            "sessionbus_cache_push_subscribers_dropped_total",
            "Push subscribers dropped: not reading (they reconnect and replay) or a bad subscribe",
            registry=r,
        )
        self.refused = Counter(
            "sessionbus_cache_refused_total",
            "Cache front connections and requests its access control refused, by reason",
            ["reason"],  # remote, uid (connections); service (a set/get/delete of another context)
            registry=r,
        )
        for reason in ("remote", "uid", "service"):
            self.refused.labels(reason)


class ConsumerMetrics:
    """Custom consumers' handlers (the worker)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.handler_duration = Histogram(
            "sessionbus_handler_duration_seconds", "Time a consumer's handler took per event",
            ["consumer"], buckets=LAG_BUCKETS, registry=r,
        )
        self.handler_failures = Counter(
            "sessionbus_handler_failures_total", "Handler calls that raised (each retry counts)",
            ["consumer"], registry=r,
        )


class FarmStatsMetrics:
    """The worker's built-in farm statistics consumer."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.lookups = Counter(
            "sessionbus_farm_lookups_total",
            "Session lookups seen on the bus from every node: local hit, cross-node hit, miss",
            ["result"], registry=r,
        )
        self.events = Counter(
            "sessionbus_farm_events_total", "Events seen on the bus from every node", ["type"],
            registry=r,
        )


G = TypeVar("G")


def _openssl_version() -> str:
    return ssl.OPENSSL_VERSION.split()[1] if " " in ssl.OPENSSL_VERSION else ssl.OPENSSL_VERSION


def _version() -> str:
    try:
        return version("sessionbus")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


class Metrics:
    """One process's metric groups on one registry, each made when first asked for."""

    def __init__(self, registry: CollectorRegistry | None = None, role: str | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # What /ready asks (set by the role once its component exists; the metrics server binds
        # before anything else, so until then /ready says "starting").
        self.ready: Readiness | None = None
        self._groups: dict[type, object] = {}
        if role is not None:
            info = Info(
                "sessionbus_build", "sessionbus build and runtime, and the role of this process",
                registry=self.registry,
            )
            info.info({
                "version": _version(), "python": platform.python_version(),
                "openssl": _openssl_version(), "role": role,
            })

    def _group(self, cls: type[G]) -> G:
        group = self._groups.get(cls)
        if group is None:
            group = self._groups[cls] = cls(self.registry)  # type: ignore[call-arg]
        return group  # type: ignore[return-value]

    @property
    def tasks(self) -> TaskMetrics:
        return self._group(TaskMetrics)

    @property
    def bus(self) -> BusMetrics:
        return self._group(BusMetrics)

    @property
    def delivery(self) -> DeliveryMetrics:
        return self._group(DeliveryMetrics)

    @property
    def replica(self) -> ReplicaMetrics:
        return self._group(ReplicaMetrics)

    @property
    def outbox(self) -> OutboxMetrics:
        return self._group(OutboxMetrics)

    @property
    def node(self) -> NodeMetrics:
        return self._group(NodeMetrics)

    @property
    def key_ring(self) -> KeyRingMetrics:
        return self._group(KeyRingMetrics)

    @property
    def publisher(self) -> PublisherMetrics:
        return self._group(PublisherMetrics)

    @property
    def keyfile(self) -> KeyfileMetrics:
        return self._group(KeyfileMetrics)

    @property
    def cache(self) -> CacheMetrics:
        return self._group(CacheMetrics)

    @property
    def consumers(self) -> ConsumerMetrics:
        return self._group(ConsumerMetrics)

    @property
    def farm_stats(self) -> FarmStatsMetrics:
        return self._group(FarmStatsMetrics)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's value, 0.0 when absent (for tests and ``--check``)."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0


Readiness = Callable[[], tuple[bool, str]]


def serve_metrics(addr: str, registry: CollectorRegistry, ready: Readiness | None = None) -> None:
    """Serve /metrics of ``registry`` on ``HOST:PORT`` from a daemon thread, and /ready (200 or
    503, one line per check) for load balancers and systemd when ``ready`` is given."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if ready is None:
        start_http_server(int(port), addr=host, registry=registry)
        return
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/ready":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        ok, text = ready()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode() + b"\n"]

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.getaddrinfo(host, int(port))[0][0]

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = make_server(host, int(port), app, Server, handler_class=Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()


class _NoReplica:
    """An empty replica, for :func:`catalogue`."""

    def __len__(self) -> int:
        return 0

    bytes_used = tombstones = evictions = expirations = 0


def catalogue() -> CollectorRegistry:
    """A registry holding every family sessionbus can export (docs, dashboards, tests)."""
    m = Metrics(role="catalogue")
    for group in ALL_GROUPS:
        m._group(group)
    m.replica.watch(_NoReplica())
    return m.registry


ALL_GROUPS = (
    TaskMetrics, BusMetrics, DeliveryMetrics, ReplicaMetrics, OutboxMetrics, NodeMetrics,
    KeyRingMetrics, PublisherMetrics, KeyfileMetrics, CacheMetrics, ConsumerMetrics,
    FarmStatsMetrics,
)
