"""Consumer crash: replicators SIGKILLed in the middle of a burst, restarted, end with everything.

Two kinds of consumer, each a separate process on the shared broker (unique name prefix):

- a replicator process: the ``Replicator`` a TLS node embeds, with the node's settings (durable
  replica queue + warm-join replay of the session stream), its replica in memory.  This module is
  also that process: ``python -m tests.test_reliability_crash --node-id ID --out FILE`` writes the
  ids of its live sessions to FILE every 100 ms.  Its memory dies with it, so after a restart the
  stream replay restores what it had acked, and the durable queue delivers what it had not.
- ``sessionbus worker`` with a custom consumer (``tests.consumers_for_tests:recorder``) on its
  durable consumer queue, whose effects (a line per event in a file) outlive it: the queue alone
  must bring it to the full state.

Both are killed with SIGKILL while events flow and restarted while events still flow; at the end
each holds exactly the expected live sessions (set equality) and no removed one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.reliability_table import record
from sessionbus.bus.connection import BrokerSettings, connect
from sessionbus.bus.topology import Topology, declare_core
from sessionbus.consumer.peer_cache import PeerCache
from sessionbus.consumer.replicator import Replicator, ReplicatorSettings
from sessionbus.producer.outbox import Outbox
from sessionbus.schemas.events import RemoveReason
from tests.farm_support import (
    AMQP_URL,
    REPO,
    Proc,
    Processes,
    bus_env,
)
from tests.helpers_der import make_session_der
from tests.helpers_keys import keys_for

CTX = b"sessionbus-test"
LIFETIME = 900
REPLICA = "replica-k"
ORIGINS = ("origin-a", "origin-b")
CHUNKS = 30
NEW_PER_CHUNK = 200
REMOVE_PER_CHUNK = 50
KILL_AT, RESTART_AT = 10, 20  # chunk indexes: killed after a third, back after two thirds


# --- the replicator process ----------------------------------------------------------------


async def _replica_main(node_id: str, out: Path) -> None:
    keys = keys_for(os.environ["SESSIONBUS_BUS_KEY_FILE"])
    topo = Topology(prefix=os.environ["SESSIONBUS_PREFIX"])
    conn = await connect(BrokerSettings(url=os.environ["SESSIONBUS_AMQP_URL"]))
    ch = await conn.channel()
    await declare_core(ch, topo)  # as a node does before its replicator starts
    await ch.close()
    replica = Replicator(conn, topo, keys, PeerCache(),
                         ReplicatorSettings(node_id=node_id, sid_ctx=CTX,
                                            session_lifetime=LIFETIME))
    await replica.start()
    print("replicator ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    tmp = out.with_suffix(".tmp")
    while not stop.is_set():
        tmp.write_text("\n".join(sorted(sid.hex() for sid, _ in replica.cache.items())))
        os.replace(tmp, out)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    await replica.stop(5)
    await conn.close()


def start_replica(procs: Processes, env: dict[str, str], out: Path) -> Proc:
    popen = subprocess.Popen(
        [sys.executable, "-m", "tests.test_reliability_crash", "--node-id", REPLICA,
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO),
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )
    proc = Proc([REPLICA], popen)

    def read() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            proc.lines.append(line)

    proc._reader = threading.Thread(target=read, daemon=True)
    proc._reader.start()
    procs.procs.append(proc)
    return proc


# --- the test ------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with bus_env(tmp_path, "consumer.recorder", f"replica.{REPLICA}") as e:
        yield {**e, "SB_TEST_RECORD": str(tmp_path / "record.jsonl")}


def replica_state(path: Path) -> set[bytes]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return set()
    return {bytes.fromhex(line) for line in text.splitlines() if line}


def recorder_state(path: Path) -> set[bytes]:
    """Live sessions by the worker's record: every NEW seen, minus every REMOVE (tombstones)."""
    new, removed = set(), set()
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return set()
    for line in lines:
        with contextlib.suppress(ValueError):  # a line cut by the SIGKILL
            type_, sid_hex, _seq = json.loads(line)
            (new if type_ == "new" else removed).add(bytes.fromhex(sid_hex))
    return new - removed


