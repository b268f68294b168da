"""``sessionbus bus-key new FILE``: make a bus key file."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sessionbus.cli.commands._common import subparser
from sessionbus.cli.exit_codes import RET_CONFIG, RET_OK
from sessionbus.schemas.sealing import BusKeyError, write_new_key_file


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "bus-key", "make a bus key file",
        "The bus key seals every message on the bus (AES-256-GCM). Every node, worker and key "
        "publisher of a farm holds the same file. A file may hold several keys: the first "
        "seals, all open, so a key can be rotated without downtime (see README).",
        "  sessionbus bus-key new /etc/sessionbus/bus.key\n"
        "  sessionbus bus-key new --force ./bus.key", exit_codes,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    new = actions.add_parser("new", help="write a new key file (mode 0600)")
    new.add_argument("file", metavar="FILE")
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    new.set_defaults(func=run_new)


def run_new(args: argparse.Namespace) -> int:
    try:
        key_id = write_new_key_file(args.file, force=args.force)
    except BusKeyError as exc:
        print(f"sessionbus bus-key: {exc}", file=sys.stderr)
        return RET_CONFIG
    print(f"wrote {args.file} (key id {key_id.hex()})")
    return RET_OK
