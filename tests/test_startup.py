"""Start-up fails fast and in one line: a taken listening port, in every role, exits 3 at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionbus.cli.exit_codes import RET_CONFIG
from sessionbus.schemas.sealing import write_signing_key_pair
from tests.farm_support import farm_files

pytestmark = pytest.mark.deadline(120)


@pytest.fixture
def taken() -> Iterator[tuple[str, int]]:
    """A loopback port something else listens on."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield "127.0.0.1", int(s.getsockname()[1])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    bus_key, cert, key = farm_files(tmp_path)
    (tmp_path / "out").mkdir(mode=0o700)
    write_signing_key_pair(tmp_path / "ring-signing.key", tmp_path / "ring-public.key")
    return {"bus_key": str(bus_key), "cert": str(cert), "key": str(key),
            "out": str(tmp_path / "out")}


def keys_env(tmp: Path) -> dict[str, str]:
    """The ring keys the key publisher and the key followers need."""
    return {"SESSIONBUS_RING_SIGNING_KEY_FILE": str(tmp / "ring-signing.key"),
            "SESSIONBUS_RING_PUBLIC_KEY_FILE": str(tmp / "ring-public.key")}


def timed(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sessionbus", *args], capture_output=True,
                         text=True, timeout=30, env={**os.environ, **env})
    return out, time.monotonic() - t0


def startup_budget(env: dict[str, str]) -> float:
    """2 s, or the interpreter's own start-up (``--help`` imports as much) plus 1.5 s on a
    machine so loaded that importing alone takes longer."""
    _, help_time = timed("node", "--help", env=env)
    return max(2.0, help_time + 1.5)


def assert_one_line(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == RET_CONFIG, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    for w in words:
        assert w in out.stderr


def test_node_on_a_taken_tls_port_exits_3_at_once(
    taken: tuple[str, int], files: dict[str, str]
) -> None:
    env = {"SESSIONBUS_BUS_KEY_FILE": files["bus_key"]}
    addr = f"{taken[0]}:{taken[1]}"
    out, took = timed("node", "--node-id", "a", "--listen", addr, "--cert", files["cert"],
                      "--key", files["key"], env=env)
    assert_one_line(out, "--listen", addr, "in use")
    assert took < startup_budget(env), took


def test_node_on_a_taken_metrics_port_exits_3_at_once(
    taken: tuple[str, int], files: dict[str, str]
) -> None:
    env = {"SESSIONBUS_BUS_KEY_FILE": files["bus_key"]}
    addr = f"{taken[0]}:{taken[1]}"
    out, took = timed("node", "--node-id", "a", "--listen", "127.0.0.1:0", "--cert",
                      files["cert"], "--key", files["key"], "--metrics", addr, env=env)
    assert_one_line(out, "--metrics", addr, "in use")
    assert took < startup_budget(env), took


ROLES = {
    "worker": ["worker"],
    "events": ["events"],
    "keys": ["keys"],
    "keyfile": ["keyfile", "--format", "nginx", "--out", "{out}"],
    "cache": ["cache", "--node-id", "c", "--memcache", "127.0.0.1:0"],
}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_role_on_a_taken_metrics_port_exits_3_without_traceback(
    role: str, taken: tuple[str, int], files: dict[str, str]
) -> None:
    # The broker URL points at a closed port: the metrics check must come before the broker.
    env = {"SESSIONBUS_BUS_KEY_FILE": files["bus_key"],
           "SESSIONBUS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
           **keys_env(Path(files["out"]).parent)}
    addr = f"{taken[0]}:{taken[1]}"
    args = [a.format(**files) for a in ROLES[role]]
    out, took = timed(*args, "--metrics", addr, env=env)
    assert_one_line(out, "--metrics", addr, "in use")
    assert took < startup_budget(env), took


@pytest.mark.parametrize("role", ["worker", "events", "keyfile"])
def test_one_shot_role_without_a_broker_exits_4_in_one_line(
    role: str, files: dict[str, str]
) -> None:
    env = {"SESSIONBUS_BUS_KEY_FILE": files["bus_key"],
           "SESSIONBUS_AMQP_URL": "amqp://guest:secret-pw@127.0.0.1:1/",
           **keys_env(Path(files["out"]).parent)}
    args = [a.format(**files) for a in ROLES[role]]
    out, _ = timed(*args, env=env)
    assert out.returncode == 4, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    # The last line is ours; the library's own lines above it are the cluster work's to quiet.
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sessionbus {role}: ") and "127.0.0.1:1" in last, out.stderr
    assert "secret-pw" not in out.stderr


def test_check_names_a_missing_file_and_exits_3(files: dict[str, str], tmp_path: Path) -> None:
    env = {"SESSIONBUS_BUS_KEY_FILE": str(tmp_path / "missing.key"),
           "SESSIONBUS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}
    out, _ = timed("node", "--node-id", "a", "--listen", "127.0.0.1:0", "--cert",
                   files["cert"], "--key", files["cert"], "--check", env=env)
    assert out.returncode == RET_CONFIG, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "FAIL  bus key: bus key file" in out.stdout and "does not exist" in out.stdout
    assert any(x.startswith("FAIL  certificate: cannot load certificate/key") for x in lines)
    assert any(x.startswith("FAIL  broker: ") for x in lines)  # still checked, and said
    assert "Traceback" not in out.stdout + out.stderr
