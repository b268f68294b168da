"""A local farm (`sessionbus up`) for tests: own directory, free ports, a unique prefix."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sessionbus.schemas.codec import sender_user
from tests.farm_support import AMQP_URL, Proc, delete_topology, start, unique_prefix


def free_range(n: int, start_at: int = 20000, avoid: range | None = None) -> int:
    """A base port with ``n`` free loopback ports after it (bounded search)."""
    for base in range(start_at, 60000, 97):
        if avoid is not None and (base in avoid or base + n - 1 in avoid):
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


@dataclass
class LocalFarm:
    directory: Path
    prefix: str
    nodes: int
    base: int  # node-1's TLS port
    mbase: int  # the key publisher's metrics port; worker +1, node-i +1+i
    up: Proc

    @property
    def env(self) -> dict[str, str]:
        """The environment a role run against this farm needs."""
        return {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_PREFIX": self.prefix,
                "SESSIONBUS_BUS_KEY_FILE": str(self.directory / "bus.key"),
                "SESSIONBUS_RING_PUBLIC_KEY_FILE": str(self.directory / "ring-public.key"),
                "SESSIONBUS_ANY_ORIGIN_USERS": sender_user(AMQP_URL)}

    @property
    def signing_key(self) -> Path:
        return self.directory / "ring-signing.key"

    def metrics_port(self, role: str) -> int:
        if role == "keys":
            return self.mbase
        if role == "worker":
            return self.mbase + 1
        return self.mbase + 1 + int(role.removeprefix("node-"))


def sessionbus_pids(prefix: str) -> list[int]:
    """sessionbus processes whose environment names this prefix."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
                env = (entry / "environ").read_bytes()
            except OSError:
                continue
            if b"sessionbus" in cmd and f"SESSIONBUS_PREFIX={prefix}".encode() in env:
                pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def local_farm(directory: Path, nodes: int = 2, extra_queues: tuple[str, ...] = ()
               ) -> Iterator[LocalFarm]:
    """``sessionbus up`` on free ports; stopped (by PID) and its names deleted afterwards.
    ``extra_queues``: names under the prefix that the test's own roles create."""
    prefix = unique_prefix()
    base = free_range(nodes)
    mbase = free_range(nodes + 2, start_at=base + 97)
    farm_dir = directory / "farm"
    up = start(["up", "--dir", str(farm_dir), "--base-port", str(base),
                "--metrics-base-port", str(mbase), "--nodes", str(nodes)],
               {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_PREFIX": prefix})
    try:
        up.wait_for("Ctrl-C stops the farm", timeout=90)
        yield LocalFarm(farm_dir, prefix, nodes, base, mbase, up)
    finally:
        up.stop(signal.SIGINT, timeout=30)
        deadline = time.monotonic() + 10
        while sessionbus_pids(prefix) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in sessionbus_pids(prefix):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        delete_topology(prefix, [f"{prefix}.replica.node-{i}" for i in range(1, nodes + 1)]
                        + [f"{prefix}.{q}" for q in extra_queues])
