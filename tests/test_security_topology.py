"""Topology v2 under attack: ops/rabbitmq/definitions.json imported into a PRIVATE broker, then
each role's own credentials try every route they must not have; the broker refuses each one.

The attacks: bind a stream or the dead queue to the DLX or to any exchange the role can write,
declare / redeclare / delete what is provisioned, publish with another role's routing key, write
the key exchange.  Every attack must end in the broker's ACCESS_REFUSED (channel closed, 403);
the test counts successes and wants 0.  Beside them, each role does its own job with the same
permissions (so the refusals are not those of a user who can do nothing), and the docs'
permission recipes are checked to be the generated text of the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import ChannelAccessRefused

from sessionbus.bus import definitions as defs
from sessionbus.bus.topology import Topology, dead_letter_key, declare_admin, provisioned
from tests.private_broker import PrivateBroker, _tool

TOPO = Topology()
ROLE_USERS = ("node-1", "cache-1", "sessionbus-worker", "revoke", "sessionbus-keyfile",
              "sessionbus-keys", "sessionbus-ops", "sessionbus-monitoring")


@dataclass
class Farm:
    broker: PrivateBroker
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        return f"amqp://{user}:{self.passwords[user]}@127.0.0.1:{self.broker.port}/{defs.VHOST}"


def _ctl_stdin(broker: PrivateBroker, stdin: str, *args: str) -> None:
    """rabbitmqctl with a secret on stdin (never argv)."""
    tool = _tool("rabbitmqctl")
    assert tool is not None
    done = subprocess.run([tool, "-n", broker.name, *args], env=broker._env(), cwd=broker.dir,
                          input=stdin, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def farm() -> Iterator[Farm]:
    with PrivateBroker.start_or_skip() as broker:
        path = broker.dir / "definitions.json"
        path.write_text(defs.DEFINITIONS.read_text())
        done = broker.ctl("import_definitions", str(path))
        assert done.returncode == 0, done.stdout + done.stderr
        d = json.loads(path.read_text())
        deadline = time.monotonic() + 30
        while True:  # the import may return before its last parts are applied
            pol = broker.ctl("list_policies", "-p", defs.VHOST, "-q", "--no-table-headers")
            top = broker.ctl("list_topic_permissions", "-p", defs.VHOST, "-q",
                             "--no-table-headers")
            if (len(pol.stdout.strip().splitlines()) == len(d["policies"])
                    and len(top.stdout.strip().splitlines()) == len(d["topic_permissions"])):
                break
            assert time.monotonic() < deadline, (pol.stdout, top.stdout)
            time.sleep(0.2)
        passwords = {u["name"]: secrets.token_urlsafe(18) for u in d["users"]}
        for user, pw in passwords.items():
            _ctl_stdin(broker, pw + "\n", "change_password", user)
        yield Farm(broker, passwords)


@contextlib.asynccontextmanager
async def connected(farm: Farm, user: str) -> AsyncIterator[AbstractConnection]:
    conn = await aio_pika.connect(farm.url(user), timeout=15)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


Attack = Callable[[AbstractConnection], Awaitable[object]]


def bind(queue: str, exchange: str, key: str) -> Attack:
    async def go(conn: AbstractConnection) -> None:
        ch = await conn.channel()
        q = await ch.get_queue(queue, ensure=False)
        await q.bind(exchange, routing_key=key)
    return go


def publish(exchange: str, key: str) -> Attack:
    async def go(conn: AbstractConnection) -> None:
        ch = await conn.channel(publisher_confirms=True)
        x = await ch.get_exchange(exchange, ensure=False)
        await asyncio.wait_for(x.publish(aio_pika.Message(b"attack"), key), 10)
    return go


def redeclare_queue(name: str) -> Attack:
    args = {q.name: q.arguments for q in provisioned(TOPO).queues}[name]

    async def go(conn: AbstractConnection) -> None:
        ch = await conn.channel()
        await ch.declare_queue(name, durable=True, arguments=args)
    return go


def redeclare_exchange(name: str) -> Attack:
    async def go(conn: AbstractConnection) -> None:
        ch = await conn.channel()
        await ch.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    return go


def delete_queue(name: str) -> Attack:
    async def go(conn: AbstractConnection) -> None:
        ch = await conn.channel()
        await ch.queue_delete(name)
    return go


def declare_queue(name: str) -> Attack:
    async def go(conn: AbstractConnection) -> None:
        ch = await conn.channel()
        await ch.declare_queue(name, durable=True)
    return go


def consume(queue: str, stream: bool) -> Attack:
    async def go(conn: AbstractConnection) -> None:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=8)
        q = await ch.get_queue(queue, ensure=True)

        async def ack(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            await m.ack()

        tag = await q.consume(ack, arguments={"x-stream-offset": "first"} if stream else {})
        await q.cancel(tag)
        await ch.close()
    return go


STREAMS = (TOPO.session_stream, TOPO.key_stream)
EXCHANGES = (TOPO.sessions_exchange, TOPO.keys_exchange, TOPO.dlx)


def attacks_of(user: str) -> dict[str, Attack]:
    """Every route ``user`` must not have, by name."""
    a: dict[str, Attack] = {}
    for q in (*STREAMS, TOPO.dead_queue):
        for x in EXCHANGES:  # the DLX and every exchange a role may write
            a[f"bind {q} to {x}"] = bind(q, x, "#")
        a[f"redeclare {q}"] = redeclare_queue(q)
        a[f"delete {q}"] = delete_queue(q)
    for x in EXCHANGES:
        a[f"redeclare exchange {x}"] = redeclare_exchange(x)
    a["bind the session stream to session.get.*"] = bind(TOPO.session_stream,
                                                        TOPO.sessions_exchange, "session.get.*")
    others = [u for u in ("node-2", "cache-1", "revoke", "sessionbus-keys") if u != user]
    for other in others:
        for t in ("new", "remove"):
            a[f"publish session.{t}.{other}"] = publish(TOPO.sessions_exchange,
                                                       f"session.{t}.{other}")
        a[f"dead-letter as {other}"] = publish(TOPO.dlx, dead_letter_key("forged", other))
    a["publish session.new.* (wildcard)"] = publish(TOPO.sessions_exchange, "session.new.*")
    a[f"publish session.new.{user}.x (longer key)"] = publish(TOPO.sessions_exchange,
                                                             f"session.new.{user}.x")
    if user != "sessionbus-keys":
        a[f"write the keys exchange as keys.{user}"] = publish(TOPO.keys_exchange, f"keys.{user}")
        a["write the keys exchange as keys.sessionbus-keys"] = publish(
            TOPO.keys_exchange, "keys.sessionbus-keys")
        a["take the key publisher's lock"] = declare_queue(TOPO.keys_lock_queue)
    if user == "revoke":
        a["publish session.new.revoke"] = publish(TOPO.sessions_exchange, "session.new.revoke")
    if user == "sessionbus-keyfile":
        a["read the session stream"] = consume(TOPO.session_stream, stream=True)
    if user != "sessionbus-worker":
        a["declare a consumer queue"] = declare_queue(TOPO.consumer_queue("x"))
    return a


async def run_attacks(farm: Farm, user: str) -> dict[str, str]:
    """{attack: outcome}; outcome "refused" only for the broker's 403 ACCESS_REFUSED."""
    outcome: dict[str, str] = {}
    async with connected(farm, user) as conn:
        for name, attack in attacks_of(user).items():
            try:
                await attack(conn)
            except ChannelAccessRefused as exc:
                assert "ACCESS_REFUSED" in str(exc), exc
                outcome[name] = "refused"
            except Exception as exc:  # anything else is not the broker refusing it
                outcome[name] = f"error {type(exc).__name__}: {exc}"
            else:
                outcome[name] = "SUCCEEDED"
    return outcome


