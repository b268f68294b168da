"""``sessionbus keyfile``: keep nginx, HAProxy, Traffic Server, Envoy or httpd on the key ring."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from sessionbus.bus.connection import connect
from sessionbus.cli.commands._common import role_metrics, start_metrics, subparser, until_stopped
from sessionbus.cli.config import ConfigError, add_common, common_from_args, env
from sessionbus.cli.runtime import run
from sessionbus.servers.keyfile.atomic_files import UnsafeDirectoryError, check_private_dir
from sessionbus.servers.keyfile.formats import (
    ATS_FILE,
    HAPROXY_FILE,
    HTTPD_FILE,
    MIN_SLOTS,
    KeyFileFormat,
    slot_file_name,
)
from sessionbus.servers.keyfile.runner import KeyfileRunner, KeyfileSettings

log = logging.getLogger("sessionbus.keyfile")

DEFAULT_SLOTS = 4

DESCRIPTION = """\
Follow the farm's ticket key ring and keep a TLS server's session-ticket key files on it: the
current ring at once on start, then every change, and every moment of the ring's timeline (a key
starts encrypting, a key is erased) even when the key publisher is silent. Each change is
written atomically (temporary file, fsync, rename; mode 0600) into --out, a directory no other
user may read (the command refuses to start otherwise), then --on-change runs once (no shell:
give `sh -c '...'` for one; bounded by --on-change-timeout; its environment has
SESSIONBUS_KEYFILE_DIR and SESSIONBUS_KEYFILE_FORMAT, and no other SESSIONBUS_* variable). A
failing command is logged (exit status and the first line of its stderr) and counted
(sessionbus_keyfile_command_failures_total), and retried at the next change or after a backoff.
Key material never reaches logs, argv or metrics.

files in --out, by --format:
  nginx    ticket.0.key .. ticket.<N-1>.key (80 bytes each; N = --slots, default 4): slot 0
           encrypts, then the key announced ahead, then decrypt-only keys, newest first; unused
           slots hold keys nobody encrypts with. One `ssl_session_ticket_key` line per slot.
  haproxy  tls-ticket-keys: three base64 lines (HAProxy keeps three keys: the next-to-last
           encrypts, the last is announced ahead). `tls-ticket-keys` on the bind line.
  ats      ssl_ticket.key: 48-byte entries, the first encrypts
           (proxy.config.ssl.server.ticket_key.filename; reload with `traffic_ctl config reload`).
  envoy    ticket.0.key .. ticket.<N-1>.key (80 bytes, the first encrypts), for
           session_ticket_keys data sources. Files are replaced one by one: have Envoy reread
           the set through --on-change rather than by watching the directory.
  httpd    ticket.key: SSLSessionTicketKeyFile's single 48-byte key, the encrypting one only.
           After each rotation tickets minted under the previous key no longer decrypt: those
           clients fall back to a full handshake. httpd rereads it on a graceful restart.

safe rotation: a key is announced (decrypt-only) before any server encrypts with it, so a ticket
minted anywhere decrypts everywhere, provided every server has reloaded in time:
  reload time + propagation (broker delivery, clock skew) < the key publisher's --announce-ahead
