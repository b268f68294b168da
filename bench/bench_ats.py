"""Traffic Server's resumed TLS handshakes/s with the sessionbus plugin against ATS's own session
cache, in the same run, with CPU per handshake beside each.

Setup (loopback only, about a minute): two Traffic Server 9.2 instances from Debian's
trafficserver package, each with its own runroot, identical (``proxy.config.ssl.session_cache
2``, tickets off, 2 net threads, debug logging off) but for the plugin: one loads
``ops/trafficserver/sessionbus_ats.so`` (built with tsxs if needed) talking to a ``sessionbus
cache --push`` that replicates to the real broker under a unique prefix; the other has no plugin
(ATS resumes from its own cache only).

Load: ``CLIENTS`` ``openssl s_time -reuse`` processes (a C client: one full handshake, then
resumptions by TLS 1.2 session id, one ``GET /`` each; ``r`` marks a resumed connection). One
server is loaded at a time, windows alternating round after round, so a noisy neighbour hits both
alike. CPU: traffic_server's user+system time over the windows divided by the resumptions, and,
for the plugin, the cache front's too (its work per resumption is nothing: a resumption by session
id on ATS is answered from ATS's own cache; the plugin only adds work on NEW sessions).

Target: resumed/s with the plugin >= 0.9x without it.

Run ``python bench/bench_ats.py`` (``--quick`` for shorter windows).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (
    AMQP_URL,
    REPO,
    Child,
    Children,
    bus_key_file,
    cpu_seconds,
    delete_topology,
    free_port,
    make_cert,
    quick,
    row,
    unique_prefix,
)
from tests.ats_support import ATS, PLUGIN_SO, ats_installed, make_instance

CLIENTS = 2
CONTEXT = "sb-bench"


class Reuse:
    """One ``openssl s_time -reuse`` process; counts resumed (``r``) and full (``*``) marks."""

    def __init__(self, port: int) -> None:
        self.popen = subprocess.Popen(
            ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-reuse", "-tls1_2",
             "-www", "/", "-time", "600"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.reused = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        while data := os.read(fd, 65536):
            with self._lock:
                self.reused += data.count(b"r")

    def count(self) -> int:
        with self._lock:
            return self.reused

    def stop(self) -> None:
        self.popen.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def window(ats: ATS, seconds: float, extra_pids: list[int]) -> tuple[int, float, float, float]:
    """(resumptions, seconds, ATS CPU s, extra CPU s) over one loaded window (after a ramp)."""
    clients = [Reuse(ats.port) for _ in range(CLIENTS)]
    try:
        time.sleep(0.5)
        pid = ats.server_pid()
        assert pid is not None
        n0 = sum(c.count() for c in clients)
        c0, e0, t0 = cpu_seconds(pid), sum(cpu_seconds(p) for p in extra_pids), time.monotonic()
        time.sleep(seconds)
        n1 = sum(c.count() for c in clients)
        c1, e1, t1 = cpu_seconds(pid), sum(cpu_seconds(p) for p in extra_pids), time.monotonic()
    finally:
        for c in clients:
            c.stop()
    return n1 - n0, t1 - t0, c1 - c0, e1 - e0


def build_plugin() -> None:
    subprocess.run(["make", "-s", "-C", str(PLUGIN_SO.parent)], check=True, timeout=180,
                   capture_output=True)


def measure(seconds: float, rounds: int) -> dict[str, Any]:
    build_plugin()
    with tempfile.TemporaryDirectory(prefix="sb-bench-ats-") as tmp:
        d = Path(tmp)
        cert, key = make_cert(d)
        prefix = unique_prefix()
        children = Children()
        instances: list[ATS] = []
        try:
            with contextlib.ExitStack() as stack:
                bus_key = stack.enter_context(bus_key_file(d))
                env = {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_BUS_KEY_FILE": str(bus_key),
                       "SESSIONBUS_PREFIX": prefix}
                mc, push = free_port(), free_port()
                cache = children.add(Child.python(
                    ["-m", "sessionbus", "cache", "--node-id", "bench-ats", "--memcache",
                     f"127.0.0.1:{mc}", "--push", f"127.0.0.1:{push}"], env))
                cache.wait_for("listening", 30)
                line = f"{PLUGIN_SO} --cache 127.0.0.1:{mc} --push 127.0.0.1:{push} " \
                       f"--context {CONTEXT}"
                common: dict[str, Any] = {"tickets": False, "session_cache": 2, "debug": False}
                with_plugin = make_instance(d / "plugin", "plugin", str(cert), str(key), None,
                                            plugin_line=line, **common)
                without = make_instance(d / "own", "own", str(cert), str(key), None, **common)
                for a in (with_plugin, without):
                    instances.append(a)
                    a.start()
                totals = {name: [0, 0.0, 0.0, 0.0] for name in ("plugin", "own")}
                for _ in range(rounds):
                    for name, a, extra in (("plugin", with_plugin, [cache.popen.pid]),
                                           ("own", without, [])):
                        got = window(a, seconds, extra)
                        for i, v in enumerate(got):
                            totals[name][i] += v
        finally:
            for a in instances:
                a.stop()
            children.stop_all()
            delete_topology(prefix, [])
    out: dict[str, Any] = {}
    for name, (n, secs, cpu, extra) in totals.items():
        out[f"{name}_rate"] = n / secs if secs else 0.0
        out[f"{name}_cpu_us"] = cpu / n * 1e6 if n else float("nan")
        out[f"{name}_extra_us"] = extra / n * 1e6 if n else float("nan")
        out[f"{name}_n"] = n
    return out


def run() -> list[dict[str, Any]]:
    if not ats_installed():
        return [row("ATS resumed handshakes/s with the plugin", None, "/s", None, ">= 0.9x",
                    None, note="trafficserver is not installed")]
    q = quick()
    m = measure(seconds=2.0 if q else 4.0, rounds=1 if q else 3)
    rate, base = m["plugin_rate"], m["own_rate"]
    ok = bool(base) and rate >= 0.9 * base
    return [
        row("ATS resumed handshakes/s, plugin (TLS 1.2 session id)", rate, "/s", base,
            ">= 0.9x ATS's own cache", ok,
            note=f"{CLIENTS} openssl s_time -reuse clients; {m['plugin_n']} and {m['own_n']} "
                 f"resumptions; CPU per resumed handshake: traffic_server "
                 f"{m['plugin_cpu_us']:.0f} us with the plugin (+ cache front "
                 f"{m['plugin_extra_us']:.0f} us) vs {m['own_cpu_us']:.0f} us without"),
        row("ATS CPU per resumed handshake, plugin", m["plugin_cpu_us"], "us",
            m["own_cpu_us"], "—", None,
            note="traffic_server user+system time / resumptions, same windows"),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        os.environ["SESSIONBUS_BENCH_QUICK"] = "1"
    for r in run():
        print(r)
    return 0


if __name__ == "__main__":
    assert REPO.is_dir()
    sys.exit(main())