@pytest.mark.broker
@pytest.mark.deadline(200)
@pytest.mark.parametrize("user", ["node-1", "cache-1", "sessionbus-worker", "revoke",
                                  "sessionbus-keyfile", "sessionbus-keys"])
async def test_no_role_reaches_a_stream_the_dead_queue_or_another_roles_key(
    farm: Farm, user: str,
) -> None:
    outcome = await run_attacks(farm, user)
    succeeded = [n for n, o in outcome.items() if o == "SUCCEEDED"]
    assert succeeded == [], succeeded
    assert all(o == "refused" for o in outcome.values()), {
        n: o for n, o in outcome.items() if o != "refused"}
    assert len(outcome) >= 25  # the list was run, not skipped


async def expect_ok(conn: AbstractConnection, *jobs: Attack) -> None:
    for job in jobs:
        await job(conn)


@pytest.mark.broker
@pytest.mark.deadline(200)
async def test_each_role_does_its_own_job(farm: Farm) -> None:
    async with connected(farm, "node-1") as c:
        await expect_ok(c, *(publish(TOPO.sessions_exchange, f"session.{t}.node-1")
                             for t in ("new", "get", "remove")),
                        publish(TOPO.dlx, dead_letter_key("forged", "node-1")),
                        consume(TOPO.session_stream, True), consume(TOPO.key_stream, True))
    async with connected(farm, "cache-1") as c:
        await expect_ok(c, publish(TOPO.sessions_exchange, "session.get.cache-1"))
    async with connected(farm, "revoke") as c:
        await expect_ok(c, publish(TOPO.sessions_exchange, "session.remove.revoke"))
    async with connected(farm, "sessionbus-worker") as c:
        ch = await c.channel()
        q = await ch.declare_queue(TOPO.consumer_queue("audit"), durable=True)
        await q.bind(TOPO.sessions_exchange, "session.*.*")
        await q.bind(TOPO.sessions_exchange, "session.get.node-1")
        await expect_ok(c, consume(TOPO.consumer_queue("audit"), False),
                        consume(TOPO.session_stream, True),
                        publish(TOPO.dlx, dead_letter_key("handler", "sessionbus-worker")))
    async with connected(farm, "sessionbus-keyfile") as c:
        await expect_ok(c, consume(TOPO.key_stream, True))
    async with connected(farm, "sessionbus-keys") as c:
        ch = await c.channel()
        await ch.declare_queue(TOPO.keys_lock_queue, exclusive=True)
        await expect_ok(c, publish(TOPO.keys_exchange, "keys.sessionbus-keys"),
                        consume(TOPO.key_stream, True))
    async with connected(farm, "sessionbus-ops") as c:
        await expect_ok(c, consume(TOPO.dead_queue, False))
    async with connected(farm, "sessionbus-monitoring") as c:
        ch = await c.channel()  # passive look-ups need no permission
        await ch.get_queue(TOPO.session_stream, ensure=True)
    async with connected(farm, "sessionbus-admin") as c:
        ch = await c.channel()
        await declare_admin(ch, TOPO)  # `sessionbus setup` after the import: nothing to change
    # and what was imported is what the code provisions, with the policies applied
    out = farm.broker.ctl("list_queues", "-p", defs.VHOST, "name", "policy", "type", "-q",
                          "--no-table-headers").stdout
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.strip().splitlines()}
    assert rows[TOPO.session_stream] == ["sessionbus-session-stream", "stream"]
    assert rows[TOPO.key_stream] == ["sessionbus-key-stream", "stream"]
    assert rows[TOPO.dead_queue] == ["sessionbus-dead", "quorum"]


