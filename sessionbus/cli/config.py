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
from sessionbus.schemas.events import valid_node_id
from sessionbus.schemas.sealing import BusKeyError, BusKeys, load_bus_keys


class ConfigError(Exception):
    """A setting or file that cannot be used: one line, exit code 3."""


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def add_common(p: argparse.ArgumentParser, *, bus_key: bool = True) -> None:
    g = p.add_argument_group("common options")
    g.add_argument(
        "--amqp-url", action="append", metavar="URL",
        help="broker URL, amqp:// or amqps://; for a cluster repeat it or give a comma list, "
        "one URL per node: each process picks one (shuffled) and fails over to the next "
        f"(env SESSIONBUS_AMQP_URL; default {DEFAULT_URL}). Prefer the env var or a URL "
        "without password on shared hosts: argv is visible to all",
    )
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
            "`sessionbus bus-key new FILE`)",
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

    def keys(self) -> BusKeys:
        if not self.bus_key_file:
            raise ConfigError("no bus key: pass --bus-key-file or set SESSIONBUS_BUS_KEY_FILE")
        try:
            return load_bus_keys(self.bus_key_file)
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
    return Common(
        broker=BrokerSettings(
            url=broker_urls(args.amqp_url), ca_file=args.amqp_ca, cert_file=args.amqp_cert,
            key_file=args.amqp_key, verify=not args.amqp_insecure,
        ),
        topology=Topology(prefix=args.prefix),
        metrics=args.metrics,
        bus_key_file=getattr(args, "bus_key_file", None),
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
