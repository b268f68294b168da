"""sessionbus: share TLS sessions and session-ticket keys across a farm of TLS servers.

``sessionbus.Farm`` (``sessionbus.farm``) is the library API; it is imported on first use, so
``import sessionbus`` (and ``sessionbus.producer.openssl`` alone, which needs only cffi) stays
light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sessionbus.farm import AttachError, Farm, FarmError, FarmSettings, TicketMode

__all__ = ["AttachError", "Farm", "FarmError", "FarmSettings", "TicketMode"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sessionbus import farm

        return getattr(farm, name)
    raise AttributeError(f"module 'sessionbus' has no attribute {name!r}")