def test_definitions_and_doc_recipes_are_the_generated_text() -> None:
    """definitions.json, and the permission sections of ops/rabbitmq/README.md and
    docs/operations.md, equal what ``python -m sessionbus.bus.definitions`` generates."""
    d = defs.definitions()
    assert json.loads(defs.DEFINITIONS.read_text()) == d
    section = defs.recipes_markdown(d)
    for doc in defs.DOCS:
        text = doc.read_text()
        assert text.count(defs.BEGIN) == 1 and text.count(defs.END) == 1, doc
        assert defs.with_section(text, section) == text, f"{doc} is stale: run --write"
    # the recipe names exactly the file's node permissions (and the check can fail)
    node = next(p for p in d["permissions"] if p["user"] == "node-1")
    assert f"'{node['configure']}' '{node['write']}' '{node['read']}'" in section
    assert defs.with_section(section.replace("x", "y") + defs.BEGIN + defs.END,
                             section) != section


def test_definitions_hold_the_v2_shape() -> None:
    d: dict[str, Any] = defs.definitions()
    perms = {p["user"]: p for p in d["permissions"]}
    assert set(perms) >= set(ROLE_USERS)
    for user in ("node-1", "cache-1", "revoke", "sessionbus-keyfile", "sessionbus-ops"):
        assert perms[user]["configure"] == "", user  # they declare nothing
    for user, p in perms.items():
        if user == "sessionbus-admin":
            continue
        for q in (*STREAMS, TOPO.dead_queue):
            for f in ("configure", "write"):
                assert not (p[f] and __import__("re").fullmatch(p[f], q)), (user, f, q)
    x = {e["name"]: e for e in d["exchanges"]}
    assert {e["type"] for e in x.values()} == {"topic"}
    assert ({(b["source"], b["destination"], b["routing_key"]) for b in d["bindings"]}
            >= {(TOPO.dlx, TOPO.dead_queue, "#")})
    assert not any("replica" in p["pattern"] for p in d["policies"])
