"""The broker definitions of topology v2 (users, permissions, policies, provisioned objects) and
the permission recipes the docs show, both generated from one table of roles.

``python -m sessionbus.bus.definitions --write`` rewrites ``ops/rabbitmq/definitions.json`` and
the generated sections of ``ops/rabbitmq/README.md`` and ``docs/operations.md``; ``--check``
exits 1 when any of them differs from what this module generates (a test runs it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sessionbus.bus.topology import Topology, provisioned

# Every user of the file has this password until an operator changes it (README says how).
PLACEHOLDER_PASSWORD = "CHANGE-ME-sessionbus"
VHOST = "sessionbus"
RABBITMQ_VERSION = "3.10.8"
DEAD_KEY = r"^dead\.[a-z_]+\.{username}$"  # each user dead-letters under its own name only


@dataclass(frozen=True, slots=True)
class Role:
    """One kind of user. Regexes use ``{P}`` for the escaped prefix; topic permissions are keyed
    by exchange suffix (``sessions``, ``keys``, ``dlx``) with (write, read)."""

    role: str
    users: tuple[str, ...]
    configure: str
    write: str
    read: str
    topic: dict[str, tuple[str, str]] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    does: str = ""


SESSION_WRITER = {
    "sessions": (r"^session\.(new|get|remove)\.{username}$", ""),
    "keys": ("", ""),
    "dlx": (DEAD_KEY, ""),
}

ROLES: tuple[Role, ...] = (
    Role("node", ("node-1", "node-2", "node-3"), "", r"^{P}\.(sessions|dlx)$",
         r"^{P}\.(sessions|keys)\.stream$", SESSION_WRITER,
         does="publishes its own NEW/GET/REMOVE, follows both streams, dead-letters as itself"),
    Role("cache front", ("cache-1",), "", r"^{P}\.(sessions|dlx)$",
         r"^{P}\.(sessions|keys)\.stream$", SESSION_WRITER,
         does="as a node (`sessionbus cache --node-id cache-1`)"),
    Role("revoke", ("revoke",), "", r"^{P}\.sessions$", "",
         {"sessions": (r"^session\.remove\.{username}$", ""), "keys": ("", ""),
          "dlx": ("", "")},
         does="publishes `session.remove.revoke` only"),
    Role("worker", ("sessionbus-worker",), r"^{P}\.consumer\.[a-z0-9._-]+$",
         r"^{P}\.(dlx|consumer\.[a-z0-9._-]+)$",
         r"^{P}\.(sessions|sessions\.stream|consumer\.[a-z0-9._-]+)$",
         {"sessions": ("", r"^session\.(new|get|remove|\*)\.[a-z0-9*-]+$"), "keys": ("", ""),
          "dlx": (DEAD_KEY, "")},
         does="declares and binds its own `consumer.<name>` queues, reads the session stream"),
    Role("keyfile", ("sessionbus-keyfile",), "", r"^{P}\.dlx$", r"^{P}\.keys\.stream$",
         {"sessions": ("", ""), "keys": ("", ""), "dlx": (DEAD_KEY, "")},
         does="follows the key stream only (`sessionbus keyfile`)"),
    Role("key publisher", ("sessionbus-keys",), r"^{P}\.keys\.leader$",
         r"^{P}\.(keys|dlx)$", r"^{P}\.(keys\.stream|keys\.leader)$",
         {"sessions": ("", ""), "keys": (r"^keys\.{username}$", ""), "dlx": (DEAD_KEY, "")},
         does="takes the leader lock, publishes `keys.sessionbus-keys`"),
    Role("ops", ("sessionbus-ops",), "", "", r"^{P}\.dead$",
         {"sessions": ("", ""), "keys": ("", ""), "dlx": ("", "")},
         does="reads (and may purge) the dead letters (`sessionbus dead`)"),
    Role("monitoring", ("sessionbus-monitoring",), "", "", "", {}, ("monitoring",),
         does="logs in for health checks; the management API shows it everything"),
    Role("admin", ("sessionbus-admin",), r"^{P}\.", r"^{P}\.", r"^{P}\.",
         {}, ("policymaker",),
         does="provisions (`sessionbus setup`); not for any running role"),
)


def password_hash(user: str, password: str = PLACEHOLDER_PASSWORD) -> str:
    """RabbitMQ's salted SHA-256 (``rabbit_password_hashing_sha256``); the salt is derived
    from the name so the file regenerates identically (the password is a placeholder)."""
    salt = hashlib.sha256(f"sessionbus-salt:{user}".encode()).digest()[:4]
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _sub(regex: str, prefix: str) -> str:
    return regex.replace("{P}", prefix.replace(".", "\\."))


def _policies(topo: Topology) -> list[dict[str, Any]]:
    p = topo.prefix.replace(".", "\\.")

    def policy(name: str, pattern: str, definition: dict[str, Any]) -> dict[str, Any]:
        return {"vhost": VHOST, "name": f"{topo.prefix}-{name}", "pattern": pattern,
                "apply-to": "queues", "priority": 10, "definition": definition}

    return [
        policy("consumer", rf"^{p}\.consumer\.", {
            "expires": 604_800_000, "max-length-bytes": 1 << 30, "overflow": "drop-head"}),
        policy("dead", rf"^{p}\.dead$", {
            "max-length": topo.dead_max_length, "max-length-bytes": 256 << 20,
            "overflow": "drop-head", "message-ttl": 604_800_000,
            "queue-leader-locator": "balanced"}),
        policy("session-stream", rf"^{p}\.sessions\.stream$", {
            "max-age": f"{topo.stream_max_age_s // 3600}h", "max-length-bytes": 4 << 30,
            "stream-max-segment-size-bytes": topo.stream_segment_bytes,
            "queue-leader-locator": "balanced"}),
        policy("key-stream", rf"^{p}\.keys\.stream$", {
            "max-age": f"{topo.key_stream_max_age_s // 3600}h", "max-length-bytes": 8 << 20,
            "stream-max-segment-size-bytes": 1 << 20, "queue-leader-locator": "balanced"}),
    ]


def definitions(topo: Topology | None = None) -> dict[str, Any]:
    """The whole ``definitions.json`` for ``topo`` (default prefix; vhost ``sessionbus``)."""
    topo = topo or Topology()
    users: list[dict[str, Any]] = []
    perms: list[dict[str, Any]] = []
    topics: list[dict[str, Any]] = []
    for role in ROLES:
        for user in role.users:
            users.append({"name": user, "password_hash": password_hash(user),
                          "hashing_algorithm": "rabbit_password_hashing_sha256",
                          "tags": list(role.tags), "limits": {}})
            perms.append({"user": user, "vhost": VHOST,
                          "configure": _sub(role.configure, topo.prefix),
                          "write": _sub(role.write, topo.prefix),
                          "read": _sub(role.read, topo.prefix)})
            for suffix, (w, r) in role.topic.items():
                topics.append({"user": user, "vhost": VHOST,
                               "exchange": f"{topo.prefix}.{suffix}", "write": w, "read": r})
    plan = provisioned(topo)
    return {
        "rabbit_version": RABBITMQ_VERSION, "rabbitmq_version": RABBITMQ_VERSION,
        "product_name": "RabbitMQ", "product_version": RABBITMQ_VERSION,
        "users": users, "vhosts": [{"name": VHOST}], "permissions": perms,
        "topic_permissions": topics, "parameters": [], "global_parameters": [],
        "policies": _policies(topo),
        "queues": [{"name": q.name, "vhost": VHOST, "durable": True, "auto_delete": False,
                    "arguments": q.arguments} for q in plan.queues],
        "exchanges": [{"name": x, "vhost": VHOST, "type": "topic", "durable": True,
                       "auto_delete": False, "internal": False, "arguments": {}}
                      for x in plan.exchanges],
        "bindings": [{"source": x, "vhost": VHOST, "destination": q,
                      "destination_type": "queue", "routing_key": k, "arguments": {}}
                     for x, q, k in plan.bindings],
    }


def _cell(regex: str) -> str:
    return f"`{regex}`".replace("|", "\\|") if regex else "(none)"


def recipes_markdown(d: dict[str, Any]) -> str:
    """The permission tables and the add-a-node recipe, from a definitions dict."""
    perms = {p["user"]: p for p in d["permissions"]}
    topics: dict[str, list[dict[str, Any]]] = {}
    for t in d["topic_permissions"]:
        topics.setdefault(t["user"], []).append(t)
    lines = [
        "<!-- generated by `python -m sessionbus.bus.definitions --write` from "
        "ops/rabbitmq/definitions.json: do not edit -->",
        "",
        "| role | users | configure | write | read | does |",
        "|---|---|---|---|---|---|",
    ]
    for role in ROLES:
        p = perms[role.users[0]]
        lines.append(f"| {role.role} | {', '.join(f'`{u}`' for u in role.users)} | "
                     f"{_cell(p['configure'])} | {_cell(p['write'])} | {_cell(p['read'])} | "
                     f"{role.does} |")
    lines += ["", "Topic permissions (write: routing keys it may publish; read: binding keys it "
              "may bind with; `{username}` is the user's own name):", "",
              "| role | exchange | write | read |", "|---|---|---|---|"]
    for role in ROLES:
        for t in topics.get(role.users[0], []):
            lines.append(f"| {role.role} | `{t['exchange']}` | {_cell(t['write'])} | "
                         f"{_cell(t['read'])} |")
    node = perms[ROLES[0].users[0]]
    lines += ["", "Add a node (its user is named exactly its node id):", "", "```sh", "ID=tls-a",
              'openssl rand -base64 24 | tee /dev/stderr | rabbitmqctl add_user "$ID"',
              f"rabbitmqctl set_permissions -p {VHOST} \"$ID\" '{node['configure']}' "
              f"'{node['write']}' '{node['read']}'"]
    for t in topics.get(ROLES[0].users[0], []):
        lines.append(f"rabbitmqctl set_topic_permissions -p {VHOST} \"$ID\" {t['exchange']} "
                     f"'{t['write']}' '{t['read']}'")
    lines += ["```"]
    return "\n".join(lines) + "\n"


BEGIN = "<!-- BEGIN permissions -->"
END = "<!-- END permissions -->"
REPO = Path(__file__).resolve().parents[2]
DEFINITIONS = REPO / "ops" / "rabbitmq" / "definitions.json"
DOCS = (REPO / "ops" / "rabbitmq" / "README.md", REPO / "docs" / "operations.md")


def render_json(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2) + "\n"


def with_section(doc: str, section: str) -> str:
    """``doc`` with the text between the BEGIN/END markers replaced by ``section``."""
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    return doc[:start] + "\n" + section + doc[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sessionbus.bus.definitions",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--write", action="store_true", help="rewrite the file and the docs")
    ap.add_argument("--check", action="store_true", help="exit 1 if any differs")
    args = ap.parse_args(argv)
    d = definitions()
    section = recipes_markdown(d)
    wanted = {DEFINITIONS: render_json(d)}
    for doc in DOCS:
        wanted[doc] = with_section(doc.read_text(), section)
    stale = [path for path, text in wanted.items() if path.read_text() != text]
    if args.write:
        for path in stale:
            path.write_text(wanted[path])
            print(f"wrote {path.relative_to(REPO)}")
        return 0
    for path in stale:
        print(f"{path.relative_to(REPO)} differs from the generated text", file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
