"""One module per subcommand, each with ``register(subparsers, exit_codes)``."""

from __future__ import annotations

from types import ModuleType

from sessionbus.cli.commands import (
    bus_key,
    cache,
    events,
    keyfile,
    keys,
    node,
    revoke,
    setup,
    up,
    worker,
)

COMMANDS: list[ModuleType] = [
    up, setup, node, cache, keys, keyfile, worker, events, revoke, bus_key,
]