"""

EXAMPLES = """\
  sessionbus keyfile --format nginx --out /var/lib/sessionbus/keyfiles/nginx \\
      --on-change "nginx -s reload"
  sessionbus keyfile --format haproxy --out /var/lib/sessionbus/keyfiles/haproxy \\
      --on-change "systemctl reload haproxy.service"
  sessionbus keyfile --format haproxy --out /var/lib/sessionbus/keyfiles/haproxy \\
      --haproxy-socket /run/haproxy/admin.sock --on-change "systemctl reload haproxy.service"
  sessionbus keyfile --format ats --out /etc/trafficserver/sessionbus \\
      --on-change "traffic_ctl config reload"
  sessionbus keyfile --format envoy --slots 3 --out /etc/envoy/ticket-keys \\
      --on-change "systemctl reload envoy.service"
  sessionbus keyfile --format httpd --out /var/lib/sessionbus/keyfiles/httpd \\
      --on-change "apachectl graceful"     # tickets of the previous key: full handshake"""


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "keyfile", "write the farm's ticket keys for nginx, HAProxy, ATS, Envoy, httpd",
        DESCRIPTION, EXAMPLES, exit_codes,
    )
    p.add_argument("--format", required=True, choices=[f.value for f in KeyFileFormat],
                   help="the server whose key file format to write")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory of the key file(s); must exist, no access for others")
    p.add_argument("--on-change", metavar="CMD", default=env("SESSIONBUS_KEYFILE_ON_CHANGE"),
                   help="run after each change, e.g. \"nginx -s reload\" (split like a shell "
                   "would, but no shell runs it; env SESSIONBUS_KEYFILE_ON_CHANGE)")
    p.add_argument("--on-change-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="kill --on-change after this long (default %(default)s)")
    p.add_argument("--slots", type=int, metavar="N",
                   help=f"nginx/envoy: number of key files (default {DEFAULT_SLOTS}, at least "
                   f"{MIN_SLOTS}; never change it without changing the server's config)")
    p.add_argument("--haproxy-socket", metavar="PATH",
                   help="haproxy: HAProxy's stats socket (level admin): a rotation is pushed "
                   "with `set ssl tls-key` instead of a reload; changes that are not a "
                   "rotation (a key announced while none was) still use --on-change")
    p.add_argument("--haproxy-ref", metavar="FILE",
                   help="haproxy: the tls-ticket-keys file as HAProxy's config names it "
                   "(default: the one HAProxy lists whose real path is ours)")
    add_common(p)
    p.set_defaults(func=main)


def _files(fmt: KeyFileFormat, slots: int) -> list[str]:
    if fmt in (KeyFileFormat.NGINX, KeyFileFormat.ENVOY):
        return [slot_file_name(i) for i in range(slots)]
    return [{KeyFileFormat.HAPROXY: HAPROXY_FILE, KeyFileFormat.ATS: ATS_FILE}.get(
        fmt, HTTPD_FILE)]


def settings_from_args(args: argparse.Namespace) -> KeyfileSettings:
    fmt = KeyFileFormat(args.format)
    if args.slots is not None and fmt not in (KeyFileFormat.NGINX, KeyFileFormat.ENVOY):
        raise ConfigError("--slots applies to --format nginx and envoy only")
    slots = DEFAULT_SLOTS if args.slots is None else args.slots
    if slots < MIN_SLOTS:
        raise ConfigError(f"--slots must be at least {MIN_SLOTS} (the current and the next key)")
    if (args.haproxy_socket or args.haproxy_ref) and fmt is not KeyFileFormat.HAPROXY:
        raise ConfigError("--haproxy-socket and --haproxy-ref apply to --format haproxy only")
    if args.haproxy_socket and not args.on_change:
        raise ConfigError("--haproxy-socket needs --on-change too: a key announced while none "
                          "was cannot go through the runtime API, only a reload can load it")
    if args.on_change_timeout <= 0:
        raise ConfigError("--on-change-timeout must be positive")
    out = Path(args.out)
    try:
        check_private_dir(out)
    except UnsafeDirectoryError as exc:
        raise ConfigError(str(exc)) from None
    argv: tuple[str, ...] = ()
    if args.on_change is not None:
        try:
            argv = tuple(shlex.split(args.on_change))
        except ValueError as exc:
            raise ConfigError(f"--on-change: {exc}") from None
        if not argv:
            raise ConfigError("--on-change is empty")
        if shutil.which(argv[0]) is None:
            raise ConfigError(f"--on-change: {argv[0]}: command not found")
    return KeyfileSettings(
        fmt=fmt, out=out, on_change=argv, slots=slots,
        command_timeout=args.on_change_timeout,
        haproxy_socket=Path(args.haproxy_socket) if args.haproxy_socket else None,
        haproxy_ref=args.haproxy_ref,
    )


def notify_ready() -> None:
    """systemd ``Type=notify``: the files exist, a server ordered after this unit may start."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(b"READY=1")
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc.strerror or type(exc).__name__)


def main(args: argparse.Namespace) -> int:
    common = common_from_args(args)
    settings = settings_from_args(args)
    keys = common.keys()
    if not keys.verifies_rings:  # every ring would be refused
        raise ConfigError("no ring public key: pass --ring-public-key-file or set "
                          "SESSIONBUS_RING_PUBLIC_KEY_FILE")
    files = _files(settings.fmt, settings.slots)

    notified = False

    def notify_once() -> None:
        nonlocal notified
        if not notified:
            notified = True
            notify_ready()

    def ready() -> None:
        print(f"keyfile: {len(files)} {settings.fmt.value} key file(s) ready in {settings.out}",
              flush=True)
        notify_once()

    async def serve(stop: asyncio.Event) -> int:
        metrics = role_metrics("keyfile")
        start_metrics(common.metrics, metrics)
        if all((settings.out / name).is_file() for name in files):
            # Files from a previous run: the server may start with them now (the ring, once
            # it arrives, replaces what changed); only a first run makes it wait for the ring.
            notify_once()
        try:
            conn = await connect(common.broker, on_state=metrics.bus.broker_state)
        except ConnectionError as exc:
            print(f"sessionbus keyfile: {exc}", file=sys.stderr)
            return 4
        # The key stream is provisioned by the admin step; the follower waits for it.
        runner = KeyfileRunner(conn, common.topology, keys, settings, on_ready=ready,
                               metrics=metrics)
        try:
            await runner.start()
        except UnsafeDirectoryError as exc:
            await conn.close()
            raise ConfigError(str(exc)) from None
        print(f"keyfile following ticket keys ({settings.fmt.value} into {settings.out})",
              flush=True)
        code = await until_stopped(stop, runner.supervisor)
        await runner.stop()
        await conn.close()
        return code

    return run(serve)
