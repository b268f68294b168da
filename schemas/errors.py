"""The one error type validation raises, with a short fixed reason code."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a message or event was rejected. Values are bounded metric label values."""

    VERSION = "version"  # unknown schema version
    TYPE = "type"  # unknown or unexpected event type
    FIELD = "field"  # missing or ill-typed field
    OVERSIZE = "oversize"  # message larger than the configured limit
    TRUNCATED = "truncated"  # too short to be a sealed message
    FORGED = "forged"  # authentication failed: tampered, wrong key, or not sealed at all
    UNKNOWN_KEY = "unknown_key"  # sealed under a bus key this process does not hold
    MALFORMED = "malformed"  # authentic but undecodable payload
    EXPIRED = "expired"  # the session's expiry has passed
    ID_MISMATCH = "id_mismatch"  # the DER's session id differs from the envelope's
    CONTEXT = "context"  # the session id context is not this service's
    SENDER = "sender"  # AMQP user_id, envelope origin and routing-key suffix disagree
    SIGNATURE = "signature"  # a key ring's signature or signer is wrong
    FUTURE = "future"  # sealed or issued later than now + the allowed clock skew
    STALE = "stale"  # sealed before the freshness window (older than the session lifetime)
    REPLAY = "replay"  # a message this receiver already took (same sender salt and counter)
    TABLE_FULL = "table_full"  # a bounded table (senders, origins) is full: refused, not raised
    HANDLER = "handler"  # a custom consumer's handler kept failing (dead-lettered after retries)


class EnvelopeError(ValueError):
    """A message (or one event of it) that must be rejected. ``str()`` never holds payload bytes."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
