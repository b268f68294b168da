"""What every role's command shares: listeners bound first, the broker connection, the run loop.

Start-up is fail-fast and said in one line: a listening address that cannot be bound is a
``ConfigError`` naming it (exit 3), a broker a one-shot role cannot reach is ``BrokerUnavailable``
(exit 4); the first SIGTERM/SIGINT drains, a second one exits at once (130).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractRobustConnection

from sessionbus.bus.connection import connect
from sessionbus.bus.topology import check_sessions
from sessionbus.cli.config import Common, ConfigError, host_port
from sessionbus.cli.exit_codes import RET_INTERRUPTED
from sessionbus.metrics import Metrics, serve_metrics

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """The broker cannot be used by a command that needs it at once: one line, exit 4."""


def _why(exc: OSError) -> str:
    # socket.create_server appends "(while attempting to bind on address ...)": we name it once
    return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__


def bind_tcp(host: str, port: int, flag: str) -> socket.socket:
    """A listening socket on HOST:PORT, or a ConfigError naming the flag and the address."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot listen on {host}:{port}: {_why(exc)}") from None


def _ready(metrics: Metrics) -> tuple[bool, str]:
    return (False, "starting") if metrics.ready is None else metrics.ready()


def start_metrics(addr: str | None, metrics: Metrics) -> None:
    """Serve ``metrics`` at http://``addr``/metrics now, or raise a ConfigError naming it.

    Every role calls this before it touches the broker, so a taken port is the first thing an
    operator hears about, in one line, not a traceback or a process that looks alive."""
    if not addr:
        return
    host, port = host_port(addr)
    try:
        serve_metrics(addr, metrics.registry, lambda: _ready(metrics))
    except OSError as exc:
        raise ConfigError(f"--metrics: cannot listen on {host}:{port}: {_why(exc)}") from None


async def connect_now(common: Common, metrics: Metrics | None = None, *,
                      declare: bool = True) -> AbstractRobustConnection:
    """The broker connection of a role that needs it at start (worker, events, keyfile):
    connected and the core topology checked, or BrokerUnavailable."""
    on_state = metrics.bus.broker_state if metrics is not None else None
    try:
        conn = await connect(common.broker, on_state=on_state)
    except ConnectionError as exc:
        raise BrokerUnavailable(str(exc)) from None
    if declare:
        # v2: a role only looks the bus up (passive, needs no permission); the admin step
        # (definitions.json, `sessionbus setup`) creates it.
        try:
            channel = await conn.channel()
            await check_sessions(channel, common.topology)
            if not channel.is_closed:
                await channel.close()
        except Exception as exc:
            await conn.close()
            raise BrokerUnavailable(
                f"{common.broker.redacted_url()}: the bus {common.topology.prefix} is not "
                f"provisioned (import ops/rabbitmq/definitions.json or run `sessionbus setup`; "
                f"{type(exc).__name__})"
            ) from None
    return conn


def run(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``main(stop)``; ``stop`` is set by the first SIGTERM/SIGINT."""

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting now")
                os._exit(RET_INTERRUPTED)
            log.info("%s: stopping (send it again to exit at once)", signal.Signals(signum).name)
            stop.set()

        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, on_signal, s)
        return await main(stop)

    with asyncio.Runner(loop_factory=loop_factory()) as runner_:
        return runner_.run(runner())


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``SESSIONBUS_LOOP=uvloop`` runs a command on uvloop (pip install 'sessionbus[uvloop]')."""
    from sessionbus.cli.config import ConfigError

    name = os.environ.get("SESSIONBUS_LOOP", "asyncio")
    if name == "asyncio":
        return None
    if name != "uvloop":
        raise ConfigError("SESSIONBUS_LOOP must be asyncio or uvloop")
    try:
        import uvloop
    except ImportError:
        raise ConfigError("SESSIONBUS_LOOP=uvloop but uvloop is not installed") from None
    return uvloop.new_event_loop
