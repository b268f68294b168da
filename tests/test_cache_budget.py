"""The cache front's output budget, enforced per command: measured on a real ``sessionbus cache``
process (its RSS from /proc) with real clients over loopback.

8 KB of pipelined multi-gets (256 keys of a 16 KiB value each) ask for ~60 MiB of answers. Before
the budget was checked per command the front built all of them from one read (its RSS grew by
58 MiB); now it writes what the client takes and stops parsing meanwhile.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionbus.schemas.sealing import write_new_key_file
from tests.httpd_support import free_port, wait_listening

ROOT = Path(__file__).resolve().parent.parent
VALUE = os.urandom((16 << 10) - 4)  # the largest opaque value (4 bytes of flags in front)
KEYS_PER_GET = 256  # FrontLimits.max_keys
GET_LINE = b"get" + b" k" * KEYS_PER_GET + b"\r\n"
PIPELINED = GET_LINE * (8192 // len(GET_LINE))  # 8 KB of multi-gets in one send
ANSWER = b"VALUE k 0 %d\r\n%b\r\n" % (len(VALUE), VALUE)
MIB = 1 << 20


def status(pid: int, field: str) -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def reset_peak(pid: int) -> None:
    """VmHWM (peak RSS) starts again from the current RSS (clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class Front:
    def __init__(self, tmp: Path, max_connections: int = 1024) -> None:
        key = tmp / "bus.key"
        write_new_key_file(key)
        self.port, self.redis_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sessionbus", "cache", "--node-id", "budget-test",
             "--memcache", f"127.0.0.1:{self.port}", "--redis", f"127.0.0.1:{self.redis_port}",
             "--no-replication",
             "--max-connections", str(max_connections)],
            env={**os.environ, "SESSIONBUS_BUS_KEY_FILE": str(key)}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        if not wait_listening(self.port, 30):
            self.stop()
            raise AssertionError("the cache front did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self, port: int | None = None) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port or self.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    f = Front(tmp_path, max_connections=1024)
    try:
        yield f
    finally:
        f.stop()


def ask(s: socket.socket, request: bytes, end: bytes) -> bytes:
    s.sendall(request)
    buf = b""
    deadline = time.monotonic() + 10
    while not buf.endswith(end) and time.monotonic() < deadline:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    return buf


def store_value(f: Front) -> socket.socket:
    s = f.connect()
    assert ask(s, b"set k 0 0 %d\r\n%b\r\n" % (len(VALUE), VALUE), b"\r\n") == b"STORED\r\n"
    # warm every path once (allocator arenas, the answer's buffers), then measure from here
    assert ask(s, GET_LINE, b"END\r\n").count(b"VALUE k ") == KEYS_PER_GET
    return s


def read_answers(s: socket.socket, gets: int, seconds: float = 30.0) -> int:
    """Read until ``gets`` multi-gets are answered; the number of values seen."""
    expected = gets * (KEYS_PER_GET * len(ANSWER) + 5)
    got = 0
    values = 0
    tail = b""
    deadline = time.monotonic() + seconds
    while got < expected and time.monotonic() < deadline:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
        data = tail + chunk
        values += data.count(b"VALUE k 0 ")
        tail = data[-16:]
        values -= tail.count(b"VALUE k 0 ")
    values += tail.count(b"VALUE k 0 ")
    assert got == expected
    return values


@pytest.mark.deadline(120)
def test_pipelined_multi_gets_grow_the_front_by_at_most_4_mib(front: Front) -> None:
    s = store_value(front)
    gets = PIPELINED.count(b"\n")
    assert len(PIPELINED) <= 8192 and gets * KEYS_PER_GET * len(VALUE) > 50 * MIB
    rss0 = status(front.pid, "VmRSS")
    reset_peak(front.pid)
    # a client that sends it all, waits, then reads: the front must not build ~60 MiB meanwhile
    s.sendall(PIPELINED)
    time.sleep(1.0)
    held = status(front.pid, "VmRSS") - rss0
    assert read_answers(s, gets) == gets * KEYS_PER_GET  # every answer, whole and in order
    # and a client that reads as it goes, several times over
    for _ in range(3):
        s.sendall(PIPELINED)
        assert read_answers(s, gets) == gets * KEYS_PER_GET
    peak = status(front.pid, "VmHWM") - rss0
    print(f"RSS held while the client waited {held / MIB:.1f} MiB, peak growth {peak / MIB:.1f} "
          f"MiB for {gets} x {KEYS_PER_GET}-key gets ({gets * KEYS_PER_GET * len(ANSWER) / MIB:.0f}"
          " MiB of answers)")
    assert peak <= 4 * MIB
    assert ask(s, b"version\r\n", b"\r\n").startswith(b"VERSION")
    s.close()


@pytest.mark.deadline(120)
def test_pipelined_redis_gets_grow_the_front_by_at_most_4_mib(front: Front) -> None:
    store_value(front).close()
    s = front.connect(front.redis_port)
    request = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    pipelined = request * (8192 // len(request))
    answer = b"$%d\r\n%b\r\n" % (len(VALUE), VALUE)
    assert ask(s, request, VALUE + b"\r\n") == answer
    rss0 = status(front.pid, "VmRSS")
    reset_peak(front.pid)
    s.sendall(pipelined)
    time.sleep(1.0)
    expected = answer * (8192 // len(request))
    got = b""
    deadline = time.monotonic() + 30
    while len(got) < len(expected) and time.monotonic() < deadline:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    assert got == expected
    peak = status(front.pid, "VmHWM") - rss0
    print(f"Redis: peak growth {peak / MIB:.1f} MiB for {len(expected) / MIB:.0f} MiB of answers")
    assert peak <= 4 * MIB
    s.close()


@pytest.mark.deadline(180)
def test_1024_connections_of_pipelined_multi_gets_leave_the_front_up(front: Front) -> None:
    keeper = store_value(front)  # connection 1 of 1,024
    rss0 = status(front.pid, "VmRSS")
    reset_peak(front.pid)
    hogs: list[socket.socket] = []
    try:
        for _ in range(1023):  # they send and never read
            h = socket.socket()
            h.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # leave little in the kernel
            h.connect(("127.0.0.1", front.port))
            h.sendall(PIPELINED)
            hogs.append(h)
        sent = time.monotonic()
        t0 = time.monotonic()
        assert ask(keeper, b"get k\r\n", b"END\r\n") == ANSWER + b"END\r\n"
        first = time.monotonic() - t0
        time.sleep(1.0)
        assert front.proc.poll() is None
        # once each has its answers' budget, the front is idle and answers at once
        t0 = time.monotonic()
        assert ask(keeper, b"get k\r\n", b"END\r\n") == ANSWER + b"END\r\n"
        later = time.monotonic() - t0
        peak = status(front.pid, "VmHWM") - rss0
        print(f"1,023 clients not reading: peak RSS growth {peak / MIB:.0f} MiB "
              f"({peak / 1023 / 1024:.0f} KiB each); a get {first * 1000:.0f} ms after the "
              f"last sent, then {later * 1000:.1f} ms ({time.monotonic() - sent:.1f} s)")
        assert later < 0.5
        # bounded per connection: its unwritten budget (4 x 17 KiB), one answer over it, the
        # unparsed rest of its read, the connection's own objects
        assert peak <= 1023 * 256 * 1024
    finally:
        for h in hogs:
            h.close()
    time.sleep(0.5)
    assert ask(keeper, b"version\r\n", b"\r\n").startswith(b"VERSION")
    keeper.close()
    assert front.proc.poll() is None
