"""A background task that fails ends the process, non-zero, with its traceback in the log.

Each test runs a real process (``tests.inject_fault`` in front of the CLI) with one function of
the product replaced by one that raises, against the real broker: the outbox's task and the
replicator's in a node, and the memcached listener in a cache front.  A process that went on
serving with replication stopped would look healthy to systemd; this one exits and is restarted.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.farm_support import Proc, bus_env, free_port, start
from tests.inject_fault import MESSAGE

pytestmark = [pytest.mark.broker, pytest.mark.deadline(90)]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with bus_env(tmp_path) as e:
        yield e


def exited(proc: Proc, timeout: float = 30.0) -> int:
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise AssertionError(
            f"still running {timeout:.0f} s after the fault:\n{proc.output()}") from None
    finally:
        if proc._reader is not None:
            proc._reader.join(5)


def assert_failed_with_traceback(proc: Proc, code: int, task: str) -> None:
    out = proc.output()
    assert code == 1, f"exit {code}, not 1:\n{out}"
    assert "Traceback (most recent call last)" in out, out
    assert f"RuntimeError: {MESSAGE}" in out, out
    assert f"{task} failed; stopping the process" in out, out
    assert "stopping after a failure" in out, out


def node_args(tls_cert: tuple[Path, Path], node_id: str) -> list[str]:
    cert, key = tls_cert
    return ["node", "--node-id", node_id, "--listen", f"127.0.0.1:{free_port()}",
            "--cert", str(cert), "--key", str(key)]


@pytest.mark.parametrize(("target", "task"), [
    ("sessionbus.producer.outbox:Outbox.run", "outbox"),
    ("sessionbus.consumer.replicator:Replicator._housekeeping", "replicator"),
])
def test_a_failed_node_task_ends_the_node(
    env: dict[str, str], tls_cert: tuple[Path, Path], target: str, task: str
) -> None:
    proc = start([target, *node_args(tls_cert, f"sup-{task}")], env, module="tests.inject_fault")
    try:
        proc.wait_for("listening on")
        assert_failed_with_traceback(proc, exited(proc), task)
    finally:
        proc.stop()


def test_a_failed_cache_listener_ends_the_cache_front(env: dict[str, str]) -> None:
    port = free_port()
    proc = start(["sessionbus.servers.cache.connection:Listener._accept_some",
                  "cache", "--node-id", "sup-cache", "--memcache", f"127.0.0.1:{port}"],
                 env, module="tests.inject_fault")
    try:
        proc.wait_for("listening")
        deadline = time.monotonic() + 10
        while proc.popen.poll() is None and time.monotonic() < deadline:
            # each connection makes the listener accept, which now raises
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    pass
            except OSError:
                break  # the listener is closed: the process is on its way out
            time.sleep(0.2)
        assert_failed_with_traceback(proc, exited(proc), "cache-memcache-listener")
    finally:
        proc.stop()
