"""Helpers the subcommands share."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from prometheus_client import REGISTRY, disable_created_metrics

from sessionbus.metrics import Metrics
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)


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


def role_metrics(role: str) -> Metrics:
    """The process's metrics: prometheus_client's global registry, which ``--metrics`` serves,
    with ``sessionbus_build_info`` naming the role."""
    # No `_created` gauge beside every counter and histogram: half the series of a page, that
    # nothing here reads (Prometheus takes resets from the counter itself).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return Metrics(REGISTRY, role=role)


async def until_stopped(stop: asyncio.Event, supervisor: Supervisor) -> int:
    """Wait for the stop signal or a failed background task: 0, or 1 after a failure (the
    failure and its traceback are in the log already)."""
    if await supervisor.wait_stop(stop):
        log.error("stopping after a failure: %s", supervisor.failure)
        return 1
    return 0
