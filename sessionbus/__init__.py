"""sessionbus: TLS sessions and session-ticket keys shared across a farm over RabbitMQ.

The public API (everything else is private by convention, and may change):

- writing a custom consumer: ``Consumer``, ``EventType``, ``SessionEvent``, ``Source``
  (also importable from ``sessionbus.consumer.api``);
- embedding sessionbus in a program: ``Node``/``NodeSettings``/``TicketMode`` (a TLS node),
  ``CacheFront``/``CacheSettings`` (a memcached/Redis session store), ``KeyPublisher``,
  ``Worker``, ``BrokerSettings``, ``Topology``, ``load_bus_keys``, ``Metrics`` (the families a
  component exports, on a registry you pass) and ``Supervisor`` (its background tasks).

Names are imported when first used, so ``import sessionbus`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors only
    from sessionbus.bus.connection import BrokerSettings
    from sessionbus.bus.topology import Topology
    from sessionbus.consumer.api import Consumer, EventType, SessionEvent, Source
    from sessionbus.consumer.worker import Worker
    from sessionbus.keys.publisher import KeyPublisher
    from sessionbus.metrics import Metrics
    from sessionbus.producer.node import Node, NodeSettings, TicketMode
    from sessionbus.schemas.sealing import load_bus_keys
    from sessionbus.servers.cache.front import CacheFront, CacheSettings
    from sessionbus.tasks import Supervisor

_WHERE = {
    "BrokerSettings": "sessionbus.bus.connection",
    "CacheFront": "sessionbus.servers.cache.front",
    "CacheSettings": "sessionbus.servers.cache.front",
    "Consumer": "sessionbus.consumer.api",
    "EventType": "sessionbus.consumer.api",
    "KeyPublisher": "sessionbus.keys.publisher",
    "Metrics": "sessionbus.metrics",
    "Node": "sessionbus.producer.node",
    "NodeSettings": "sessionbus.producer.node",
    "SessionEvent": "sessionbus.consumer.api",
    "Source": "sessionbus.consumer.api",
    "Supervisor": "sessionbus.tasks",
    "TicketMode": "sessionbus.producer.node",
    "Topology": "sessionbus.bus.topology",
    "Worker": "sessionbus.consumer.worker",
    "load_bus_keys": "sessionbus.schemas.sealing",
}

__all__ = [
    "BrokerSettings",
    "CacheFront",
    "CacheSettings",
    "Consumer",
    "EventType",
    "KeyPublisher",
    "Metrics",
    "Node",
    "NodeSettings",
    "SessionEvent",
    "Source",
    "Supervisor",
    "TicketMode",
    "Topology",
    "Worker",
    "load_bus_keys",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sessionbus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
