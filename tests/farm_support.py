"""Test support: start sessionbus processes, TLS clients over loopback, cleanup of bus names."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sessionbus.bus.connection import BrokerSettings, connect
from sessionbus.bus.topology import Topology, declare_admin, delete_all
from sessionbus.cli.local_farm import self_signed
from sessionbus.schemas.sealing import write_new_key_file, write_signing_key_pair

AMQP_URL = os.environ.get("SESSIONBUS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_prefix() -> str:
    return f"sbtest-{uuid.uuid4().hex[:10]}"


def provisioned_prefix() -> str:
    """A fresh name prefix whose bus is provisioned on the shared broker, as the admin step
    would (roles only look the exchanges and streams up): ``delete_topology`` removes it."""
    prefix = unique_prefix()
    provision(prefix)
    return prefix


def provision(prefix: str, url: str | None = None) -> None:
    """``declare_admin`` for ``prefix``, on a thread of its own (callable inside a loop too)."""

    async def go() -> None:
        conn = await connect(BrokerSettings(url=url or AMQP_URL))
        try:
            ch = await conn.channel()
            await declare_admin(ch, Topology(prefix=prefix))
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result(timeout=60)


@dataclass
class Proc:
    """A sessionbus process started by a test; stopped by PID at teardown."""

    args: list[str]
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return
            if self.popen.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                raise RuntimeError(
                    f"process exited ({self.popen.returncode}) before {text!r}:\n{self.output()}"
                )
            time.sleep(0.05)
        raise TimeoutError(f"no {text!r} within {timeout}s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        return self.popen.returncode


def ring_files(key_file: str | Path) -> tuple[Path, Path]:
    """The ring signing key and public key file of a test farm's bus key (made on first use,
    next to it)."""
    sign, public = Path(f"{key_file}.ring-signing"), Path(f"{key_file}.ring-public")
    if not sign.exists():
        write_signing_key_pair(sign, public, force=True)
    return sign, public


def role_env(env: dict[str, str]) -> dict[str, str]:
    """A test role's environment completed as every test farm needs it: the ring signing key
    and public key of its bus key, and the single-user allowance (every test role is guest on
    the loopback broker)."""
    key_file = env.get("SESSIONBUS_BUS_KEY_FILE")
    out = {"SESSIONBUS_ANY_ORIGIN_USERS": "guest", **env}
    if key_file and "SESSIONBUS_RING_PUBLIC_KEY_FILE" not in env:
        sign, public = ring_files(key_file)
        out["SESSIONBUS_RING_PUBLIC_KEY_FILE"] = str(public)
        out.setdefault("SESSIONBUS_RING_SIGNING_KEY_FILE", str(sign))
    return out


def start(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
          module: str = "sessionbus") -> Proc:
    """``python -m MODULE ARGS`` (the CLI; ``tests.inject_fault`` for the supervision tests)."""
    full_env = role_env({**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    popen = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
        cwd=str(cwd or REPO),
    )
    proc = Proc(args, popen)

    def read() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            proc.lines.append(line)

    proc._reader = threading.Thread(target=read, daemon=True)
    proc._reader.start()
    return proc


class Processes:
    """Every process a test started, stopped at teardown even when the test failed."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, args: list[str], env: dict[str, str] | None = None) -> Proc:
        p = start(args, env)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def farm_files(directory: Path) -> tuple[Path, Path, Path]:
    """A fresh bus key file and a self-signed certificate: (bus key, cert, key)."""
    key_file = directory / "bus.key"
    write_new_key_file(key_file)
    return (key_file, *make_cert(directory))


@contextlib.contextmanager
def bus_env(directory: Path, *queues: str) -> Iterator[dict[str, str]]:
    """The environment of sessionbus processes on a fresh bus key (in ``directory``) and a
    unique prefix; afterwards the prefix's topology and its named queues (``<prefix>.<name>``)
    are deleted."""
    key_file = directory / "bus.key"
    write_new_key_file(key_file)
    sign, public = ring_files(key_file)
    prefix = provisioned_prefix()
    try:
        # Every role runs as guest on the loopback broker here: the explicit test allowance.
        yield {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_BUS_KEY_FILE": str(key_file),
               "SESSIONBUS_PREFIX": prefix, "SESSIONBUS_RING_PUBLIC_KEY_FILE": str(public),
               "SESSIONBUS_RING_SIGNING_KEY_FILE": str(sign),
               "SESSIONBUS_ANY_ORIGIN_USERS": "guest"}
    finally:
        delete_topology(prefix, [f"{prefix}.{q}" for q in queues])


def revoke(env: dict[str, str], session_id: bytes) -> subprocess.CompletedProcess[str]:
    """``sessionbus revoke`` of one session, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sessionbus", "revoke", "--session-id", session_id.hex()],
        env=role_env({**os.environ, **env}), capture_output=True, text=True, timeout=30,
    )


def delete_topology(prefix: str, queues: list[str]) -> None:
    async def go() -> None:
        conn = await connect(BrokerSettings(url=AMQP_URL))
        try:
            ch = await conn.channel()
            await delete_all(ch, Topology(prefix=prefix), queues)
        finally:
            await conn.close()

    asyncio.run(go())


# --- TLS client --------------------------------------------------------------------------


@dataclass
class Handshake:
    reused: bool
    session: ssl.SSLSession | None
    body: bytes
    version: str | None


@functools.cache
def client_context(version: str) -> ssl.SSLContext:
    """One client context per version (a saved session can only be offered on its context)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = v
    return ctx


def handshake(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None,
    request: bool = True, close_notify: bool = False,
) -> Handshake:
    """One connection: handshake (offering ``session``), one HTTP request, close.

    Python's client closes without close_notify unless ``close_notify``: the case that must not
    revoke the session.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        # without it a resumed TLS 1.2 handshake waits ~40 ms for the server's delayed ACK
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        body = b""
        if request:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            chunks = []
            while chunk := tls.recv(4096):
                chunks.append(chunk)
            body = b"".join(chunks)
        # TLS 1.3 tickets arrive after the handshake: reading the reply above receives them.
        result = Handshake(tls.session_reused, tls.session, body, tls.version())
        if close_notify:
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.unwrap()
        tls.close()
        return result


def s_client(port: int, version: str, sess_out: Path | None = None,
             sess_in: Path | None = None) -> str:
    """``openssl s_client`` connect; returns its output (look for "Reused")."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-tls1_3" if version == "1.3" else "-tls1_2", "-ign_eof"]
    if sess_out is not None:
        args += ["-sess_out", str(sess_out)]
    if sess_in is not None:
        args += ["-sess_in", str(sess_in)]
    out = subprocess.run(
        args, input="GET / HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=20,
    )
    return out.stdout + out.stderr


# The project's own certificate maker (what `sessionbus up` uses): ECDSA P-256, CN=localhost.
make_cert = self_signed


def retry_until(fn: object, timeout: float = 10.0, interval: float = 0.1) -> Iterator[int]:
    """Yield attempt numbers until ``timeout``: ``for _ in retry_until(...)`` with a break."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        yield n
        n += 1
        time.sleep(interval)
