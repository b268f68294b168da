"""``COMMAND --check``: a role's settings, files, listeners, broker and permissions, one line each.

What an operator runs before a deploy: it starts nothing and takes no message. Broker checks do
what the role itself does at start (passive declares of what must exist, its own queues declared
and bound, a consume on what it reads, cancelled at once) so a permission the role lacks fails
here, named, instead of in the role's log after the deploy. Exit 0 when every check passed, 3 if
a setting or file failed, otherwise 4 if a broker check failed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from yarl import URL

from sessionbus.bus.connection import connect
from sessionbus.bus.topology import Topology, binding_keys
from sessionbus.cli.config import Common, ConfigError, host_port
from sessionbus.cli.exit_codes import RET_BROKER, RET_CONFIG, RET_OK
from sessionbus.cli.runtime import bind_tcp
from sessionbus.consumer.api import Consumer, Source

LocalCheck = Callable[[], str]  # returns what it found, raises ConfigError on a failure


@dataclass(slots=True)
class OwnQueue:
    """A queue the role declares itself, and the bindings it makes."""

    name: str
    exclusive: bool
    exchange: str
    binding_keys: list[str]


@dataclass(slots=True)
class Needs:
    """What a role needs on the broker."""

    exchanges: list[str] = field(default_factory=list)  # must exist
    queues: list[str] = field(default_factory=list)  # must exist (queues and streams)
    read_streams: list[str] = field(default_factory=list)  # it consumes these
    own_queues: list[OwnQueue] = field(default_factory=list)


def free_address(flag: str, value: str | tuple[str, int] | None) -> LocalCheck | None:
    if value is None:
        return None
    host, port = host_port(value) if isinstance(value, str) else value

    def check() -> str:
        if port == 0:
            return f"{host}:0 (any free port)"
        bind_tcp(host, port, flag).close()
        return f"{host}:{port} is free"

    return check


class Report:
    def __init__(self) -> None:
        self.config_failed = False
        self.broker_failed = False

    def line(self, ok: bool, what: str, detail: str) -> None:
        print(f"{'ok' if ok else 'FAIL':<5} {what}: {detail}", flush=True)

    def local(self, what: str, check: LocalCheck) -> None:
        try:
            self.line(True, what, check())
        except ConfigError as exc:
            self.config_failed = True
            self.line(False, what, str(exc))

    def broker(self, what: str, ok: bool, detail: str) -> None:
        self.broker_failed |= not ok
        self.line(ok, what, detail)

    @property
    def code(self) -> int:
        return RET_CONFIG if self.config_failed else RET_BROKER if self.broker_failed else RET_OK


def _refusal(exc: BaseException) -> str:
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return f"access refused ({exc})"
    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
        return f"does not exist ({exc})"
    return f"{type(exc).__name__}: {exc}"


BrokerOp = Callable[[AbstractChannel], Awaitable[str]]


async def _on_channel(conn: AbstractRobustConnection, op: BrokerOp) -> str:
    """Run ``op`` on a fresh channel (a refusal closes the channel it happened on)."""
    channel = await conn.channel()
    try:
        return await asyncio.wait_for(op(channel), 10)
    finally:
        if not channel.is_closed:
            await channel.close()


async def _broker_checks(report: Report, common: Common, needs: Needs) -> None:
    url = URL(common.broker.url)
    who = f"as {url.user or 'guest'}, vhost {url.path[1:] or '/'}"
    try:
        conn = await connect(common.broker)
    except ConnectionError as exc:
        report.broker("broker", False, str(exc))
        return
    report.broker("broker", True, f"connected to {common.broker.redacted_url()} {who}")
    try:
        for name in needs.exchanges:
            async def exchange(ch: AbstractChannel, name: str = name) -> str:
                await ch.declare_exchange(name, passive=True)
                return "exists"
            await _run(report, conn, f"exchange {name}", exchange)
        for name in needs.queues:
            async def queue(ch: AbstractChannel, name: str = name) -> str:
                q = await ch.declare_queue(name, passive=True)
                return f"exists ({q.declaration_result.message_count} messages)"
            await _run(report, conn, f"queue {name}", queue)
        for name in needs.read_streams:
            async def read(ch: AbstractChannel, name: str = name) -> str:
                await ch.set_qos(prefetch_count=1)
                q = await ch.declare_queue(name, passive=True)
                tag = await q.consume(_ignore, arguments={"x-stream-offset": "next"})
                await q.cancel(tag)
                return "may read"
            await _run(report, conn, f"read {name}", read)
        for own in needs.own_queues:
            async def declare(ch: AbstractChannel, own: OwnQueue = own) -> str:
                q = await ch.declare_queue(own.name, exclusive=own.exclusive,
                                           durable=not own.exclusive)
                for key in own.binding_keys:
                    await q.bind(own.exchange, routing_key=key)
                if own.exclusive:
                    await q.delete(if_unused=False, if_empty=False)
                    return f"may declare and bind to {own.exchange}"
                return f"declared and bound to {own.exchange}"
            shown = own.name if not own.exclusive else own.name.rsplit(".", 1)[0] + ".<id>"
            await _run(report, conn, f"own queue {shown}", declare)
    finally:
        await conn.close()


async def _ignore(_message: object) -> None:
    return None


async def _run(report: Report, conn: AbstractRobustConnection, what: str,
               op: BrokerOp) -> None:
    try:
        report.broker(what, True, await _on_channel(conn, op))
    except Exception as exc:
        report.broker(what, False, _refusal(exc))


def run_check(role: str, common: Common, local: list[tuple[str, LocalCheck | None]],
              needs: Needs | None) -> int:
    """Print one line per check and return the exit code. ``needs`` None: no broker."""
    report = Report()
    report.line(True, "settings", f"sessionbus {role} options are valid")
    if common.bus_key_file is not None or needs is not None:
        def bus_key() -> str:
            common.keys()
            return f"{common.bus_key_file} opens"
        report.local("bus key", bus_key)
    for what, check in local:
        if check is not None:
            report.local(what, check)
    if common.metrics:
        check = free_address("--metrics", common.metrics)
        assert check is not None
        report.local("--metrics", check)
    if needs is not None:
        asyncio.run(_broker_checks(report, common, needs))
    return report.code


def check_queue_name(base: str) -> str:
    """An exclusive queue named like the role's own (``base.<id>``), for the check alone."""
    return f"{base}.{uuid.uuid4().hex[:12]}"


def core_needs(topo: Topology) -> Needs:
    """What every role that touches session events needs to exist."""
    return Needs(exchanges=[topo.sessions_exchange, topo.dlx],
                 queues=[topo.session_stream, topo.dead_queue])


def consumer_needs(topo: Topology, consumers: list[Consumer]) -> Needs:
    """A worker's (or ``events``'): each consumer's queue declared and bound, or its stream."""
    needs = core_needs(topo)
    for c in consumers:
        keys = binding_keys(c.types, c.origins)
        if c.source is Source.STREAM:
            needs.read_streams.append(topo.session_stream)
        elif c.source is Source.EXCLUSIVE:
            needs.own_queues.append(OwnQueue(check_queue_name(topo.consumer_queue(c.name)),
                                             True, topo.sessions_exchange, keys))
        else:
            needs.own_queues.append(OwnQueue(topo.consumer_queue(c.name), False,
                                             topo.sessions_exchange, keys))
    return needs
