"""Connecting to RabbitMQ: one robust connection per process over one or several broker URLs.

A cluster is given as several URLs (``amqps://a/,amqps://b/``).  A process connects to one of them
(the list is shuffled per process, so a farm spreads over the cluster), and when it loses it, or
cannot reach it, tries the next at once; only after every URL failed in a row does it back off,
with jitter, to at most ``backoff_max`` (1 s by default, so a broker node that returns is used
again within about a second).  aio-pika has no multi-host support: ``FailoverConnection`` is its
robust connection (channels and consumers are restored as before) whose every connection attempt
goes to the next URL.

Failures are said in sessionbus's words (``describe_error``): authentication refused, vhost
missing or not permitted, TLS verification failed, connection refused, timeout; one line naming
the URL (password redacted), the user and the vhost.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractConnection
from aio_pika.robust_connection import RobustConnection
from yarl import URL

log = logging.getLogger(__name__)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
SCHEMES = ("amqp://", "amqps://")
ERROR_REPEAT = 60.0  # a node repeats a broker error at most once a minute while it lasts
_FAILOVER_PAUSE = 0.05  # between two URLs of one round: next broker node at once


class BrokerUrlError(ValueError):
    """A --amqp-url value that cannot be used (the message is redacted)."""


class BrokerError(ConnectionError):
    """The broker refused or could not be reached; ``str()`` is the one line to show."""

    def __init__(self, line: str, kind: str) -> None:
        super().__init__(line)
        self.kind = kind


_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)?([^@/]*?):([^@/]*)@")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``; works on text that is not a valid URL."""
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}{m.group(2)}:***@", url.strip())


def split_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """The broker URLs in ``value`` (a comma list, or several of them), each validated.

    Raises ``BrokerUrlError`` with one redacted line. A comma inside a password must be written
    ``%2C``."""
    parts = [value] if isinstance(value, str) else list(value)
    items = [u.strip() for p in parts for u in p.split(",")]
    if not any(items):
        raise BrokerUrlError("no broker URL given")
    urls: list[str] = []
    for i, item in enumerate(items, 1):
        where = f"URL {i} of {len(items)}" if len(items) > 1 else "the URL"
        if not item:
            raise BrokerUrlError(f"{where} is empty (a stray comma?)")
        if not item.startswith(SCHEMES):
            hint = (" (give every broker node its own full URL: "
                    "amqps://user:***@host1:5671/,amqps://user:***@host2:5671/)"
                    if len(items) > 1 else "")
            raise BrokerUrlError(
                f"{where} ({redact(item)}) must start with amqp:// or amqps://{hint}"
            )
        try:
            u = URL(item)
            port = u.port
        except ValueError as exc:
            raise BrokerUrlError(f"{where} ({redact(item)}) is not a URL: {exc}") from None
        if not u.host:
            raise BrokerUrlError(f"{where} ({redact(item)}) names no host")
        if port is not None and not 0 < port < 65536:
            raise BrokerUrlError(f"{where} ({redact(item)}) has a bad port")
        if u.raw_path.count("/") > 1:
            raise BrokerUrlError(
                f"{where} ({redact(item)}): the vhost is one path segment (write '/' as %2F)"
            )
        urls.append(item)
    if len({u.split("://")[0] for u in urls}) > 1:
        raise BrokerUrlError("mixing amqp:// and amqps:// URLs: use one scheme for all")
    return tuple(urls)


def _vhost(u: URL) -> str:
    path = u.path[1:] if u.path.startswith("/") else u.path
    return path or "/"


def _where(url: str) -> str:
    u = URL(url)
    return f"{redact(url)} (user {u.user or 'guest'}, vhost {_vhost(u)})"


def host_of(url: str) -> str:
    """``host:port`` of a broker URL: what metrics and logs may name (never credentials)."""
    u = URL(url)
    default = 5671 if u.scheme == "amqps" else 5672
    return f"{u.host}:{u.port or default}"


def classify(exc: BaseException) -> tuple[str, str]:
    """(kind, what it means) of a failed connection attempt."""
    text = str(exc)
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError) or "ACCESS_REFUSED" in text:
        return "auth", "authentication refused: check the user and password"
    if "Connection.OpenOk" in text or "NOT_ALLOWED" in text or "vhost" in text.lower():
        return "vhost", "vhost missing or not permitted for this user"
    cause: BaseException | None = exc
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen and len(seen) < 8:  # chains can cycle
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
            cause
        ):
            return "tls", "TLS verification failed: check --amqp-ca and the broker's host name"
        if isinstance(cause, ssl.SSLError) or "[SSL" in str(cause):
            return "tls", "TLS handshake failed: is this port amqps, and the scheme amqps://?"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout", "timed out: no answer from the broker"
    errno_ = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if isinstance(exc, ConnectionRefusedError) or errno_ == errno.ECONNREFUSED:
        return "refused", "connection refused: no broker listening there"
    if isinstance(exc, aiormq.exceptions.IncompatibleProtocolError):
        return "protocol", "not an AMQP broker there (or it closed the connection at once)"
    return "other", f"cannot connect ({type(exc).__name__})"


