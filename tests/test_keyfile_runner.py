"""``sessionbus keyfile``'s runner against the real broker: rings published here, files on disk.

What is checked: the files are written at start and rewritten on each change, atomically with
mode 0600; the on-change command runs once per change; a failing command is counted and retried;
an erased key leaves the files on time while the publisher says nothing; a world-readable
directory is refused (exit 3, one line).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from sessionbus.bus.topology import Topology, declare_core, declare_keys, key_routing_key
from sessionbus.schemas.codec import CONTENT_TYPE, encode_key_ring
from sessionbus.schemas.sealing import BusKeys, write_new_key_file
from sessionbus.schemas.ticket_keys import KeyRing, TicketKey
from sessionbus.servers.keyfile.atomic_files import UnsafeDirectoryError
from sessionbus.servers.keyfile.formats import ATS_FILE, HAPROXY_FILE, KeyFileFormat, render
from sessionbus.servers.keyfile.runner import (
    KeyfileRunner,
    KeyfileSettings,
    KeyFileWriter,
    command_env,
    haproxy_shift,
    run_command,
)
from tests.farm_support import AMQP_URL, Processes, delete_topology, free_port, role_env
from tests.helpers_keys import keys_for

pytestmark = [pytest.mark.broker]

PUBLISHER = "test-keys"


# --- helpers ------------------------------------------------------------------------------------


def key(now: float, start: float, end: float, erase: float, ahead: float = 60.0) -> TicketKey:
    """A fresh key encrypting over [now+start, now+end), erased at now+erase."""
    return TicketKey.generate(now + start - ahead, now + start, now + end, now + erase)


def make_ring(seq: int, *keys: TicketKey, issued_at: float | None = None) -> KeyRing:
    return KeyRing(seq=seq, issued_at=time.time() if issued_at is None else issued_at, keys=keys)


async def publish(
    connection: AbstractRobustConnection, topo: Topology, keys: BusKeys, ring: KeyRing
) -> None:
    """What `sessionbus keys` does, minus the schedule: one sealed ring on the key exchange."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        await declare_core(channel, topo)
        exchange = await declare_keys(channel, topo)
        body, headers = encode_key_ring(ring, PUBLISHER, keys)
        await exchange.publish(
            aio_pika.Message(body, headers=headers, content_type=CONTENT_TYPE,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT, user_id="guest"),
            key_routing_key(PUBLISHER),
        )
    finally:
        await channel.close()


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


def private_dir(tmp_path: Path, name: str = "keys") -> Path:
    d = tmp_path / name
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    return d


def counter_command(counter: Path, fail_flag: Path | None = None) -> tuple[str, ...]:
    """A command that appends a line to ``counter`` per run; fails while ``fail_flag`` exists."""
    script = (
        "import os, sys\n"
        "open(sys.argv[1], 'a').write('run\\n')\n"
        "if len(sys.argv) > 2 and os.path.exists(sys.argv[2]):\n"
        "    sys.stderr.write('reload refused: flag present\\nsecond line never logged\\n')\n"
        "    sys.exit(7)\n"
    )
    argv = [sys.executable, "-c", script, str(counter)]
    if fail_flag is not None:
        argv.append(str(fail_flag))
    return tuple(argv)


def runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def on_disk(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}


def failures_total(runner: KeyfileRunner) -> float:
    return runner.metrics.value("sessionbus_keyfile_command_failures_total")


def contains_key(files: dict[str, bytes], k: TicketKey) -> bool:
    """nginx/Envoy files hold hmac and aes secrets whole (80-byte layout)."""
    return any(k.hmac_secret in data and k.aes_secret in data for data in files.values())


@pytest.fixture
async def runners() -> AsyncIterator[list[KeyfileRunner]]:
    started: list[KeyfileRunner] = []
    try:
        yield started
    finally:
        for r in started:
            await r.stop()


