"""The README's shell blocks marked runnable, run as written against a local farm.

Marker convention: words after ``sh`` in the fence's info string (GitHub and other renderers
highlight by the first word only, so the marker stays invisible):

- ```` ```sh runnable ````: the block runs with ``bash -euo pipefail`` and must exit 0 within
  60 s;
- ```` ```sh runnable-with-farm ```` (or ``runnable-background``): a block that keeps running (a
  worker, a server) beside the farm. It must still be running 10 s after it started (a port in
  use, a missing key or an unreachable broker end a role long before), and it keeps running for
  the blocks after it; at the end its commands get SIGTERM and must stop cleanly (exit 0).

Blocks run in README order, each in a fresh bash, from a directory laid out like a checkout
after ``bash ops/local-farm`` (``farm/`` the farm's directory, ``examples/``, ``.venv/`` with
``sessionbus`` also on the PATH), against a farm of 3 nodes that ``sessionbus up`` started. The
test runs beside other tests on one machine, so two things are mapped, nothing else: in a block,
``127.0.0.1:<port>`` of the farm (nodes 8443.., metrics 9400..) becomes the test farm's and any
other ``127.0.0.1:<port>`` a free one; ``/tmp/`` becomes a directory of the test's. The farm's
prefix and broker URL come from the environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.farm_support import REPO, client_context, free_port, handshake
from tests.local_farm_support import LocalFarm, local_farm

pytestmark = [pytest.mark.broker, pytest.mark.tls, pytest.mark.slow, pytest.mark.deadline(240)]

BLOCK = re.compile(r"^```sh[ \t]+(runnable|runnable-with-farm|runnable-background)[ \t]*\n"
                   r"(.*?)^```", re.M | re.S)
BACKGROUND = {"runnable-with-farm", "runnable-background"}
SETTLE = 10.0  # seconds a background block must keep running
ADDRESS = re.compile(r"127\.0\.0\.1:(\d{4,5})\b")
NODES = 3


def runnable_blocks(text: str) -> list[tuple[bool, str]]:
    """(runs in the background, body) of each marked block, in order."""
    return [(m.group(1) in BACKGROUND, m.group(2)) for m in BLOCK.finditer(text)]


def port_map(blocks: list[tuple[bool, str]], farm: LocalFarm) -> dict[int, int]:
    ports: dict[int, int] = {}
    for _, body in blocks:
        for m in ADDRESS.finditer(body):
            p = int(m.group(1))
            if p in ports:
                continue
            if 8443 <= p < 8443 + farm.nodes:
                ports[p] = farm.base + p - 8443
            elif 9400 <= p < 9402 + farm.nodes:
                ports[p] = farm.mbase + p - 9400
            else:
                ports[p] = free_port()
    return ports


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def wait_warm(farm: LocalFarm, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for i in range(1, farm.nodes + 1):
        url = f"http://127.0.0.1:{farm.metrics_port(f'node-{i}')}/metrics"
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                if re.search(rb"^sessionbus_replay_caught_up 1\.0$", r.read(), re.M):
                    break
            assert time.monotonic() < deadline, f"node-{i} not warm within {timeout:.0f} s"
            time.sleep(0.2)


def test_marked_blocks_are_found() -> None:
    blocks = runnable_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 2, "the README has lost its runnable blocks (or their markers)"
    assert any(background for background, _ in blocks)
    assert any(not background for background, _ in blocks)


def test_readme_runnable_blocks_pass_against_a_local_farm(tmp_path: Path) -> None:
    blocks = runnable_blocks((REPO / "README.md").read_text())
    assert blocks
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    for name in ("examples", ".venv"):
        (workdir / name).symlink_to(REPO / name)
    queues = ("consumer.resumptions-per-origin",)
    with local_farm(workdir, nodes=NODES, extra_queues=queues) as farm:
        # A reader types the blocks once the farm is up and warm: every node's replica is.
        wait_warm(farm)
        ports = port_map(blocks, farm)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONBUS_")}
        env.update(PATH=f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}",
                   SESSIONBUS_AMQP_URL=farm.env["SESSIONBUS_AMQP_URL"],
                   SESSIONBUS_PREFIX=farm.prefix, PYTHONUNBUFFERED="1")
        running: list[tuple[str, subprocess.Popen[str], Path]] = []
        try:
            scratch = tmp_path / "tmp"
            scratch.mkdir()
            for i, (background, body) in enumerate(blocks):
                script = ADDRESS.sub(lambda m: f"127.0.0.1:{ports[int(m.group(1))]}", body)
                script = script.replace("/tmp/", f"{scratch}/")
                log = tmp_path / f"block-{i}.log"
                if not background:
                    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script],
                                          cwd=workdir, env=env, capture_output=True, text=True,
                                          timeout=60)
                    assert done.returncode == 0, (body, done.stdout, done.stderr)
                    print(f"block {i} passed:\n{done.stdout}")
                    continue
                with log.open("w") as out:
                    p = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=workdir,
                                         env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)
                running.append((body, p, log))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(SETTLE)
                assert p.poll() is None, (body, log.read_text())
                print(f"block {i} is running:\n{log.read_text()}")
            # Traffic through the farm while the background blocks run: what they receive must
            # be accepted (a consumer that dead-letters everything "runs" too).
            ctx = client_context("1.3")
            first = handshake(farm.base, ctx)
            handshake(farm.base + 1, ctx, first.session)
            time.sleep(2.0)
            for body, p, log in running:
                assert p.poll() is None, (body, log.read_text())
                assert "dead-lettered" not in log.read_text(), (body, log.read_text())
                # bash runs a block's last command in its own process (exec): then that is it
                for pid in children(p.pid) or [p.pid]:
                    os.kill(pid, signal.SIGTERM)
                assert p.wait(30) == 0, (body, log.read_text())
                assert "Traceback" not in log.read_text()
        finally:
            for _, p, _ in running:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
