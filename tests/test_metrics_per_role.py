"""Each role's /metrics holds the families of its own role, and ``sessionbus_build_info``, and
nothing else of sessionbus's; ``promtool check metrics`` finds nothing to fault in any of them.

Real processes on the real broker, each scraped over HTTP once it is up.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sessionbus.metrics import (
    BusMetrics,
    CacheMetrics,
    ConsumerMetrics,
    DeliveryMetrics,
    FarmStatsMetrics,
    KeyfileMetrics,
    KeyRingMetrics,
    NodeMetrics,
    OutboxMetrics,
    PublisherMetrics,
    ReplicaMetrics,
    TaskMetrics,
    catalogue,
)
from tests.farm_support import Processes, bus_env, free_port

pytestmark = [pytest.mark.broker, pytest.mark.deadline(180)]

# The replica's gauges come from a collector on the replica itself (not a group's families).
REPLICA_VIEW = {"sessionbus_replica_sessions", "sessionbus_replica_bytes",
                "sessionbus_replica_tombstones", "sessionbus_replica_evictions",
                "sessionbus_replica_expirations"}
BUILD = {"sessionbus_build"}


def families(*groups: type) -> set[str]:
    registry = CollectorRegistry()
    for group in groups:
        group(registry)
    names = {f.name for f in registry.collect()}
    return names | (REPLICA_VIEW if ReplicaMetrics in groups else set()) | BUILD


ROLES: dict[str, set[str]] = {
    "node": families(TaskMetrics, BusMetrics, DeliveryMetrics, ReplicaMetrics, OutboxMetrics,
                     NodeMetrics),
    "node-stateless": families(TaskMetrics, BusMetrics, DeliveryMetrics, ReplicaMetrics,
                               OutboxMetrics, NodeMetrics, KeyRingMetrics),
    "cache": families(TaskMetrics, BusMetrics, DeliveryMetrics, ReplicaMetrics, OutboxMetrics,
                      CacheMetrics),
    "keys": families(TaskMetrics, BusMetrics, DeliveryMetrics, KeyRingMetrics,
                     PublisherMetrics),
    "keyfile": families(TaskMetrics, BusMetrics, DeliveryMetrics, KeyRingMetrics,
                        KeyfileMetrics),
    "worker": families(TaskMetrics, BusMetrics, DeliveryMetrics, ConsumerMetrics,
                       FarmStatsMetrics),
}


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory,
         tls_cert: tuple[Path, Path]) -> Iterator[dict[str, str]]:
    """One process of each role on one bus; role -> its /metrics page."""
    d = tmp_path_factory.mktemp("roles")
    cert, key = tls_cert
    out = d / "keyfiles"
    out.mkdir(mode=0o700)
    procs = Processes()
    pages: dict[str, str] = {}
    with bus_env(d) as env:
        try:
            ports = {role: free_port() for role in ROLES}
            args = {
                "keys": ["keys", "--rotate-every", "60", "--announce-ahead", "5"],
                "node": ["node", "--node-id", "m-node", "--listen", f"127.0.0.1:{free_port()}",
                         "--cert", str(cert), "--key", str(key)],
                "node-stateless": ["node", "--node-id", "m-node-s", "--listen",
                                   f"127.0.0.1:{free_port()}", "--cert", str(cert), "--key",
                                   str(key), "--tickets", "stateless"],
                "cache": ["cache", "--node-id", "m-cache", "--memcache",
                          f"127.0.0.1:{free_port()}"],
                "keyfile": ["keyfile", "--format", "nginx", "--out", str(out)],
                "worker": ["worker"],
            }
            started = {}
            for role in ("keys", *[r for r in ROLES if r != "keys"]):
                started[role] = procs.start(
                    [*args[role], "--metrics", f"127.0.0.1:{ports[role]}"], env)
            for role, proc in started.items():
                proc.wait_for("listening" if role in ("node", "node-stateless", "cache")
                              else "started" if role == "keys"
                              else "ready" if role == "keyfile" else "running", timeout=60)
            time.sleep(1.0)  # one more beat: the bus side of each is up
            for role, port in ports.items():
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    pages[role] = r.read().decode()
            yield pages
        finally:
            procs.stop_all()


def exported(page: str) -> set[str]:
    """The sessionbus family names a page declares (its # TYPE lines), counters without
    _total, as prometheus_client names families."""
    names = set()
    for m in re.finditer(r"^# TYPE (sessionbus_\w+) (\w+)$", page, re.MULTILINE):
        name, kind = m.groups()
        if kind == "counter" and name.endswith("_total"):
            name = name[: -len("_total")]
        if name.endswith("_info"):  # an Info family (build, broker): the text says gauge
            name = name[: -len("_info")]
        names.add(name)
    return names


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_exports_only_its_own_families(farm: dict[str, str], role: str) -> None:
    got = exported(farm[role])
    assert got == ROLES[role], (
        f"{role}: not its own: {sorted(got - ROLES[role])}; missing: {sorted(ROLES[role] - got)}"
    )
    info = re.search(r'^sessionbus_build_info\{(.*)\} 1\.0$', farm[role], re.MULTILINE)
    assert info is not None
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
    assert set(labels) == {"version", "python", "openssl", "role"}
    assert labels["role"] == role.split("-")[0]
    # every family a role exports is one sessionbus documents (the catalogue)
    assert got <= {f.name for f in catalogue().collect()} | REPLICA_VIEW


@pytest.mark.parametrize("role", sorted(ROLES))
def test_promtool_finds_nothing_to_fault(farm: dict[str, str], role: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus) is not installed")
    out = subprocess.run([promtool, "check", "metrics"], input=farm[role], text=True,
                         capture_output=True, timeout=30)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
        f"{role}: {out.stdout}{out.stderr}")


def test_no_key_held_is_nan_not_zero(farm: dict[str, str]) -> None:
    """A stateful node holds no ring (no family at all); a keyfile host that has a ring shows
    its age; the gauge is never a 0 that means 'nothing'."""
    assert "sessionbus_ticket_key_newest_age_seconds" not in farm["node"]
    ages = re.findall(r"^sessionbus_ticket_key_newest_age_seconds (\S+)$", farm["keyfile"],
                      re.MULTILINE)
    assert len(ages) == 1 and (ages[0] == "NaN" or float(ages[0]) > 0.0)
