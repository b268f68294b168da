"""Readiness told truthfully: /ready (200/503) next to /metrics, and the gauges behind it."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.farm_support import bus_env, farm_files, free_port
from tests.farm_support import start as start_proc


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.broker
@pytest.mark.tls
@pytest.mark.deadline(90)
def test_node_ready_only_once_declared_and_subscribed(tmp_path: Path) -> None:
    with bus_env(tmp_path) as env:
        cdir = tmp_path / "certs"
        cdir.mkdir()
        _, cert, key = farm_files(cdir)
        metrics = free_port()
        bad = start_proc(
            ["node", "--node-id", "nr-bad", "--listen", f"127.0.0.1:{free_port()}", "--cert",
             str(cert), "--key", str(key), "--metrics", f"127.0.0.1:{metrics}"],
            env={**env, "SESSIONBUS_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{dead_port()}/"})
        good_metrics = free_port()
        good = start_proc(
            ["node", "--node-id", "nr-good", "--listen", f"127.0.0.1:{free_port()}", "--cert",
             str(cert), "--key", str(key), "--metrics", f"127.0.0.1:{good_metrics}"], env=env)
        try:
            bad.wait_for("listening on", 20)
            good.wait_for("listening on", 20)
            status, text = get(f"http://127.0.0.1:{metrics}/ready")
            assert status == 503 and "NOT broker connected" in text, text
            _, m = get(f"http://127.0.0.1:{metrics}/metrics")
            assert "sessionbus_bus_ready 0.0" in m and "sessionbus_replica_subscribed 0.0" in m
            deadline = time.monotonic() + 20
            while (status := get(f"http://127.0.0.1:{good_metrics}/ready")[0]) != 200:
                assert time.monotonic() < deadline, "node never became ready"
                time.sleep(0.1)
            _, text = get(f"http://127.0.0.1:{good_metrics}/ready")
            assert "NOT" not in text and "ok replica subscribed" in text, text
            _, m = get(f"http://127.0.0.1:{good_metrics}/metrics")
            for line in ("sessionbus_bus_ready 1.0", "sessionbus_replica_subscribed 1.0",
                         "sessionbus_outbox_blocked 0.0", "sessionbus_broker_connected 1.0",
                         'sessionbus_broker_info{host="127.0.0.1:5672"} 1.0'):
                assert line in m, line
            assert "guest" not in m  # the broker info names the host only
        finally:
            bad.stop()
            good.stop()
