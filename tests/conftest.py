"""Shared fixtures: bus keys, session DER, a throwaway TLS certificate, and the broker.

Broker fixtures (``amqp_url``, ``connection``, ``topology``, ``declared_queues``) need the real
RabbitMQ at ``SESSIONBUS_TEST_AMQP_URL`` (default amqp://guest:guest@127.0.0.1:5672/); a test that
uses them is marked ``broker`` automatically (``-m "not broker"`` leaves it out), and should say so
itself with ``pytest.mark.broker`` too.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from types import FrameType

import pytest
from aio_pika.abc import AbstractRobustConnection

from sessionbus.bus.connection import BrokerSettings, connect
from sessionbus.bus.topology import Topology, declare_admin, delete_all
from sessionbus.schemas.sealing import BusKeys
from tests.helpers_der import make_session_der
from tests.helpers_keys import farm_keys

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# The session id context the session_der factory uses unless told otherwise.
TEST_SID_CTX = b"sessionbus-test"

SessionDerFactory = Callable[..., bytes]

_BROKER_FIXTURES = frozenset({"amqp_url", "connection", "topology", "declared_queues"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


# --- a deadline per test ----------------------------------------------------------------------
# A test stuck on a broker that stopped answering must fail, not hold CI until its job limit.
# At the deadline SIGALRM raises in the test (its fixtures still tear down and stop what they
# started); if it is still stuck GRACE seconds later, every thread's stack is printed and the run
# exits, so the log says where it hung.

DEFAULT_DEADLINE = 240.0  # seconds for setup + call + teardown, unless marked deadline(s)
GRACE = 60.0


class TestDeadline(BaseException):
    """Raised in a test that ran past its deadline (BaseException: no ``except Exception``
    in the code under test swallows it)."""


def _deadline_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("deadline")
    return float(marker.args[0]) if marker is not None else DEFAULT_DEADLINE


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    seconds = _deadline_of(item)

    def expired(_signum: int, _frame: FrameType | None) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise TestDeadline(f"{item.nodeid} ran past its deadline of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + GRACE, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- bus keys ---------------------------------------------------------------------------------


@pytest.fixture
def bus_keys() -> BusKeys:
    """The bus keys of "this farm": one fresh key (and a ring signing key)."""
    return farm_keys()


@pytest.fixture
def other_bus_keys() -> BusKeys:
    """Keys of another farm (or an attacker): one fresh key that ``bus_keys`` does not hold."""
    return farm_keys()


# --- sessions ---------------------------------------------------------------------------------


@pytest.fixture
def session_der() -> SessionDerFactory:
    """Factory of SSL_SESSION DER bytes (see ``tests/helpers_der.py``).

    ``session_der(session_id=None, sid_ctx=TEST_SID_CTX, time=None, timeout=300)``: a random
    32-byte id unless given, ``time`` defaults to now. Parse the id back with
    ``sessionbus.schemas.session_der.parse_session`` when you let it pick one.
    """

    def make(
        session_id: bytes | None = None,
        sid_ctx: bytes = TEST_SID_CTX,
        time: int | None = None,
        timeout: int = 300,
    ) -> bytes:
        return make_session_der(
            os.urandom(32) if session_id is None else session_id,
            sid_ctx,
            _now() if time is None else time,
            timeout,
        )

    return make


def _now() -> int:
    return int(time.time())


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed P-256 certificate for CN=localhost: (cert_path, key_path)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    directory = tmp_path_factory.mktemp("tls-cert")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out",
         str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


# --- broker -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return os.environ.get("SESSIONBUS_TEST_AMQP_URL", DEFAULT_AMQP_URL)


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractRobustConnection]:
    """A robust connection (``sessionbus.bus.connection.connect``), closed at teardown."""
    conn = await connect(BrokerSettings(url=amqp_url, name="sessionbus-tests"))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def declared_queues() -> list[str]:
    """Append the name of every extra queue a test declares: ``topology`` deletes them."""
    return []


@pytest.fixture
async def topology(
    connection: AbstractRobustConnection, declared_queues: list[str]
) -> AsyncIterator[Topology]:
    """A Topology of its own (unique prefix), provisioned. Teardown deletes what it made and
    every queue in ``declared_queues``, on a fresh channel (the test's may be closed)."""
    topo = Topology(prefix=f"sbtest-{uuid.uuid4().hex[:10]}")
    try:
        channel = await connection.channel()
        await declare_admin(channel, topo)  # the admin step: roles only look it up
        await channel.close()
        yield topo
    finally:
        channel = await connection.channel()
        try:
            await delete_all(channel, topo, declared_queues)
        finally:
            await channel.close()
