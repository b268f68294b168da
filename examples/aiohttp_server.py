"""An aiohttp server whose TLS sessions are the farm's: ``farm.attach(ctx)`` and ``cleanup_ctx``.

    SESSIONBUS_BUS_KEY_FILE=bus.key SESSIONBUS_AMQP_URL=amqps://... \\
        python -m examples.aiohttp_server --node-id web-1 --port 8443 --cert c.pem --key k.pem
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys

from aiohttp import web

import sessionbus


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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    try:
        farm = sessionbus.Farm.from_env(node_id=args.node_id, tickets=args.tickets)
        farm.attach(ctx)  # before the first handshake; AttachError if this ssl can't be used
    except (sessionbus.FarmError, sessionbus.AttachError) as exc:
        print(f"aiohttp_server: {exc}", file=sys.stderr)
        return 3

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text=f"node {farm.node_id}\n")

    app = web.Application()
    app.router.add_get("/", hello)
    app.cleanup_ctx.append(farm.cleanup_ctx)  # the farm runs while the app does
    loop = None
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, ssl_context=ctx, loop=loop,
                print=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
