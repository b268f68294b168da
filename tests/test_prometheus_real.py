"""Watched in a real Prometheus: Debian's server, the shipped scrape config and alert rules.

Prometheus (``/usr/bin/prometheus``) runs on loopback with its own directory, against a local
farm (``sessionbus up`` on free ports, a unique prefix) plus what the farm does not start: a node
whose broker connection goes through a TCP proxy (the shipped config's ``node-3``), a cache front
and a key-file writer. The shipped prometheus.yml is used with only its target ports mapped to the
test's and its scrape/evaluation intervals shortened to 1 s; the rule file is the shipped one,
unchanged. Checked through the HTTP API:

- every panel query of ops/grafana/sessionbus.json returns series;
- SessionbusBrokerDisconnected fires for the node cut off from its broker within its ``for:``
  window (plus a few scrape and evaluation intervals), and resolves once the broker is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.farm_support import REPO, Proc, client_context, free_port, handshake, start
from tests.local_farm_support import LocalFarm, local_farm
from tests.tcp_proxy import TcpProxy

PROMETHEUS = "/usr/bin/prometheus"
OPS = REPO / "ops"
ALERT = "SessionbusBrokerDisconnected"
T = TypeVar("T")

pytestmark = [
    pytest.mark.broker, pytest.mark.tls, pytest.mark.slow, pytest.mark.deadline(300),
    pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK),
                       reason="Debian's prometheus package is not installed"),
]


class ProxyThread:
    """tests/tcp_proxy.py on an event loop of its own thread, driven from the test."""

    def __init__(self, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = TcpProxy("127.0.0.1", port)
        self.call(self.proxy.start())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def close(self) -> None:
        self.call(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def rule_for(name: str) -> float:
    """The shipped rule's ``for:`` in seconds."""
    text = (OPS / "prometheus" / "rules" / "sessionbus.yml").read_text()
    block = text[text.index(f"alert: {name}"):]
    m = re.search(r"for:\s*(\d+)([smh])", block)
    assert m is not None
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def prometheus_config(ports: dict[int, int]) -> str:
    """The shipped prometheus.yml: target ports mapped, intervals 1 s, nothing else changed."""
    text = (OPS / "prometheus" / "prometheus.yml").read_text()
    text = re.sub(r"(scrape_interval|evaluation_interval): \d+s", r"\1: 1s", text)
    unmapped = [int(p) for p in re.findall(r'"127\.0\.0\.1:(\d+)"', text)
                if int(p) not in ports]
    assert unmapped == [15692], unmapped  # only RabbitMQ's own exporter stays as shipped
    return re.sub(r'"127\.0\.0\.1:(\d+)"',
                  lambda m: f'"127.0.0.1:{ports.get(int(m.group(1)), int(m.group(1)))}"', text)


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((OPS / "grafana" / "sessionbus.json").read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            out.extend((p.get("title", "?"), t["expr"]) for t in p.get("targets", [])
                       if t.get("expr"))

    walk(dashboard["panels"])
    return out


def as_prometheus_query(expr: str) -> str:
    """Grafana's variables as Grafana would fill them in with a 1 s scrape interval."""
    return expr.replace("$__rate_interval", "15s").replace("$instance", ".*")


class Api:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def series(self, expr: str) -> int:
        return len(self.get("/api/v1/query", query=expr)["result"])

    def alert_state(self, name: str, instance: str) -> str | None:
        for a in self.get("/api/v1/alerts")["alerts"]:
            if a["labels"].get("alertname") == name and a["labels"].get("instance") == instance:
                return str(a["state"])
        return None


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Path:
    d = tmp_path / "prometheus"
    (d / "rules").mkdir(parents=True)
    shutil.copy(OPS / "prometheus" / "rules" / "sessionbus.yml", d / "rules" / "sessionbus.yml")
    return d


def start_prometheus(d: Path, config: str, port: int) -> subprocess.Popen[bytes]:
    (d / "prometheus.yml").write_text(config)
    log = (d / "prometheus.log").open("wb")
    return subprocess.Popen(
        [PROMETHEUS, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT, cwd=d,
    )


def wait_until(what: str, fn: Any, timeout: float, interval: float = 0.5) -> float:
    """Poll ``fn()`` until true; returns when (monotonic). Bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return time.monotonic()
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def memcache(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        return s.recv(4096)


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[LocalFarm]:
    with local_farm(tmp_path, nodes=2,
                    extra_queues=("replica.node-3", "replica.cache-1")) as f:
        yield f


def test_dashboard_has_data_and_the_broker_alert_fires_and_resolves(
    farm: LocalFarm, prometheus_dir: Path, tmp_path: Path
) -> None:
    proxy = ProxyThread(5672)
    procs: list[Proc] = []
    prom: subprocess.Popen[bytes] | None = None
    try:
        env = farm.env
        node3_port, node3_metrics = free_port(), free_port()
        cache_port, cache_metrics, keyfile_metrics = free_port(), free_port(), free_port()
        d = farm.directory
        node3 = start(["node", "--node-id", "node-3", "--listen", f"127.0.0.1:{node3_port}",
                       "--cert", str(d / "cert.pem"), "--key", str(d / "key.pem"),
                       "--metrics", f"127.0.0.1:{node3_metrics}"],
                      {**env, "SESSIONBUS_AMQP_URL": proxy.proxy.url()})
        procs.append(node3)
        cache = start(["cache", "--node-id", "cache-1", "--memcache", f"127.0.0.1:{cache_port}",
                       "--metrics", f"127.0.0.1:{cache_metrics}"], env)
        procs.append(cache)
        out = tmp_path / "keyfiles"
        out.mkdir(mode=0o700)
        keyfile = start(["keyfile", "--format", "nginx", "--out", str(out),
                         "--metrics", f"127.0.0.1:{keyfile_metrics}"], env)
        procs.append(keyfile)
        # keyfile: running is enough (a new farm has no encrypting key for --announce-ahead, so
        # its files, and "ready", come later; its families are there at once).
        for p, text in ((node3, "listening"), (cache, "listening"),
                        (keyfile, "keyfile following ticket keys")):
            p.wait_for(text, timeout=60)

        ports = {9400: farm.metrics_port("keys"), 9401: farm.metrics_port("worker"),
                 9402: farm.metrics_port("node-1"), 9403: farm.metrics_port("node-2"),
                 9404: node3_metrics, 9410: cache_metrics, 9420: keyfile_metrics}
        prom_port = free_port()
        prom = start_prometheus(prometheus_dir, prometheus_config(ports), prom_port)
        api = Api(prom_port)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{api.base}/-/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until("prometheus ready", ready, 60)

        # Traffic for every panel: sessions made on one node, resumed on the others (lookups,
        # replication, farm statistics, handler durations), and cache front requests.
        ctx = client_context("1.2")
        deadline = time.monotonic() + 20
        rounds = 0
        while time.monotonic() < deadline and rounds < 40:
            first = handshake(farm.base, ctx)
            for port in (farm.base + 1, node3_port):
                handshake(port, ctx, first.session)
            memcache(cache_port, b"get mod_ssl-sess:00\r\n")
            rounds += 1
            time.sleep(0.3)

        queries = panel_queries()
        assert len(queries) >= 30
        missing: list[str] = []

        def all_have_data() -> bool:
            missing[:] = [f"{title}: {expr}" for title, expr in queries
                          if api.series(as_prometheus_query(expr)) == 0]
            return not missing

        try:
            wait_until("every dashboard query has data", all_have_data, 45, interval=2)
        except AssertionError:
            raise AssertionError("queries without series:\n" + "\n".join(missing)) from None

        instance = f"127.0.0.1:{node3_metrics}"
        assert api.alert_state(ALERT, instance) is None
        assert api.series(f'sessionbus_broker_connected{{instance="{instance}"}} == 1') == 1
        window = rule_for(ALERT)
        cut_at = time.monotonic()
        assert proxy.call(proxy.proxy.pause(cut=True)) >= 1  # refused from now on
        pending = wait_until("alert pending", lambda: api.alert_state(ALERT, instance)
                             == "pending", 20)
        fired = wait_until("alert firing", lambda: api.alert_state(ALERT, instance)
                           == "firing", window + 30)
        # Not before its `for:`, and within it plus the detection, scrape and evaluation slack.
        assert window - 2 <= fired - cut_at <= window + 15, (pending - cut_at, fired - cut_at)
        print(f"{len(queries)} dashboard queries have data; {ALERT} (for: {window:.0f} s) "
              f"pending after {pending - cut_at:.1f} s, firing after {fired - cut_at:.1f} s")
        # The other roles, on the broker directly, stayed connected.
        assert api.alert_state(ALERT, f"127.0.0.1:{farm.metrics_port('node-1')}") is None
        # The cut-off node still serves handshakes.
        assert b"node-3" in handshake(node3_port, ctx).body

        proxy.call(proxy.proxy.resume())
        back_at = time.monotonic()
        resolved = wait_until("alert resolved",
                              lambda: api.alert_state(ALERT, instance) is None, 60)
        print(f"{ALERT} resolved {resolved - back_at:.1f} s after the broker was back")
        assert api.series(f'sessionbus_broker_connected{{instance="{instance}"}} == 1') == 1
    finally:
        if prom is not None:
            prom.send_signal(signal.SIGTERM)
            try:
                prom.wait(15)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(5)
        for p in reversed(procs):
            p.stop()
        proxy.close()
