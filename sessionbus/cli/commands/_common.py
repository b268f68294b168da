"""Helpers the subcommands share."""

from __future__ import annotations

import argparse
from typing import Any


def subparser(
    sub: Any, name: str, help_: str, description: str, examples: str, exit_codes: str
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_, description=description,
        epilog="examples:\n" + examples + "\n" + exit_codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return p


def csv_of(choices: tuple[str, ...]) -> Any:
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{value!r}: choose from {','.join(choices)}"
            )
        return items

    return parse
