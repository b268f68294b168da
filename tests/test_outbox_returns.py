"""A confirm means the stream has the event: an unroutable NEW/REMOVE is returned (mandatory),
stays in the outbox and goes again once the stream takes it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aio_pika.abc import AbstractRobustConnection

from sessionbus.bus.topology import Topology, declare_core
from sessionbus.metrics import Metrics
from sessionbus.producer.outbox import Outbox
from sessionbus.schemas.events import EventType
from tests.helpers_keys import farm_keys

METRICS = Metrics()


def sample(name: str, **labels: str) -> float:
    return METRICS.value(name, labels)


@pytest.mark.broker
@pytest.mark.deadline(60)
async def test_returned_event_stays_in_the_outbox_and_goes_again(
    connection: AbstractRobustConnection, topology: Topology,
) -> None:
    ch = await connection.channel()
    await declare_core(ch, topology)
    sessions = await ch.get_exchange(topology.sessions_exchange, ensure=False)
    stream = await ch.get_queue(topology.session_stream, ensure=True)
    box = Outbox("ret-a", topology, farm_keys(), metrics=METRICS)
    task = asyncio.get_running_loop().create_task(box.run(connection))
    try:
        box.put_new(b"\x01" * 32, b"ctx", 1e10, b"der")
        assert await box.flush(10)  # the publishing channel is open
        returned0 = sample("sessionbus_messages_returned_total", type="new")
        published0 = sample("sessionbus_events_published_total", type="new")
        failed0 = sample("sessionbus_publish_failures_total", reason="returned")
        await stream.unbind(sessions, routing_key="session.new.*")  # the route to the stream
        box.put_new(b"\x02" * 32, b"ctx", 1e10, b"der")
        for _ in range(200):
            if sample("sessionbus_messages_returned_total", type="new") > returned0:
                break
            await asyncio.sleep(0.02)
        # returned: counted as such (and sent again, returned again while the route is
        # missing), never as published; it waits in the outbox
        await asyncio.sleep(1.0)
        returns = sample("sessionbus_messages_returned_total", type="new") - returned0
        assert returns >= 1
        assert sample("sessionbus_publish_failures_total", reason="returned") - failed0 == returns
        assert sample("sessionbus_events_published_total", type="new") == published0
        assert not await box.flush(0.2) and box.blocked  # still waiting (or in flight again)
        await stream.bind(sessions, routing_key=f"session.{EventType.NEW.value}.*")
        assert await box.flush(10)  # sent again and confirmed once the stream takes it
        assert sample("sessionbus_events_published_total", type="new") == published0 + 1
        assert not box.blocked
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ch.close()
