"""Real Apache httpd (Debian's apache2) and memcached for tests and benchmarks, on loopback.

Each server gets its own config, ServerRoot, pid file and logs in a directory of the caller's,
listens on a free 127.0.0.1 port, and is stopped by the PID from its pid file (never through
systemctl or a broad kill).  Nothing here waits without a bound.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MODULES = Path("/usr/lib/apache2/modules")
# One ServerName (with its port) on every server of the farm: mod_ssl's session id context is the
# MD5 of the virtual host's "ServerName:port", so servers named differently never resume each
# other's sessions. Without a ServerName in the <VirtualHost>, httpd names it after the reverse
# DNS of its address and its port, which differs from server to server.
FARM_SERVER_NAME = "farm.example:443"


def apache2_binary() -> str | None:
    found = shutil.which("apache2") or ("/usr/sbin/apache2" if Path("/usr/sbin/apache2").exists()
                                        else None)
    if found is None:
        return None
    needed = ("mod_ssl.so", "mod_socache_memcache.so", "mod_socache_shmcb.so",
              "mod_mpm_event.so", "mod_authz_core.so")
    return found if all((MODULES / m).exists() for m in needed) else None


def has_redis_module() -> bool:
    return (MODULES / "mod_socache_redis.so").exists()


def memcached_binary() -> str | None:
    return shutil.which("memcached") or (
        "/usr/bin/memcached" if Path("/usr/bin/memcached").exists() else None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def _pin(cpus: str | None) -> list[str]:
    """A command prefix that runs it on ``cpus`` only (taskset execs: the PID stays the same)."""
    if cpus is None:
        return []
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("taskset (util-linux) is not installed")
    return [taskset, "-c", cpus]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie child of ours counts as gone
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def _stop_pid(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):  # httpd runs in its own session: its process group is its own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Httpd:
    """One httpd with mod_ssl whose session cache is ``cache`` (the SSLSessionCache argument)."""

    directory: Path
    cert: Path
    key: Path
    cache: str  # "memcache:127.0.0.1:11311", "redis:127.0.0.1:6380", "shmcb:/path(512000)"
    port: int = field(default_factory=free_port)
    server_name: str = FARM_SERVER_NAME
    session_timeout: int = 300
    threads: int = 25
    processes: int = 2
    cpus: str | None = None  # "0": run on these CPUs only (taskset), for benchmarks
    pid: int | None = None

    @property
    def conf(self) -> Path:
        return self.directory / "httpd.conf"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    def config(self) -> str:
        d = self.directory
        modules = ["mpm_event", "authz_core", "ssl", "socache_shmcb", "socache_memcache"]
        if has_redis_module():
            modules.append("socache_redis")
        lines = [
            f"ServerRoot {d}",
            f"PidFile {d}/httpd.pid",
            f"ErrorLog {d}/error.log",
            "LogLevel warn",
            f"Listen 127.0.0.1:{self.port}",
            *(f"LoadModule {m}_module {MODULES}/mod_{m}.so" for m in modules),
            f"DefaultRuntimeDir {d}",
            f"ServerName {self.server_name}",
            f"DocumentRoot {d}/htdocs",
            f"<Directory {d}/htdocs>",
            "  Require all granted",
            "</Directory>",
            f"StartServers {self.processes}",
            f"ServerLimit {self.processes}",
            f"ThreadsPerChild {self.threads}",
            f"MaxRequestWorkers {self.processes * self.threads}",
            f"MinSpareThreads {self.threads}",
            f"MaxSpareThreads {self.processes * self.threads}",
            "KeepAlive Off",
            f"SSLSessionCache {self.cache}",
            f"SSLSessionCacheTimeout {self.session_timeout}",
            "SSLSessionTickets off",
            f"<VirtualHost 127.0.0.1:{self.port}>",
            f"  ServerName {self.server_name}",
            "  SSLEngine on",
            f"  SSLCertificateFile {self.cert}",
            f"  SSLCertificateKeyFile {self.key}",
            "</VirtualHost>",
        ]
        if os.geteuid() == 0:  # httpd refuses to serve as root; its children switch to this user
            with contextlib.suppress(KeyError):
                pwd.getpwnam("www-data")
                lines[5:5] = ["User www-data", "Group www-data"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> Httpd:
        binary = apache2_binary()
        if binary is None:
            raise RuntimeError("apache2 (Debian's package, with mod_ssl) is not installed")
        (self.directory / "htdocs").mkdir(parents=True, exist_ok=True)
        (self.directory / "htdocs" / "index.html").write_text("hello\n")
        for p in (self.directory, self.directory / "htdocs"):
            p.chmod(0o755)
        (self.directory / "htdocs" / "index.html").chmod(0o644)
        self.conf.write_text(self.config())
        done = subprocess.run([*_pin(self.cpus), binary, "-f", str(self.conf), "-k", "start"],
                              capture_output=True, text=True, timeout=timeout)
        pidfile = self.directory / "httpd.pid"
        deadline = time.monotonic() + timeout
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pidfile.exists():
            with contextlib.suppress(ValueError):
                self.pid = int(pidfile.read_text().strip())
        if done.returncode != 0 or self.pid is None or not wait_listening(self.port, timeout):
            log = self.error_log.read_text() if self.error_log.exists() else ""
            self.stop()
            raise RuntimeError(f"httpd did not start: {done.stdout}{done.stderr}\n{log}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.pid is not None:
            _stop_pid(self.pid, timeout)
            self.pid = None


@dataclass
class Memcached:
    """Debian's memcached on a free loopback port, our own child, stopped by its PID."""

    port: int = field(default_factory=free_port)
    threads: int = 2
    cpus: str | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Memcached:
        binary = memcached_binary()
        if binary is None:
            raise RuntimeError("memcached is not installed")
        args = [binary, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-t",
                str(self.threads), "-m", "64"]
        if os.geteuid() == 0:
            args += ["-u", "root"]
        self.popen = subprocess.Popen([*_pin(self.cpus), *args], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        if not wait_listening(self.port):
            self.stop()
            raise RuntimeError("memcached did not start")
        return self

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.popen = None
