"""The cache front's lock-free request metrics expose what prometheus_client's would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from sessionbus.servers.cache.request_stats import RequestStats

BUCKETS = (0.0001, 0.00025, 0.001, 1.0)


def _lines(registry: CollectorRegistry, name: str) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if line.startswith(name) and "_created" not in line]


def test_histogram_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    stats = RequestStats("x_requests_total", "x_duration_seconds", BUCKETS)
    ours.register(stats)
    reference = Histogram("x_duration_seconds", "", ["protocol"], buckets=BUCKETS,
                          registry=theirs)
    stats.precreate("memcache", [])
    # on a bound, between bounds, beyond the last: "le" means less than or equal
    for v in (0.0001, 0.00005, 0.0002, 0.00025, 0.0009, 2.0, 0.5):
        stats.observe("memcache", v)
        reference.labels("memcache").observe(v)
    assert _lines(ours, "x_duration_seconds") == _lines(theirs, "x_duration_seconds")
    assert ours.get_sample_value("x_duration_seconds_count", {"protocol": "memcache"}) == 7


def test_requests_by_label_and_precreated_zeros() -> None:
    registry = CollectorRegistry()
    stats = RequestStats("y_requests_total", "y_duration_seconds", BUCKETS)
    registry.register(stats)
    stats.precreate("redis", [("get", "hit"), ("get", "miss")])
    stats.count("redis", "get", "hit")
    stats.count("redis", "get", "hit")
    stats.count("redis", "ping", "ok")
    def value(command: str, result: str) -> float | None:
        return registry.get_sample_value(
            "y_requests_total", {"protocol": "redis", "command": command, "result": result})
    assert value("get", "hit") == 2
    assert value("get", "miss") == 0
    assert value("ping", "ok") == 1


def test_record_is_count_and_observe_in_one_call() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    a = RequestStats("z_requests_total", "z_duration_seconds", BUCKETS)
    b = RequestStats("z_requests_total", "z_duration_seconds", BUCKETS)
    one.register(a)
    two.register(b)
    for stats in (a, b):
        stats.precreate("memcache", [("get", "hit")])
    for command, result, seconds in (("get", "hit", 0.0002), ("set", "stored", 0.003),
                                     ("get", "hit", 0.00001)):
        a.record(("memcache", command, result), seconds)
        b.count("memcache", command, result)
        b.observe("memcache", seconds)
    assert generate_latest(one) == generate_latest(two)
    assert one.get_sample_value("z_requests_total",
                                {"protocol": "memcache", "command": "get", "result": "hit"}) == 2