@pytest.mark.broker
@pytest.mark.slow
def test_sigkilled_consumers_restart_and_end_with_the_full_state(
    env: dict[str, str], tmp_path: Path,
) -> None:
    out = tmp_path / "replica.txt"
    rec = Path(env["SB_TEST_RECORD"])
    procs = Processes()
    keys = keys_for(env["SESSIONBUS_BUS_KEY_FILE"])
    topo = Topology(prefix=env["SESSIONBUS_PREFIX"])
    live: set[bytes] = set()
    removed: set[bytes] = set()
    killed_with: dict[str, int] = {}
    timings: dict[str, float] = {}

    def start_all() -> tuple[Proc, Proc]:
        r = start_replica(procs, env, out)
        # a handler of 0.3 ms per event: the worker has a backlog (and deliveries in its
        # prefetch) when it is killed
        w = procs.start(["worker", "--consumer", "tests.consumers_for_tests:recorder",
                         "--no-stats"], {**env, "SB_TEST_DELAY": "0.0003"})
        return r, w

    async def burst() -> None:
        conn = await connect(BrokerSettings(url=AMQP_URL))
        ch = await conn.channel()
        await declare_core(ch, topo)
        await ch.close()
        boxes = [Outbox(o, topo, keys) for o in ORIGINS]
        tasks = [asyncio.get_running_loop().create_task(b.run(conn)) for b in boxes]
        now = int(time.time())
        made: list[tuple[bytes, Outbox]] = []
        try:
            for c in range(CHUNKS):
                if c == KILL_AT:
                    # mid-burst: both have applied some but not all of what was sent
                    killed_with["replica"] = len(replica_state(out))
                    killed_with["worker"] = len(recorder_state(rec))
                    r.stop(signal.SIGKILL)
                    w.stop(signal.SIGKILL)
                    timings["killed"] = time.monotonic()
                if c == RESTART_AT:
                    timings["restarted"] = time.monotonic()
                    r2, w2 = start_all()
                    await asyncio.to_thread(r2.wait_for, "replicator ready", 30)
                    await asyncio.to_thread(w2.wait_for, "worker running", 30)
                    timings["ready"] = time.monotonic()
                for i in range(NEW_PER_CHUNK):
                    sid = os.urandom(32)
                    box = boxes[i % len(boxes)]
                    box.put_new(sid, CTX, time.time() + LIFETIME,
                                make_session_der(sid, CTX, now, LIFETIME))
                    made.append((sid, box))
                    live.add(sid)
                for _ in range(REMOVE_PER_CHUNK if c else 0):
                    sid, box = made.pop(len(made) // 2)
                    box.put_remove(sid, CTX, now + LIFETIME, RemoveReason.REVOKE)
                    live.discard(sid)
                    removed.add(sid)
                await asyncio.sleep(0.1)
            for b in boxes:
                assert await b.flush(60)
            timings["fed"] = time.monotonic()
        finally:
            for t in tasks:
                t.cancel()
            await conn.close()

    try:
        r, w = start_all()
        r.wait_for("replicator ready", 30)
        w.wait_for("worker running", 30)
        asyncio.run(asyncio.wait_for(burst(), 180))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not {"replica", "worker"} <= timings.keys():
            if "replica" not in timings and replica_state(out) == live:
                timings["replica"] = time.monotonic()
            if "worker" not in timings and recorder_state(rec) == live:
                timings["worker"] = time.monotonic()
            time.sleep(0.05)
    finally:
        procs.stop_all()
    events = CHUNKS * NEW_PER_CHUNK + (CHUNKS - 1) * REMOVE_PER_CHUNK
    sent_before_kill = KILL_AT * (NEW_PER_CHUNK + REMOVE_PER_CHUNK)
    # really mid-burst: each had applied something, and not everything, when it was killed
    assert 0 < killed_with["replica"] < events and 0 < killed_with["worker"] < events, killed_with
    have_r, have_w = replica_state(out), recorder_state(rec)
    assert have_r == live, (len(have_r), len(live), len(live - have_r), len(have_r - live))
    assert have_w == live, (len(have_w), len(live), len(live - have_w), len(have_w - live))
    assert not have_r & removed and not have_w & removed
    down = timings["restarted"] - timings["killed"]
    common = (f"SIGKILL after ~{sent_before_kill:,} of {events:,} events, down {down:.1f} s "
              "while events kept coming, restarted")
    record(
        "consumer crash: replicator process (the node's Replicator: stream replay + durable "
        "queue)",
        injected=common, lost=len(live - have_r), rejected=0,
        recover_s=timings["replica"] - timings["restarted"],
        note=(f"held {killed_with['replica']:,} sessions when killed, lost them with its memory; "
              f"ends = expected set ({len(live):,} live, {len(removed):,} removed absent); "
              "recovery: restart until exact (the burst was still running)"),
        group="consumer-crash",
    )
    record(
        "consumer crash: `sessionbus worker` (custom consumer, durable queue)",
        injected=common, lost=len(live - have_w), rejected=0,
        recover_s=timings["worker"] - timings["restarted"],
        note=(f"had recorded {killed_with['worker']:,} sessions when killed; ends = expected set; "
              "its handler is slowed to 0.3 ms/event so it had a backlog, which the recovery "
              "time mostly is"),
        group="consumer-crash",
    )


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="a replicator process for the crash test")
    p.add_argument("--node-id", required=True)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    asyncio.run(_replica_main(args.node_id, args.out))


if __name__ == "__main__":
    main(sys.argv[1:])
