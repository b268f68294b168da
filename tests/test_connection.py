"""Broker URLs and the connection: several URLs, failover, redaction, errors in our own words."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest
from yarl import URL

from sessionbus.bus.connection import (
    BrokerError,
    BrokerSettings,
    BrokerUrlError,
    ErrorLog,
    FailoverConnection,
    connect,
    redact,
    split_urls,
)
from tests.tcp_proxy import TcpProxy

AMQP_URL = os.environ.get("SESSIONBUS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
_BROKER = URL(AMQP_URL)


def sb(*args: str, env: dict[str, str] | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessionbus", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP and never says a word: a broker that times out."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


@pytest.fixture
def bus_key(tmp_path: Path) -> str:
    path = tmp_path / "bus.key"
    out = sb("bus-key", "new", str(path))
    assert out.returncode == 0, out.stderr
    return str(path)


# --- URLs --------------------------------------------------------------------------------------

def test_comma_list_and_repeats_give_each_url() -> None:
    assert split_urls("amqp://a:1@h1:5681/, amqp://a:1@h2:5682/") == (
        "amqp://a:1@h1:5681/", "amqp://a:1@h2:5682/")
    assert split_urls(["amqp://h1/", "amqp://h2/,amqp://h3/"]) == (
        "amqp://h1/", "amqp://h2/", "amqp://h3/")
    assert BrokerSettings(url="amqp://h1/,amqp://h2/").urls == ("amqp://h1/", "amqp://h2/")


@pytest.mark.parametrize("value", [
    "amqp://u:topsecret@h1:5681,h2:5682/",  # a host list inside one URL
    "amqp://u:pw1@h1:5681/,u:topsecret@h2:5682/",  # the second lacks its scheme
    "amqp://u:pw1@h1:5681/,amqp://u:topsecret@h2:99999/",  # the second's port
    "amqp://u:pw1@h1:5681/,amqp://u:topsecret@h2:5682/a/b",  # the second's vhost
    "amqp://u:pw1@h1/,",
    "amqp://u:pw1@h1/,amqps://u:topsecret@h2/",
])
def test_bad_lists_are_one_redacted_message(value: str) -> None:
    with pytest.raises(BrokerUrlError) as info:
        split_urls(value)
    text = str(info.value)
    assert "topsecret" not in text and "pw1" not in text and "\n" not in text


def test_redact_hides_every_password() -> None:
    assert redact("amqp://u:p@h/") == "amqp://u:***@h/"
    assert redact("u:p@h2:5682/") == "u:***@h2:5682/"
    s = BrokerSettings(url="amqp://a:one@h1/,amqp://b:two@h2/")
    assert s.redacted_url() == "amqp://a:***@h1/,amqp://b:***@h2/"


def test_cli_host_list_url_is_one_line_exit_3(bus_key: str) -> None:
    out = sb("worker", "--bus-key-file", bus_key, "--amqp-url", "amqp://u:topsecret@h1:5681,h2:5682/")
    assert out.returncode == 3, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "topsecret" not in out.stderr + out.stdout
    assert "URL 2 of 2" in out.stderr


def test_cli_second_url_password_never_printed(bus_key: str) -> None:
    out = sb("events", "--bus-key-file", bus_key, "--amqp-url", "amqp://guest:pw1@127.0.0.1:1/",
             "--amqp-url", "amqp://guest:topsecret@127.0.0.1:2/x/y")
    assert out.returncode == 3 and out.stderr.count("\n") == 1, out.stderr
    assert "topsecret" not in out.stderr and "pw1" not in out.stderr
    env_out = sb("events", "--bus-key-file", bus_key, env={
        "SESSIONBUS_AMQP_URL": "amqp://guest:pw1@127.0.0.1:1/,guest:topsecret@127.0.0.1:2/"})
    assert env_out.returncode == 3 and "topsecret" not in env_out.stderr, env_out.stderr


# --- rotation and backoff (no broker) ---------------------------------------------------------

async def test_every_attempt_goes_to_the_next_url_and_backs_off_only_after_a_round() -> None:
    ports = [_free_port() for _ in range(3)]
    urls = [f"amqp://guest:guest@127.0.0.1:{p}/" for p in ports]
    errors: list[BrokerError] = []
    conn = await connect(
        BrokerSettings(url=",".join(urls), backoff_min=0.3, backoff_max=0.3),
        wait=False, errors=ErrorLog(),
    )
    assert isinstance(conn, FailoverConnection)
    conn._on_error = errors.append
    try:
        t0 = time.monotonic()
        while len(errors) < 7 and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    hosts = [e.args[0].split()[1] for e in errors[:6]]
    # each round visits all three URLs, in the same (shuffled) order
    assert len(set(hosts[:3])) == 3 and hosts[:3] == hosts[3:6], hosts
    assert all(e.kind == "refused" for e in errors)
    # two rounds and a bit: three failovers at once, two backoffs of 0.15-0.3 s
    assert 0.25 <= time.monotonic() - t0 < 3


async def test_backoff_is_bounded_by_backoff_max() -> None:
    conn = FailoverConnection(URL("amqp://guest:guest@127.0.0.1:1/"))
    conn.backoff_min, conn.backoff_max = 0.2, 1.0
    conn._down_since = time.monotonic() - 3600
    samples = [conn.reconnect_interval for _ in range(200)]
    assert min(samples) >= 0.5 and max(samples) <= 1.0


async def test_error_log_says_a_line_once_then_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging
    lg = logging.getLogger("sessionbus.test.errorlog")
    el = ErrorLog(lg, repeat=0.2)
    err = BrokerError("broker amqp://u:***@h/ (user u, vhost /): connection refused", "refused")
    with caplog.at_level(logging.WARNING, logger=lg.name):
        for _ in range(50):
            el.failed(err)
        assert len(caplog.records) == 1
        await asyncio.sleep(0.25)
        el.failed(err)
        assert len(caplog.records) == 2 and "(still)" in caplog.records[1].message


# --- errors in our own words, against the real broker ----------------------------------------

def _url(user: str = "", password: str = "", port: int | None = None, vhost: str | None = None
         ) -> str:
    u = _BROKER
    if user:
        u = u.with_user(user)
    if password:
        u = u.with_password(password)
    if port is not None:
        u = u.with_port(port)
    if vhost is not None:
        u = u.with_path("/" + vhost)
    return str(u)


@pytest.mark.broker
@pytest.mark.parametrize(("case", "kind", "words"), [
    ("password", "auth", "authentication refused"),
    ("vhost", "vhost", "vhost missing or not permitted"),
    ("port", "refused", "connection refused"),
])
async def test_each_broker_error_has_its_own_line(case: str, kind: str, words: str) -> None:
    url = {
        "password": _url(password="not-the-password"),
        "vhost": _url(vhost=f"sbtest-missing-{os.getpid()}"),
        "port": _url(port=_free_port()),
    }[case]
    with pytest.raises(BrokerError) as info:
        await connect(BrokerSettings(url=url), wait=True)
    line = str(info.value)
    assert info.value.kind == kind and words in line, line
    assert "not-the-password" not in line and "\n" not in line
    assert "user " in line and "vhost " in line


async def test_timeout_is_its_own_line() -> None:
    with silent_listener() as port, pytest.raises(BrokerError) as info:
        await connect(BrokerSettings(url=f"amqp://guest:guest@127.0.0.1:{port}/",
                                     connect_timeout=0.5), wait=True)
    assert info.value.kind == "timeout" and "timed out" in str(info.value)


@pytest.mark.broker
@pytest.mark.parametrize(("case", "words"), [
    ("password", "authentication refused"),
    ("vhost", "vhost missing or not permitted"),
    ("port", "connection refused"),
])
def test_worker_exits_4_with_the_line(bus_key: str, case: str, words: str) -> None:
    url = {"password": _url(password="not-the-password"),
           "vhost": _url(vhost=f"sbtest-missing-{os.getpid()}"),
           "port": _url(port=_free_port())}[case]
    out = sb("worker", "--bus-key-file", bus_key, "--no-stats", "--consumer",
             "tests.consumers_for_tests:recorder", env={"SESSIONBUS_AMQP_URL": url})
    assert out.returncode == 4, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out.stderr
    assert "not-the-password" not in out.stderr and "Traceback" not in out.stderr


# --- failover with a real broker behind two proxies -------------------------------------------

@pytest.fixture
async def two_paths() -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    a = TcpProxy(_BROKER.host or "127.0.0.1", _BROKER.port or 5672)
    b = TcpProxy(_BROKER.host or "127.0.0.1", _BROKER.port or 5672)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.broker
@pytest.mark.deadline(60)
async def test_fails_over_at_once_and_returns_within_a_second(
    two_paths: tuple[TcpProxy, TcpProxy],
) -> None:
    a, b = two_paths
    by_port = {a.port: a, b.port: b}
    states: list[tuple[bool, str]] = []
    conn = await connect(BrokerSettings(url=f"{a.url()},{b.url()}"), wait=True,
                         on_state=lambda c, h: states.append((c, h)))
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(exclusive=True)  # restored on the new node
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message: object) -> None:
            await got.put(message.body)  # type: ignore[attr-defined]

        await queue.consume(on_message, no_ack=True)
        first = by_port[int(conn.current_host.rsplit(":", 1)[1])]
        other = b if first is a else a
        t0 = time.monotonic()
        await first.pause()
        while not (conn.connected.is_set() and conn.current_host.endswith(f":{other.port}")):
            assert time.monotonic() - t0 < 5, "no failover within 5 s"
            await asyncio.sleep(0.01)
        failover = time.monotonic() - t0
        assert failover < 1.0, failover
        # channel and consumer restored (told after the restore): a message to the queue
        # arrives; mandatory, so one sent before the queue is back is returned and sent again
        n_states = len(states)
        for _ in range(200):
            if any(c for c, _ in states[n_states - 1:]):
                break
            await asyncio.sleep(0.01)
        pub = await conn.channel(on_return_raises=True)
        for _ in range(100):
            with contextlib.suppress(Exception):
                await pub.default_exchange.publish(
                    aio_pika.Message(b"after failover"), queue.name, mandatory=True)
                break
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(got.get(), 5) == b"after failover"
        # both gone for 3 s, then one back: used again within about a second
        await other.pause()
        await asyncio.sleep(3.0)
        assert not conn.connected.is_set()
        await first.resume()
        t1 = time.monotonic()
        while not conn.connected.is_set():
            assert time.monotonic() - t1 < 5
            await asyncio.sleep(0.01)
        back = time.monotonic() - t1
        assert back < 1.2, back
        # told after the channels are restored, which follows `connected` by a moment
        for _ in range(200):
            if states[-1][0]:
                break
            await asyncio.sleep(0.01)
        assert states[-1] == (True, f"127.0.0.1:{first.port}")
    finally:
        await conn.close()


@pytest.mark.broker
@pytest.mark.tls
@pytest.mark.deadline(90)
@pytest.mark.parametrize(("case", "words"), [
    ("password", "authentication refused"),
    ("vhost", "vhost missing or not permitted"),
    ("port", "connection refused"),
])
def test_node_logs_the_line_once_and_serves_on(tmp_path: Path, case: str, words: str) -> None:
    from tests.farm_support import client_context, farm_files, handshake
    from tests.farm_support import start as start_proc

    url = {"password": _url(password="not-the-password"),
           "vhost": _url(vhost=f"sbtest-missing-{os.getpid()}"),
           "port": _url(port=_free_port())}[case]
    key_file, cert, key = farm_files(tmp_path)
    port = _free_port()
    node = start_proc(["node", "--node-id", "n1", "--listen", f"127.0.0.1:{port}",
                       "--cert", str(cert), "--key", str(key)],
                      env={"SESSIONBUS_AMQP_URL": url, "SESSIONBUS_BUS_KEY_FILE": str(key_file),
                           "SESSIONBUS_PREFIX": f"sbtest-unused-{os.getpid()}"})
    try:
        node.wait_for("listening on", 20)
        node.wait_for(words, 10)
        time.sleep(3.0)  # some ten more attempts fail meanwhile: none may be logged again
        first = handshake(port, client_context("1.2"))
        again = handshake(port, client_context("1.2"), first.session)
        assert b"node n1" in first.body and again.reused  # served, from its own replica
    finally:
        node.stop()
    out = node.output()
    assert sum(words in line for line in out.splitlines()) == 1, out
    assert "not-the-password" not in out and "Traceback" not in out, out
    assert "aiormq" not in out and "aio_pika" not in out, out  # library noise below warning


def test_every_url_of_a_list_is_held_to_the_plaintext_rule(bus_key: str) -> None:
    out = sb("events", "--bus-key-file", bus_key, env={
        "SESSIONBUS_AMQP_URL": "amqp://guest:pw1@127.0.0.1:1/,amqp://guest:topsecret@192.0.2.7:5672/"})
    assert out.returncode == 3 and out.stderr.count("\n") == 1, out.stderr
    assert "plaintext" in out.stderr and "192.0.2.7" in out.stderr
    assert "topsecret" not in out.stderr and "pw1" not in out.stderr
