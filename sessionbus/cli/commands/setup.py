"""``sessionbus setup``: provision the bus (exchanges, streams, bindings, dead queue), as admin."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from sessionbus.bus.connection import connect
from sessionbus.bus.topology import DEFAULT_CLUSTER_SIZE, declare_admin
from sessionbus.cli.commands._common import subparser
from sessionbus.cli.config import add_common, common_from_args


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "setup", "provision the bus (admin credentials)",
        "Create the exchanges, the session and key streams, their bindings and the dead-letter "
        "queue (idempotent), as ops/rabbitmq/definitions.json does. Roles never create them: "
        "run this once with a user that may configure the vhost (the local farm does, as "
        "guest).",
        "  SESSIONBUS_AMQP_URL=amqps://sessionbus-admin@broker/sessionbus sessionbus setup",
        exit_codes,
    )
    p.add_argument("--cluster-size", type=int, default=DEFAULT_CLUSTER_SIZE, metavar="N",
                   help="initial members of the streams and the dead queue (fewer broker "
                   "nodes: all of them; default %(default)s)")
    add_common(p, bus_key=False)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    common = common_from_args(args)
    if not 1 <= args.cluster_size <= 9:
        print("sessionbus setup: --cluster-size must be 1..9", file=sys.stderr)
        return 2

    async def go() -> int:
        try:
            conn = await connect(common.broker)
        except ConnectionError as exc:
            print(f"sessionbus setup: {exc}", file=sys.stderr)
            return 4
        try:
            channel = await conn.channel()
            await declare_admin(channel, common.topology, args.cluster_size)
            await channel.close()
        except Exception as exc:  # a refusal or a clash with existing arguments: one line
            print(f"sessionbus setup: the broker refused: {type(exc).__name__}: "
                  f"{str(exc)[:300]}", file=sys.stderr)
            return 1
        finally:
            await conn.close()
        print(f"sessionbus setup: bus {common.topology.prefix} provisioned")
        return 0

    return asyncio.run(go())
