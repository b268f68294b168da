"""Warm-join progress: offsets replayed and remaining, a gauge and a line every few seconds."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from sessionbus.bus.topology import Topology
from sessionbus.consumer.replay_progress import ReplayProgress, stream_end
from sessionbus.metrics import Metrics

M = Metrics()  # a registry of this test's own


def gauge(state: str) -> float:
    return M.value("sessionbus_replay_offsets", {"state": state})


async def test_a_slow_replay_reports_replayed_and_remaining_until_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "sessionbus.consumer.replay_progress")
    done = asyncio.Event()
    offset: list[int | None] = [None]

    async def end() -> int:
        return 1099

    progress = ReplayProgress("replica n1", lambda: offset[0], done, M.replica.replay_offsets,
                              interval=0.05)
    task = asyncio.get_running_loop().create_task(progress.run(end()))
    await asyncio.sleep(0.08)
    offset[0] = 100  # the replay began at offset 100 and is at it
    await asyncio.sleep(0.06)
    assert (gauge("replayed"), gauge("remaining")) == (1, 999)
    offset[0] = 599
    await asyncio.sleep(0.06)
    assert (gauge("replayed"), gauge("remaining")) == (500, 500)
    done.set()
    await asyncio.wait_for(task, 1)
    assert gauge("remaining") == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("warm join" in m and "0 offsets replayed, unknown remaining" in m for m in lines)
    assert any("500 offsets replayed, 500 remaining" in m for m in lines)


async def test_a_quick_replay_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "sessionbus.consumer.replay_progress")
    done = asyncio.Event()
    progress = ReplayProgress("replica n1", lambda: 5, done, M.replica.replay_offsets, end=5,
                              interval=1.0)
    task = asyncio.get_running_loop().create_task(progress.run())
    await asyncio.sleep(0.05)
    done.set()
    await asyncio.wait_for(task, 1)
    assert not [r for r in caplog.records if "warm join" in r.getMessage()]


@pytest.mark.broker
async def test_stream_end_is_the_last_chunk_of_a_real_stream(
    connection: AbstractRobustConnection, topology: Topology, declared_queues: list[str]
) -> None:
    name = f"{topology.prefix}.progress.stream"
    declared_queues.append(name)
    channel = await connection.channel()
    await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "stream"})
    assert await stream_end(connection, name, timeout=1) is None  # empty
    for _ in range(50):
        await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=name)
    end = await stream_end(connection, name)
    assert end is not None and 0 <= end <= 49
    assert await stream_end(connection, f"{topology.prefix}.no-such-stream") is None
    await channel.close()
