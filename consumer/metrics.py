"""Prometheus metrics of the consumer side (and of the broker connection every role has).

Base units, ``_total`` on counters, bounded label values only (event types, reason codes,
outcomes, configured consumer names): never a session id, node address or key.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, Info, make_wsgi_app, start_http_server

from sessionbus.schemas.errors import Reason
from sessionbus.schemas.events import SESSION_EVENT_TYPES

# Sub-millisecond buckets: replication inside one data centre should be well under 1 ms.
LAG_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
)

OUTCOMES = ("applied", "skipped", "rejected")

EVENTS_CONSUMED = Counter(
    "sessionbus_events_consumed_total", "Events received from the bus, by type and outcome",
    ["type", "outcome"],
)
EVENTS_REJECTED = Counter(
    "sessionbus_events_rejected_total",
    "Messages or events that failed validation, by reason", ["reason"],
)
MESSAGES_DEAD_LETTERED = Counter(
    "sessionbus_messages_dead_lettered_total",
    "Messages copied to the dead-letter exchange, by reason", ["reason"],
)
HANDLER_DURATION = Histogram(
    "sessionbus_handler_duration_seconds", "Time a consumer's handler took per event",
    ["consumer"], buckets=LAG_BUCKETS,
)
HANDLER_FAILURES = Counter(
    "sessionbus_handler_failures_total", "Handler calls that raised (each retry counts)",
    ["consumer"],
)
REPLICATION_LAG = Histogram(
    "sessionbus_replication_lag_seconds", "Event time at the origin to applied in this replica",
    buckets=LAG_BUCKETS,
)
REPLICA_SESSIONS = Gauge("sessionbus_replica_sessions", "Live sessions in the replica")
REPLICA_BYTES = Gauge("sessionbus_replica_bytes", "Bytes the replica accounts for")
REPLICA_TOMBSTONES = Gauge("sessionbus_replica_tombstones", "Removed sessions remembered")
REPLICA_EVICTIONS = Counter(
    "sessionbus_replica_evictions_total", "Sessions evicted to stay within the replica's bounds"
)
REPLICA_EXPIRATIONS = Counter(
    "sessionbus_replica_expirations_total", "Sessions dropped because they expired"
)
REPLAY_CAUGHT_UP = Gauge(
    "sessionbus_replay_caught_up", "1 once the warm-join replay of the session stream reached live"
)
BROKER_CONNECTED = Gauge("sessionbus_broker_connected", "1 while connected to RabbitMQ")
# Connected is not ready: after a (re)connect the bus is declared and channels restored first.
BUS_READY = Gauge(
    "sessionbus_bus_ready",
    "1 while connected, the bus checked and every subscription restored (what /ready reports)",
)
REPLICA_SUBSCRIBED = Gauge(
    "sessionbus_replica_subscribed", "1 while the replica follows the session stream live"
)
BROKER_RECONNECTS = Counter("sessionbus_broker_reconnects_total", "Reconnections to RabbitMQ")
BROKER_NODE = Info(
    "sessionbus_broker", "The broker node this process uses (host:port only, never credentials)"
)

TICKET_KEYS = Gauge("sessionbus_ticket_keys", "Ticket keys held (not erased)")
TICKET_KEY_NEWEST_AGE = Gauge(
    "sessionbus_ticket_key_newest_age_seconds",
    "Seconds since the newest ticket key held was published (grows if the publisher is silent)",
)
KEYFILE_WRITES = Counter("sessionbus_keyfile_writes_total", "Key files rewritten")
KEYFILE_COMMAND_FAILURES = Counter(
    "sessionbus_keyfile_command_failures_total", "--on-change commands that failed"
)


def precreate() -> None:
    """Create every bounded label combination so dashboards see zeros, not gaps."""
    for t in SESSION_EVENT_TYPES:
        for o in OUTCOMES:
            EVENTS_CONSUMED.labels(t.value, o)
    for r in Reason:
        EVENTS_REJECTED.labels(r.value)
        MESSAGES_DEAD_LETTERED.labels(r.value)


class _BrokerState:
    connected = False
    ever = False


def broker_state(connected: bool, host: str = "") -> None:
    """Record the connection coming or going (to ``host``, "host:port"); a return after a loss
    counts as a reconnect."""
    if connected and host:
        BROKER_NODE.info({"host": host})
    if connected and not _BrokerState.connected and _BrokerState.ever:
        BROKER_RECONNECTS.inc()
    _BrokerState.connected = connected
    _BrokerState.ever = _BrokerState.ever or connected
    BROKER_CONNECTED.set(1 if connected else 0)


Readiness = Callable[[], tuple[bool, str]]


def serve_metrics(addr: str, ready: Readiness | None = None) -> None:
    """Serve /metrics on ``HOST:PORT`` from a daemon thread, and /ready (200 or 503, one line per
    check) for load balancers and systemd when ``ready`` is given."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if ready is None:
        start_http_server(int(port), addr=host)
        return
    metrics_app = make_wsgi_app()

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


precreate()
