"""A private RabbitMQ node for one test module: a test that restarts a broker must own it.

The shared broker on 127.0.0.1:5672 serves other people's tests and is never touched.  This starts
a second node of the same installation on this machine, with its own node name, free AMQP and
distribution ports (loopback only), its own data, log, config and cookie under a temporary
directory and no plugins (so no management or Prometheus listener can clash):

    with PrivateBroker.start_or_skip() as broker:
        broker.url                  # amqp://guest:guest@127.0.0.1:<port>/
        broker.restart()            # rabbitmqctl stop_app; start_app; await_startup
    # stopped (rabbitmqctl stop, then by PID if needed) and its directory removed

    with PrivateCluster.start_or_skip(3) as cluster:   # three nodes joined into one cluster
        cluster.urls                # every node's URL
        cluster.nodes[1].kill()     # SIGKILL of the node's VM by PID; .boot() brings it back

The node runs in the foreground under a wrapper process this module started, so it is stopped by
that process's PID (and the node's own PID file), never by name.  ``start_or_skip`` skips the
calling test (with the reason and the end of the node's log) when the node cannot start in time.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_SBIN = Path("/usr/lib/rabbitmq/bin")  # Debian: the real scripts (/usr/sbin ones su to rabbitmq)


def _tool(name: str) -> str | None:
    p = _SBIN / name
    if p.is_file() and os.access(p, os.X_OK):
        return str(p)
    return shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerUnavailable(RuntimeError):
    pass


class PrivateBroker:
    def __init__(self, base: Path | None = None, *, name: str | None = None,
                 cookie: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sb-broker-", dir=base))
        self.name = name or f"sbtest-{secrets.token_hex(4)}@localhost"
        # One cookie for the nodes of one cluster (and their rabbitmqctl), kept across reboots.
        self.cookie = cookie or secrets.token_hex(16).upper()
        self.port = _free_port()
        self.dist_port = _free_port()
        while self.dist_port == self.port:
            self.dist_port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "console.log"
        self.restarts = 0
        self.stop_output = ""

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    # --- environment ------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        d = self.dir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(d),  # the Erlang cookie lives here, shared by the node and rabbitmqctl
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),  # not /etc's NODENAME
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),  # -> rabbitmq.conf
            "RABBITMQ_PID_FILE": str(d / "node.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        })
        return env

    def _prepare(self) -> None:
        d = self.dir
        (d / "rabbitmq-env.conf").write_text("")
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "disk_free_limit.absolute = 50MB\n"
            "log.console = false\n"
        )
        cookie = d / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        tool = _tool("rabbitmqctl")
        if tool is None:
            raise BrokerUnavailable("rabbitmqctl is not installed")
        return subprocess.run(
            [tool, "-n", self.name, *args], env=self._env(), cwd=self.dir,
            capture_output=True, text=True, timeout=timeout,
        )

    def _check(self, *args: str, timeout: float = 60) -> None:
        done = self.ctl(*args, timeout=timeout)
        if done.returncode != 0:
            raise BrokerUnavailable(
                f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
                f"{(done.stdout + done.stderr).strip()[-800:]}"
            )

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self._log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # --- life cycle -------------------------------------------------------------------------

    def boot(self, timeout: float = 60.0) -> None:
        server = _tool("rabbitmq-server")
        if server is None or _tool("rabbitmqctl") is None:
            raise BrokerUnavailable("rabbitmq-server/rabbitmqctl are not installed")
        self._prepare()
        with open(self._log, "wb") as out:
            self._proc = subprocess.Popen(
                [server], env=self._env(), cwd=self.dir, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise BrokerUnavailable(
                    f"the private node exited ({self._proc.returncode}) while starting:\n"
                    f"{self.log_tail()}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnavailable(
                    f"the private node did not start within {timeout:.0f}s:\n{self.log_tail()}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                done = self.ctl("await_startup", "--timeout", str(max(1, int(left))),
                                timeout=left + 5)
                if done.returncode == 0 and self._accepts():
                    return
            time.sleep(0.5)

    def _accepts(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(
            ("127.0.0.1", self.port), timeout=1
        ):
            return True
        return False

    def vm_pid(self) -> int | None:
        """The node's Erlang VM PID (from its PID file), if it is running."""
        try:
            pid = int((self.dir / "node.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return None
        return pid

    def kill(self) -> None:
        """SIGKILL the node (its VM by PID, then the process group this object started): a
        crash, no clean shutdown.  ``boot()`` starts it again on the same data."""
        proc, self._proc = self._proc, None
        pid = self.vm_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        deadline = time.monotonic() + 10
        while self._accepts() and time.monotonic() < deadline:
            time.sleep(0.05)

    def join(self, seed: PrivateBroker, timeout: float = 60.0) -> None:
        """Join ``seed``'s cluster (stop_app, join_cluster, start_app)."""
        self._check("stop_app", timeout=timeout)
        self._check("join_cluster", seed.name, timeout=timeout)
        self.start_app(timeout)

    def stop_app(self) -> None:
        self._check("stop_app")

    def start_app(self, timeout: float = 60.0) -> None:
        self._check("start_app", timeout=timeout)
        self._check("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 5)

    def restart(self, down_for: float = 0.0) -> float:
        """``stop_app``, stay down ``down_for`` seconds, ``start_app``. Returns seconds down."""
        t0 = time.monotonic()
        self.stop_app()
        if down_for:
            time.sleep(down_for)
        self.start_app()
        self.restarts += 1
        return time.monotonic() - t0

    def stop(self) -> None:
        """Halt the node (rabbitmqctl stop, then its process group by PID), remove its directory.

        Idempotent.  The node runs in the process group of the wrapper this object started
        (``start_new_session``), so the group id is that PID: nothing else is signalled.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                done = self.ctl("stop", timeout=30)
                self.stop_output = (done.stdout + done.stderr).strip()
            except (subprocess.SubprocessError, OSError) as exc:
                self.stop_output = repr(exc)
            for sig, wait in ((None, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # the wrapper may be gone while the VM lingers a moment: its group still names it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        pid = self.vm_pid()  # a VM that outlived its wrapper (after kill() and boot())
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def boot_again(self, timeout: float = 60.0) -> None:
        """Start the node again after ``kill()`` (same name, ports, data and cookie)."""
        self.boot(timeout)

    @classmethod
    @contextlib.contextmanager
    def start_or_skip(cls, timeout: float = 60.0) -> Iterator[PrivateBroker]:
        """A started private broker, or ``pytest.skip`` with the reason."""
        import pytest

        broker = cls()
        try:
            try:
                broker.boot(timeout)
            except (BrokerUnavailable, OSError, subprocess.SubprocessError) as exc:
                pytest.skip(f"cannot start a private RabbitMQ node: {exc}")
            yield broker
        finally:
            broker.stop()


class PrivateCluster:
    """Private nodes joined into one RabbitMQ cluster (loopback, own names, one cookie)."""

    def __init__(self, size: int = 3, base: Path | None = None) -> None:
        tag = secrets.token_hex(3)
        cookie = secrets.token_hex(16).upper()
        self.nodes = [PrivateBroker(base, name=f"sbtest-{tag}-{i}@localhost", cookie=cookie)
                      for i in range(1, size + 1)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def boot(self, timeout: float = 120.0) -> None:
        errors: list[BaseException] = []

        def one(node: PrivateBroker) -> None:
            try:
                node.boot(timeout)
            except BaseException as exc:  # reported below, from the calling thread
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 30)
        if errors:
            raise errors[0]
        for node in self.nodes[1:]:
            node.join(self.nodes[0], timeout)
        out = self.nodes[0].ctl("cluster_status", timeout=60).stdout
        missing = [n.name for n in self.nodes if n.name not in out]
        if missing:
            raise BrokerUnavailable(f"nodes not in the cluster: {missing}\n{out[-800:]}")

    def node_of_port(self, port: int) -> PrivateBroker:
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @classmethod
    @contextlib.contextmanager
    def start_or_skip(cls, size: int = 3, timeout: float = 120.0) -> Iterator[PrivateCluster]:
        import pytest

        cluster = cls(size)
        try:
            try:
                cluster.boot(timeout)
            except (BrokerUnavailable, OSError, subprocess.SubprocessError) as exc:
                pytest.skip(f"cannot start a private RabbitMQ cluster: {exc}")
            yield cluster
        finally:
            cluster.stop()
