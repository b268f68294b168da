"""Real Traffic Server 9.2 instances for tests: own runroot on loopback, started/stopped by PID.

Debian's ``traffic_layout init`` keeps the package's absolute paths, so each instance gets a
hand-written ``runroot.yaml`` (its own sysconfdir, runtimedir, logdir, cachedir; binaries from
``/usr/bin``). ``traffic_manager --run-root=DIR`` runs it (``traffic_ctl --run-root=DIR config
reload`` talks to that manager); stopping kills the manager and then its ``traffic_server`` by
PID, never by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.farm_support import free_port

TRAFFIC_MANAGER = "/usr/bin/traffic_manager"
TRAFFIC_CTL = "/usr/bin/traffic_ctl"
BODY_FACTORY = Path("/etc/trafficserver/body_factory")
PLUGIN_SO = Path(__file__).resolve().parent.parent / "ops" / "trafficserver" / "sessionbus_ats.so"


def ats_installed() -> bool:
    return os.access(TRAFFIC_MANAGER, os.X_OK) and os.access(TRAFFIC_CTL, os.X_OK)


RUNROOT = """\
prefix: {root}
exec_prefix: /usr
bindir: /usr/bin
sbindir: /usr/sbin
sysconfdir: {root}/etc
datadir: {root}/share
includedir: /usr/include
libdir: /usr/lib/trafficserver
libexecdir: /usr/lib/trafficserver/modules
localstatedir: {root}/var
runtimedir: {root}/run
logdir: {root}/log
cachedir: {root}/cache
"""

RECORDS = """\
CONFIG proxy.config.http.server_ports STRING {port}:ssl:ipv4:ip-in=127.0.0.1
CONFIG proxy.config.process_manager.mgmt_port INT {mgmt_port}
CONFIG proxy.config.admin.user_id STRING #-1
CONFIG proxy.config.exec_thread.autoconfig INT 0
CONFIG proxy.config.exec_thread.limit INT 2
CONFIG proxy.config.accept_threads INT 1
CONFIG proxy.config.task_threads INT 1
CONFIG proxy.config.cache.threads_per_disk INT 1
CONFIG proxy.config.http.cache.http INT 0
CONFIG proxy.config.reverse_proxy.enabled INT 1
CONFIG proxy.config.url_remap.remap_required INT 1
CONFIG proxy.config.log.logging_enabled INT 0
CONFIG proxy.config.http.keep_alive_enabled_in INT 0
CONFIG proxy.config.ssl.server.cert.path STRING {root}/etc
CONFIG proxy.config.ssl.server.private_key.path STRING {root}/etc
CONFIG proxy.config.ssl.server.ticket_key.filename STRING {ticket_key}
CONFIG proxy.config.ssl.server.session_ticket.enable INT {tickets}
CONFIG proxy.config.ssl.server.session_ticket.number INT 1
CONFIG proxy.config.ssl.session_cache INT {session_cache}
CONFIG proxy.config.ssl.session_cache.timeout INT 3600
CONFIG proxy.config.ssl.TLSv1_3 INT 1
CONFIG proxy.config.diags.debug.enabled INT {debug}
CONFIG proxy.config.diags.debug.tags STRING ssl_load|sessionbus
CONFIG proxy.config.diags.output.debug STRING L
CONFIG proxy.config.body_factory.template_sets_dir STRING {body_factory}
CONFIG proxy.config.config_update_interval_ms INT 1000
"""


@dataclass
class ATS:
    name: str
    root: Path
    port: int
    mgmt_port: int
    cert_path: str  # ssl_cert_name as written: the session id context is built from it
    ticket_key: Path | None
    manager: subprocess.Popen[bytes] | None = None
    extra_records: str = ""
    plugin_line: str = ""
    session_cache: int = 0
    tickets: bool = True
    debug: bool = True  # ssl_load|sessionbus debug lines in diags.log (tests read them)
    started_at: float = 0.0
    _server_pids: set[int] = field(default_factory=set)

    # --- files ---------------------------------------------------------------------------

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def diags(self) -> Path:
        return self.root / "log" / "diags.log"

    def write_config(self, key_pem: str) -> None:
        for sub in ("etc", "share", "var", "run", "log", "cache"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "runroot.yaml").write_text(RUNROOT.format(root=self.root))
        (self.etc / "records.config").write_text(RECORDS.format(
            root=self.root, port=self.port, mgmt_port=self.mgmt_port,
            ticket_key=self.ticket_key if self.ticket_key is not None else "NULL",
            tickets=1 if self.tickets else 0, session_cache=self.session_cache,
            body_factory=BODY_FACTORY, debug=1 if self.debug else 0) + self.extra_records)
        (self.etc / "ssl_multicert.config").write_text(
            f"dest_ip=* ssl_cert_name={self.cert_path} ssl_key_name={key_pem}\n")
        (self.etc / "plugin.config").write_text(self.plugin_line + "\n" if self.plugin_line
                                                else "")
        for empty in ("remap.config", "storage.config", "cache.config", "hosting.config",
                      "parent.config", "volume.config", "splitdns.config", "socks.config"):
            (self.etc / empty).write_text("")
        (self.etc / "ip_allow.yaml").write_text(
            "ip_allow:\n  - apply: in\n    ip_addrs: 127.0.0.1\n    action: allow\n"
            "    methods: ALL\n")
        (self.etc / "logging.yaml").write_text("logging: {}\n")
        (self.etc / "sni.yaml").write_text("sni: []\n")
        (self.etc / "strategies.yaml").write_text("")

    # --- processes -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start, and once more if no TLS came up (traffic_manager now and then never starts
        traffic_server on a loaded machine)."""
        try:
            self._start(timeout / 2)
        except TimeoutError:
            self.stop()
            self._start(timeout)

    def _start(self, timeout: float) -> None:
        self.started_at = time.time()
        log = open(self.root / "manager.out", "ab")  # noqa: SIM115 - the child holds it
        try:
            self.manager = subprocess.Popen(
                [TRAFFIC_MANAGER, f"--run-root={self.root}"], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "TS_ROOT": str(self.root)})
        finally:
            log.close()
        self.wait_listening(timeout)

    def server_pid(self) -> int | None:
        """traffic_server's PID: the manager's child."""
        if self.manager is None:
            return None
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.manager.pid}/task/{self.manager.pid}/children")
            for pid in children.read_text().split():
                self._server_pids.add(int(pid))
                return int(pid)
        return None

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.manager is not None and self.manager.poll() is not None:
                raise RuntimeError(f"{self.name}: traffic_manager exited "
                                   f"{self.manager.returncode}\n{self.log_tail()}")
            self.server_pid()
            with contextlib.suppress(OSError, ssl.SSLError):
                tls_connect(self.port, "1.2")
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: no TLS on {self.port}\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the manager and its traffic_server (by PID), SIGKILL after 3 s: ATS's
        own shutdown waits for connections to drain, which a test has no use for."""
        if self.manager is None:
            return
        self.server_pid()
        pids = [self.manager.pid, *self._server_pids]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and (
                self.manager.poll() is None or any(_alive(p) for p in self._server_pids)):
            time.sleep(0.05)
        for pid in pids:
            if pid == self.manager.pid and self.manager.poll() is not None:
                continue
            if pid != self.manager.pid and not _alive(pid):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.manager.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in self._server_pids):
            time.sleep(0.05)
        self._server_pids.clear()
        self.manager = None

    def kill_server(self) -> None:
        """Kill traffic_server only (the manager restarts it)."""
        pid = self.server_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def reload_argv(self) -> list[str]:
        return [TRAFFIC_CTL, f"--run-root={self.root}", "config", "reload"]

    def reload(self) -> None:
        subprocess.run(self.reload_argv(), check=True, capture_output=True, timeout=20)

    def log_text(self) -> str:
        try:
            return self.diags.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 4000) -> str:
        parts = []
        for p in (self.diags, self.root / "log" / "traffic.out", self.root / "manager.out"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)

    def ticket_loads(self) -> list[float]:
        """Times (epoch seconds) at which ATS loaded its ticket key file, from the diags log."""
        return [_diags_time(m.group(1)) for m in
                re.finditer(r"^\[(\w+ +\d+ [\d:.]+)\].*ssl_load.*(?:loaded ticket|ticket key "
                            r"file)", self.log_text(), re.M)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _diags_time(stamp: str) -> float:
    # "Dec  4 18:55:01.123": the year is this year's
    t = time.strptime(f"{time.gmtime().tm_year} {stamp.split('.')[0]}", "%Y %b %d %H:%M:%S")
    frac = float("0." + stamp.split(".")[1]) if "." in stamp else 0.0
    return time.mktime(t) + frac


# --- clients ------------------------------------------------------------------------------------


@dataclass
class Conn:
    reused: bool
    session: ssl.SSLSession | None
    version: str | None


def client_context(version: str, tickets: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = v
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


_CONTEXTS: dict[tuple[str, bool], ssl.SSLContext] = {}


def context(version: str, tickets: bool = True) -> ssl.SSLContext:
    """One client context per (version, tickets): a session is offered only on its context."""
    key = (version, tickets)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = client_context(version, tickets)
    return _CONTEXTS[key]


def tls_connect(port: int, version: str, session: ssl.SSLSession | None = None,
                tickets: bool = True, timeout: float = 10.0) -> Conn:
    """Handshake (offering ``session``), one request, read the reply, close with close_notify.

    Reading the reply receives TLS 1.3 tickets (they follow the handshake).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = context(version, tickets).wrap_socket(raw, server_hostname="localhost",
                                                    session=session)
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError, ssl.SSLError):
            while tls.recv(65536):
                pass
        result = Conn(tls.session_reused, tls.session, tls.version())
        with contextlib.suppress(OSError, ssl.SSLError):
            tls.unwrap()
        tls.close()
        return result


