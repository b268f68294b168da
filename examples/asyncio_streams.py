"""A plain ``asyncio.start_server`` TLS server whose sessions are the farm's.

It also reports what only a streams server sees: each completed handshake
(``farm.handshake_done``) and a connection that ended in a TLS error (``farm.connection_failed``:
if OpenSSL invalidated the session after a fatal alert, it resumes nowhere in the farm).

    SESSIONBUS_BUS_KEY_FILE=bus.key python -m examples.asyncio_streams --node-id s-1 \\
        --port 8443 --cert c.pem --key k.pem
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import sys

import sessionbus


async def serve(farm: sessionbus.Farm, ctx: ssl.SSLContext, host: str, port: int) -> int:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        farm.handshake_done(sslobj)
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            body = f"node {farm.node_id}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b"
                         % (len(body), body))
            await writer.drain()
        except ssl.SSLError:
            farm.connection_failed(sslobj)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    async with farm:
        server = await asyncio.start_server(handle, host, port, ssl=ctx, ssl_handshake_timeout=10)
        print(f"listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            # a failed background task (logged, counted) stops the server: exit 1, restart
            failed = await farm.supervisor.wait_stop(stop)
    return 1 if failed else 0


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
        farm.attach(ctx)
    except (sessionbus.FarmError, sessionbus.AttachError) as exc:
        print(f"asyncio_streams: {exc}", file=sys.stderr)
        return 3
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(farm, ctx, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
