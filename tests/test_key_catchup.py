"""Key ring catch-up: a follower cut off across a rotation has the new ring within a second of
its broker coming back."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest
from yarl import URL

from sessionbus.bus.connection import BrokerSettings, connect
from sessionbus.bus.topology import (
    Topology,
    declare_core,
    declare_keys,
    delete_all,
    key_routing_key,
)
from sessionbus.keys.follower import KeyFollower
from sessionbus.schemas.codec import CONTENT_TYPE, encode_key_ring
from sessionbus.schemas.ticket_keys import KeyRing, TicketKey
from tests.farm_support import AMQP_URL, unique_prefix
from tests.helpers_keys import farm_keys
from tests.tcp_proxy import TcpProxy


def ring(seq: int) -> KeyRing:
    now = time.time()
    return KeyRing(seq, now, (TicketKey.generate(now - 1, now - 1, now + 600, now + 1200),))


@pytest.mark.broker
@pytest.mark.deadline(60)
async def test_follower_cut_off_across_a_rotation_catches_up_within_a_second() -> None:
    topo = Topology(prefix=unique_prefix())
    keys = farm_keys()
    u = URL(AMQP_URL)
    direct = await connect(BrokerSettings(url=AMQP_URL))
    proxy = TcpProxy(u.host or "127.0.0.1", u.port or 5672)
    await proxy.start()
    follower_conn = await connect(BrokerSettings(url=proxy.url()))
    follower: KeyFollower | None = None
    ch = await direct.channel()
    try:
        await declare_core(ch, topo)
        exchange = await declare_keys(ch, topo)

        async def publish(r: KeyRing) -> None:
            body, headers = encode_key_ring(r, "keys-test", keys)
            await exchange.publish(
                aio_pika.Message(body, headers=headers, content_type=CONTENT_TYPE,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 user_id=u.user or "guest", timestamp=time.time()),
                key_routing_key("keys-test"))

        await publish(ring(1))
        follower = KeyFollower(follower_conn, topo, keys)
        await follower.start()
        assert (await follower.wait(10)) is not None and follower.ring is not None
        assert follower.ring.seq == 1
        await proxy.pause()  # cut off
        for _ in range(200):
            if not follower_conn.connected.is_set():
                break
            await asyncio.sleep(0.01)
        await publish(ring(2))  # the rotation it misses
        await asyncio.sleep(1.0)
        assert follower.ring.seq == 1
        await proxy.resume()
        t0 = time.monotonic()
        while follower.ring.seq != 2:
            assert time.monotonic() - t0 < 5, "no catch-up within 5 s"
            await asyncio.sleep(0.01)
        took = time.monotonic() - t0
        assert took < 1.5, took  # reconnect (backoff <= 1 s) plus the re-read
    finally:
        if follower is not None:
            await follower.stop()
        await follower_conn.close()
        await proxy.stop()
        await delete_all(ch, topo, [])
        await direct.close()
