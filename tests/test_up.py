"""`sessionbus up`: the local farm comes up, a session resumes across nodes, Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.farm_support import AMQP_URL, Processes, delete_topology, unique_prefix
from tests.local_farm_support import free_range, sessionbus_pids

pytestmark = [pytest.mark.broker, pytest.mark.tls, pytest.mark.slow]


def s_client(port: int, *args: str) -> str:
    out = subprocess.run(
        ["openssl", "s_client", "-ign_eof", "-connect", f"127.0.0.1:{port}", *args],
        input="GET / HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=20,
    )
    return out.stdout


def test_up_farm_resumes_across_nodes_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    prefix = unique_prefix()
    base = free_range(3)
    mbase = free_range(5, start_at=base + 97)
    farm_dir = tmp_path / "farm"
    procs = Processes()
    try:
        up = procs.start(
            ["up", "--dir", str(farm_dir), "--base-port", str(base), "--metrics-base-port",
             str(mbase), "--nodes", "3"],
            {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_PREFIX": prefix},
        )
        up.wait_for("Ctrl-C stops the farm", timeout=60)
        assert (farm_dir / "bus.key").exists() and (farm_dir / "cert.pem").exists()
        assert len(sessionbus_pids(prefix)) == 6  # up itself, keys, worker, 3 nodes
        sess = tmp_path / "s.pem"
        first = s_client(base, "-sess_out", str(sess))
        assert "New," in first and "node node-1" in first
        out = ""
        for _ in range(50):
            out = s_client(base + 1, "-sess_in", str(sess))
            if "Reused," in out:
                break
            time.sleep(0.1)
        assert "Reused," in out and "node node-2" in out
        os.kill(up.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert up.popen.wait(60) == 0
        deadline = time.monotonic() + 10
        while sessionbus_pids(prefix) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sessionbus_pids(prefix) == []
    finally:
        procs.stop_all()
        for pid in sessionbus_pids(prefix):
            os.kill(pid, signal.SIGKILL)
        delete_topology(prefix, [f"{prefix}.replica.node-{i}" for i in (1, 2, 3)])
