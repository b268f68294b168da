"""Against a running local farm: `--check` per role, a second `up` refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.farm_support import free_port, start
from tests.local_farm_support import LocalFarm, local_farm

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.deadline(200)]


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFarm]:
    with local_farm(tmp_path_factory.mktemp("farm")) as f:
        yield f


def sb(farm: LocalFarm, *args: str, env: dict[str, str] | None = None
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sessionbus", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **farm.env, **(env or {})})


def node_args(farm: LocalFarm) -> list[str]:
    d = farm.directory
    return ["node", "--node-id", "node-9", "--listen", f"127.0.0.1:{free_port()}",
            "--cert", str(d / "cert.pem"), "--key", str(d / "key.pem"),
            "--metrics", f"127.0.0.1:{free_port()}"]


def test_check_passes_for_every_role_on_the_local_farms_settings(
    farm: LocalFarm, tmp_path: Path
) -> None:
    out_dir = tmp_path / "keyfiles"
    out_dir.mkdir(mode=0o700)
    for args in (node_args(farm), [*node_args(farm), "--tickets", "stateless"], ["worker"],
                 ["events"], ["keys", "--ring-signing-key-file", str(farm.signing_key)],
                 ["keyfile", "--format", "nginx", "--out", str(out_dir)]):
        out = sb(farm, *args, "--check")
        lines = out.stdout.splitlines()
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        assert lines and all(line.startswith("ok ") for line in lines), out.stdout
        assert any(line.startswith("ok    broker: connected") for line in lines)
        assert any(line.startswith("ok    read ") or line.startswith("ok    own queue ")
                   for line in lines), out.stdout
    # A taken address is a failing check of its own, exit 3.
    taken = sb(farm, *node_args(farm)[:4], f"127.0.0.1:{farm.base}", *node_args(farm)[5:],
               "--check")
    assert taken.returncode == 3, taken.stdout
    assert f"FAIL  --listen: --listen: cannot listen on 127.0.0.1:{farm.base}" in taken.stdout


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def test_check_fails_naming_a_missing_permission(farm: LocalFarm) -> None:
    user, password = f"sbtest-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    rabbitmqctl("add_user", user, password)
    try:
        # May configure and write anything, read nothing.
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", "^$")
        env = {"SESSIONBUS_AMQP_URL": f"amqp://{user}:{password}@127.0.0.1:5672/"}
        out = sb(farm, *node_args(farm), "--check", env=env)
        assert out.returncode == 4, out.stdout + out.stderr
        assert f"ok    broker: connected to amqp://{user}:***@127.0.0.1:5672/ as {user}" \
            in out.stdout
        assert f"FAIL  read {farm.prefix}.sessions.stream: access refused" in out.stdout
        assert password not in out.stdout + out.stderr
        # The worker binds its queues to the session exchange: that needs read on it.
        worker = sb(farm, "worker", "--check", env=env)
        assert worker.returncode == 4
        assert f"FAIL  own queue {farm.prefix}.consumer.farm-stats.<id>: access refused" \
            in worker.stdout
    finally:
        rabbitmqctl("delete_user", user)


def test_a_second_farm_is_refused_in_one_line_and_the_first_keeps_running(
    farm: LocalFarm, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    same_dir = start(["up", "--dir", str(farm.directory), "--base-port", str(free_port()),
                      "--metrics-base-port", str(free_port())], farm.env)
    assert same_dir.popen.wait(30) == 3
    took = time.monotonic() - t0
    same_dir.stop()
    text = same_dir.output().strip()
    assert len(text.splitlines()) == 1, text
    assert "a farm is already running from" in text and f"kill {farm.up.pid}" in text
    other_dir = start(["up", "--dir", str(tmp_path / "other"), "--base-port", str(farm.base),
                       "--metrics-base-port", str(farm.mbase),
                       "--nodes", str(farm.nodes)], farm.env)
    assert other_dir.popen.wait(30) == 3
    other_dir.stop()
    text = other_dir.output().strip()
    assert len(text.splitlines()) == 1 and f"127.0.0.1:{farm.base} (node-1) is in use" in text
    assert "farm is up" not in text
    assert farm.up.popen.poll() is None  # the running farm is untouched
    assert took < 10
