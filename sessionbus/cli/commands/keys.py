"""``sessionbus keys``: the key-rotation publisher (run two for availability)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import socket
import textwrap
from typing import Any

from sessionbus.cli.commands._common import role_metrics, start_metrics, subparser, until_stopped
from sessionbus.cli.config import ConfigError, add_common, common_from_args, env
from sessionbus.cli.config import node_id as node_id_type
from sessionbus.cli.runtime import run
from sessionbus.keys.publisher import KeyPublisher, PublisherSettings
from sessionbus.keys.ring import (
    DEFAULT_ANNOUNCE_AHEAD,
    DEFAULT_KEEP,
    DEFAULT_ROTATE_EVERY,
    Timeline,
)

log = logging.getLogger("sessionbus.keys")


def default_publisher_id() -> str:
    """``keys-<hostname>`` reduced to a node id ([a-z0-9-], at most 63)."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return f"keys-{host}"[:63].rstrip("-") if host else "keys"


def _seconds(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: must be a positive number of seconds")
    return v


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: must be an integer >= 1")
    return int(value)


_PARAGRAPHS = (
    "Generate session-ticket encryption keys on a schedule and publish the key ring, sealed, "
    "on the key stream; nodes with --tickets stateless and `sessionbus keyfile` follow it.",
    "Each key is announced --announce-ahead seconds before any node may encrypt with it, "
    "encrypts for --rotate-every seconds, then only decrypts (tickets under it are renewed) "
    "for --keep more periods, and is erased. A ticket therefore resumes for up to "
    "KEEP*ROTATE_EVERY seconds after it was minted: set every node's --session-timeout to at "
    "most that (the defaults give 2*3600 = 7200, the node's default). --announce-ahead must "
    "exceed broker propagation plus clock skew between nodes, plus, for servers fed by "
    "`sessionbus keyfile`, the time to write the files and reload. A new farm issues no "
    "tickets during its first --announce-ahead seconds (its first key is being announced).",
    "Run two or more for availability: exactly one leads (it holds the exclusive queue "
    "PREFIX.keys.leader), the others try to take over every second, and continue the "
    "leader's key timeline, so a failover breaks no ticket.",
)
DESCRIPTION = "\n\n".join(textwrap.fill(p, 88) for p in _PARAGRAPHS)


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "keys", "run the ticket-key publisher (rotates the farm's session ticket keys)",
        DESCRIPTION,
        "  sessionbus keys --metrics 127.0.0.1:9400\n"
        "  sessionbus keys --rotate-every 3600 --keep 2 --announce-ahead 60   # the defaults\n"
        "  sessionbus keys --rotate-every 43200 --keep 1   # 12-hour keys, 12-hour tickets\n"
        "  sessionbus keys --publisher-id keys-b --metrics 127.0.0.1:9410   # a second one",
        exit_codes,
    )
    p.add_argument("--rotate-every", type=_seconds, default=DEFAULT_ROTATE_EVERY,
                   metavar="SECONDS",
                   help="length of each key's encrypt window (default %(default).0f)")
    p.add_argument("--keep", type=_count, default=DEFAULT_KEEP, metavar="N",
                   help="encrypt windows a key still decrypts after its own; tickets live at "
                   "most N*ROTATE_EVERY (default %(default)s)")
    p.add_argument("--announce-ahead", type=_seconds, default=DEFAULT_ANNOUNCE_AHEAD,
                   metavar="SECONDS",
                   help="publish each key this long before it encrypts; at most "
                   "--rotate-every (default %(default).0f)")
    p.add_argument("--publisher-id", type=node_id_type, default=None, metavar="ID",
                   help="origin of the rings this publisher sends, [a-z0-9-] "
                   "(default keys-<hostname>)")
    p.add_argument("--ring-signing-key-file", default=env("SESSIONBUS_RING_SIGNING_KEY_FILE"),
                   metavar="FILE", help="Ed25519 key the rings are signed with, mode 0600; "
                   "leader and standby share it (env SESSIONBUS_RING_SIGNING_KEY_FILE; make "
                   "it with `sessionbus bus-key signing-key`)")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    common = common_from_args(args)
    try:
        timeline = Timeline(
            rotate_every=args.rotate_every, keep=args.keep, announce_ahead=args.announce_ahead
        )
    except ValueError as exc:
        raise ConfigError(str(exc).replace("rotate every", "--rotate-every")
                          .replace("announce ahead", "--announce-ahead")
                          .replace("keep must", "--keep must")) from None
    publisher_id = args.publisher_id or default_publisher_id()
    keys = common.keys()
    if not keys.can_sign_rings:
        raise ConfigError("no ring signing key: pass --ring-signing-key-file or set "
                          "SESSIONBUS_RING_SIGNING_KEY_FILE (`sessionbus bus-key signing-key`)")

    async def serve(stop: asyncio.Event) -> int:
        metrics = role_metrics("keys")
        start_metrics(common.metrics, metrics)
        publisher = KeyPublisher(
            PublisherSettings(publisher_id=publisher_id, timeline=timeline),
            common.broker, keys, common.topology, metrics=metrics,
        )
        print(f"key publisher {publisher_id} started: rotate every {timeline.rotate_every:g}s, "
              f"keep {timeline.keep}, announce {timeline.announce_ahead:g}s ahead "
              f"(tickets resume for up to {timeline.decrypt_window:g}s)", flush=True)
        done = asyncio.Event()  # the signal, or a failed background task
        watch = asyncio.ensure_future(until_stopped(stop, publisher.supervisor))
        watch.add_done_callback(lambda _: done.set())
        await publisher.run(done)
        code = await watch
        log.info("key publisher %s stopped", publisher_id)
        return code

    return run(serve)
