"""Consumers the worker tests load by import string (``tests.consumers_for_tests:recorder``)."""

from __future__ import annotations

import asyncio
import json
import os

from sessionbus.consumer.api import Consumer, EventType, SessionEvent

_out = None


async def record(event: SessionEvent) -> None:
    """Append one JSON line per event to $SB_TEST_RECORD, slowly if $SB_TEST_DELAY says so."""
    global _out
    if _out is None:
        _out = open(os.environ["SB_TEST_RECORD"], "a", buffering=1)  # noqa: SIM115
    delay = float(os.environ.get("SB_TEST_DELAY", "0"))
    if delay:
        await asyncio.sleep(delay)
    _out.write(json.dumps([event.type.value, event.session_id.hex(), event.seq]) + "\n")


recorder = Consumer("recorder", record, types=(EventType.NEW, EventType.GET, EventType.REMOVE))
not_a_consumer = 42


async def refuse_until_fixed(event: SessionEvent) -> None:
    """Raise until the file $SB_TEST_FIXED exists, then record the event like ``record``."""
    if not os.path.exists(os.environ["SB_TEST_FIXED"]):
        raise ValueError("this handler cannot take the event yet")
    with open(os.environ["SB_TEST_RECORD"], "a") as out:
        out.write(json.dumps([event.type.value, event.session_id.hex(), event.seq]) + "\n")


flaky = Consumer("flaky", refuse_until_fixed, types=(EventType.NEW,), retries=1,
                 retry_delay=0.01)
