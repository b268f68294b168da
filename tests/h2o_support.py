"""Debian's h2o (2.2.5) on loopback for tests: its own config, logs and pid in a directory of the
caller's, session resumption through a memcached (``sessionbus cache``), stopped by its PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.httpd_support import free_port, wait_listening


def h2o_binary() -> str | None:
    return shutil.which("h2o") or ("/usr/bin/h2o" if Path("/usr/bin/h2o").exists() else None)


@dataclass
class H2o:
    """One h2o whose TLS sessions live in the memcached (ASCII protocol) at ``memcached_port``."""

    directory: Path
    cert: Path
    key: Path
    memcached_port: int
    port: int = field(default_factory=free_port)
    lifetime: int = 600  # ssl-session-resumption's lifetime: also the memcached expiry
    tickets: bool = False  # mode: ticket, ticket-store: memcached (the farm's ring, read-only)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.directory / "h2o.conf"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    def config(self) -> str:
        d = self.directory
        lines = [
            # as root h2o switches to "nobody" after reading its config, which then cannot
            # write the pid file in a test's private directory
            *(["user: root"] if os.geteuid() == 0 else []),
            f"pid-file: {d / 'h2o.pid'}",
            f"error-log: {self.error_log}",
            "num-threads: 2",
            "listen:",
            "  host: 127.0.0.1",
            f"  port: {self.port}",
            "  ssl:",
            f"    certificate-file: {self.cert}",
            f"    key-file: {self.key}",
            "    ocsp-update-interval: 0",  # a self-signed test certificate has no OCSP URI
            "ssl-session-resumption:",
            *(["  mode: ticket", "  ticket-store: memcached"] if self.tickets else
              # session ids (TLS 1.2) and stateful TLS 1.3 tickets
              ["  mode: cache", "  cache-store: memcached"]),
            f"  lifetime: {self.lifetime}",
            "  memcached:",
            "    host: 127.0.0.1",
            f"    port: {self.memcached_port}",
            "    protocol: ASCII",
            "hosts:",
            "  default:",
            "    paths:",
            "      /:",
            f"        file.dir: {d / 'htdocs'}",
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> H2o:
        binary = h2o_binary()
        if binary is None:
            raise RuntimeError("h2o is not installed (apt-get install h2o)")
        (self.directory / "htdocs").mkdir(parents=True, exist_ok=True)
        (self.directory / "htdocs" / "index.html").write_text("hello from h2o\n")
        self.conf.write_text(self.config())
        out = (self.directory / "stdout.log").open("wb")
        self.popen = subprocess.Popen([binary, "-c", str(self.conf)], stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        if not wait_listening(self.port, timeout):
            log = self.error_log.read_text() if self.error_log.exists() else ""
            stdout = (self.directory / "stdout.log").read_text(errors="replace")
            self.stop()
            raise RuntimeError(f"h2o did not start:\n{stdout}\n{log}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            p.terminate()  # the master stops its workers
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: only its processes
                p.wait(5)
        self.popen = None
