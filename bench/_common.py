"""What the benchmarks share: settings, rows, session DER, child processes, CPU time, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sessionbus.cli.local_farm import self_signed

REPO = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get(
    "SESSIONBUS_BENCH_AMQP_URL",
    os.environ.get("SESSIONBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
)
SID_CTX = b"sessionbus"  # the service name a node uses by default
QUICK_ENV = "SESSIONBUS_BENCH_QUICK"


def quick() -> bool:
    """``python -m bench --quick``: shorter runs, same figures (noisier)."""
    return os.environ.get(QUICK_ENV) == "1"


def unique_prefix() -> str:
    """A fresh prefix, its bus provisioned (roles only look it up)."""
    prefix = _unique_name()
    provision(prefix)
    return prefix


def provision(prefix: str) -> None:
    """``declare_admin`` for ``prefix``, on a thread of its own (callable inside a loop too)."""
    import concurrent.futures

    from sessionbus.bus.connection import BrokerSettings, connect
    from sessionbus.bus.topology import Topology, declare_admin

    async def go() -> None:
        conn = await connect(BrokerSettings(url=AMQP_URL, name="sessionbus bench setup"))
        try:
            ch = await conn.channel()
            await declare_admin(ch, Topology(prefix=prefix))
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result(timeout=60)


def _unique_name() -> str:
    return f"sbbench-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- rows ------------------------------------------------------------------------------------


def row(
    figure: str,
    value: float | None,
    unit: str,
    baseline: float | None,
    target: str,
    ok: bool | None,
    *,
    ratio: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One line of the table. ``ratio`` defaults to value / baseline."""
    if ratio is None and value is not None and baseline:
        ratio = value / baseline
    return {
        "figure": figure, "value": value, "unit": unit, "baseline": baseline,
        "ratio": ratio, "target": target, "ok": ok, "note": note,
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


# --- session DER ------------------------------------------------------------------------------


def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    else:
        body = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(body)]) + body
    return bytes([tag]) + length + value


def _int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    while len(body) > 1 and body[0] == 0 and body[1] < 0x80:
        body = body[1:]
    return _tlv(0x02, body)


class DerFactory:
    """OpenSSL-shaped SSL_SESSION DER of a fixed size with a chosen 32-byte session id.

    The layout is OpenSSL's SSL_SESSION_ASN1 (version, ssl_version 1.2, cipher, session id,
    master key, [1] time, [2] timeout, [4] sid_ctx) plus a [6] host name and a [10] ticket-like
    filler to reach ``size`` bytes (what a session with an SNI name and a few extensions weighs);
    receivers read the id and sid_ctx from it exactly as from a real one. Built from a template:
    one concatenation per session, so making 300,000 of them costs well under a second.
    """

    SID_LEN = 32

    def __init__(self, size: int = 300, sid_ctx: bytes = SID_CTX, lifetime: int = 7200) -> None:
        marker = b"\xa5" * self.SID_LEN
        now = int(time.time())

        def build(filler: int) -> bytes:
            fields = [
                _int(1), _int(0x0303), _tlv(0x04, b"\xc0\x2b"), _tlv(0x04, marker),
                _tlv(0x04, os.urandom(48)), _tlv(0xA1, _int(now)), _tlv(0xA2, _int(lifetime)),
                _tlv(0xA4, _tlv(0x04, sid_ctx)), _tlv(0xA6, _tlv(0x04, b"bench.example")),
                _tlv(0xAA, _tlv(0x04, b"\0" * filler)),
            ]
            return _tlv(0x30, b"".join(fields))

        filler = max(0, size - len(build(0)))
        der = build(filler)
        while len(der) > size and filler:  # length bytes grew past a boundary
            filler -= 1
            der = build(filler)
        at = der.index(marker)
        self._head, self._tail = der[:at], der[at + self.SID_LEN :]
        self.size = len(der)
        self.expires = float(now + lifetime)

    def der(self, session_id: bytes) -> bytes:
        return self._head + session_id + self._tail

    def sessions(self, n: int) -> list[tuple[bytes, bytes]]:
        urandom = os.urandom
        head, tail = self._head, self._tail
        out = []
        for _ in range(n):
            sid = urandom(32)
            out.append((sid, head + sid + tail))
        return out


# --- processes --------------------------------------------------------------------------------


class Child:
    """A process this benchmark started: stdout read line by line, stopped by its own PID."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None,
                 stdin: bool = False) -> None:
        self.args = list(args)
        argv = self.args
        extra = {"PYTHONUNBUFFERED": "1"}
        if threading.current_thread() is threading.main_thread():
            # The child gets SIGTERM if this process dies, however it dies (PR_SET_PDEATHSIG
            # follows the creating thread, hence main thread only).
            if argv[:2] == [sys.executable, "-m"]:
                argv = [sys.executable, "-m", "bench._pdeathsig", *argv[1:]]
            elif argv[0] != sys.executable:
                argv = [sys.executable, "-m", "bench._pdeathsig", *argv]
            extra["SESSIONBUS_BENCH_PARENT"] = str(os.getpid())
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True,
            env={**os.environ, **extra, **(env or {})}, cwd=str(REPO),
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def python(cls, module_args: Sequence[str], env: dict[str, str] | None = None,
               stdin: bool = False) -> Child:
        return cls([sys.executable, *module_args], env, stdin)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self, last: int = 40) -> str:
        return "".join(self.lines[-last:])

    def wait_for(self, text: str, timeout: float = 30.0, start: int = 0) -> int:
        """Index of the first line from ``start`` on that contains ``text``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(start, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(
                        f"{self.args[:4]} exited ({self.popen.returncode}) before {text!r}:\n"
                        + self.output()
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {text!r} within {timeout}s:\n{self.output()}")
                self._cond.wait(min(left, 0.5))

    def send(self, obj: Any) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(obj) + "\n")
        self.popen.stdin.flush()

    def read_json(self, key: str, timeout: float, start: int = 0) -> tuple[int, dict[str, Any]]:
        """The first JSON line holding ``"key"`` from line ``start`` on, and its index."""
        i = start
        while True:
            i = self.wait_for(f'"{key}"', timeout, i)
            with contextlib.suppress(ValueError):
                return i, json.loads(self.lines[i])
            i += 1

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        self._reader.join(5)
        return self.popen.returncode


class Children:
    """Every process started by one benchmark, stopped (newest first) on exit."""

    def __init__(self) -> None:
        self.all: list[Child] = []

    def add(self, child: Child) -> Child:
        self.all.append(child)
        return child

    def stop_all(self) -> None:
        for c in reversed(self.all):
            with contextlib.suppress(Exception):
                c.stop()
        self.all.clear()


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15)


# --- broker -----------------------------------------------------------------------------------


def delete_topology(prefix: str, queues: list[str]) -> None:
    """Delete every exchange and queue of a run (``sessionbus.bus.topology.delete_all``)."""
    from sessionbus.bus.connection import BrokerSettings, connect
    from sessionbus.bus.topology import Topology, delete_all

    async def go() -> None:
        conn = await connect(BrokerSettings(url=AMQP_URL, name="sessionbus bench cleanup"))
        try:
            ch = await conn.channel()
            await delete_all(ch, Topology(prefix=prefix), queues)
        finally:
            await conn.close()

    asyncio.run(go())


@contextlib.contextmanager
def bus_key_file(directory: Path) -> Iterator[Path]:
    from sessionbus.schemas.sealing import write_new_key_file

    path = directory / "bus.key"
    write_new_key_file(path)
    yield path


# The project's own certificate maker (what `sessionbus up` uses): ECDSA P-256, CN=localhost.
make_cert = self_signed
