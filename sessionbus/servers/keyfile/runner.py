"""Keep a TLS server's ticket-key files on the farm's key ring (``sessionbus keyfile``).

The runner follows the key stream (:class:`~sessionbus.keys.follower.KeyFollower`: the current
ring at once on start, then every newer one), renders the ring in the server's format
(:mod:`sessionbus.servers.keyfile.formats`), writes every file of the set atomically with mode 0600
(:mod:`sessionbus.servers.keyfile.atomic_files`) and then tells the server once, by running the
``--on-change`` command (or, for HAProxy, through its runtime API).

Time matters as much as messages: a key starts encrypting at ``encrypt_from`` and must be gone at
``erase_at`` whether or not the key publisher says anything then.  So the ring is rendered again
at every such moment of its timeline and at least once a second; a file is written only when its
bytes change (fillers are deterministic, so an unchanged ring is never a change), and the server
is told only after a write.  When the publisher is silent the files stay as they are, tickets keep
working, and ``sessionbus_ticket_key_newest_age_seconds`` grows.

The command runs without a shell (``shlex`` split; give ``sh -c '...'`` for one), with stdin and
stdout closed, in its own process group, killed after a timeout.  A failure (non-zero exit, a
signal, the timeout, a command that cannot start) is logged with its exit status and at most the
first line of its standard error, counted in ``sessionbus_keyfile_command_failures_total``, and
retried: at the next change, or after a backoff (1 s doubling to 30 s) if no change comes first.

HAProxy can also take a rotation without a reload: with a stats socket, the runner reads the
live keys (``show tls-keys``) and, when the new file is the live ring moved on by one or more
positions, pushes the new keys with ``set ssl tls-key``.  Any other change (a key announced while
none was) cannot go through that API without a moment where a filler key encrypts, so it is left
to the command.

Nothing here logs or raises key material: messages name files, counts, ring sequence numbers and
times only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aio_pika.abc import AbstractRobustConnection

from sessionbus.bus.topology import Topology
from sessionbus.keys.follower import KeyFollower
from sessionbus.metrics import Metrics
from sessionbus.schemas.sealing import BusKeys
from sessionbus.schemas.ticket_keys import KeyRing
from sessionbus.servers.keyfile.atomic_files import check_private_dir, write_atomic
from sessionbus.servers.keyfile.formats import (
    HAPROXY_FILE,
    HAPROXY_TLS_TICKETS_NO,
    KeyFileError,
    KeyFileFormat,
    render,
)
from sessionbus.tasks import Supervisor

__all__ = [
    "CommandResult",
    "HAProxyRuntime",
    "KeyFileWriter",
    "KeyfileRunner",
    "KeyfileSettings",
    "WriteResult",
    "command_env",
    "haproxy_shift",
    "run_command",
]

log = logging.getLogger(__name__)

STDERR_LINE_MAX = 200  # characters of the command's first stderr line that reach the log
RETRY_MIN = 1.0
RETRY_MAX = 30.0
WARN_EVERY = 60.0  # the same render warning is logged again at most this often


@dataclass(frozen=True, slots=True)
class KeyfileSettings:
    fmt: KeyFileFormat
    out: Path  # the directory that holds the server's key file(s)
    on_change: tuple[str, ...] = ()  # argv of the command that makes the server reread them
    slots: int = 4  # nginx / Envoy: number of key files (fixed; the server's config names each)
    command_timeout: float = 30.0
    haproxy_socket: Path | None = None  # HAProxy's stats socket (level admin): no reload
    haproxy_ref: str | None = None  # the tls-ticket-keys path as HAProxy's config spells it
    tick: float = 1.0  # render at least this often (seconds)


# --- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteResult:
    changed: list[str]  # file names (relative to ``out``) whose bytes changed
    files: int  # files in the set
    warnings: list[str]


class KeyFileWriter:
    """Render a ring and write the set: every file of it, atomically, 0600."""

    def __init__(self, settings: KeyfileSettings) -> None:
        self.settings = settings
        self.fmt = KeyFileFormat(settings.fmt)

    def write(self, ring: KeyRing, now: float) -> WriteResult:
        """Raises :class:`KeyFileError` (nothing written) or ``OSError`` (maybe part written:
        call again, a set is complete only once this returns)."""
        rendered = render(self.fmt, ring, now, slots=self.settings.slots)
        changed: list[str] = []
        for name, data in rendered.files.items():
            path = self.settings.out / name
            before = _mtime_ns(path) if self.fmt is KeyFileFormat.ATS else None
            if write_atomic(path, data):
                changed.append(name)
                if before is not None:
                    _advance_mtime_second(path, before)
        return WriteResult(changed, len(rendered.files), rendered.warnings)


def _mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _advance_mtime_second(path: Path, before_ns: int | None) -> None:
    """Traffic Server rereads its ticket key file only when the mtime's whole second advances:
    a second write within the same second would go unnoticed, so move the mtime on."""
    if before_ns is None:
        return
    st = os.stat(path)
    before_s = before_ns // 1_000_000_000
    if st.st_mtime_ns // 1_000_000_000 <= before_s:
        target = (before_s + 1) * 1_000_000_000
        os.utime(path, ns=(st.st_atime_ns, target))


# --- the on-change command ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandResult:
    ok: bool
    status: str  # "exit 0", "exit 1", "signal 9", "timed out after 30 s", "cannot start: ..."
    stderr_line: str  # at most the first line of standard error, shortened

    def describe(self) -> str:
        return f"{self.status}: {self.stderr_line}" if self.stderr_line else self.status


def _first_line(data: bytes) -> str:
    for raw in data.splitlines():
        line = raw.decode("utf-8", "replace").strip()
        if line:
            printable = "".join(c if c.isprintable() else "?" for c in line)
            if len(printable) > STDERR_LINE_MAX:
                printable = printable[:STDERR_LINE_MAX] + "..."
            return printable
    return ""


def command_env(settings: KeyfileSettings) -> dict[str, str]:
    """The command's environment: ours without sessionbus settings (the broker URL may hold a
    password) or systemd's notify socket, plus where the files are."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SESSIONBUS_") and k != "NOTIFY_SOCKET"}
    env["SESSIONBUS_KEYFILE_FORMAT"] = KeyFileFormat(settings.fmt).value
    env["SESSIONBUS_KEYFILE_DIR"] = str(settings.out)
    return env


