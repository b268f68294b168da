"""The ``sessionbus`` console script: one subcommand per role."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from sessionbus.cli.commands import COMMANDS
from sessionbus.cli.config import ConfigError
from sessionbus.cli.safety import disable_core_dumps

EXIT_CODES = """\
exit codes:
  0    stopped cleanly (or the command did what it was asked)
  1    failed while running (see the log)
  2    bad usage: unknown flag, bad value
  3    a file or setting cannot be used (missing certificate, bad bus-key file, ...)
  4    the broker could not be reached by a command that needs it at once
  130  a second SIGINT/SIGTERM cut the graceful stop short
"""

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
        self.exit(2, f"{self.prog}: error: {message}\n")


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
        return 3
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
