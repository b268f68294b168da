"""``sessionbus cache``: a memcached/Redis session store for servers you already run."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import pwd
from dataclasses import replace
from typing import Any

from sessionbus.cli.check import core_needs, free_address, run_check
from sessionbus.cli.commands._common import role_metrics, subparser, until_stopped
from sessionbus.cli.config import ConfigError, add_common, common_from_args, host_port
from sessionbus.cli.config import node_id as node_id_type
from sessionbus.cli.runtime import run, start_metrics
from sessionbus.servers.cache.access import (
    OPAQUE_SERVICE,
    AccessPolicy,
    listens_on_loopback,
    service_context,
)
from sessionbus.servers.cache.connection import FrontLimits
from sessionbus.servers.cache.front import (
    CACHE_OUTBOX,
    DEFAULT_MIN_INTERVAL,
    CacheFront,
    CacheSettings,
)

log = logging.getLogger("sessionbus.cache")
_DEFAULTS = FrontLimits()


def register(sub: Any, exit_codes: str) -> None:
    p = subparser(
        sub, "cache", "a memcached/Redis session store that joins the farm",
        "A local session store that speaks the memcached text protocol and/or Redis (RESP2),\n"
        "so Apache httpd (SSLSessionCache memcache:HOST:PORT or redis:HOST:PORT), and anything\n"
        "else that keeps TLS sessions in memcached or Redis, joins the farm: sessions stored\n"
        "here resume on every server of the farm. Answers come from memory at once, whether\n"
        "the broker is up or not. Keys mod_ssl-sess:<hex id> are TLS sessions (the value must\n"
        "be the session's DER); other keys are stored and replicated as opaque values (written\n"
        "once, deleted farm-wide). Run one beside each server; see ops/httpd/.",
        "  sessionbus cache --node-id web-1 --memcache 127.0.0.1:11311\n"
        "  sessionbus cache --node-id web-2 --redis 127.0.0.1:6380 --metrics 127.0.0.1:9410\n"
        "  sessionbus cache --node-id web-3 --memcache 127.0.0.1:11311 --redis 127.0.0.1:6380 \\\n"
        "      --session-timeout 300",
        exit_codes,
    )
    p.add_argument("--node-id", required=True, type=node_id_type,
                   help="this cache's id: [a-z0-9-], unique in the farm")
    p.add_argument("--memcache", type=host_port, metavar="HOST:PORT",
                   help="serve the memcached text protocol here")
    p.add_argument("--redis", type=host_port, metavar="HOST:PORT",
                   help="serve the Redis protocol (RESP2) here")
    p.add_argument("--session-timeout", type=int, default=7200, metavar="SECONDS",
                   help="session lifetime: at least the servers' own (httpd's "
                   "SSLSessionCacheTimeout); caps every entry's expiry and is how far back a "
                   "starting cache replays the farm's sessions (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=_DEFAULTS.max_connections,
                   metavar="N", help="client connections at most (default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=_DEFAULTS.idle_timeout,
                   metavar="SECONDS",
                   help="close a client connection silent this long; keep it above httpd's "
                   "connection-pool TTL (15 s) (default %(default)s)")
    p.add_argument("--linger", type=float, default=DEFAULT_MIN_INTERVAL, metavar="SECONDS",
                   help="at most one message of new (and one of removed) sessions per this "
                   "long: under load they wait for the next one and share it, after a quiet "
                   "spell they go at once; longer costs less CPU per session, shorter "
                   "replicates sooner (default %(default)s; lookups, statistics only, wait up "
                   "to 0.25 s)")
    p.add_argument("--push", type=host_port, metavar="HOST:PORT",
                   help="push subscriptions (Traffic Server's sessionbus plugin): the "
                   "replica's sessions replayed on subscribe, then peers' NEW and REMOVE")
    p.add_argument("--service", action="append", metavar="CONTEXT", default=[],
                   help="store and serve only sessions of this session id context (repeatable): "
                   "httpd's is the MD5 hex of its ServerName:port (printf "
                   "'www.example.com:443' | md5sum), a sessionbus node's its service name; "
                   f"{OPAQUE_SERVICE} for the opaque (non-TLS-session) keys. A set, get or "
                   "delete of another context is refused and counted "
                   "(sessionbus_cache_refused_total). Default: every context")
    p.add_argument("--allow-uid", action="append", metavar="USER", default=[],
                   help="serve only loopback clients whose socket belongs to this user (name "
                   "or uid; repeatable), e.g. httpd's www-data: the owner is read from "
                   "/proc/net/tcp as identd does. Default: any local user")
    p.add_argument("--allow-remote", action="store_true",
                   help="listen on and serve non-loopback addresses too (the protocols have "
                   "no authentication: only behind a firewall that admits this host's web "
                   "servers alone)")
    p.add_argument("--sync-sets", action="store_true",
                   help="validate and store a TLS session's set before answering it (a bad "
                   "value gets an error reply) instead of answering STORED at once and "
                   "counting and dropping a bad value after")
    p.add_argument("--no-replication", action="store_true",
                   help="a local store only: no broker, no peers (for comparison)")
    p.add_argument("--h2o-tickets", action="store_true",
                   help="follow the farm's ticket-key ring (run `sessionbus keys`) and serve "
                   "it read-only to h2o's `ticket-store: memcached` as h2o:ssl-session-key "
                   "(the keys are secrets: only h2o may reach this listener)")
    add_common(p)
    p.set_defaults(func=main)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(args: argparse.Namespace) -> int:
    common = common_from_args(args)
    if args.memcache is None and args.redis is None:
        raise ConfigError("give --memcache HOST:PORT, --redis HOST:PORT, or both")
    if args.session_timeout <= 0:
        raise ConfigError("--session-timeout must be positive")
    if args.max_connections < 1:
        raise ConfigError("--max-connections must be at least 1")
    if args.idle_timeout <= 0:
        raise ConfigError("--idle-timeout must be positive")
    if args.push is not None and not _loopback(args.push[0]):
        raise ConfigError("--push serves the replica's sessions to whoever connects: give a "
                          "loopback address (127.0.0.1:PORT), for the ATS plugin on this host")
    if not 0 <= args.linger <= 1:
        raise ConfigError("--linger must be 0..1 seconds")
    for name, addr in (("--memcache", args.memcache), ("--redis", args.redis)):
        if addr is not None and not args.allow_remote and not listens_on_loopback(addr[0]):
            raise ConfigError(
                f"{name} {addr[0]}:{addr[1]} is not a loopback address: the memcached and Redis "
                "protocols have no authentication (give --allow-remote if that is meant)")
    settings = CacheSettings(
        node_id=args.node_id, memcache=args.memcache, redis=args.redis,
        session_timeout=args.session_timeout, replication=not args.no_replication,
        limits=FrontLimits(max_connections=args.max_connections,
                           idle_timeout=args.idle_timeout),
        outbox=replace(CACHE_OUTBOX, min_interval=args.linger), push=args.push,
        h2o_tickets=args.h2o_tickets,
        access=AccessPolicy(
            allow_remote=args.allow_remote,
            uids=frozenset(_uid(u) for u in args.allow_uid) if args.allow_uid else None,
            services=_services(args.service),
        ),
        defer_sets=not args.sync_sets,
    )
    if args.check:
        needs = None
        if settings.replication:
            needs = core_needs(common.topology)
            needs.read_streams.append(common.topology.session_stream)
        return run_check("cache", common, [
            ("--memcache", free_address("--memcache", args.memcache)),
            ("--redis", free_address("--redis", args.redis)),
        ], needs)
    metrics = role_metrics("cache")
    start_metrics(common.metrics, metrics)  # listeners before anything else
    keys = common.keys()

    async def serve(stop: asyncio.Event) -> int:
        front = CacheFront(settings, common.broker, keys, common.topology, metrics=metrics)
        metrics.ready = front.bus.readiness
        try:
            await front.start()
        except OSError as exc:
            where = ", ".join(f"--{name} {a[0]}:{a[1]}" for name, a in
                              (("memcache", args.memcache), ("redis", args.redis)) if a)
            raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        where = ", ".join(
            f"{name} on {front.address(name)[0]}:{front.address(name)[1]}"
            for name in front.protocols
        )
        print(f"cache {settings.node_id} listening: {where}", flush=True)
        code = await until_stopped(stop, front.supervisor)
        await front.stop()
        return code

    return run(serve)


def _uid(user: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ConfigError(f"--allow-uid {user}: no such user") from None


def _services(names: list[str]) -> frozenset[bytes] | None:
    if not names:
        return None
    try:
        return frozenset(service_context(n) for n in names)
    except ValueError as exc:
        raise ConfigError(f"--service: {exc}") from None
