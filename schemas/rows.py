"""The wire row of each event type: the one place its layout is written.

A batch carries one row per event, a msgpack array by position (no field names on the wire: a
batch of a few hundred events would double in size).  The outbox builds these rows directly, with
no object per event, and the codec reads them; both take the layout from here, and
``tests/test_codec.py`` checks that what the outbox queues decodes to the events it was given.
"""

from __future__ import annotations

from typing import NamedTuple

from sessionbus.schemas.events import EventType


class NewRow(NamedTuple):
    seq: int
    time: float  # unix seconds at the origin
    session_id: bytes
    sid_ctx: bytes
    expires: float
    der: bytes  # the serialized SSL_SESSION (or a cache front's opaque value)
    opaque: bool  # a cache front's value under another key, not a session DER


class GetRow(NamedTuple):
    seq: int
    time: float
    session_id: bytes
    sid_ctx: bytes
    expires: float
    hit: bool
    session_origin: str  # "" on a miss


class RemoveRow(NamedTuple):
    seq: int
    time: float
    session_id: bytes
    sid_ctx: bytes
    expires: float
    reason: str  # a RemoveReason value


Row = NewRow | GetRow | RemoveRow

ROW_TYPES: dict[EventType, type[NewRow] | type[GetRow] | type[RemoveRow]] = {
    EventType.NEW: NewRow, EventType.GET: GetRow, EventType.REMOVE: RemoveRow,
}
# The fields every row starts with, in order (what the decoder checks before the type's own).
HEAD = ("seq", "time", "session_id", "sid_ctx", "expires")
ROW_LENGTH = {t: len(cls._fields) for t, cls in ROW_TYPES.items()}

assert all(cls._fields[: len(HEAD)] == HEAD for cls in ROW_TYPES.values())
