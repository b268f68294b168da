"""amqps:// to the broker through a TLS endpoint on loopback, certificate verification on."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sessionbus.bus.connection import BrokerSettings, connect

pytestmark = pytest.mark.broker


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost signed by it, and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    p = {n: d / n for n in ("ca.pem", "ca.key", "srv.pem", "srv.key", "srv.csr",
                            "other.pem", "other.key", "ext.cnf")}
    for ca in ("ca", "other"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-days", "2", "-subj", f"/CN=test {ca}", "-keyout",
                 str(d / f"{ca}.key"), "-out", str(d / f"{ca}.pem"))
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", "/CN=localhost", "-keyout", str(p["srv.key"]), "-out", str(p["srv.csr"]))
    p["ext.cnf"].write_text("subjectAltName=DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(p["srv.csr"]), "-CA", str(p["ca.pem"]), "-CAkey",
             str(p["ca.key"]), "-CAcreateserial", "-days", "2", "-extfile", str(p["ext.cnf"]),
             "-out", str(p["srv.pem"]))
    return p


@pytest.fixture(params=[False, True], ids=["server-auth", "mutual-tls"])
async def tls_endpoint(
    pki: dict[str, Path], request: pytest.FixtureRequest
) -> AsyncIterator[tuple[int, bool]]:
    """TLS on a loopback port, plain AMQP to the broker behind it (optionally mTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["srv.pem"], pki["srv.key"])
    if request.param:  # clients must show a certificate our CA signed (the server's will do)
        ctx.load_verify_locations(pki["ca.pem"])
        ctx.verify_mode = ssl.CERT_REQUIRED
    conns: set[asyncio.Task[None]] = set()

    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conns.add(task)
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", 5672)
            await asyncio.gather(pump(r, uw), pump(ur, w))
        finally:
            conns.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1], request.param
    finally:
        server.close()
        for t in list(conns):
            t.cancel()


async def test_amqps_with_the_right_ca_connects(
    tls_endpoint: tuple[int, bool], pki: dict[str, Path],
) -> None:
    port, mutual = tls_endpoint
    s = BrokerSettings(url=f"amqps://guest:guest@localhost:{port}/", ca_file=str(pki["ca.pem"]),
                       cert_file=str(pki["srv.pem"]) if mutual else None,
                       key_file=str(pki["srv.key"]) if mutual else None)
    conn = await connect(s)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(exclusive=True)
        assert q.name
    finally:
        await conn.close()


async def test_amqps_verifies_the_broker_certificate(
    tls_endpoint: tuple[int, bool], pki: dict[str, Path],
) -> None:
    s = BrokerSettings(url=f"amqps://guest:secret-password@localhost:{tls_endpoint[0]}/",
                       ca_file=str(pki["other.pem"]))
    with pytest.raises(ConnectionError) as info:
        await connect(s)
    assert "secret-password" not in str(info.value)  # the error names the broker, not secrets
    assert "***" in str(info.value)
    # in sessionbus's words, one line naming the URL, user and vhost
    line = str(info.value)
    assert "TLS verification failed" in line and "user guest, vhost /" in line, line


@pytest.mark.parametrize("tls_endpoint", [True], indirect=True, ids=["mutual-tls"])
async def test_mutual_tls_without_a_client_certificate_fails(
    tls_endpoint: tuple[int, bool], pki: dict[str, Path],
) -> None:
    port, mutual = tls_endpoint
    assert mutual  # the endpoint asks for a client certificate
    s = BrokerSettings(url=f"amqps://guest:guest@localhost:{port}/", ca_file=str(pki["ca.pem"]))
    with pytest.raises(ConnectionError):
        await connect(s)
