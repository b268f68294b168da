"""Running a role until SIGTERM/SIGINT: the first signal drains, a second one exits at once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130


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
                os._exit(EXIT_INTERRUPTED)
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
