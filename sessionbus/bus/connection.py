"""Connecting to RabbitMQ: one robust connection per process, amqp or amqps, jittered backoff."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.robust_connection import RobustConnection
from yarl import URL

log = logging.getLogger(__name__)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    url: str = DEFAULT_URL
    ca_file: str | None = None  # amqps: CA bundle to verify the broker (system CAs if None)
    cert_file: str | None = None  # amqps: client certificate (for EXTERNAL/mTLS)
    key_file: str | None = None
    verify: bool = True  # only a test against a throwaway broker may turn this off
    heartbeat: int = 15
    name: str = "sessionbus"
    backoff_min: float = 0.2
    backoff_max: float = 10.0

    def redacted_url(self) -> str:
        """The URL without its password, for logs and errors."""
        u = URL(self.url)
        return str(u.with_password("***")) if u.password else str(u)


def tls_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    if URL(settings.url).scheme != "amqps":
        return None
    ctx = ssl.create_default_context(cafile=settings.ca_file)
    if not settings.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.cert_file:
        ctx.load_cert_chain(settings.cert_file, settings.key_file)
    return ctx


class JitteredConnection(RobustConnection):
    """A robust connection whose reconnect delay grows with the outage and is jittered.

    aio-pika sleeps ``reconnect_interval`` between attempts; reading it here yields a fresh
    delay each time: twice the outage so far, bounded, times a random factor in [0.5, 1.5), so a
    farm of nodes does not reconnect in lock-step after a broker restart.
    """

    backoff_min = 0.2
    backoff_max = 10.0
    _down_since: float | None = None

    @property
    def reconnect_interval(self) -> float:
        down = 0.0 if self._down_since is None else time.monotonic() - self._down_since
        base = min(self.backoff_max, max(self.backoff_min, down))
        return base * random.uniform(0.5, 1.5)

    @reconnect_interval.setter
    def reconnect_interval(self, value: Any) -> None:  # set by RobustConnection.__init__
        pass

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        await super()._on_connection_close(closing)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self._down_since = None


async def connect(
    settings: BrokerSettings,
    *,
    wait: bool = True,
    on_state: Callable[[bool], None] | None = None,
) -> AbstractRobustConnection:
    """Open the process's robust connection.

    ``wait=False`` returns at once even if the broker is down (a node keeps serving and connects
    when it can); ``on_state`` is told True/False as the connection comes and goes.
    """
    conn = JitteredConnection(
        URL(settings.url).update_query(heartbeat=settings.heartbeat, name=settings.name),
        ssl_context=tls_context(settings),
        fail_fast="1" if wait else "0",
    )
    conn.backoff_min, conn.backoff_max = settings.backoff_min, settings.backoff_max
    if on_state is not None:
        conn.close_callbacks.add(lambda *_: on_state(False))
        conn.reconnect_callbacks.add(lambda *_: on_state(True))
    if wait:
        try:
            await conn.connect(timeout=10)
        except Exception as exc:
            raise ConnectionError(
                f"cannot connect to {settings.redacted_url()}: {type(exc).__name__}"
            ) from None
        if on_state is not None:
            on_state(True)
        return conn

    async def _background() -> None:
        await conn.connect()
        if on_state is not None:
            on_state(True)

    task = asyncio.get_running_loop().create_task(_background())
    conn.__dict__["_sb_connect_task"] = task  # keep a reference so the task is not collected
    return conn


# What the broker or the network can raise (aio-pika's own list, which includes the
# RuntimeError a channel raises while its connection is gone, plus timeouts): these are retried.
# Anything else is a bug, and propagates to the task's supervisor.
BROKER_ERRORS: tuple[type[Exception], ...] = (
    *aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError,
)


async def retry(op: Callable[[], Awaitable[object]], what: str) -> None:
    """Run ``op`` until it succeeds, backing off from 0.2 s to 5 s: set-up on the bus (declares,
    subscriptions) that must outlast a broker restart or a key stream not created yet.  Only
    broker and network errors (``BROKER_ERRORS``) are retried."""
    delay = 0.2
    while True:
        try:
            await op()
            return
        except BROKER_ERRORS as exc:
            log.warning("%s failed (%s); retrying in %.1f s", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


__all__ = [
    "BROKER_ERRORS", "DEFAULT_URL", "BrokerSettings", "JitteredConnection", "aio_pika", "connect",
    "retry",
]
