"""Common options of every subcommand (flags, with environment variables as defaults)."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sessionbus.bus.connection import (
    DEFAULT_URL,
    BrokerSettings,
    BrokerUrlError,
    quiet_library_logs,
    split_urls,
)
from sessionbus.bus.topology import Topology
from sessionbus.cli.safety import (
    UnsafeSetting,
    check_any_origin_users,
    refuse_plaintext_remote,
)
from sessionbus.schemas.events import valid_node_id
from sessionbus.schemas.sealing import BusKeyError, BusKeys, load_bus_keys


class ConfigError(Exception):
    """A setting or file that cannot be used: one line, exit code 3."""


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def add_common(p: argparse.ArgumentParser, *, bus_key: bool = True, check: bool = True) -> None:
    g = p.add_argument_group("common options")
    if check:
        g.add_argument(
            "--check", action="store_true",
            help="check settings, files, listening addresses, the broker and this role's "
            "permissions, one line each, then exit (0 ok, 3 a setting or file, 4 the broker)",
        )
    url = env("SESSIONBUS_AMQP_URL", DEFAULT_URL) or DEFAULT_URL
    # --help never prints a password (of any URL in a comma list)
    shown = BrokerSettings(url=url).redacted_url().replace("%", "%%")
    g.add_argument(
        "--amqp-url", action="append", metavar="URL",
        help="broker URL, amqps:// (or amqp:// on loopback); for a cluster repeat it or give a "
        "comma list, one URL per node: each process picks one (shuffled) and fails over to the "
        f"next (env SESSIONBUS_AMQP_URL; default {shown}). Prefer the env var or a URL without "
        "password on shared hosts: argv is visible to all",
    )
    g.add_argument("--amqp-plaintext", action="store_true",
                   default=env("SESSIONBUS_AMQP_PLAINTEXT", "") == "1",
                   help="allow amqp:// (no TLS) to a non-loopback broker: the network is "
                   "trusted (env SESSIONBUS_AMQP_PLAINTEXT=1)")
    g.add_argument("--amqp-ca", default=env("SESSIONBUS_AMQP_CA"), metavar="PEM",
                   help="amqps: CA file of the broker's certificate (env SESSIONBUS_AMQP_CA)")
    g.add_argument("--amqp-cert", default=env("SESSIONBUS_AMQP_CERT"), metavar="PEM",
                   help="amqps: client certificate (env SESSIONBUS_AMQP_CERT)")
    g.add_argument("--amqp-key", default=env("SESSIONBUS_AMQP_KEY"), metavar="PEM",
                   help="amqps: client key (env SESSIONBUS_AMQP_KEY)")
    g.add_argument("--amqp-insecure", action="store_true",
                   help="amqps: do not verify the broker's certificate (tests only)")
    if bus_key:
        g.add_argument(
            "--bus-key-file", default=env("SESSIONBUS_BUS_KEY_FILE"), metavar="FILE",
            help="bus key file, mode 0600 (env SESSIONBUS_BUS_KEY_FILE; make one with "
            "`sessionbus bus-key new FILE`; a keyfile host or key publisher holds the "
            "ring-only file of `sessionbus bus-key ring-file`)",
        )
        g.add_argument(
            "--ring-public-key-file", default=env("SESSIONBUS_RING_PUBLIC_KEY_FILE"),
            metavar="FILE", help="public key(s) ticket-key rings must be signed with (env "
            "SESSIONBUS_RING_PUBLIC_KEY_FILE; `sessionbus bus-key signing-key`)",
        )
        g.add_argument(
            "--any-origin-user", action="append", metavar="USER",
            default=[u for u in (env("SESSIONBUS_ANY_ORIGIN_USERS", "") or "").split(",") if u],
            help="dev/test only, loopback brokers only: a broker user whose messages may carry "
            "any origin (e.g. guest for `sessionbus up`; env SESSIONBUS_ANY_ORIGIN_USERS, "
            "comma-separated). Otherwise a message is taken only if its user is its origin",
        )
    g.add_argument("--prefix", default=env("SESSIONBUS_PREFIX", "sessionbus"),
                   help="name prefix of exchanges and queues (env SESSIONBUS_PREFIX; "
                   "default %(default)s)")
    g.add_argument("--metrics", metavar="HOST:PORT", default=env("SESSIONBUS_METRICS"),
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    g.add_argument("--log-level", default=env("SESSIONBUS_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])


@dataclass(frozen=True, slots=True)
class Common:
    broker: BrokerSettings
    topology: Topology
    metrics: str | None
    bus_key_file: str | None
    ring_public_key_file: str | None = None
    any_origin_users: frozenset[str] = frozenset()
    ring_signing_key_file: str | None = None

    def keys(self) -> BusKeys:
        if not self.bus_key_file:
            raise ConfigError("no bus key: pass --bus-key-file or set SESSIONBUS_BUS_KEY_FILE")
        try:
            return load_bus_keys(
                self.bus_key_file, public_key_file=self.ring_public_key_file,
                signing_key_file=self.ring_signing_key_file,
                any_origin_users=self.any_origin_users,
            )
        except BusKeyError as exc:
            raise ConfigError(str(exc)) from None


def common_from_args(args: argparse.Namespace) -> Common:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_library_logs(debug=str(args.log_level) == "debug")
    for f in ("amqp_ca", "amqp_cert", "amqp_key"):
        v = getattr(args, f)
        if v and not Path(v).is_file():
            raise ConfigError(f"--{f.replace('_', '-')}: {v} does not exist")
    if args.metrics:
        try:
            host_port(str(args.metrics))
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--metrics: {exc}") from None
    urls = broker_urls(args.amqp_url)
    try:
        any_origin: frozenset[str] = frozenset()
        for one in urls.split(","):  # each broker node's URL is held to the same rules
            refuse_plaintext_remote(one, plaintext_ok=bool(args.amqp_plaintext))
            any_origin = check_any_origin_users(one,
                                                getattr(args, "any_origin_user", None) or ())
    except UnsafeSetting as exc:
        raise ConfigError(str(exc)) from None
    return Common(
        broker=BrokerSettings(
            url=urls, ca_file=args.amqp_ca, cert_file=args.amqp_cert,
            key_file=args.amqp_key, verify=not args.amqp_insecure,
        ),
        topology=Topology(prefix=args.prefix),
        metrics=args.metrics,
        bus_key_file=getattr(args, "bus_key_file", None),
        ring_public_key_file=getattr(args, "ring_public_key_file", None),
        any_origin_users=any_origin,
        ring_signing_key_file=getattr(args, "ring_signing_key_file", None),
    )


def broker_urls(given: list[str] | None) -> str:
    """The validated broker URLs (comma-joined) from --amqp-url values or the environment."""
    value: list[str] = given or [env("SESSIONBUS_AMQP_URL") or DEFAULT_URL]
    try:
        return ",".join(split_urls(value))
    except BrokerUrlError as exc:
        raise ConfigError(f"--amqp-url: {exc}") from None


def host_port(value: str) -> tuple[str, int]:
    """argparse type for HOST:PORT."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def node_id(value: str) -> str:
    if not valid_node_id(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a node id (lowercase letters, digits and '-', at most 63)"
        )
    return value


def existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    return value
