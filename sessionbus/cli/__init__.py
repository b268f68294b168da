"""The ``sessionbus`` console script: one subcommand per role."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from sessionbus.cli.commands import COMMANDS
from sessionbus.cli.config import ConfigError
from sessionbus.cli.exit_codes import (
    EXIT_CODES,
    RET_BROKER,
    RET_CONFIG,
    RET_INTERRUPTED,
    RET_USAGE,
)
from sessionbus.cli.runtime import BrokerUnavailable
from sessionbus.cli.safety import disable_core_dumps

EXAMPLES = """\
examples:
  sessionbus bus-key new /etc/sessionbus/bus.key
  sessionbus up                                   # a whole farm on this machine
  sessionbus node --node-id a --listen 127.0.0.1:8443 --cert c.pem --key k.pem
  sessionbus events --type new,remove
  sessionbus worker --consumer examples.resumptions_per_origin:consumer
  sessionbus revoke --session-id 6f1c...e2
"""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(RET_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> Parser:
    parser = Parser(
        prog="sessionbus",
        description="Share TLS sessions and ticket keys across a farm of TLS servers "
        "over RabbitMQ.",
        epilog=EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in COMMANDS:
        module.register(sub, EXIT_CODES)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    disable_core_dumps()  # before any key is read: no core file, no ptrace by same-uid peers
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"sessionbus {args.command}: {exc}", file=sys.stderr)
        return RET_CONFIG
    except BrokerUnavailable as exc:
        print(f"sessionbus {args.command}: {exc}", file=sys.stderr)
        return RET_BROKER
    except KeyboardInterrupt:
        return RET_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