async def start_runner(
    runners: list[KeyfileRunner], connection: AbstractRobustConnection, topo: Topology,
    keys: BusKeys, settings: KeyfileSettings,
) -> KeyfileRunner:
    runner = KeyfileRunner(connection, topo, keys, settings)
    await runner.start()
    runners.append(runner)
    return runner


# --- the runner, in process ---------------------------------------------------------------------


async def test_initial_write_rewrite_on_change_and_one_command_per_change(
    connection: AbstractRobustConnection, topology: Topology, bus_keys: BusKeys,
    runners: list[KeyfileRunner], tmp_path: Path,
) -> None:
    now = time.time()
    old = key(now, -200, -100, 300)
    cur = key(now, -100, 100, 400)
    await publish(connection, topology, bus_keys, make_ring(1, old, cur))
    out, counter = private_dir(tmp_path), tmp_path / "runs"
    settings = KeyfileSettings(KeyFileFormat.NGINX, out, counter_command(counter), slots=4)
    runner = await start_runner(runners, connection, topology, bus_keys, settings)

    # the current ring at once on start: a whole set, 0600, as rendered, and one command run
    assert await until(lambda: runs(counter) == 1)
    files = on_disk(out)
    assert files == render(KeyFileFormat.NGINX, make_ring(1, old, cur), time.time()).files
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert [n for n in os.listdir(out) if n.startswith(".")] == []  # no temporary left over
    assert files["ticket.0.key"][16:48] == cur.hmac_secret

    # a change: the next key announced ahead -> rewritten, exactly one more command
    nxt = key(now, 100, 300, 600)
    await publish(connection, topology, bus_keys, make_ring(2, old, cur, nxt))
    assert await until(lambda: runs(counter) == 2)
    files = on_disk(out)
    assert files["ticket.0.key"][16:48] == cur.hmac_secret  # still encrypting
    assert files["ticket.1.key"][16:48] == nxt.hmac_secret  # announced ahead
    assert contains_key(files, old)

    # the same keys again (a refresh) and an older ring (replayed): no write, no command
    await publish(connection, topology, bus_keys, make_ring(3, old, cur, nxt))
    await publish(connection, topology, bus_keys, make_ring(1, cur, issued_at=now - 50))
    await asyncio.sleep(2.5)  # two ticks and more
    assert runs(counter) == 2
    assert on_disk(out) == files
    assert runner.commands_run == 2 and runner.command_failures == 0