def describe_error(exc: BaseException, url: str) -> BrokerError:
    kind, what = classify(exc)
    return BrokerError(f"broker {_where(url)}: {what}", kind)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    url: str = DEFAULT_URL  # one URL or a comma list: the nodes of one cluster
    ca_file: str | None = None  # amqps: CA bundle to verify the broker (system CAs if None)
    cert_file: str | None = None  # amqps: client certificate (for EXTERNAL/mTLS)
    key_file: str | None = None
    verify: bool = True  # only a test against a throwaway broker may turn this off
    heartbeat: int = 15
    name: str = "sessionbus"
    backoff_min: float = 0.2
    backoff_max: float = 1.0  # a returning broker is used again within about this long
    connect_timeout: float = 5.0  # per attempt: TCP, TLS and the AMQP handshake
    shuffle: bool = True  # spread a farm's processes over the cluster's nodes

    @property
    def urls(self) -> tuple[str, ...]:
        return split_urls(self.url)

    def redacted_url(self) -> str:
        """The URL(s) without password, for logs and errors."""
        return ",".join(redact(u) for u in self.url.split(","))


def tls_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    if not settings.url.strip().startswith("amqps://"):
        return None
    ctx = ssl.create_default_context(cafile=settings.ca_file)
    if not settings.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.cert_file:
        ctx.load_cert_chain(settings.cert_file, settings.key_file)
    return ctx


class ErrorLog:
    """Logs a broker error line once, then at most once a minute while it lasts."""

    def __init__(self, logger: logging.Logger = log, repeat: float = ERROR_REPEAT) -> None:
        self._log = logger
        self._repeat = repeat
        self._last: dict[str, float] = {}

    def failed(self, error: BrokerError) -> None:
        now = time.monotonic()
        line = str(error)
        last = self._last.get(line)
        if last is None or now - last >= self._repeat:
            self._last[line] = now
            self._log.warning("%s%s", line, " (still)" if last is not None else "")

    def recovered(self, host: str) -> None:
        if self._last:
            self._log.info("broker %s reachable again: connected", host)
        self._last.clear()


