"""Typed session events and the batch one AMQP message carries.

One message holds events of one type from one origin node; the receiver validates each event on
its own, so one bad event never costs the good ones beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})

# Node ids appear in routing keys and in RabbitMQ topic-permission regexes ({username} expands
# unescaped), so they are restricted to characters that mean nothing in a regex.
NODE_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62})$")

MAX_SESSION_ID = 250  # TLS ids are <= 32 bytes; cache fronts store opaque keys (memcached: 250)
MAX_SID_CTX = 32  # SSL_MAX_SID_CTX_LENGTH


class EventType(StrEnum):
    NEW = "new"
    GET = "get"
    REMOVE = "remove"
    KEYRING = "keyring"


SESSION_EVENT_TYPES = (EventType.NEW, EventType.GET, EventType.REMOVE)


class RemoveReason(StrEnum):
    REVOKE = "revoke"  # an operator's `sessionbus revoke`
    ALERT = "alert"  # OpenSSL invalidated the session after a fatal alert
    DELETE = "delete"  # a server's cache front deleted it (httpd `delete`)


class GetResult(StrEnum):
    HIT = "hit"
    MISS = "miss"


def valid_node_id(node_id: str) -> bool:
    return bool(NODE_ID_RE.match(node_id))


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One NEW, GET or REMOVE.

    ``der`` is set for NEW only (the serialized SSL_SESSION, in clear after the batch was opened).
    ``hit``/``session_origin`` are set for GET, ``reason`` for REMOVE.
    """

    type: EventType
    origin: str
    seq: int
    time: float  # unix seconds at the origin
    session_id: bytes
    sid_ctx: bytes
    expires: float  # unix seconds: the session's own expiry
    der: bytes | None = None
    hit: bool | None = None
    session_origin: str | None = None
    reason: RemoveReason | None = None

    def __repr__(self) -> str:  # never the session bytes
        return (
            f"SessionEvent({self.type.value} origin={self.origin} seq={self.seq} "
            f"id={self.session_id.hex()})"
        )


@dataclass(frozen=True, slots=True)
class Rejected:
    """An event of a batch that failed validation, with the reason code (a metric label)."""

    index: int
    reason: str
    session_id: bytes | None = None
