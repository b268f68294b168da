"""``sessionbus revoke``: make a session resume nowhere."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from sessionbus.cli.commands._common import subparser
from sessionbus.cli.config import add_common, common_from_args
from sessionbus.cli.config import node_id as node_id_type
from sessionbus.cli.exit_codes import RET_FAILURE, RET_OK
from sessionbus.cli.runtime import connect_now
from sessionbus.producer.outbox import Outbox
from sessionbus.schemas.events import RemoveReason


def _hex_id(value: str) -> bytes:
    try:
        sid = bytes.fromhex(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not hex") from None
    if not 0 < len(sid) <= 64:
        raise argparse.ArgumentTypeError("a session id is 1 to 64 bytes")
    return sid


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "revoke", "revoke sessions farm-wide",
        "Publish a REMOVE for each session id: every replica drops it and remembers the "
        "revocation until the session would have expired, so it resumes nowhere.",
        "  sessionbus revoke --session-id 6f1c0d...e2\n"
        "  sessionbus revoke --session-id ID1 --session-id ID2 --max-lifetime 86400",
        exit_codes,
    )
    p.add_argument("--session-id", action="append", required=True, type=_hex_id,
                   metavar="HEX", help="session id in hex (as `sessionbus events` prints)")
    p.add_argument("--max-lifetime", type=int, default=7 * 86400, metavar="SECONDS",
                   help="how long replicas remember the revocation: at least the session "
                   "lifetime (default %(default)s)")
    p.add_argument("--origin", type=node_id_type, default="revoke",
                   help="origin id of the REMOVE events (not a node's id; default %(default)s)")
    add_common(p, check=False)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    common = common_from_args(args)
    keys = common.keys()

    async def go() -> int:
        conn = await connect_now(common, declare=False)
        outbox = Outbox(args.origin, common.topology, keys)
        task = asyncio.get_running_loop().create_task(outbox.run(conn))
        expires = time.time() + args.max_lifetime
        for sid in args.session_id:
            outbox.put_remove(sid, b"", expires, RemoveReason.REVOKE)
        ok = await outbox.flush(30)
        task.cancel()
        await conn.close()
        if not ok:
            print("sessionbus revoke: the broker did not confirm the revocation",
                  file=sys.stderr)
            return RET_FAILURE
        for sid in args.session_id:
            print(f"revoked {sid.hex()}")
        return RET_OK

    return asyncio.run(go())
