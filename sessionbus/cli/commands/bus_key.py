"""``sessionbus bus-key``: make bus-key, ring-only and ring signing key files."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sessionbus.cli.commands._common import subparser
from sessionbus.schemas.sealing import (
    BusKeyError,
    write_new_key_file,
    write_ring_file,
    write_signing_key_pair,
)


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "bus-key", "make bus key, ring-only and ring signing key files",
        "The bus key seals every message on the bus (AES-256-GCM, keys by purpose derived "
        "with HKDF). Nodes, cache fronts, workers and revoke hold the bus-key file. Keyfile "
        "hosts and the key publisher hold only its ring-only file: it opens ticket-key rings "
        "and cannot open a session. Rings are signed (Ed25519) by the key publisher: its "
        "signing key file (0600) stays on the key publishers, the public key file goes to "
        "every follower. A key file may hold several keys: the first seals, all open, so a "
        "key can be rotated without downtime (see docs/security.md).",
        "  sessionbus bus-key new /etc/sessionbus/bus.key\n"
        "  sessionbus bus-key ring-file /etc/sessionbus/bus.key /etc/sessionbus/ring.key\n"
        "  sessionbus bus-key signing-key /etc/sessionbus/ring-signing.key "
        "/etc/sessionbus/ring-public.key\n"
        "  sessionbus bus-key new --force ./bus.key", exit_codes,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    new = actions.add_parser("new", help="write a new key file (mode 0600)")
    new.add_argument("file", metavar="FILE")
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    new.set_defaults(func=run_new)
    ring = actions.add_parser(
        "ring-file", help="write the ring-only file of a bus-key file (keyfile hosts, key "
        "publisher; mode 0600); run it again after each rotation step")
    ring.add_argument("bus_key_file", metavar="BUS_KEY_FILE")
    ring.add_argument("file", metavar="OUT")
    ring.add_argument("--force", action="store_true", help="overwrite an existing file")
    ring.set_defaults(func=run_ring)
    sign = actions.add_parser(
        "signing-key", help="write a new ring signing key (0600) and its public key file")
    sign.add_argument("file", metavar="SIGNING_FILE")
    sign.add_argument("public", metavar="PUBLIC_FILE")
    sign.add_argument("--force", action="store_true", help="overwrite existing files")
    sign.set_defaults(func=run_signing)


def _fail(exc: BusKeyError) -> int:
    print(f"sessionbus bus-key: {exc}", file=sys.stderr)
    return 3


def run_new(args: argparse.Namespace) -> int:
    try:
        key_id = write_new_key_file(args.file, force=args.force)
    except BusKeyError as exc:
        return _fail(exc)
    print(f"wrote {args.file} (key id {key_id.hex()})")
    return 0


def run_ring(args: argparse.Namespace) -> int:
    try:
        n = write_ring_file(args.bus_key_file, args.file, force=args.force)
    except BusKeyError as exc:
        return _fail(exc)
    print(f"wrote {args.file} ({n} ring key{'s' if n != 1 else ''}, no session key)")
    return 0


def run_signing(args: argparse.Namespace) -> int:
    try:
        signer = write_signing_key_pair(args.file, args.public, force=args.force)
    except BusKeyError as exc:
        return _fail(exc)
    print(f"wrote {args.file} (mode 0600) and {args.public} (signer id {signer.hex()})")
    return 0
