"""Host hygiene and broker-URL safety: no core dumps, redacted URLs, no plaintext off loopback."""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4


class UnsafeSetting(ValueError):
    """A broker URL or allowance that would expose secrets or trust: one line, exit code 3."""


def disable_core_dumps() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)``: no core dump (which would hold keys and sessions), and no
    ptrace or /proc/<pid>/mem by other processes of the same user. False if it failed."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for --help, logs, errors)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<unparsable URL>"


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return True  # aio-pika's default host is localhost
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        raise UnsafeSetting("--amqp-url is not a URL") from None


def refuse_plaintext_remote(url: str, *, plaintext_ok: bool) -> None:
    """``amqp://`` (no TLS) to a host that is not loopback carries the password and every
    sealed message in clear: refused unless the operator said plaintext is intended."""
    if url.startswith("amqp://") and not plaintext_ok and not is_loopback_host(_host(url)):
        raise UnsafeSetting(
            f"--amqp-url {redact_url(url)}: plaintext amqp:// to a non-loopback host; use "
            "amqps:// or pass --amqp-plaintext if the network is trusted"
        )


def check_any_origin_users(url: str, users: Iterable[str]) -> frozenset[str]:
    """The dev/test allowance (users that may speak for any origin) holds only on a loopback
    broker: a real farm gives every sender its own broker user."""
    allowed = frozenset(u for u in users if u)
    if allowed and not is_loopback_host(_host(url)):
        raise UnsafeSetting(
            "--any-origin-user is for a single-user dev/test farm on a loopback broker; "
            f"{redact_url(url)} is not loopback: give each sender its own broker user"
        )
    return allowed
