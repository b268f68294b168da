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
signal, the timeout, a command that cannot start) is logged with its exit status and up to
``STDERR_LINES`` lines of its standard error (Traffic Server's ``NOTE:`` chatter, such as
``traffic_ctl``'s "using command line path as RUNROOT", left out), counted in
``sessionbus_keyfile_command_failures_total``, and retried: at the next change, or after a
backoff (1 s doubling to 30 s) if no change comes first.

HAProxy can also take a rotation without a reload: with a stats socket, the runner reads the
live keys (``show tls-keys``) and, when the new file is the live ring moved on by one or more
positions, pushes the new keys with ``set ssl tls-key``.  Any other change (a key announced while
none was) cannot go through that API without a moment where a filler key encrypts, so it is left
to the command.

Traffic Server (``--format ats``) rereads its key file only when the file's mtime is later than
the wall-clock second of its last load (9.2 ``SSLConfig.cc`` ``LoadTicket``: skipped when
``st_mtime <= last_load_time``). Any load that read the old content happened before the rename,
so in a second at most the write's: the file's mtime is set to the next whole second after the
write, which no such load can equal. ATS also applies a reload seconds later (``RELOAD_LATENCY``):
a ring announcing keys less than that ahead is warned about at start and shown by
``sessionbus_keyfile_announce_ahead_short``.

With ``group``/``mode`` (``--group trafficserver --mode 0640``) the files are written with that
group and mode, for a server that runs as another user; both are checked at start.

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
    RELOAD_LATENCY,
    KeyFileError,
    KeyFileFormat,
    announce_ahead,
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
    "check_group_mode",
    "command_env",
    "haproxy_shift",
    "run_command",
]

log = logging.getLogger(__name__)

STDERR_LINE_MAX = 200  # characters of each stderr line of the command that reach the log
STDERR_LINES = 3  # stderr lines of a failed command that reach the log
# Lines a command prints that say nothing about a failure (traffic_ctl: "NOTE: using command
# line path as RUNROOT", always first with --run-root).
_NOISE = re.compile(r"^\[?[^\]]*\]?\s*(?:NOTE|STATUS|DIAG|DEBUG):|^NOTE:")
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
    mode: int = 0o600  # the key files' permission bits
    gid: int | None = None  # the key files' group (None: ours)


def check_group_mode(out: Path, mode: int, gid: int | None) -> None:
    """Raise :class:`KeyFileError` unless files of ``mode``/``gid`` in ``out`` are safe and usable.

    Safe: no bit for others, nothing executable, the owner can read and write. Usable: with a
    group, we may give files that group (root, or a member), and the group can reach ``out``
    (the directory is of that group and group-searchable), else the server could never open them.
    """
    if mode & ~0o7777 or mode & 0o007:
        raise KeyFileError(f"--mode {mode:04o}: key files must give others no access")
    if mode & 0o111 or mode & 0o7000:
        raise KeyFileError(f"--mode {mode:04o}: key files are data (no execute or special bits)")
    if mode & 0o600 != 0o600:
        raise KeyFileError(f"--mode {mode:04o}: the owner must read and write its key files")
    if mode & 0o020:
        raise KeyFileError(f"--mode {mode:04o}: the group must not write the key files")
    if gid is None:
        if mode & 0o070:
            raise KeyFileError(f"--mode {mode:04o} gives a group access: give --group too")
        return
    if os.geteuid() != 0 and gid not in (os.getegid(), *os.getgroups()):
        raise KeyFileError(f"--group {_group_name(gid)}: this user is not a member of that "
                           "group, so cannot give it the key files")
    if not mode & 0o040:
        raise KeyFileError(f"--group {_group_name(gid)} with --mode {mode:04o}: the group "
                           "cannot read the files (use --mode 0640)")
    try:
        st = os.stat(out)
    except OSError as exc:
        raise KeyFileError(f"{out}: {exc.strerror or type(exc).__name__}") from None
    if st.st_gid != gid or not st.st_mode & 0o010:
        raise KeyFileError(
            f"{out}: group {_group_name(gid)} cannot reach the key files (the directory must "
            f"be of that group with mode 0750: chgrp {_group_name(gid)} {out}; "
            f"chmod 0750 {out})")


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


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
            before = _mtime_s(path) if self.fmt is KeyFileFormat.ATS else None
            if write_atomic(path, data, mode=self.settings.mode, gid=self.settings.gid):
                changed.append(name)
                if self.fmt is KeyFileFormat.ATS:
                    ats_mtime(path, before)
        return WriteResult(changed, len(rendered.files), rendered.warnings)


