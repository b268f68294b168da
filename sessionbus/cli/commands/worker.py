"""``sessionbus worker``: run custom consumers (and the farm statistics)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from sessionbus.bus.connection import connect, retry
from sessionbus.bus.topology import check_sessions, check_with
from sessionbus.cli.commands._common import role_metrics, start_metrics, subparser, until_stopped
from sessionbus.cli.config import ConfigError, add_common, common_from_args
from sessionbus.cli.runtime import run
from sessionbus.consumer.farm_stats import farm_stats
from sessionbus.consumer.worker import ImportStringError, Worker, load_consumer

log = logging.getLogger("sessionbus.worker")


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "worker", "run custom consumers",
        "Run consumers given by import string (package.module:attr, each a "
        "sessionbus.consumer.api.Consumer) in one process, plus the built-in farm statistics "
        "(sessionbus_farm_lookups_total: local and cross-node resumptions). SIGTERM/SIGINT "
        "stops consuming and lets in-flight handlers finish within --drain-timeout; a second "
        "signal exits at once.",
        "  sessionbus worker --consumer examples.resumptions_per_origin:consumer \\\n"
        "      --metrics 127.0.0.1:9400\n"
        "  sessionbus worker --consumer myapp.audit:consumer --consumer myapp.siem:consumer",
        exit_codes,
    )
    p.add_argument("--consumer", action="append", default=[], metavar="MODULE:ATTR")
    p.add_argument("--no-stats", action="store_true", help="do not run the farm statistics")
    p.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    common = common_from_args(args)
    sys.path.insert(0, ".")  # import strings name the user's own modules
    try:
        consumers = [load_consumer(s) for s in args.consumer]
    except ImportStringError as exc:
        raise ConfigError(f"--consumer {exc}") from None
    metrics = role_metrics("worker")
    if not args.no_stats:
        consumers.append(farm_stats(metrics))
    if not consumers:
        raise ConfigError("nothing to run: give --consumer or drop --no-stats")
    keys = common.keys()

    async def serve(stop: asyncio.Event) -> int:
        try:
            conn = await connect(common.broker, on_state=metrics.bus.broker_state)
        except ConnectionError as exc:
            print(f"sessionbus worker: {exc}", file=sys.stderr)
            return 4
        # Provisioned by the admin step: only checked (and waited for) here.
        await retry(lambda: check_with(conn, common.topology, check_sessions), "finding the bus")
        worker = Worker(conn, common.topology, keys, consumers, metrics=metrics)
        await worker.start()
        start_metrics(common.metrics, metrics)
        print(f"worker running {', '.join(c.name for c in consumers)}", flush=True)
        code = await until_stopped(stop, worker.supervisor)
        drained = await worker.stop(args.drain_timeout)
        await conn.close()
        return code if drained else 1

    return run(serve)
