"""ops/rabbitmq/definitions.json: imported into a fresh vhost of the real broker, each role does
what it must and is refused what it must not (node ids in routing keys, the key exchange).

The definitions are rewritten into a vhost and user names unique to this run (``sbtest-<hex>``,
``node-1-<hex>``, ...), imported with ``rabbitmqctl import_definitions`` and always deleted at the
end.  Everything a role declares at start (``declare_core``, its own queues) is declared here *as
that role*, so a permission a real process needs but the file lacks fails this test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused, ChannelLockedResource
from yarl import URL

from sessionbus.bus.topology import Topology, declare_core, declare_keys, declare_replica_queue

REPO = Path(__file__).resolve().parent.parent
DEFINITIONS = REPO / "ops" / "rabbitmq" / "definitions.json"
# The placeholder password of every user in definitions.json (documented in ops/rabbitmq/README.md).
PLACEHOLDER = "CHANGE-ME-sessionbus"
# The broker the other tests use (only its host and port: the users here are our own).
_BROKER = URL(os.environ.get("SESSIONBUS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
AMQP_HOST = f"{_BROKER.host}:{_BROKER.port or 5672}"
TOPO = Topology()
NODES = ("node-1", "node-2", "node-3")
# what declare_core declares: every role may redeclare these
CORE_NAMES = (TOPO.sessions_exchange, TOPO.dlx, TOPO.dead_queue, TOPO.session_stream)


def load_definitions() -> dict[str, Any]:
    return json.loads(DEFINITIONS.read_text())


# --- the file itself (no broker) ----------------------------------------------------------------


def test_one_user_per_role_and_only_the_key_publisher_writes_keys() -> None:
    d = load_definitions()
    users = {u["name"]: u for u in d["users"]}
    assert set(users) == {
        *NODES, "revoke", "sessionbus-worker", "sessionbus-keys", "sessionbus-monitoring",
    }
    assert users["sessionbus-monitoring"]["tags"] == ["monitoring"]
    assert all(u["tags"] == [] for n, u in users.items() if n != "sessionbus-monitoring")
    assert [v["name"] for v in d["vhosts"]] == ["sessionbus"]
    perms = {p["user"]: p for p in d["permissions"]}
    assert set(perms) == set(users)
    for p in perms.values():
        assert p["vhost"] == "sessionbus"
    writers = [u for u, p in perms.items()
               if p["write"] and re.fullmatch(p["write"], TOPO.keys_exchange)]
    assert writers == ["sessionbus-keys"]
    for node in NODES:
        p = perms[node]
        assert re.fullmatch(p["configure"], TOPO.replica_queue(node))
        others = [n for n in NODES if n != node]
        for other in others:
            assert not re.fullmatch(p["configure"], TOPO.replica_queue(other))
            assert not re.fullmatch(p["read"], TOPO.replica_queue(other))
        for name in CORE_NAMES:
            assert re.fullmatch(p["configure"], name), name  # declare_core redeclares them
        for name in (TOPO.keys_exchange, TOPO.key_stream):  # the key publisher's alone
            assert not re.fullmatch(p["configure"], name), name
            assert not re.fullmatch(p["write"], name), name
    mon = perms["sessionbus-monitoring"]
    assert (mon["configure"], mon["write"], mon["read"]) == ("", "", "")
    topic = {(t["user"], t["exchange"]): t for t in d["topic_permissions"]}
    for node in NODES:
        w = topic[(node, TOPO.sessions_exchange)]["write"]
        assert w == r"^session\.(new|get|remove)\.{username}$"
    assert topic[("sessionbus-keys", TOPO.keys_exchange)]["write"] == r"^keys\.[a-z0-9-]+$"


def test_readme_shows_the_permissions_of_the_file() -> None:
    readme = (DEFINITIONS.parent / "README.md").read_text()
    d = load_definitions()
    for p in d["permissions"]:
        if p["user"] in ("node-2", "node-3", "sessionbus-monitoring"):
            continue
        for field in ("configure", "write", "read"):
            assert f"`{p[field]}`".replace("|", "\\|") in readme, (p["user"], field)
    for t in d["topic_permissions"]:
        for field in ("write", "read"):
            if t[field]:
                assert f"`{t[field]}`".replace("|", "\\|") in readme, (t["user"], field)


def test_policies_match_the_names_of_the_topology() -> None:
    pol = {p["name"]: p for p in load_definitions()["policies"]}

    def policy_of(queue: str) -> str | None:
        matching = [p for p in pol.values() if re.search(p["pattern"], queue)]
        assert len(matching) <= 1, f"{queue}: several policies match, only one applies"
        return matching[0]["name"] if matching else None

    assert policy_of(TOPO.replica_queue("node-7")) == "sessionbus-replica"
    assert policy_of(TOPO.dead_queue) == "sessionbus-dead"
    assert policy_of(TOPO.session_stream) == "sessionbus-session-stream"
    assert policy_of(TOPO.key_stream) == "sessionbus-key-stream"
    assert policy_of(TOPO.consumer_queue("audit")) == "sessionbus-consumer"
    assert policy_of(TOPO.keys_lock_queue) is None
    replica = pol["sessionbus-replica"]["definition"]
    assert replica["dead-letter-exchange"] == TOPO.dlx
    assert replica["overflow"] == "drop-head"
    assert replica["message-ttl"] == 7_200_000
    assert pol["sessionbus-session-stream"]["definition"]["max-age"] == "2h"
    assert all(p["apply-to"] == "queues" for p in pol.values())


# --- against the broker ---------------------------------------------------------------------------


def _ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=60, check=check)


@dataclass(frozen=True)
class Imported:
    vhost: str
    users: dict[str, str]  # name in definitions.json -> name in this run

    def url(self, user: str) -> str:
        return f"amqp://{self.users[user]}:{PLACEHOLDER}@{AMQP_HOST}/{self.vhost}"


def rewrite(d: dict[str, Any], vhost: str, suffix: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The definitions with their vhost and user names (also inside regexes) made unique."""
    d = json.loads(json.dumps(d))
    names = {u["name"]: f"{u['name']}-{suffix}" for u in d["users"]}

    def rename_in(regex: str) -> str:
        for old, new in names.items():
            regex = re.sub(rf"(?<![a-z0-9-]){re.escape(old)}(?![a-z0-9-])", new, regex)
        return regex

    for u in d["users"]:
        u["name"] = names[u["name"]]
    d["vhosts"] = [{**v, "name": vhost} for v in d["vhosts"]]
    for section in ("permissions", "topic_permissions", "policies", "queues", "exchanges",
                    "bindings"):
        for e in d.get(section, []):
            e["vhost"] = vhost
            if "user" in e:
                e["user"] = names[e["user"]]
                for f in ("configure", "write", "read"):
                    if f in e:
                        e[f] = rename_in(e[f])
    return d, names


