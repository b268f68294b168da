"""sessionbus.Farm in-process: attach's checks, from_env's settings, metrics on a caller's registry,
and real loopback resumption through an attached asyncio server (no broker: a lone member)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import sessionbus
from sessionbus.farm import Farm, FarmSettings, TicketMode
from sessionbus.producer import openssl
from sessionbus.schemas.sealing import BusKeys, new_key, write_new_key_file
from tests.farm_support import REPO, client_context, handshake, make_cert

pytestmark = pytest.mark.tls


@pytest.fixture(autouse=True)
def _binding_loaded() -> None:
    # load it unpatched first: a load that failed under a test's monkeypatch would stay failed
    assert openssl.binding_available() is None


def lone_farm(tickets: TicketMode = TicketMode.STATEFUL, **kw: object) -> Farm:
    settings = FarmSettings(node_id="api-test", tickets=tickets, replication=False)
    kw.setdefault("registry", CollectorRegistry())  # the global one takes one Farm per process
    return Farm(settings, bus_keys=BusKeys([new_key()]), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("farm-api"))


def server_ctx(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    return ctx


# --- attach refuses what it cannot use, at once and with one exception -------------------------


def test_attach_refuses_a_client_context() -> None:
    with pytest.raises(sessionbus.AttachError, match="server context"):
        lone_farm().attach(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))


def test_attach_refuses_what_is_not_a_context() -> None:
    with pytest.raises(sessionbus.AttachError, match=r"ssl\.SSLContext"):
        lone_farm().attach(object())  # type: ignore[arg-type]


def test_attach_refuses_another_openssl(monkeypatch: pytest.MonkeyPatch) -> None:
    # what a process whose ssl module links another libssl than the one mapped looks like
    monkeypatch.setattr(ssl, "OPENSSL_VERSION_NUMBER", ssl.OPENSSL_VERSION_NUMBER + 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(sessionbus.AttachError, match="version mismatch"):
        lone_farm().attach(ctx)


@pytest.mark.skipif(sys.maxsize < 2**32 or hasattr(sys, "gettotalrefcount"),
                    reason="the offsets are for 64-bit release builds")
@pytest.mark.parametrize("offset", [0, 8, 24])
def test_attach_refuses_a_layout_the_pointer_checks_reject(
    monkeypatch: pytest.MonkeyPatch, offset: int, cert: tuple[Path, Path]
) -> None:
    monkeypatch.setattr(openssl, "_SSL_CTX_OFFSET", offset)
    ctx = server_ctx(cert)
    before = ctx.options
    with pytest.raises(sessionbus.AttachError, match="layout not recognised"):
        lone_farm().attach(ctx)
    assert ctx.options == before  # nothing on the context changed (no OP_NO_TICKET either)


def test_attach_is_a_binding_error_too() -> None:
    # `sessionbus node` and existing callers catch BindingError: AttachError is one
    assert issubclass(sessionbus.AttachError, openssl.BindingError)


@pytest.mark.parametrize(("mode", "no_ticket", "tickets"), [
    (TicketMode.STATEFUL, True, 2), (TicketMode.STATELESS, False, 2), (TicketMode.OFF, True, 0),
])
def test_attach_sets_the_ticket_mode(
    cert: tuple[Path, Path], mode: TicketMode, no_ticket: bool, tickets: int
) -> None:
    ctx = server_ctx(cert)
    if mode is TicketMode.STATELESS:
        ctx.options |= ssl.OP_NO_TICKET  # attach clears it: stateless needs tickets
    assert lone_farm(mode).attach(ctx) is ctx
    assert bool(ctx.options & ssl.OP_NO_TICKET) is no_ticket
    assert ctx.num_tickets == tickets


# --- settings ---------------------------------------------------------------------------------


def test_from_env_needs_a_node_id_and_a_bus_key(tmp_path: Path) -> None:
    with pytest.raises(sessionbus.FarmError, match="node id"):
        Farm.from_env(environ={})
    with pytest.raises(sessionbus.FarmError, match="bus key"):
        Farm.from_env(node_id="a", environ={})
    with pytest.raises(sessionbus.FarmError):
        Farm.from_env(node_id="a", environ={"SESSIONBUS_BUS_KEY_FILE": str(tmp_path / "none")})


def test_from_env_reads_what_the_commands_read(tmp_path: Path) -> None:
    key = tmp_path / "bus.key"
    write_new_key_file(key)
    env = {"SESSIONBUS_BUS_KEY_FILE": str(key), "SESSIONBUS_NODE_ID": "web-1",
           "SESSIONBUS_TICKETS": "stateless", "SESSIONBUS_SERVICE": "shop",
           "SESSIONBUS_SESSION_TIMEOUT": "600"}
    farm = Farm.from_env(environ=env, registry=CollectorRegistry())
    assert (farm.node_id, farm.settings.tickets, farm.settings.sid_ctx,
            farm.settings.session_timeout) == ("web-1", TicketMode.STATELESS, b"shop", 600)
    lingering = Farm.from_env(environ={**env, "SESSIONBUS_LINGER": "0.05"},
                              registry=CollectorRegistry())
    assert lingering.settings.outbox.min_interval == 0.05
    for bad in ({"SESSIONBUS_TICKETS": "maybe"}, {"SESSIONBUS_AMQP_URL": "http://x"},
                {"SESSIONBUS_SESSION_TIMEOUT": "soon"}, {"SESSIONBUS_NODE_ID": "Web_1"},
                {"SESSIONBUS_SERVICE": "s" * 33}, {"SESSIONBUS_LINGER": "2"},
                {"SESSIONBUS_LINGER": "soon"},
                {"SESSIONBUS_AMQP_URL": "amqp://u:sekrit@192.0.2.1/"},  # plaintext, not loopback
                {"SESSIONBUS_AMQP_URL": "amqps://u:sekrit@192.0.2.1/",
                 "SESSIONBUS_ANY_ORIGIN_USERS": "guest"}):  # the test allowance off loopback
        with pytest.raises(sessionbus.FarmError) as caught:
            Farm.from_env(environ={**env, **bad}, registry=CollectorRegistry())
        assert "\n" not in str(caught.value) and "sekrit" not in str(caught.value)


def test_a_second_farm_on_one_registry_is_one_clear_error() -> None:
    registry = CollectorRegistry()
    lone_farm(registry=registry)
    with pytest.raises(sessionbus.FarmError, match="one Farm per registry"):
        lone_farm(registry=registry)


def test_import_sessionbus_stays_light() -> None:
    # .ci/binding-matrix imports the binding in venvs that have only cffi
    code = ("import sys, sessionbus, sessionbus.producer.openssl; "
            "print(sorted(m for m in ('aio_pika', 'prometheus_client', 'sessionbus.farm') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=30, check=True)
    assert out.stdout.strip() == "[]"


# --- an attached asyncio server, for real -------------------------------------------------------


async def _handshakes(ctx: ssl.SSLContext, farm: Farm, version: str) -> list[bool]:
    """Serve on ``ctx`` from this loop; a blocking client (in a thread) connects three times
    offering the first session."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        farm.handshake_done(writer.get_extra_info("ssl_object"))
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    client = client_context(version)
    async with farm, server:
        first = await asyncio.to_thread(handshake, port, client)
        assert first.body.endswith(b"ok")
        again = [await asyncio.to_thread(handshake, port, client, first.session)
                 for _ in range(2)]
    return [first.reused, *(h.reused for h in again)]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_attached_streams_server_resumes_from_the_replica(
    cert: tuple[Path, Path], version: str
) -> None:
    registry = CollectorRegistry()
    farm = lone_farm(registry=registry)
    ctx = farm.attach(server_ctx(cert))
    assert await _handshakes(ctx, farm, version) == [False, True, True]
    assert len(farm.replica) >= 1
    text = generate_latest(registry).decode()
    # the farm's families on the caller's registry, with values
    hits = [line for line in text.splitlines()
            if line.startswith('sessionbus_lookups_total{result="hit"}')]
    assert hits and float(hits[0].split()[-1]) >= 2
    resumed = [line for line in text.splitlines()
               if line.startswith('sessionbus_handshakes_total{kind="resumed"}')]
    assert resumed and float(resumed[0].split()[-1]) >= 2
    assert "sessionbus_replica_sessions" in text


def test_sessionbus_loop_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop

    from sessionbus.cli.config import ConfigError
    from sessionbus.cli.runtime import loop_factory

    monkeypatch.setenv("SESSIONBUS_LOOP", "uvloop")
    assert loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("SESSIONBUS_LOOP", "asyncio")
    assert loop_factory() is None
    monkeypatch.setenv("SESSIONBUS_LOOP", "trio")
    with pytest.raises(ConfigError, match="asyncio or uvloop"):
        loop_factory()


async def test_lifespan_and_cleanup_ctx_run_the_farm_around_the_app() -> None:
    farm = lone_farm()
    async with farm.lifespan(object()):  # Starlette/FastAPI
        assert farm._started
    assert not farm._started
    gen = farm.cleanup_ctx(object())  # aiohttp: up to the yield at start-up, the rest at cleanup
    await gen.__anext__()
    assert farm._started
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    assert not farm._started