def ticket_key_name(port: int, version: str, workdir: Path) -> bytes | None:
    """The name (first 16 bytes) of the ticket key ATS encrypts a fresh ticket with."""
    sess = workdir / f"sess-{port}-{time.monotonic_ns()}.pem"
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-tls1_3" if version == "1.3" else "-tls1_2", "-ign_eof", "-sess_out", str(sess)]
    subprocess.run(args, input="GET / HTTP/1.0\r\n\r\n", capture_output=True, text=True,
                   timeout=20)
    try:
        text = subprocess.run(["openssl", "sess_id", "-in", str(sess), "-noout", "-text"],
                              capture_output=True, text=True, timeout=10).stdout
    finally:
        with contextlib.suppress(OSError):
            sess.unlink()
    m = re.search(r"TLS session ticket:\n((?:\s*[0-9a-f]{4} - .*\n)+)", text)
    if not m:
        return None
    data = bytearray()
    for line in m.group(1).splitlines():
        hexpart = line.split(" - ", 1)[1][:47].replace("-", " ")
        data += bytes.fromhex("".join(hexpart.split()))
    return bytes(data[:16])


def make_instance(root: Path, name: str, cert_path: str, key_pem: str,
                  ticket_key: Path | None, **kw: object) -> ATS:
    root.mkdir(parents=True, exist_ok=True)
    ats = ATS(name=name, root=root, port=free_port(), mgmt_port=free_port(),
              cert_path=cert_path, ticket_key=ticket_key, **kw)  # type: ignore[arg-type]
    ats.write_config(key_pem)
    return ats


def which_ok() -> bool:
    return ats_installed() and shutil.which("openssl") is not None
