"""An aiohttp server's full handshakes/s attached to the farm (``sessionbus.Farm``) vs the same
server not attached, in the same run, with the server's CPU per handshake beside each.

Both servers are real processes (this module's ``serve``: aiohttp, ``web.run_app(...,
ssl_context=ctx)``, one small text answer; the attached one runs the farm with replication on the
real broker under a unique prefix). The load is ``openssl s_time -new -tls1_2 -www /`` (a fresh
handshake and one request per connection), ``CLIENTS`` processes at once, alternating between the
two servers in short windows so that noise from elsewhere hits both alike; handshakes are
counted from s_time's own summary, CPU from ``/proc/PID/stat`` over each window. A third
server, attached with replication off (no broker), tells the binding's cost from replication's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (
    AMQP_URL,
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

CLIENTS = 3
TARGET = 0.9  # attached / not attached
NODE_ID = "bench-aiohttp"
LINGER_ID = "bench-aiohttp-linger"
LINGER = 0.05  # SESSIONBUS_LINGER of the third server (what a cache front uses)
_SUMMARY = re.compile(r"(\d+) connections in (\d+) real seconds")


def _sizes() -> tuple[int, int]:
    """(seconds per window, rounds)."""
    return (2, 3) if quick() else (3, 5)


def serve(argv: list[str]) -> int:
    """The benchmarked server: attached to the farm with ``--node-id``, plain without."""
    from aiohttp import web

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--node-id")
    p.add_argument("--lone", action="store_true", help="attached, replication off (no broker)")
    args = p.parse_args(argv)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    app = web.Application()

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hello\n")

    app.router.add_get("/", hello)
    if args.node_id:
        import logging

        import sessionbus

        logging.basicConfig(level=logging.INFO)
        if args.lone:
            from sessionbus.farm import FarmSettings
            from sessionbus.schemas.sealing import BusKeys, new_key

            farm = sessionbus.Farm(FarmSettings(node_id=args.node_id, replication=False),
                                   bus_keys=BusKeys([new_key()]))
        else:
            farm = sessionbus.Farm.from_env(node_id=args.node_id)
        farm.attach(ctx)
        app.cleanup_ctx.append(farm.cleanup_ctx)
    web.run_app(app, host="127.0.0.1", port=args.port, ssl_context=ctx, access_log=None,
                print=lambda line: print(line, flush=True))
    return 0


def _window(port: int, pid: int, seconds: int) -> tuple[int, float, float]:
    """(handshakes, seconds, server CPU seconds) of one window of s_time load."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    loaders = [Child(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-tls1_2",
                      "-www", "/", "-time", str(seconds)]) for _ in range(CLIENTS)]
    n = 0
    try:
        for c in loaders:
            i = c.wait_for("real seconds", seconds + 30)
            m = _SUMMARY.search(c.lines[i])
            n += int(m.group(1)) if m else 0
    finally:
        for c in loaders:
            c.stop(5)
    return n, time.monotonic() - t0, cpu_seconds(pid) - cpu0


@contextlib.contextmanager
def _servers() -> Iterator[dict[str, tuple[Child, int]]]:
    prefix = unique_prefix()
    children = Children()
    with tempfile.TemporaryDirectory(prefix="sbbench-") as tmp, bus_key_file(Path(tmp)) as kf:
        cert, key = make_cert(Path(tmp))
        env = {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_BUS_KEY_FILE": str(kf),
               "SESSIONBUS_PREFIX": prefix, "SESSIONBUS_ANY_ORIGIN_USERS": "guest"}
        try:
            base = ["-m", "bench.bench_aiohttp", "serve", "--cert", str(cert), "--key", str(key)]
            extra = {"on": ["--node-id", NODE_ID], "linger": ["--node-id", LINGER_ID],
                     "lone": ["--node-id", "bench-lone", "--lone"], "off": []}
            servers: dict[str, tuple[Child, int]] = {}
            for name, args in extra.items():
                port = free_port()
                linger = {"SESSIONBUS_LINGER": str(LINGER)} if name == "linger" else {}
                servers[name] = (children.add(Child.python(
                    [*base, "--port", str(port), *args], {**env, **linger})), port)
            for name, (child, _) in servers.items():
                child.wait_for("Running on", 60)
                if name in ("on", "linger"):
                    child.wait_for("is warm", 60)
            time.sleep(5.5)  # the warm-join replay's live margin (see bench_node.settle)
            yield servers
        finally:
            children.stop_all()
            delete_topology(prefix, [f"{prefix}.replica.{n}" for n in (NODE_ID, LINGER_ID)])


