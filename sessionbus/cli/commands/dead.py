"""``sessionbus dead list|replay|purge``: what was dead-lettered, and why; re-queue or drop it."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import aiormq

from sessionbus.cli.commands._common import subparser
from sessionbus.cli.config import ConfigError, add_common, common_from_args
from sessionbus.cli.exit_codes import RET_FAILURE, RET_OK
from sessionbus.cli.runtime import BrokerUnavailable, connect_now
from sessionbus.consumer.dead_letters import DeadLetters
from sessionbus.schemas.codec import sender_user
from sessionbus.schemas.errors import Reason

DESCRIPTION = """\
Messages the farm rejected go to the dead-letter queue (PREFIX.dead), each with the reason in
its sessionbus-reject-reason header and the queue or stream it came from. Reasons:
""" + "".join(f"  {r.value}\n" for r in Reason) + """
list    print one line per dead letter: reason, source, type, origin, age, event count, the
        indexes of the events that failed and their sessions' short hashes (never a session id,
        session bytes or a key)
replay  re-queue each to the consumer queue it came from (a handler fixed since can now take
        it; restart the worker first: a running one refuses the copy as a replay); a message
        that failed in a handler is replayed for its failed events only.
        Letters from a stream (a replica's) or that cannot be opened are left, and said so
purge   drop them (needs --reason, --limit or --all)
Messages not acted on stay in the queue, in order."""


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "dead", "list, replay or purge dead-lettered messages", DESCRIPTION,
        "  sessionbus dead list\n"
        "  sessionbus dead list --reason handler --limit 20\n"
        "  sessionbus dead replay --reason handler     # after fixing the consumer\n"
        "  sessionbus dead purge --reason expired", exit_codes,
    )
    p.add_argument("action", choices=["list", "replay", "purge"])
    p.add_argument("--reason", choices=[r.value for r in Reason],
                   help="only dead letters with this reason")
    p.add_argument("--limit", type=int, metavar="N",
                   help="act on (or list) at most N dead letters, oldest first")
    p.add_argument("--all", action="store_true", help="purge: every dead letter")
    add_common(p, check=False)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    common = common_from_args(args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    if args.action == "purge" and not (args.reason or args.limit or args.all):
        raise ConfigError("purge needs --reason, --limit or --all")
    keys = common.keys()

    async def go() -> int:
        conn = await connect_now(common, declare=False)
        try:
            walk = await DeadLetters(conn, common.topology, keys,
                                     sender_user(common.broker.url)).walk(
                args.action, args.reason, args.limit
            )
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BrokerUnavailable(f"no dead-letter queue {common.topology.dead_queue} "
                                    "(is --prefix right?)") from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise BrokerUnavailable(f"{common.topology.dead_queue}: access refused "
                                    f"({exc})") from None
        finally:
            await conn.close()
        if args.action == "list":
            for letter in walk.seen:
                print(letter.line())
            print(f"{len(walk.seen)} dead letter(s)"
                  + (f" with reason {args.reason}" if args.reason else ""))
            return RET_OK
        verb = "replayed" if args.action == "replay" else "purged"
        for letter in walk.done:
            print(f"{verb} {letter.line()}")
        for letter, why in walk.skipped:
            print(f"left {letter.line()}: {why}")
        print(f"{len(walk.done)} {verb}, {len(walk.skipped)} left")
        return RET_FAILURE if walk.skipped and not walk.done else RET_OK

    return asyncio.run(go())
