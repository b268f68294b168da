"""``sessionbus up``: the whole farm on this machine."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sessionbus.bus.connection import connect
from sessionbus.bus.topology import declare_admin
from sessionbus.cli.commands._common import subparser
from sessionbus.cli.config import ConfigError, add_common, common_from_args, existing_file
from sessionbus.cli.local_farm import Farm, FarmSettings


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "up", "run a whole farm on this machine",
        "Start a key publisher, N TLS nodes and a worker (each with metrics) as child "
        "processes, creating a bus key and a self-signed certificate in --dir if absent. "
        "Ctrl-C stops them all. Logs go to --dir/<name>.log.",
        "  sessionbus up\n  sessionbus up --nodes 5 --base-port 9443 --dir /tmp/farm",
        exit_codes,
    )
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--base-port", type=int, default=8443, help="first node's port")
    p.add_argument("--metrics-base-port", type=int, default=9400)
    p.add_argument("--dir", type=Path, default=Path("farm"),
                   help="where the bus key, certificate and logs go (default ./farm)")
    p.add_argument("--cert", type=existing_file, help="certificate (default: self-signed)")
    p.add_argument("--key", type=existing_file)
    p.add_argument("--tickets", choices=["stateful", "stateless", "off"], default="stateful")
    p.add_argument("--rotate-every", type=int, default=3600, metavar="SECONDS")
    add_common(p, bus_key=False)
    p.set_defaults(func=main)


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def main(args: argparse.Namespace) -> int:
    common = common_from_args(args)
    if not 1 <= args.nodes <= 64:
        raise ConfigError("--nodes must be 1..64")
    if (args.cert is None) != (args.key is None):
        raise ConfigError("give both --cert and --key, or neither")

    async def probe() -> str | None:
        try:
            conn = await connect(common.broker)
        except ConnectionError as exc:
            return str(exc)
        try:
            # The local farm runs as one admin-capable user (guest): it provisions the bus
            # that its roles then only look up (a real farm imports definitions.json).
            channel = await conn.channel()
            await declare_admin(channel, common.topology)
            await channel.close()
        except Exception as exc:
            return f"cannot provision the bus: {type(exc).__name__}"
        finally:
            await conn.close()
        return None

    problem = asyncio.run(probe())
    if problem:
        print(f"sessionbus up: {problem} (is RabbitMQ running? `rabbitmq-server -detached`)",
              file=sys.stderr)
        return 4
    env = {**os.environ, "SESSIONBUS_AMQP_URL": common.broker.url,
           "SESSIONBUS_PREFIX": common.topology.prefix, "SESSIONBUS_LOG_LEVEL": args.log_level}
    settings = FarmSettings(
        directory=args.dir.resolve(), nodes=args.nodes, base_port=args.base_port,
        metrics_base=args.metrics_base_port, cert=args.cert and Path(args.cert),
        key=args.key and Path(args.key), rotate_every=args.rotate_every, tickets=args.tickets,
    )
    farm = Farm(settings, env)
    stopping = []
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        lines = farm.start()
        ports = [settings.base_port + i for i in range(settings.nodes)]
        deadline = time.monotonic() + 30
        while not all(_listening(settings.host, p) for p in ports):
            if farm.poll() or stopping or time.monotonic() > deadline:
                failed = farm.poll()
                print(f"sessionbus up: {failed or 'a node'} did not start; see "
                      f"{settings.directory}/{failed or 'node-1'}.log", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print("sessionbus farm is up:")
        for line in lines:
            print("  " + line)
        a, b = ports[0], ports[min(1, len(ports) - 1)]
        print("\nwatch a session made on one node resume on another:")
        # -ign_eof with a request: a TLS 1.3 ticket arrives after the handshake, and s_client
        # must still be reading when it does or -sess_out saves a session without it.
        req = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | openssl s_client -ign_eof -connect"
        print(f"  {req} 127.0.0.1:{a} -sess_out /tmp/sb.sess 2>&1 | grep -E '^(New|Reused),|^node'")
        print(f"  {req} 127.0.0.1:{b} -sess_in /tmp/sb.sess 2>&1 | grep -E '^(New|Reused),|^node'")
        print("\nCtrl-C stops the farm.", flush=True)
        while not stopping:
            gone = farm.poll()
            if gone:
                print(f"sessionbus up: {gone} exited; stopping the farm (see "
                      f"{settings.directory}/{gone}.log)", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print("stopping...", flush=True)
        return 0
    finally:
        farm.stop()
