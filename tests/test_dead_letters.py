"""A failing consumer you can debug: its failures logged, its dead letters listed and replayed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionbus.bus.connection import BrokerSettings, connect
from sessionbus.bus.topology import Topology, declare_core
from sessionbus.consumer.worker import session_ref
from sessionbus.producer.outbox import Outbox
from sessionbus.schemas.sealing import load_bus_keys
from tests.farm_support import AMQP_URL, Processes, bus_env
from tests.helpers_der import make_session_der

pytestmark = [pytest.mark.broker, pytest.mark.deadline(120)]
CTX = b"sessionbus"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with bus_env(tmp_path, "consumer.flaky") as e:
        yield {**e, "SB_TEST_RECORD": str(tmp_path / "record.jsonl"),
               "SB_TEST_FIXED": str(tmp_path / "fixed")}


def publish_new(env: dict[str, str], sid: bytes) -> None:
    keys = load_bus_keys(env["SESSIONBUS_BUS_KEY_FILE"])
    topo = Topology(prefix=env["SESSIONBUS_PREFIX"])

    async def go() -> None:
        conn = await connect(BrokerSettings(url=AMQP_URL))
        await declare_core(await conn.channel(), topo)
        box = Outbox("node-a", topo, keys)
        task = asyncio.get_running_loop().create_task(box.run(conn))
        now = int(time.time())
        box.put_new(sid, CTX, now + 600, make_session_der(sid, CTX, now, 600))
        assert await box.flush(30)
        task.cancel()
        await conn.close()

    asyncio.run(go())


def dead(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sessionbus", "dead", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def records(env: dict[str, str]) -> list[list[object]]:
    path = Path(env["SB_TEST_RECORD"])
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_failing_handler_is_logged_listed_and_replayed_once(env: dict[str, str]) -> None:
    sid = os.urandom(32)
    ref = session_ref(sid)
    queue = f"{env['SESSIONBUS_PREFIX']}.consumer.flaky"
    procs = Processes()
    try:
        w = procs.start(["worker", "--consumer", "tests.consumers_for_tests:flaky",
                         "--no-stats"], env)
        w.wait_for("worker running")
        publish_new(env, sid)
        w.wait_for("dead-lettered (reason handler)")
        log = w.output()
        # Each attempt: the message, the event type and the session's short hash...
        attempts = [line for line in log.splitlines() if "handler raised ValueError" in line]
        assert len(attempts) == 2, log
        assert all("this handler cannot take the event yet" in a and "new event" in a
                   and ref in a for a in attempts), log
        assert "(attempt 1 of 2)" in attempts[0] and "(attempt 2 of 2)" in attempts[1]
        # ...the traceback only on the final attempt (info level), never the id itself.
        assert log.count("Traceback") == 1, log
        assert log.index("Traceback") > log.index("(attempt 2 of 2)")
        assert "refuse_until_fixed" in log[log.index("Traceback"):]
        assert sid.hex() not in log

        listed = dead(env, "list")
        assert listed.returncode == 0, listed.stderr
        line = next(x for x in listed.stdout.splitlines() if x.startswith("#"))
        assert "reason=handler" in line and f"source={queue}" in line and ref in line
        assert "type=new" in line and "origin=node-a" in line and "rejected=0" in line
        assert sid.hex() not in listed.stdout + listed.stderr
        assert "1 dead letter(s)" in listed.stdout
        # Listing takes nothing away.
        assert "1 dead letter(s)" in dead(env, "list", "--reason", "handler").stdout
        assert "0 dead letter(s)" in dead(env, "list", "--reason", "forged").stdout
        assert records(env) == []

        # The handler is fixed and the worker restarted (a running one remembers the message's
        # counter and would refuse the copy as a replay).
        assert w.stop() == 0
        Path(env["SB_TEST_FIXED"]).touch()
        w = procs.start(["worker", "--consumer", "tests.consumers_for_tests:flaky",
                         "--no-stats"], env)
        w.wait_for("worker running")
        replayed = dead(env, "replay", "--reason", "handler")
        assert replayed.returncode == 0, replayed.stderr
        assert "1 replayed, 0 left" in replayed.stdout, replayed.stdout
        deadline = time.monotonic() + 20
        while not records(env) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # a second delivery, if there were one, would be here by now
        got = records(env)
        assert [r[:2] for r in got] == [["new", sid.hex()]], got
        assert "0 dead letter(s)" in dead(env, "list").stdout
        assert "rejected" not in w.output() and "dead-lettered" not in w.output(), w.output()
    finally:
        procs.stop_all()


def test_purge_needs_a_filter_and_drops_only_what_matches(env: dict[str, str]) -> None:
    procs = Processes()
    try:
        w = procs.start(["worker", "--consumer", "tests.consumers_for_tests:flaky",
                         "--no-stats"], env)
        w.wait_for("worker running")
        publish_new(env, os.urandom(32))
        w.wait_for("dead-lettered (reason handler)")
    finally:
        procs.stop_all()
    refused = dead(env, "purge")
    assert refused.returncode == 3 and "--reason, --limit or --all" in refused.stderr
    assert "0 purged" in dead(env, "purge", "--reason", "forged").stdout
    assert "1 dead letter(s)" in dead(env, "list").stdout
    assert "1 purged" in dead(env, "purge", "--reason", "handler").stdout
    assert "0 dead letter(s)" in dead(env, "list").stdout
