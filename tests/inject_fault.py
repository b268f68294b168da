"""Run the sessionbus CLI with one function replaced by one that raises: how the supervision
tests make a background task fail inside a real process.

    python -m tests.inject_fault sessionbus.producer.outbox:Outbox.run node --node-id a ...
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from typing import Any

from sessionbus.cli import main

MESSAGE = "injected fault (a test)"


def install(target: str) -> None:
    """Replace ``package.module:Class.attr`` (or ``package.module:function``) by a raiser of
    the same kind (coroutine function or plain)."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    original = getattr(owner, attr)

    if inspect.iscoroutinefunction(original):
        async def broken(*_: Any, **__: Any) -> None:
            await asyncio.sleep(0)
            raise RuntimeError(MESSAGE)
        setattr(owner, attr, broken)
    else:
        def broken_sync(*_: Any, **__: Any) -> None:
            raise RuntimeError(MESSAGE)
        setattr(owner, attr, broken_sync)


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