def measure() -> dict[str, Any]:
    seconds, rounds = _sizes()
    with _servers() as servers:
        for child, port in servers.values():
            _window(port, child.pid, 1)  # warm each
        results: list[dict[str, tuple[int, float, float]]] = []
        for r in range(rounds):
            order = list(servers.items())
            if r % 2:
                order.reverse()
            results.append({name: _window(port, c.pid, seconds) for name, (c, port) in order})

    def rate(w: tuple[int, float, float]) -> float:
        return w[0] / seconds

    def cpu_us(w: tuple[int, float, float]) -> float:
        return w[2] / max(1, w[0]) * 1e6

    ratios = [rate(x["on"]) / rate(x["off"]) if rate(x["off"]) else 0.0 for x in results]
    lone = [rate(x["lone"]) / rate(x["off"]) if rate(x["off"]) else 0.0 for x in results]
    linger = [rate(x["linger"]) / rate(x["off"]) if rate(x["off"]) else 0.0 for x in results]
    return {
        "linger": statistics.median(rate(x["linger"]) for x in results),
        "linger_ratio": statistics.median(linger),
        "linger_ratios": [round(r, 3) for r in linger],
        "linger_cpu_us": statistics.median(cpu_us(x["linger"]) for x in results),
        "lone": statistics.median(rate(x["lone"]) for x in results),
        "lone_ratio": statistics.median(lone), "lone_ratios": [round(r, 3) for r in lone],
        "lone_cpu_us": statistics.median(cpu_us(x["lone"]) for x in results),
        "on": statistics.median(rate(x["on"]) for x in results),
        "off": statistics.median(rate(x["off"]) for x in results),
        "ratio": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios],
        "on_cpu_us": statistics.median(cpu_us(x["on"]) for x in results),
        "off_cpu_us": statistics.median(cpu_us(x["off"]) for x in results),
    }


def run() -> list[dict[str, Any]]:
    m = measure()
    return [row(
        f"aiohttp full handshakes/s attached to the farm (base: not attached), {CLIENTS} s_time "
        "clients", m["on"], "hs/s", m["off"], f"ratio ≥{TARGET}", m["ratio"] >= TARGET,
        ratio=m["ratio"],
        note=f"medians of {len(m['ratios'])} alternating rounds (round ratios {m['ratios']}); "
        f"server CPU per handshake (connection + one request): attached {m['on_cpu_us']:.0f} us, "
        f"not attached {m['off_cpu_us']:.0f} us",
    ), row(
        f"aiohttp full handshakes/s attached, SESSIONBUS_LINGER={LINGER} (base: not attached)",
        m["linger"], "hs/s", m["off"], f"ratio ≥{TARGET}", m["linger_ratio"] >= TARGET,
        ratio=m["linger_ratio"],
        note=f"round ratios {m['linger_ratios']}; server CPU per handshake "
        f"{m['linger_cpu_us']:.0f} us",
    ), row(
        "aiohttp full handshakes/s attached, replication off (base: not attached): the "
        "binding's own cost", m["lone"], "hs/s", m["off"], "—", None, ratio=m["lone_ratio"],
        note=f"round ratios {m['lone_ratios']}; server CPU per handshake "
        f"{m['lone_cpu_us']:.0f} us",
    )]


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        os.environ["SESSIONBUS_BENCH_QUICK"] = "1"
    from bench.__main__ import print_table

    print_table([{"bench": "aiohttp", **r} for r in run()])


if __name__ == "__main__":
    main()
