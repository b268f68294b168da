"""`sessionbus worker` as a process: custom consumers by import string, order, graceful stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.resumptions_per_origin import RESUMPTIONS
from examples.resumptions_per_origin import consumer as example_consumer
from sessionbus.bus.connection import BrokerSettings, connect
from sessionbus.bus.topology import Topology, declare_core
from sessionbus.consumer.worker import ImportStringError, load_consumer
from sessionbus.producer.outbox import Outbox
from sessionbus.schemas.events import EventType, RemoveReason, SessionEvent
from tests.farm_support import AMQP_URL, Processes, bus_env
from tests.helpers_der import make_session_der
from tests.helpers_keys import keys_for

CTX = b"sessionbus"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with bus_env(tmp_path, "consumer.recorder") as e:
        yield {**e, "SB_TEST_RECORD": str(tmp_path / "record.jsonl")}


def publish_lifecycles(env: dict[str, str], sessions: int) -> list[tuple[str, str, int]]:
    """NEW, two GETs and a REMOVE per session, interleaved across sessions. Returns them."""
    keys = keys_for(env["SESSIONBUS_BUS_KEY_FILE"])
    topo = Topology(prefix=env["SESSIONBUS_PREFIX"])
    ids = [os.urandom(32) for _ in range(sessions)]
    sent: list[tuple[str, str, int]] = []

    async def go() -> None:
        conn = await connect(BrokerSettings(url=AMQP_URL))
        ch = await conn.channel()
        await declare_core(ch, topo)
        box = Outbox("node-a", topo, keys)
        task = asyncio.get_running_loop().create_task(box.run(conn))
        exp = time.time() + 600
        for step in ("new", "get", "get", "remove"):
            for sid in ids:
                if step == "new":
                    box.put_new(sid, CTX, exp, make_session_der(sid, CTX, int(time.time()), 600))
                elif step == "get":
                    box.put_get(sid, CTX, exp, True, "node-a")
                else:
                    box.put_remove(sid, CTX, exp, RemoveReason.REVOKE)
                sent.append((step, sid.hex(), box._seq))
        assert await box.flush(60)
        task.cancel()
        await conn.close()

    asyncio.run(go())
    return sent


def recorded(env: dict[str, str]) -> list[tuple[str, str, int]]:
    path = Path(env["SB_TEST_RECORD"])
    if not path.exists():
        return []
    return [tuple(json.loads(line)) for line in path.read_text().splitlines() if line]  # type: ignore[misc]


def wait_recorded(env: dict[str, str], n: int, timeout: float = 60) -> list[tuple[str, str, int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = recorded(env)
        if len({r[2] for r in got}) >= n:
            return got
        time.sleep(0.1)
    return recorded(env)


@pytest.mark.broker
def test_consumer_by_import_string_gets_every_event_in_session_order(
    env: dict[str, str],
) -> None:
    procs = Processes()
    try:
        w = procs.start(["worker", "--consumer", "tests.consumers_for_tests:recorder",
                         "--no-stats"], env)
        w.wait_for("worker running")
        sent = publish_lifecycles(env, 100)
        got = wait_recorded(env, len(sent))
    finally:
        procs.stop_all()
    assert {r[2] for r in got} == {s[2] for s in sent}
    by_session: dict[str, list[str]] = {}
    for type_, sid, _seq in got:
        by_session.setdefault(sid, []).append(type_)
    assert all(v == ["new", "get", "get", "remove"] for v in by_session.values())


@pytest.mark.broker
@pytest.mark.slow
def test_sigterm_during_a_burst_loses_nothing_acked(env: dict[str, str]) -> None:
    slow = {**env, "SB_TEST_DELAY": "0.005"}
    procs = Processes()
    try:
        w = procs.start(["worker", "--consumer", "tests.consumers_for_tests:recorder",
                         "--no-stats", "--drain-timeout", "20"], slow)
        w.wait_for("worker running")
        sent = publish_lifecycles(env, 500)  # 2,000 events
        while len(recorded(env)) < 300:  # mid-burst
            time.sleep(0.02)
        assert w.stop(signal.SIGTERM, timeout=40) == 0
        first_run = recorded(env)
        assert len(first_run) < len(sent)  # it really stopped mid-burst
        # what was not handled was not acked: a new worker gets exactly the rest
        w2 = procs.start(["worker", "--consumer", "tests.consumers_for_tests:recorder",
                          "--no-stats"], env)
        w2.wait_for("worker running")
        got = wait_recorded(env, len(sent))
    finally:
        procs.stop_all()
    assert {r[2] for r in got} == {s[2] for s in sent}


def test_import_string_errors_are_one_line(env: dict[str, str]) -> None:
    for spec, why in [("nocolon", "is not package.module:attr"),
                      ("tests.no_such_module:x", "cannot import"),
                      ("tests.consumers_for_tests:not_a_consumer", "is not a consumer")]:
        with pytest.raises(ImportStringError, match=why):
            load_consumer(spec)
    out = subprocess.run(
        [sys.executable, "-m", "sessionbus", "worker", "--consumer", "nocolon"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 3
    assert out.stderr.strip().count("\n") == 0 and "package.module:attr" in out.stderr


async def test_example_counts_resumptions_per_origin() -> None:
    assert load_consumer("examples.resumptions_per_origin:consumer") is example_consumer

    def get(hit: bool, origin: str, session_origin: str | None) -> SessionEvent:
        return SessionEvent(EventType.GET, origin, 1, time.time(), b"s", CTX, 0.0, hit=hit,
                            session_origin=session_origin)

    def value(so: str, where: str) -> float:
        return RESUMPTIONS.labels(so, where)._value.get()

    before = value("node-a", "cross"), value("node-a", "local")
    await example_consumer.handler(get(True, "node-b", "node-a"))
    await example_consumer.handler(get(True, "node-c", "node-a"))
    await example_consumer.handler(get(True, "node-a", "node-a"))
    await example_consumer.handler(get(False, "node-b", None))
    assert value("node-a", "cross") - before[0] == 2
    assert value("node-a", "local") - before[1] == 1


@pytest.mark.broker
def test_events_prints_json_lines_without_session_bytes(env: dict[str, str]) -> None:
    procs = Processes()
    try:
        ev = procs.start(["events", "--type", "new,remove"], env)
        ev.wait_for("subscribed")  # its temporary queue is bound
        sent = publish_lifecycles(env, 5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            lines = [ln for ln in ev.lines if ln.startswith("{")]
            if len(lines) >= 10:
                break
            time.sleep(0.1)
    finally:
        procs.stop_all()
    events = [json.loads(ln) for ln in lines]
    assert sorted((e["type"], e["session_id"]) for e in events) == sorted(
        (t, sid) for t, sid, _ in sent if t in ("new", "remove"))
    new = next(e for e in events if e["type"] == "new")
    assert new["session_bytes"] > 0 and new["origin"] == "node-a"
    assert not any(k in new for k in ("der", "session")), new
    assert all(len(ln) < 400 for ln in lines)  # no session bytes in any form