class FailoverConnection(RobustConnection):
    """aio-pika's robust connection, each attempt to the next of several URLs.

    Within a round of URLs, the next one is tried at once; once all failed in a row, the delay
    grows with the outage (bounded by ``backoff_max``) times a random factor in [0.5, 1), so a farm
    does not reconnect in lock-step after a broker restart.
    """

    backoff_min = 0.2
    backoff_max = 1.0
    _down_since: float | None = None

    def __init__(self, url: URL, *, urls: Sequence[str] = (), query: dict[str, Any] | None = None,
                 on_error: Callable[[BrokerError], None] | None = None, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._urls = tuple(urls) or (str(url),)
        self._query = query or {}
        self._next = 0
        self._failed_in_row = 0
        self.attempts = 0  # connection attempts made (tests and wait-for-first-round)
        self.current_url = self._urls[0]
        self.last_error: BrokerError | None = None
        self._on_error = on_error

    @property
    def failures_in_row(self) -> int:
        return self._failed_in_row

    @property
    def current_host(self) -> str:
        return host_of(self.current_url)

    @property
    def reconnect_interval(self) -> float:
        if self._failed_in_row % len(self._urls) and len(self._urls) > 1:
            return _FAILOVER_PAUSE  # another node of this round is still untried
        down = 0.0 if self._down_since is None else time.monotonic() - self._down_since
        base = min(self.backoff_max, max(self.backoff_min, down))
        return base * random.uniform(0.5, 1.0)

    @reconnect_interval.setter
    def reconnect_interval(self, value: Any) -> None:  # set by RobustConnection.__init__
        pass

    async def _RobustConnection__connect_transport(self) -> None:
        # RobustConnection's factory calls this (name-mangled) for every attempt; it reads
        # self.url, so pointing self.url at the next URL here makes each attempt fail over.
        # tests/test_connection.py asserts the rotation, so an aio-pika change that bypasses
        # this hook fails a test instead of silently pinning one host.
        url = self._urls[self._next % len(self._urls)]
        self._next += 1
        self.current_url = url
        self.url = URL(url).update_query(self._query)
        self.attempts += 1
        parent = super()._RobustConnection__connect_transport  # type: ignore[misc]
        try:
            await parent()
        except BaseException as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
            self._failed_in_row += 1
            if not isinstance(exc, asyncio.CancelledError) or not self._close_called:
                self.last_error = describe_error(exc, url)
                if self._on_error is not None:
                    self._on_error(self.last_error)
            raise

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        await super()._on_connection_close(closing)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self._down_since = None
        self._failed_in_row = 0
        self.last_error = None


# Kept for callers and tests that name the single-URL class.
JitteredConnection = FailoverConnection


def _ordered(settings: BrokerSettings) -> list[str]:
    urls = list(settings.urls)
    if settings.shuffle:
        random.shuffle(urls)
    return urls


async def connect(
    settings: BrokerSettings,
    *,
    wait: bool = True,
    on_state: Callable[[bool, str], None] | None = None,
    errors: ErrorLog | None = None,
) -> FailoverConnection:
    """Open the process's robust connection.

    ``wait=True`` (one-shot roles) tries every URL once and raises ``BrokerError`` (the last
    failure, in sessionbus's words) if none answers. ``wait=False`` returns at once even if the
    broker is down (a node keeps serving and connects when it can); failures go to ``errors``
    (an ``ErrorLog`` by default: once, then at most once a minute). ``on_state`` is told
    ``(connected, "host:port")`` as the connection comes and goes.
    """
    urls = _ordered(settings)
    error_log = errors if errors is not None else (ErrorLog() if not wait else None)
    conn = FailoverConnection(
        URL(urls[0]), urls=urls,
        query={"heartbeat": settings.heartbeat, "name": settings.name},
        on_error=error_log.failed if error_log is not None else None,
        ssl_context=tls_context(settings), fail_fast="0",
    )
    conn.backoff_min, conn.backoff_max = settings.backoff_min, settings.backoff_max

    def up(*_: Any) -> None:
        if error_log is not None:
            error_log.recovered(conn.current_host)
        if on_state is not None:
            on_state(True, conn.current_host)

    if on_state is not None:
        conn.close_callbacks.add(lambda *_: on_state(False, conn.current_host))
    conn.reconnect_callbacks.add(up)
    task = asyncio.get_running_loop().create_task(conn.connect(timeout=settings.connect_timeout))
    conn.__dict__["_sb_connect_task"] = task  # keep a reference so the task is not collected
    if not wait:
        task.add_done_callback(lambda t: None if t.cancelled() or t.exception() else up())
        return conn
    # One round: connected, or every URL failed once.
    while not task.done() and conn.failures_in_row < len(urls):
        await asyncio.sleep(0.01)
    if conn.connected.is_set() or (task.done() and not task.exception()):
        await task
        up()
        return conn
    error = conn.last_error or BrokerError(
        f"broker {settings.redacted_url()}: cannot connect", "other")
    await conn.close()
    raise error


async def connect_once(settings: BrokerSettings, name: str, heartbeat: int) -> AbstractConnection:
    """A plain (non-robust) connection to the first URL that answers, for a connection whose
    loss must be seen rather than repaired (the key publisher's lock)."""
    error: BrokerError | None = None
    for url in _ordered(settings):
        try:
            return await aio_pika.connect(
                URL(url).update_query(heartbeat=heartbeat, name=name),
                ssl_context=tls_context(settings), timeout=settings.connect_timeout,
            )
        except Exception as exc:
            error = describe_error(exc, url)
    assert error is not None
    raise error


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


class _LibraryNoise(logging.Filter):
    """aiormq/aio_pika records, at most debug: sessionbus says a broker failure once, in its
    own words (ErrorLog), where the libraries log every attempt at warning or error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.partition(".")[0] not in ("aiormq", "aio_pika"):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def quiet_library_logs(debug: bool) -> None:
    """Keep aiormq/aio_pika below warning: dropped, or shown as debug at ``--log-level debug``."""
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL + 1)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _LibraryNoise) for f in handler.filters):
            handler.addFilter(_LibraryNoise())


__all__ = [
    "BROKER_ERRORS", "DEFAULT_URL", "BrokerError", "BrokerSettings", "BrokerUrlError", "ErrorLog",
    "FailoverConnection", "JitteredConnection", "aio_pika", "connect", "connect_once",
    "describe_error", "host_of", "quiet_library_logs", "redact", "retry", "split_urls",
]
