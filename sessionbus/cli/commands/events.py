"""``sessionbus events``: print events as JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from sessionbus.bus.connection import connect, retry
from sessionbus.bus.topology import check_sessions, check_with
from sessionbus.cli.commands._common import csv_of, subparser, until_stopped
from sessionbus.cli.config import add_common, common_from_args
from sessionbus.cli.runtime import run
from sessionbus.consumer.event_printer import printer
from sessionbus.consumer.worker import Worker
from sessionbus.schemas.events import SESSION_EVENT_TYPES, EventType

_TYPES = tuple(t.value for t in SESSION_EVENT_TYPES)


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "events", "print events as JSON lines",
        "Print one JSON line per event as it crosses the bus: type, origin node, sequence, "
        "time, session id (hex), session id context, expiry; GET adds hit and the session's "
        "origin, REMOVE its reason, NEW the session's size. Session bytes are never printed.",
        "  sessionbus events\n"
        "  sessionbus events --type new,remove --origin node-a\n"
        "  sessionbus events --type get | jq 'select(.hit and .session_origin != .origin)'",
        exit_codes,
    )
    p.add_argument("--type", type=csv_of(_TYPES), default=_TYPES, metavar="TYPES",
                   help="comma-separated: new,get,remove (default all)")
    p.add_argument("--origin", action="append", metavar="NODE_ID",
                   help="only events from this node (repeatable)")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    common = common_from_args(args)
    keys = common.keys()
    types = tuple(EventType(t) for t in args.type)
    origins = tuple(args.origin) if args.origin else None

    async def serve(stop: asyncio.Event) -> int:
        try:
            conn = await connect(common.broker)
        except ConnectionError as exc:
            print(f"sessionbus events: {exc}", file=sys.stderr)
            return 4
        # Provisioned by the admin step: only checked (and waited for) here.
        await retry(lambda: check_with(conn, common.topology, check_sessions), "finding the bus")
        worker = Worker(conn, common.topology, keys, [printer(types, origins)])
        await worker.start()
        # stdout carries only JSON lines; readiness goes to stderr
        print("sessionbus events: subscribed", file=sys.stderr, flush=True)
        code = await until_stopped(stop, worker.supervisor)
        await worker.stop(5)
        await conn.close()
        return code

    return run(serve)