async def test_failing_command_is_counted_and_retried(
    connection: AbstractRobustConnection, topology: Topology, bus_keys: BusKeys,
    runners: list[KeyfileRunner], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    now = time.time()
    cur = key(now, -100, 100, 400)
    await publish(connection, topology, bus_keys, make_ring(1, cur))
    out, counter, flag = private_dir(tmp_path), tmp_path / "runs", tmp_path / "fail"
    flag.touch()
    settings = KeyfileSettings(KeyFileFormat.HAPROXY, out, counter_command(counter, flag))
    runner = await start_runner(runners, connection, topology, bus_keys, settings)

    # the first run fails; it is retried without any change (backoff 1 s, 2 s, ...)
    assert await until(lambda: runner.command_failures >= 2, timeout=6)
    assert runs(counter) == runner.command_failures
    assert failures_total(runner) == runner.command_failures  # its own registry starts at 0
    logged = caplog.text
    assert "exit 7: reload refused: flag present" in logged
    assert "second line never logged" not in logged

    # a change is retried at once, whatever the backoff; the command now succeeds
    flag.unlink()
    failed = runner.command_failures
    nxt = key(now, 100, 300, 600)
    t0 = time.monotonic()
    await publish(connection, topology, bus_keys, make_ring(2, cur, nxt))
    assert await until(lambda: runner.last_result is not None and runner.last_result.ok)
    assert time.monotonic() - t0 < 2.0
    assert runner.command_failures == failed
    settled = runs(counter)
    await asyncio.sleep(2.5)
    assert runs(counter) == settled  # no more retries once it succeeded
    assert failures_total(runner) == failed


async def test_erased_key_leaves_the_files_on_time_with_the_publisher_silent(
    connection: AbstractRobustConnection, topology: Topology, bus_keys: BusKeys,
    runners: list[KeyfileRunner], tmp_path: Path,
) -> None:
    now = time.time()
    old = key(now, -20, -10, 3.0)  # erased 3 s from now
    cur = key(now, -10, 100, 400)
    await publish(connection, topology, bus_keys, make_ring(1, old, cur))
    out, counter = private_dir(tmp_path), tmp_path / "runs"
    settings = KeyfileSettings(KeyFileFormat.NGINX, out, counter_command(counter), slots=3)
    runner = await start_runner(runners, connection, topology, bus_keys, settings)
    assert await until(lambda: runs(counter) == 1)
    assert contains_key(on_disk(out), old)
    age0 = runner.metrics.registry.get_sample_value("sessionbus_ticket_key_newest_age_seconds")
    assert age0 is not None

    # nothing is published from here on
    assert await until(lambda: not contains_key(on_disk(out), old), timeout=8)
    late = time.time() - old.erase_at
    assert 0 <= late < 1.0, f"erased key removed {late:.2f} s after erase_at"
    assert await until(lambda: runs(counter) == 2)
    files = on_disk(out)
    assert len(files) == 3 and contains_key(files, cur)
    # tickets keep working under the last ring, and the age of its newest key shows the silence
    age1 = runner.metrics.registry.get_sample_value("sessionbus_ticket_key_newest_age_seconds")
    assert age1 is not None and age1 >= age0 + 2.0
    assert runner.sets_written == 2


async def test_key_starts_encrypting_on_time_and_nothing_is_written_before(
    connection: AbstractRobustConnection, topology: Topology, bus_keys: BusKeys,
    runners: list[KeyfileRunner], tmp_path: Path,
) -> None:
    now = time.time()
    first = key(now, 2.0, 100, 400)  # announced, encrypts 2 s from now: no current key yet
    await publish(connection, topology, bus_keys, make_ring(1, first))
    out, counter = private_dir(tmp_path), tmp_path / "runs"
    settings = KeyfileSettings(KeyFileFormat.HAPROXY, out, counter_command(counter))
    runner = await start_runner(runners, connection, topology, bus_keys, settings)
    await asyncio.sleep(1.0)
    assert on_disk(out) == {} and runs(counter) == 0 and not runner.ready.is_set()
    assert await until(lambda: runs(counter) == 1, timeout=5)
    late = time.time() - first.encrypt_from
    assert late < 1.5
    lines = [base64.b64decode(x) for x in (out / HAPROXY_FILE).read_bytes().split()]
    assert len(lines) == 3 and lines[1][48:80] == first.hmac_secret  # next-to-last encrypts


async def test_write_failure_is_retried_and_the_server_told_after_the_whole_set(
    connection: AbstractRobustConnection, topology: Topology, bus_keys: BusKeys,
    runners: list[KeyfileRunner], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    now = time.time()
    cur = key(now, -100, 100, 400)
    await publish(connection, topology, bus_keys, make_ring(1, cur))
    out, counter = private_dir(tmp_path), tmp_path / "runs"
    settings = KeyfileSettings(KeyFileFormat.NGINX, out, counter_command(counter), slots=2)
    await start_runner(runners, connection, topology, bus_keys, settings)
    assert await until(lambda: runs(counter) == 1)
    for p in out.iterdir():
        p.unlink()
    out.rmdir()  # the directory is gone (a full disk, an operator's mistake)
    nxt = key(now, 100, 300, 600)
    await publish(connection, topology, bus_keys, make_ring(2, cur, nxt))
    assert await until(lambda: "cannot write key files" in caplog.text)
    await asyncio.sleep(1.5)
    assert runs(counter) == 1  # nothing told while the set is not on disk
    out.mkdir(mode=0o700)
    assert await until(lambda: runs(counter) == 2, timeout=5)
    files = on_disk(out)
    assert sorted(files) == ["ticket.0.key", "ticket.1.key"]
    assert files["ticket.1.key"][16:48] == nxt.hmac_secret
    assert caplog.text.count("cannot write key files") == 1  # not once per attempt


async def test_world_readable_directory_is_refused_in_process(
    connection: AbstractRobustConnection, topology: Topology, bus_keys: BusKeys, tmp_path: Path,
) -> None:
    out = tmp_path / "open"
    out.mkdir()
    os.chmod(out, 0o755)
    runner = KeyfileRunner(connection, topology, bus_keys,
                           KeyfileSettings(KeyFileFormat.NGINX, out))
    with pytest.raises(UnsafeDirectoryError, match="open to other users"):
        await runner.start()


# --- pieces without the broker ------------------------------------------------------------------


async def test_command_timeout_kills_the_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "child-alive"
    script = f"sleep 5; touch {marker}"
    t0 = time.monotonic()
    result = await run_command(["sh", "-c", f"({script}) & wait"], timeout=0.5)
    assert not result.ok and result.status == "timed out after 0.5 s"
    assert time.monotonic() - t0 < 3
    result = await run_command(["/nonexistent/reload"], timeout=1)
    assert not result.ok and result.status.startswith("cannot start")
    result = await run_command(["sh", "-c", "kill -TERM $$"], timeout=5)
    assert not result.ok and result.status == "signal 15"
    await asyncio.sleep(5.5)
    assert not marker.exists(), "a child of the timed-out command survived"


async def test_command_environment_has_no_bus_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSIONBUS_AMQP_URL", "amqp://user:secret-password@broker/")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    out = private_dir(tmp_path)
    env = command_env(KeyfileSettings(KeyFileFormat.NGINX, out))
    dump = tmp_path / "env"
    script = "import os, sys; open(sys.argv[1], 'w').write(repr(dict(os.environ)))"
    result = await run_command([sys.executable, "-c", script, str(dump)], 10, env)
    assert result.ok, result.describe()
    seen = dump.read_text()
    assert "secret-password" not in seen and "NOTIFY_SOCKET" not in seen
    assert f"'SESSIONBUS_KEYFILE_DIR': '{out}'" in seen
    assert "'SESSIONBUS_KEYFILE_FORMAT': 'nginx'" in seen


def test_ats_mtime_advances_a_whole_second_per_change(tmp_path: Path) -> None:
    out = private_dir(tmp_path)
    writer = KeyFileWriter(KeyfileSettings(KeyFileFormat.ATS, out))
    now = time.time()
    cur = key(now, -10, 100, 400)
    seconds = []
    for seq in range(3):  # three changes well within one second
        nxt = key(now, 100 + seq, 300, 600)
        assert writer.write(make_ring(seq + 1, cur, nxt), now).changed == [ATS_FILE]
        seconds.append((out / ATS_FILE).stat().st_mtime_ns // 1_000_000_000)
    assert seconds[0] < seconds[1] < seconds[2]
    # unchanged content: no write, mtime left alone
    assert writer.write(make_ring(9, cur, nxt), now).changed == []
    assert (out / ATS_FILE).stat().st_mtime_ns // 1_000_000_000 == seconds[2]


def test_haproxy_shift() -> None:
    a, b, c, d, e, f = (bytes([i]) * 80 for i in range(6))
    assert haproxy_shift([a, b, c], [b, c, d]) == [d]  # one rotation: one `set ssl tls-key`
    assert haproxy_shift([a, b, c], [c, d, e]) == [d, e]
    assert haproxy_shift([a, b, c], [a, b, d]) is None  # announced in place: reload
    assert haproxy_shift([a, b, c], [d, e, f]) is None
    assert haproxy_shift([a, b], [b, c]) is None


# --- the command ---------------------------------------------------------------------------------


def sb(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sessionbus", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_cli_refuses_world_readable_dir_and_bad_settings(tmp_path: Path) -> None:
    key_file = tmp_path / "bus.key"
    write_new_key_file(key_file)
    env = role_env({"SESSIONBUS_BUS_KEY_FILE": str(key_file), "SESSIONBUS_AMQP_URL": AMQP_URL})
    out = tmp_path / "open"
    out.mkdir()
    os.chmod(out, 0o755)
    done = sb("keyfile", "--format", "nginx", "--out", str(out), env=env)
    assert done.returncode == 3, done.stderr
    assert done.stderr.count("\n") == 1 and "open to other users" in done.stderr
    assert done.stdout == ""
    good = private_dir(tmp_path)
    for args, message in [
        (["--format", "nginx", "--out", str(tmp_path / "missing")], "does not exist"),
        (["--format", "haproxy", "--out", str(good), "--slots", "4"], "--slots applies"),
        (["--format", "nginx", "--out", str(good), "--slots", "1"], "at least 2"),
        (["--format", "nginx", "--out", str(good), "--on-change", "no-such-reload-cmd"],
         "command not found"),
        (["--format", "nginx", "--out", str(good), "--on-change", "nginx -s 'reload"],
         "--on-change"),
        (["--format", "haproxy", "--out", str(good), "--haproxy-socket", "/run/x.sock"],
         "needs --on-change"),
        (["--format", "nginx", "--out", str(good), "--haproxy-socket", "/run/x.sock",
          "--on-change", "true"], "haproxy only"),
    ]:
        done = sb("keyfile", *args, env=env)
        assert done.returncode == 3 and done.stderr.count("\n") == 1, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
    done = sb("keyfile", "--format", "lighttpd", "--out", str(good), env=env)
    assert done.returncode == 2


async def test_cli_writes_at_start_with_metrics_and_stops_cleanly(
    connection: AbstractRobustConnection, tmp_path: Path,
) -> None:
    key_file = tmp_path / "bus.key"
    write_new_key_file(key_file)
    keys = keys_for(key_file)
    topo = Topology(prefix=f"sbtest-kf-{os.urandom(5).hex()}")
    procs = Processes()
    try:
        now = time.time()
        cur = key(now, -100, 100, 400)
        nxt = key(now, 100, 300, 600)
        await publish(connection, topo, keys, make_ring(1, cur, nxt))
        out, counter = private_dir(tmp_path), tmp_path / "runs"
        port = free_port()
        # systemd Type=notify: READY=1 once the files exist
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(20)
        proc = procs.start(
            ["keyfile", "--format", "haproxy", "--out", str(out), "--metrics",
             f"127.0.0.1:{port}"],
            {"SESSIONBUS_BUS_KEY_FILE": str(key_file), "SESSIONBUS_AMQP_URL": AMQP_URL,
             "SESSIONBUS_PREFIX": topo.prefix, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
             "SESSIONBUS_KEYFILE_ON_CHANGE": shlex.join(counter_command(counter))},
        )
        with notify:
            assert await asyncio.to_thread(notify.recv, 64) == b"READY=1"
        assert (out / HAPROXY_FILE).is_file()
        await asyncio.to_thread(proc.wait_for, "key file(s) ready", 20)
        assert await until(lambda: runs(counter) == 1)
        path = out / HAPROXY_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        expected = render(KeyFileFormat.HAPROXY, make_ring(1, cur, nxt), time.time())
        assert path.read_bytes() == expected.files[HAPROXY_FILE]
        page = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
            .read().decode())
        assert "sessionbus_keyfile_writes_total 1.0" in page
        assert "sessionbus_keyfile_command_failures_total 0.0" in page
        assert "sessionbus_ticket_keys 2.0" in page
        assert proc.stop(signal.SIGTERM) == 0
    finally:
        procs.stop_all()
        await asyncio.to_thread(delete_topology, topo.prefix, [])
