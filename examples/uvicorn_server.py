"""A uvicorn (ASGI) server whose TLS sessions are the farm's, through uvicorn's
``ssl_context_factory``: the context uvicorn builds from its ssl options, attached.

    SESSIONBUS_BUS_KEY_FILE=bus.key SESSIONBUS_AMQP_URL=amqps://... \\
        python -m examples.uvicorn_server --node-id api-1 --port 8443 --cert c.pem --key k.pem
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

import sessionbus

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def make_app(node_id: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    body = f"node {node_id}\n".encode()

    async def app(scope: Scope, _receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan: nothing to set up (the farm runs around the server below)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"),
                                ((b"content-length", str(len(body)).encode()))]})
        await send({"type": "http.response.body", "body": body})

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--node-id", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--tickets", default=None, help="stateful (default), stateless or off")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = p.parse_args(argv)
    try:
        farm = sessionbus.Farm.from_env(node_id=args.node_id, tickets=args.tickets)
    except sessionbus.FarmError as exc:
        print(f"uvicorn_server: {exc}", file=sys.stderr)
        return 3

    def attached(_config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return farm.attach(default())  # AttachError here, in config.load(), before serving

    config = uvicorn.Config(
        make_app(farm.node_id), host=args.host, port=args.port, ssl_certfile=args.cert,
        ssl_keyfile=args.key, ssl_context_factory=attached, loop=args.loop, lifespan="off",
        log_level="info",
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config.load()
    except sessionbus.AttachError as exc:
        print(f"uvicorn_server: {exc}", file=sys.stderr)
        return 3
    server = uvicorn.Server(config)

    async def serve() -> None:
        async with farm:
            await server.serve()

    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # handler that would kill the process before the farm publishes what waits in its outbox.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: None)

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