@pytest.fixture(scope="module")
def imported() -> Iterator[Imported]:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")
    suffix = uuid.uuid4().hex[:8]
    vhost = f"sbtest-{suffix}"
    d, names = rewrite(load_definitions(), vhost, suffix)
    # The broker's own user (rabbitmq) reads the file: an absolute, world-readable path.
    fd, path = tempfile.mkstemp(prefix="sessionbus-defs-", suffix=".json", dir="/tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(d, f)
        os.chmod(path, 0o644)
        done = _ctl("import_definitions", path, check=False)
        if done.returncode != 0:
            if _ctl("list_vhosts", check=False).returncode != 0:
                pytest.skip("rabbitmqctl cannot reach the broker (not running, no Erlang cookie)")
            raise AssertionError(f"import_definitions failed: {done.stdout}{done.stderr}")
        _await_import(vhost, len(d["policies"]), len(d["topic_permissions"]))
        yield Imported(vhost, names)
    finally:
        os.unlink(path)
        # Always: the vhost (its queues and exchanges go with it) and the users.
        cleanups = [subprocess.Popen(["rabbitmqctl", "-q", "delete_vhost", vhost],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        cleanups += [subprocess.Popen(["rabbitmqctl", "-q", "delete_user", n],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for n in names.values()]
        for p in cleanups:
            p.wait(60)


def _await_import(vhost: str, policies: int, topic_permissions: int) -> None:
    """``import_definitions`` may return before the import is applied: wait for its last parts."""
    deadline = time.monotonic() + 20
    while True:
        lists = [subprocess.Popen(["rabbitmqctl", "-q", cmd, "-p", vhost, "--no-table-headers"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for cmd in ("list_policies", "list_topic_permissions")]
        pol, top = (p.communicate(timeout=60)[0] for p in lists)
        if (len(pol.strip().splitlines()) == policies
                and len(top.strip().splitlines()) == topic_permissions):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"definitions not applied to {vhost}: {pol!r} {top!r}")
        time.sleep(0.2)


@contextlib.asynccontextmanager
async def connected(imp: Imported, user: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    conn = await aio_pika.connect(imp.url(user), timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


async def confirmed_publish(
    conn: aio_pika.abc.AbstractConnection, exchange: str, routing_key: str
) -> None:
    """Publish one message with confirms on a fresh channel (a refusal closes the channel)."""
    channel = await conn.channel(publisher_confirms=True)
    ex = await channel.get_exchange(exchange, ensure=False)
    await asyncio.wait_for(ex.publish(aio_pika.Message(b"probe"), routing_key), 10)
    await channel.close()


async def consume_once(conn: aio_pika.abc.AbstractConnection, queue: str, stream: bool) -> None:
    """Start and cancel a consumer (streams: manual acks, a prefetch and an offset)."""
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=16)
    q = await channel.get_queue(queue, ensure=True)
    args = {"x-stream-offset": "first"} if stream else {}

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()

    tag = await q.consume(ignore, arguments=args)
    await q.cancel(tag)
    await channel.close()


def refused(what: str) -> Any:
    message = f"ACCESS_REFUSED - access to {what}"
    return pytest.raises(ChannelAccessRefused, match=re.escape(message))


@pytest.mark.broker
async def test_node_declares_its_topology_and_publishes_only_its_own_id(
    imported: Imported,
) -> None:
    me, other = imported.users["node-1"], imported.users["node-2"]
    async with connected(imported, "sessionbus-keys") as conn:  # a key publisher ran before
        channel = await conn.channel()
        await declare_core(channel, TOPO)
        await declare_keys(channel, TOPO)
    async with connected(imported, "node-1") as conn:
        # What a node does at start: the core topology on its outbox channel, its replica queue.
        channel = await conn.channel(publisher_confirms=True)
        await declare_core(channel, TOPO)
        await declare_replica_queue(channel, TOPO, me)
        await channel.close()
        await consume_once(conn, TOPO.replica_queue(me), stream=False)
        await consume_once(conn, TOPO.session_stream, stream=True)  # warm-join replay
        await consume_once(conn, TOPO.key_stream, stream=True)  # the key follower

        await confirmed_publish(conn, TOPO.sessions_exchange, f"session.new.{me}")
        await confirmed_publish(conn, TOPO.sessions_exchange, f"session.get.{me}")
        await confirmed_publish(conn, TOPO.sessions_exchange, f"session.remove.{me}")
        await confirmed_publish(conn, TOPO.dlx, "")  # dead-lettering a bad message

        for key in (f"session.new.{other}", f"session.remove.{other}", "session.new.*",
                    f"session.new.{me}.x", f"session.new.{me}x"):
            with refused(f"topic '{key}' in exchange '{TOPO.sessions_exchange}' in vhost "
                         f"'{imported.vhost}' refused for user '{me}'"):
                await confirmed_publish(conn, TOPO.sessions_exchange, key)
        with refused(f"exchange '{TOPO.keys_exchange}' in vhost '{imported.vhost}' refused "
                     f"for user '{me}'"):
            await confirmed_publish(conn, TOPO.keys_exchange, f"keys.{me}")

        # Another node's replica queue is not ours to declare, read or bind.
        with refused(f"queue '{TOPO.replica_queue(other)}'"):
            ch = await conn.channel()
            await ch.declare_queue(TOPO.replica_queue(other), durable=True)
        # Bindings are topic-checked too: the session stream must not take GETs.
        with refused(f"topic 'session.get.*' in exchange '{TOPO.sessions_exchange}'"):
            ch = await conn.channel()
            q = await ch.get_queue(TOPO.session_stream, ensure=False)
            await q.bind(TOPO.sessions_exchange, "session.get.*")


@pytest.mark.broker
async def test_node_cannot_route_session_messages_into_the_key_stream(
    imported: Imported,
) -> None:
    async with connected(imported, "node-2") as conn:
        channel = await conn.channel()
        await declare_core(channel, TOPO)
        with refused(f"queue '{TOPO.key_stream}'"):
            q = await channel.get_queue(TOPO.key_stream, ensure=False)
            await q.bind(TOPO.sessions_exchange, "session.new.*")


@pytest.mark.broker
async def test_key_publisher_takes_the_lock_and_alone_writes_keys(imported: Imported) -> None:
    me = imported.users["sessionbus-keys"]
    async with connected(imported, "sessionbus-keys") as conn:
        channel = await conn.channel()
        await declare_core(channel, TOPO)
        await declare_keys(channel, TOPO)
        await channel.declare_queue(TOPO.keys_lock_queue, exclusive=True)
        await consume_once(conn, TOPO.key_stream, stream=True)  # it follows the ring too
        await confirmed_publish(conn, TOPO.keys_exchange, "keys.keys-1")
        await confirmed_publish(conn, TOPO.dlx, "")
        with refused(f"exchange '{TOPO.sessions_exchange}' in vhost '{imported.vhost}' "
                     f"refused for user '{me}'"):
            await confirmed_publish(conn, TOPO.sessions_exchange, "session.new.keys-1")
        # A second publisher is told the lock is held (405), not refused (403).
        async with connected(imported, "sessionbus-keys") as second:
            ch2 = await second.channel()
            with pytest.raises(ChannelLockedResource):
                await ch2.declare_queue(TOPO.keys_lock_queue, exclusive=True)
    for other in ("node-3", "sessionbus-worker"):
        async with connected(imported, other) as conn:
            with refused(f"exchange '{TOPO.keys_exchange}' in vhost '{imported.vhost}' "
                         f"refused for user '{imported.users[other]}'"):
                await confirmed_publish(conn, TOPO.keys_exchange, "keys.keys-1")


@pytest.mark.broker
async def test_worker_declares_consumer_queues_and_cannot_publish_events(
    imported: Imported,
) -> None:
    me = imported.users["sessionbus-worker"]
    async with connected(imported, "sessionbus-worker") as conn:
        channel = await conn.channel()
        await declare_core(channel, TOPO)
        durable = await channel.declare_queue(TOPO.consumer_queue("audit"), durable=True)
        await durable.bind(TOPO.sessions_exchange, "session.get.node-1")
        temporary = await channel.declare_queue(exclusive=True, auto_delete=True)
        assert temporary.name.startswith("amq.gen-")
        await temporary.bind(TOPO.sessions_exchange, "session.*.*")
        await consume_once(conn, TOPO.consumer_queue("audit"), stream=False)
        await consume_once(conn, TOPO.session_stream, stream=True)  # Source.STREAM consumers
        await consume_once(conn, TOPO.key_stream, stream=True)  # sessionbus keyfile
        await consume_once(conn, TOPO.dead_queue, stream=False)  # inspecting dead letters
        await confirmed_publish(conn, TOPO.dlx, "")
        with refused(f"exchange '{TOPO.sessions_exchange}' in vhost '{imported.vhost}' "
                     f"refused for user '{me}'"):
            await confirmed_publish(conn, TOPO.sessions_exchange, "session.new.node-1")
        with refused(f"queue '{TOPO.replica_queue('node-1')}'"):
            ch = await conn.channel()
            await ch.declare_queue(TOPO.replica_queue("node-1"), durable=True)


@pytest.mark.broker
async def test_revoke_user_publishes_only_removes_as_revoke(imported: Imported) -> None:
    me = imported.users["revoke"]  # `sessionbus revoke`'s default --origin is "revoke"
    async with connected(imported, "revoke") as conn:
        await declare_core(await conn.channel(), TOPO)  # what its outbox does first
        await confirmed_publish(conn, TOPO.sessions_exchange, f"session.remove.{me}")
        for key in (f"session.new.{me}", f"session.remove.{imported.users['node-1']}"):
            with refused(f"topic '{key}' in exchange '{TOPO.sessions_exchange}'"):
                await confirmed_publish(conn, TOPO.sessions_exchange, key)
        with refused(f"queue '{TOPO.replica_queue(me)}'"):
            ch = await conn.channel()
            await ch.declare_queue(TOPO.replica_queue(me), durable=True)


@pytest.mark.broker
async def test_monitoring_user_can_only_look(imported: Imported) -> None:
    async with connected(imported, "node-3") as conn:
        await declare_core(await conn.channel(), TOPO)
    async with connected(imported, "sessionbus-monitoring") as conn:
        # A passive declare (does it exist, how many messages) needs no permission.
        ch = await conn.channel()
        await ch.get_queue(TOPO.session_stream, ensure=True)
        await ch.get_queue(TOPO.dead_queue, ensure=True)
        await ch.close()
        with refused(f"queue '{TOPO.dead_queue}'"):
            await consume_once(conn, TOPO.dead_queue, stream=False)
        with refused(f"queue '{TOPO.consumer_queue('x')}'"):
            ch = await conn.channel()
            await ch.declare_queue(TOPO.consumer_queue("x"), durable=True)
        with refused(f"exchange '{TOPO.sessions_exchange}'"):
            await confirmed_publish(conn, TOPO.sessions_exchange, "session.new.node-1")


@pytest.mark.broker
async def test_policies_apply_to_the_declared_queues(imported: Imported) -> None:
    node = imported.users["node-1"]
    async with connected(imported, "node-1") as conn:
        channel = await conn.channel()
        await declare_core(channel, TOPO)
        await declare_replica_queue(channel, TOPO, node)
    async with connected(imported, "sessionbus-worker") as conn:
        channel = await conn.channel()
        await channel.declare_queue(TOPO.consumer_queue("audit"), durable=True)
    out = (await asyncio.to_thread(
        _ctl, "list_queues", "-p", imported.vhost, "name", "policy", "--no-table-headers"
    )).stdout
    policy = dict(line.split("\t") for line in out.strip().splitlines())
    assert policy[TOPO.replica_queue(node)] == "sessionbus-replica"
    assert policy[TOPO.dead_queue] == "sessionbus-dead"
    assert policy[TOPO.session_stream] == "sessionbus-session-stream"
    assert policy[TOPO.key_stream] == "sessionbus-key-stream"
    assert policy[TOPO.consumer_queue("audit")] == "sessionbus-consumer"