def _mtime_s(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns // 1_000_000_000
    except FileNotFoundError:
        return None


def ats_mtime(path: Path, previous_s: int | None = None, now: float | None = None) -> int:
    """Give a just-written Traffic Server key file an mtime ATS always sees as a change.

    ATS 9.2 skips the file when ``st_mtime <= last_load_time``, the wall-clock second of its last
    load. Every load that read the previous content ran before our rename, so within the second
    of ``now`` (taken after the rename) at the latest: an mtime of the next whole second is later
    than any of them. (Advancing only past the previous mtime is not enough: ATS may have loaded
    in the very second this write lands in.) It is also past the previous mtime
    (``previous_s``), so two writes within one second still differ for traffic_manager, which
    notices a changed file by its mtime. Returns the mtime set, in seconds.
    """
    t = time.time() if now is None else now
    target = max(int(t) + 1, (previous_s or 0) + 1)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, target * 1_000_000_000))
    return target


# --- the on-change command ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandResult:
    ok: bool
    status: str  # "exit 0", "exit 1", "signal 9", "timed out after 30 s", "cannot start: ..."
    stderr_line: str  # up to STDERR_LINES lines of standard error, noise left out, " | "-joined

    def describe(self) -> str:
        return f"{self.status}: {self.stderr_line}" if self.stderr_line else self.status


def _printable(line: str) -> str:
    printable = "".join(c if c.isprintable() else "?" for c in line)
    if len(printable) > STDERR_LINE_MAX:
        printable = printable[:STDERR_LINE_MAX] + "..."
    return printable


def _first_line(data: bytes) -> str:
    for raw in data.splitlines():
        line = raw.decode("utf-8", "replace").strip()
        if line:
            return _printable(line)
    return ""


def stderr_lines(data: bytes, limit: int = STDERR_LINES) -> str:
    """Up to ``limit`` meaningful lines of a command's stderr, " | "-joined (notes left out;
    if every line is a note, the first one, so the log still shows something)."""
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    kept = [_printable(ln) for ln in lines if not _NOISE.match(ln)][:limit]
    if not kept and lines:
        kept = [_printable(lines[0])]
    more = len([ln for ln in lines if not _NOISE.match(ln)]) - len(kept)
    return " | ".join(kept) + (f" (+{more} more line(s))" if more > 0 else "")


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
    return CommandResult(code == 0, status, stderr_lines(err or b""))


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
        self._judged_seq: int | None = None  # the ring whose announce-ahead was last judged
        self.announce_ahead_short = False
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
        check_group_mode(self.settings.out, self.settings.mode, self.settings.gid)
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
        self._judge_announce_ahead(ring, now)
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

    def _judge_announce_ahead(self, ring: KeyRing, now: float) -> None:
        """Warn (first ring at once, then every WARN_EVERY) and flag the metric when keys are
        announced less far ahead than this server takes to load a changed file."""
        latency = RELOAD_LATENCY.get(self._writer.fmt)
        if latency is None or ring.seq == self._judged_seq:
            return
        first = self._judged_seq is None
        self._judged_seq = ring.seq
        ahead = announce_ahead(ring)
        self.announce_ahead_short = ahead is not None and ahead < latency
        self._m.announce_ahead_short.set(1 if self.announce_ahead_short else 0)
        if self.announce_ahead_short:
            self._warn(
                f"keyfile: the ring announces keys {ahead:.1f} s before they encrypt, less than "
                f"{self._writer.fmt.value}'s reload latency (~{latency:.0f} s): tickets other "
                "servers mint under a new key fail to resume here until it loads; run "
                f"`sessionbus keys` with --announce-ahead of at least {latency * 1.5:.0f}",
                now, force=first)

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