async def run_command(
    argv: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> CommandResult:
    """Run ``argv`` (no shell), wait at most ``timeout`` seconds, kill its process group after."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
    except OSError as exc:
        return CommandResult(False, f"cannot start: {exc.strerror or type(exc).__name__}", "")
    try:
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            return CommandResult(False, f"timed out after {timeout:g} s", "")
    finally:
        if proc.returncode is None:  # cancelled (stopping): do not leave it behind
            _kill_group(proc.pid)
    code = proc.returncode
    assert code is not None
    status = f"exit {code}" if code >= 0 else f"signal {-code}"
    return CommandResult(code == 0, status, _first_line(err or b""))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# --- HAProxy's runtime API ----------------------------------------------------------------------


def haproxy_shift(old: Sequence[bytes], new: Sequence[bytes]) -> list[bytes] | None:
    """The keys to push with ``set ssl tls-key`` to turn HAProxy's ring ``old`` into ``new``.

    ``set ssl tls-key`` overwrites the oldest key with the given one and moves the encrypting
    position on by one: ring ``[a, b, c]`` (b encrypts) becomes ``[b, c, d]`` (c encrypts).  So a
    change that moves the ring on by ``k`` positions is ``k`` pushes; anything else (a key
    announced ahead replacing a filler in place, say) is not a rotation the API can express and
    returns None: reload instead.
    """
    if len(old) != len(new) or len(new) != HAPROXY_TLS_TICKETS_NO:
        return None
    n = len(new)
    for k in range(1, n):
        if list(old[k:]) == list(new[: n - k]):
            return list(new[n - k :])
    return None


class HAProxyRuntime:
    """HAProxy's ticket keys through its stats socket (``level admin``): no reload.

    ``ref`` is the ``tls-ticket-keys`` file as HAProxy's configuration names it; by default the
    listed reference whose real path is our file.
    """

    def __init__(self, socket_path: Path, key_file: Path, ref: str | None = None,
                 timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.key_file = key_file
        self.ref = ref
        self.timeout = timeout

    def _command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            chunks: list[bytes] = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def _resolve_ref(self) -> str | None:
        if self.ref is not None:
            return self.ref
        want = os.path.realpath(self.key_file)
        for line in self._command("show tls-keys").splitlines():
            m = re.fullmatch(r"\d+ \((.+)\)", line.strip())
            if m and os.path.realpath(m.group(1)) == want:
                self.ref = m.group(1)
                return self.ref
        return None

    def live(self) -> list[bytes] | None:
        """HAProxy's keys in file order (oldest, encrypting, announced ahead); never logged."""
        ref = self._resolve_ref()
        if ref is None:
            return None
        keys: list[bytes] = []
        for line in self._command(f"show tls-keys {ref}").splitlines():
            m = re.fullmatch(r"\d+\.\d+ ([A-Za-z0-9+/=]+)", line.strip())
            if m:
                keys.append(base64.b64decode(m.group(1)))
        return keys or None

    def sync(self, new: Sequence[bytes]) -> CommandResult | None:
        """Bring HAProxy's ring to ``new`` by ``set ssl tls-key``; None if only a reload can."""
        try:
            live = self.live()
            if live is None:
                return CommandResult(
                    False, "runtime API: no tls-ticket-keys reference for this file", "")
            if list(live) == list(new):
                return CommandResult(True, "runtime API: keys already in place", "")
            pushes = haproxy_shift(live, new)
            if pushes is None:
                return None
            for key in pushes:
                reply = self._command(
                    f"set ssl tls-key {self.ref} {base64.b64encode(key).decode()}")
                if "TLS ticket key updated" not in reply:
                    # never quote the reply whole: keep its first line, minus our arguments
                    return CommandResult(False, "runtime API refused the key", _first_line(
                        reply.replace(str(self.ref), "<ref>").encode()))
            if self.live() != list(new):
                return CommandResult(False, "runtime API: keys differ after the update", "")
        except OSError as exc:
            return CommandResult(
                False, f"runtime API: {exc.strerror or type(exc).__name__}", "")
        return CommandResult(True, f"runtime API: {len(pushes)} key(s) pushed", "")


def _haproxy_lines(content: bytes | None) -> list[bytes] | None:
    if content is None:
        return None
    try:
        return [base64.b64decode(line, validate=True) for line in content.split()]
    except ValueError:
        return None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# --- the runner ---------------------------------------------------------------------------------


class KeyfileRunner:
    """Follow the key ring, keep the files on it, tell the server after each change."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        keys: BusKeys,
        settings: KeyfileSettings,
        *,
        on_ready: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics = metrics or Metrics()
        self.supervisor = supervisor or Supervisor(metrics)
        self._m = metrics.keyfile
        self._writer = KeyFileWriter(settings)
        self._follower = KeyFollower(connection, topology, keys, on_ring=self._on_ring,
                                     metrics=metrics, supervisor=self.supervisor)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_ready = on_ready
        self._runtime = (
            HAProxyRuntime(settings.haproxy_socket, settings.out / HAPROXY_FILE,
                           settings.haproxy_ref)
            if settings.haproxy_socket is not None
            and KeyFileFormat(settings.fmt) is KeyFileFormat.HAPROXY
            else None
        )
        self._env = command_env(settings)
        # The server has not been told about the files on disk (a failed command, or start).
        self._pending = True
        self._retry_at = 0.0
        self._backoff = RETRY_MIN
        self._warned: dict[str, float] = {}
        # Observable state (tests, and the ready line).
        self.ready = asyncio.Event()  # set once a complete file set is on disk
        self.sets_written = 0  # renders that changed at least one file
        self.commands_run = 0  # --on-change runs
        self.runtime_updates = 0  # HAProxy runtime API updates that succeeded
        self.command_failures = 0
        self.last_result: CommandResult | None = None

    @property
    def ring(self) -> KeyRing | None:
        return self._follower.ring

    async def start(self) -> None:
        check_private_dir(self.settings.out)
        await self._follower.start()
        self._task = self.supervisor.spawn(self._loop(), "keyfile")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._follower.stop()

    def _on_ring(self, _ring: KeyRing) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            ring = self._follower.ring
            try:
                if ring is not None:
                    await self.sync(ring, time.time())
            except (OSError, KeyFileError) as exc:  # keep the files as they are, retry next tick
                log.warning("keyfile: cannot write the key files: %s", exc)
            delay = self._next_delay(ring, time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _next_delay(self, ring: KeyRing | None, now: float) -> float:
        delay = self.settings.tick
        if ring is not None:
            upcoming = [
                t
                for k in ring.keys
                for t in (k.encrypt_from, k.encrypt_until, k.erase_at)
                if t > now
            ]
            if upcoming:
                delay = min(delay, min(upcoming) - now + 0.001)
        if self._pending and self.ready.is_set():
            delay = min(delay, self._retry_at - now)
        return max(delay, 0.01)

    def _warn(self, message: str, now: float, *, force: bool = False) -> None:
        # Render warnings carry ages that change every second: key them by their wording
        # without digits, and repeat one at most every WARN_EVERY seconds.
        key = "".join(c for c in message if not c.isdigit())
        if force or now - self._warned.get(key, -WARN_EVERY) >= WARN_EVERY:
            self._warned[key] = now
            log.warning("%s", message)

    async def sync(self, ring: KeyRing, now: float) -> WriteResult | None:
        """Render ``ring`` for ``now``, write what changed, tell the server if needed."""
        try:
            result = self._writer.write(ring, now)
        except KeyFileError as exc:
            self._warn(f"keyfile: {exc}; the files stay as they are", now)
            return None
        except OSError as exc:
            # Part of the set may be on disk: tell the server once the whole set is.
            self._pending, self._retry_at = True, now + self.settings.tick
            self._warn(
                f"keyfile: cannot write key files in {self.settings.out}: "
                f"{exc.strerror or type(exc).__name__}; retrying",
                now,
            )
            return None
        if result.changed:
            self._m.writes.inc(len(result.changed))
            self.sets_written += 1
            log.info(
                "keyfile: ring %d: wrote %d of %d %s key file(s) in %s",
                ring.seq, len(result.changed), result.files, self._writer.fmt.value,
                self.settings.out,
            )
        for w in result.warnings:
            self._warn(f"keyfile: {w}", now, force=bool(result.changed))
        first = not self.ready.is_set()
        if first:
            # At start the server is told even if nothing changed: a previous run may have
            # stopped between writing the files and running the command.
            self.ready.set()
            if self._on_ready is not None:
                self._on_ready()
        if result.changed or first or (self._pending and time.time() >= self._retry_at):
            await self._tell_server()
        return result

    async def _tell_server(self) -> None:
        result: CommandResult | None = None
        if self._runtime is not None:
            new = _haproxy_lines(_read(self.settings.out / HAPROXY_FILE)) or []
            result = await asyncio.to_thread(self._runtime.sync, new)
            if result is not None and result.ok:
                self.runtime_updates += 1
                log.info("keyfile: %s", result.status)
            elif result is not None:
                log.warning("keyfile: %s", result.describe())
            elif not self.settings.on_change:
                result = CommandResult(
                    False, "runtime API: this change is not a rotation (give --on-change to "
                    "reload for it)", "")
                log.warning("keyfile: %s", result.status)
        argv = self.settings.on_change
        if (result is None or not result.ok) and argv:
            self.commands_run += 1
            result = await run_command(argv, self.settings.command_timeout, self._env)
            name = os.path.basename(argv[0])
            if result.ok:
                log.info("keyfile: on-change command (%s) done", name)
            else:
                log.warning("keyfile: on-change command (%s) failed: %s; retrying",
                            name, result.describe())
        if result is None:  # nothing to tell the server with: files only (Envoy watches them)
            self._pending = False
            return
        self.last_result = result
        if result.ok:
            self._pending = False
            self._backoff = RETRY_MIN
        else:
            self._m.command_failures.inc()
            self.command_failures += 1
            self._pending = True
            self._retry_at = time.time() + self._backoff
            self._backoff = min(self._backoff * 2, RETRY_MAX)
