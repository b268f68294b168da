"""Helpers the subcommands share."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from prometheus_client import REGISTRY

from sessionbus.cli.config import ConfigError
from sessionbus.metrics import Metrics, Readiness, serve_metrics
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
    return Metrics(REGISTRY, role=role)


def start_metrics(addr: str | None, metrics: Metrics, ready: Readiness | None = None) -> None:
    """Serve ``--metrics`` if given (and /ready if ``ready``); a port that cannot be had is a
    setting error (exit 3)."""
    if not addr:
        return
    try:
        serve_metrics(addr, metrics.registry, ready)
    except OSError as exc:
        raise ConfigError(f"--metrics: cannot listen on {addr}: {exc.strerror}") from None


async def until_stopped(stop: asyncio.Event, supervisor: Supervisor) -> int:
    """Wait for the stop signal or a failed background task: 0, or 1 after a failure (the
    failure and its traceback are in the log already)."""
    if await supervisor.wait_stop(stop):
        log.error("stopping after a failure: %s", supervisor.failure)
        return 1
    return 0
