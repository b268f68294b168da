"""``sessionbus node``: a TLS node."""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from typing import Any

from sessionbus.cli.check import Needs, core_needs, free_address, run_check
from sessionbus.cli.commands._common import role_metrics, subparser, until_stopped
from sessionbus.cli.config import (
    Common,
    ConfigError,
    add_common,
    common_from_args,
    existing_file,
    host_port,
)
from sessionbus.cli.config import node_id as node_id_type
from sessionbus.cli.runtime import bind_tcp, run, start_metrics
from sessionbus.producer.node import Node, NodeSettings, TicketMode, make_context
from sessionbus.producer.openssl import BindingError
from sessionbus.producer.outbox import OutboxSettings

log = logging.getLogger("sessionbus.node")


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "node", "run a TLS node",
        "Terminate TLS with the farm's session cache: sessions made here resume on every node. "
        "With --upstream it forwards the plaintext to HOST:PORT; without it, it answers every "
        "HTTP request with 200 and its node id.",
        "  sessionbus node --node-id a --listen 127.0.0.1:8443 --cert c.pem --key k.pem\n"
        "  sessionbus node --node-id b --listen 0.0.0.0:443 --cert c.pem --key k.pem \\\n"
        "      --upstream 127.0.0.1:8080 --tickets stateless --metrics 127.0.0.1:9402",
        exit_codes,
    )
    p.add_argument("--node-id", required=True, type=node_id_type,
                   help="this node's id: [a-z0-9-], unique in the farm")
    p.add_argument("--listen", required=True, type=host_port, metavar="HOST:PORT")
    p.add_argument("--cert", required=True, type=existing_file, metavar="PEM")
    p.add_argument("--key", required=True, type=existing_file, metavar="PEM")
    p.add_argument("--upstream", type=host_port, metavar="HOST:PORT",
                   help="forward decrypted traffic here")
    p.add_argument("--session-timeout", type=int, default=7200, metavar="SECONDS",
                   help="session lifetime, equal on every node (default %(default)s)")
    p.add_argument("--tickets", choices=[m.value for m in TicketMode], default="stateful",
                   help="stateful: TLS 1.3 resumes through the farm cache (default); "
                   "stateless: tickets under the farm's key ring (needs `sessionbus keys`); "
                   "off: no tickets (TLS 1.2 session ids only)")
    p.add_argument("--service", default="sessionbus",
                   help="session id context, the same on every node of one service and "
                   "different between services (at most 32 bytes; default %(default)s)")
    p.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                   help="at most one message of new (and one of removed) sessions per this "
                   "long: under load they wait for the next one and share it, after a quiet "
                   "spell they go at once. 0 (default): at once, for the least replication "
                   "delay; 0.01 measured ~20%% more full handshakes/s at ~4 ms more delay")
    p.add_argument("--no-replication", action="store_true",
                   help="do not publish or replicate sessions (a lone node; for comparison)")
    add_common(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    common = common_from_args(args)
    if args.session_timeout <= 0:
        raise ConfigError("--session-timeout must be positive")
    if len(args.service.encode()) > 32:
        raise ConfigError("--service must be at most 32 bytes")
    if not 0 <= args.linger <= 1:
        raise ConfigError("--linger must be 0..1 seconds")
    settings = NodeSettings(
        node_id=args.node_id, host=args.listen[0], port=args.listen[1], cert=args.cert,
        key=args.key, upstream=args.upstream, session_timeout=args.session_timeout,
        tickets=TicketMode(args.tickets), service=args.service,
        replication=not args.no_replication,
        outbox=OutboxSettings(min_interval=args.linger),
    )
    if args.check:
        return check(common, settings)
    # Listeners first, before the certificate, the bus or any task: a taken port is one line
    # and exit 3 at once (a node that cannot listen must not look alive).
    sock = bind_tcp(args.listen[0], args.listen[1], "--listen")
    metrics = role_metrics("node")
    start_metrics(common.metrics, metrics)
    keys = common.keys()

    async def serve(stop: asyncio.Event) -> int:
        try:
            node = Node(settings, common.broker, keys, common.topology, metrics=metrics)
            metrics.ready = node.readiness
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load certificate/key: {exc.strerror or exc}") from None
        except BindingError as exc:
            raise ConfigError(str(exc)) from None
        await node.start(sock)
        print(f"node {settings.node_id} listening on {node.address[0]}:{node.address[1]}",
              flush=True)
        code = await until_stopped(stop, node.supervisor)
        await node.stop()
        return code

    return run(serve)


def check(common: Common, settings: NodeSettings) -> int:
    def certificate() -> str:
        try:
            make_context(settings)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load certificate/key: {exc.strerror or exc}") from None
        return f"{settings.cert} and {settings.key} load"

    needs: Needs | None = None
    if settings.replication or settings.tickets is TicketMode.STATELESS:
        needs = core_needs(common.topology)
        if settings.replication:
            needs.read_streams.append(common.topology.session_stream)
        if settings.tickets is TicketMode.STATELESS:
            needs.queues.append(common.topology.key_stream)
            needs.read_streams.append(common.topology.key_stream)
    return run_check("node", common, [
        ("certificate", certificate),
        ("--listen", free_address("--listen", (settings.host, settings.port))),
    ], needs)
