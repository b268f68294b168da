"""The worker runtime: runs custom consumers, each on its own subscription, until stopped."""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
import uuid
from collections.abc import Mapping
from functools import partial
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from sessionbus.bus.topology import Topology, binding_keys
from sessionbus.consumer.api import Consumer, Source
from sessionbus.consumer.subscription import QueueSource, StreamSource, Subscription
from sessionbus.metrics import Metrics
from sessionbus.schemas.codec import DecodedBatch, decode_batch
from sessionbus.schemas.errors import Reason
from sessionbus.schemas.sealing import BusKeys
from sessionbus.tasks import Supervisor

log = logging.getLogger(__name__)


class ImportStringError(ValueError):
    pass


def load_consumer(spec: str) -> Consumer:
    """Import ``package.module:attr``; attr must be a Consumer."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ImportStringError(f"{spec!r} is not package.module:attr")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportStringError(f"cannot import {module_name}: {exc}") from None
    obj = getattr(module, attr, None)
    if not isinstance(obj, Consumer):
        raise ImportStringError(f"{spec} is not a consumer (a sessionbus.consumer.api.Consumer)")
    return obj


def _decode(keys: BusKeys, body: bytes, headers: Mapping[str, Any]) -> DecodedBatch:
    return decode_batch(body, headers, keys)


class ConsumerRunner:
    """One consumer: its subscription and the retry loop around its handler."""

    def __init__(
        self, connection: AbstractRobustConnection, topology: Topology, keys: BusKeys,
        consumer: Consumer, *, metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.consumer = consumer
        self._topo = topology
        metrics = metrics or Metrics()
        self._delivery = metrics.delivery
        self._duration = metrics.consumers.handler_duration.labels(consumer.name)
        self._failures = metrics.consumers.handler_failures.labels(consumer.name)
        source: QueueSource | StreamSource
        if consumer.source is Source.STREAM:
            source = StreamSource(topology.session_stream, consumer.replay_from)
        else:
            source = QueueSource(topology.consumer_queue(consumer.name), self._declare)
        self.subscription: Subscription[DecodedBatch] = Subscription(
            connection, topology, source, partial(_decode, keys), self._handle,
            prefetch=consumer.prefetch, metrics=metrics, supervisor=supervisor,
        )

    async def _declare(self, channel: AbstractChannel) -> AbstractQueue:
        c = self.consumer
        if c.source is Source.EXCLUSIVE:
            # Named under the consumer prefix (permissions match it) and unique per process.
            queue = await channel.declare_queue(
                self._topo.consumer_queue(f"{c.name}.{uuid.uuid4().hex[:12]}"), exclusive=True
            )
        else:
            queue = await channel.declare_queue(self._topo.consumer_queue(c.name), durable=True)
        for key in binding_keys(c.types, c.origins):
            await queue.bind(self._topo.sessions_exchange, routing_key=key)
        return queue

    async def _handle(self, batch: DecodedBatch) -> list[tuple[int, str]] | None:
        c = self.consumer
        failed: list[tuple[int, str]] = []
        consumed = self._delivery.events_consumed
        for i, event in enumerate(batch.events):
            if not c.wants(event):
                continue
            for attempt in range(c.retries + 1):
                start = time.perf_counter()
                try:
                    await c.handler(event)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failures.inc()
                    log.warning("consumer %s: handler raised %s (attempt %d of %d)", c.name,
                                type(exc).__name__, attempt + 1, c.retries + 1)
                    if attempt < c.retries:
                        await asyncio.sleep(c.retry_delay * 2**attempt)
                else:
                    self._duration.observe(time.perf_counter() - start)
                    consumed.labels(event.type.value, "applied").inc()
                    break
            else:
                failed.append((i, Reason.HANDLER.value))
                consumed.labels(event.type.value, "rejected").inc()
                self._delivery.events_rejected.labels(Reason.HANDLER.value).inc()
        return failed or None


class Worker:
    def __init__(
        self, connection: AbstractRobustConnection, topology: Topology, keys: BusKeys,
        consumers: list[Consumer], *, metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        names = [c.name for c in consumers]
        if len(set(names)) != len(names):
            raise ValueError("two consumers with one name would share a queue")
        metrics = metrics or Metrics()
        self.supervisor = supervisor or Supervisor(metrics)
        self.runners = [
            ConsumerRunner(connection, topology, keys, c, metrics=metrics,
                           supervisor=self.supervisor)
            for c in consumers
        ]

    async def start(self) -> None:
        for r in self.runners:
            await r.subscription.start()
            log.info("consumer %s subscribed to %s", r.consumer.name,
                     r.subscription.source.name)

    async def stop(self, timeout: float) -> bool:
        """Stop taking deliveries, let in-flight handlers finish within ``timeout``."""
        for r in self.runners:
            await r.subscription.cancel()
        results = await asyncio.gather(*(r.subscription.stop(timeout) for r in self.runners))
        return all(results)
