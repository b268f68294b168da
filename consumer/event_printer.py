"""A ready consumer: one JSON line per event. Session ids yes; session bytes never."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from sessionbus.consumer.api import Consumer, Source
from sessionbus.schemas.events import EventType, SessionEvent


def event_json(event: SessionEvent) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": event.type.value,
        "origin": event.origin,
        "seq": event.seq,
        "time": round(event.time, 6),
        "session_id": event.session_id.hex(),
        "sid_ctx": event.sid_ctx.decode("utf-8", "replace"),
        "expires": round(event.expires, 3),
    }
    if event.type is EventType.NEW and event.der is not None:
        out["session_bytes"] = len(event.der)  # the size only: the bytes hold the master secret
    elif event.type is EventType.GET:
        out["hit"] = event.hit
        out["session_origin"] = event.session_origin
    elif event.type is EventType.REMOVE and event.reason is not None:
        out["reason"] = event.reason.value
    return out


def printer(
    types: tuple[EventType, ...], origins: tuple[str, ...] | None, out: TextIO = sys.stdout
) -> Consumer:
    async def handle(event: SessionEvent) -> None:
        out.write(json.dumps(event_json(event), separators=(",", ":")) + "\n")
        out.flush()

    # A temporary queue: it sees GET too and leaves nothing behind when the printer exits.
    return Consumer("events-printer", handle, types=types, origins=origins,
                    source=Source.EXCLUSIVE, retries=0)
