"""One module per subcommand, each with ``register(subparsers, exit_codes)``."""

from __future__ import annotations

from types import ModuleType

from sessionbus.commands import bus_key, events, node, revoke, up, worker

COMMANDS: list[ModuleType] = [up, node, worker, events, revoke, bus_key]
