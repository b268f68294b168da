"""The cache front's access control: loopback only, the service contexts it serves, the client's
uid (from /proc/net/tcp), and the nftables owner rule of ops/httpd, over real loopback sockets.

The uid tests run a client as ``nobody`` (a subprocess with setuid), so they need root; the
nftables test needs ``nft`` and a private network namespace (``unshare -n``), and is skipped
otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sessionbus.servers.cache.access import AccessPolicy, is_loopback, peer_uid, service_context
from sessionbus.servers.cache.store import OPAQUE_SID_CTX
from tests import test_cache_protocols as protocols
from tests.test_cache_protocols import (
    HTTPD_CTX,
    mc_key,
    mc_set,
    requests,
    resp,
    tls_session,
)

clients = protocols.clients  # the fixtures
front_with = protocols.front_with
OTHER_CTX = b"0123456789abcdef0123456789abcdef"
NOBODY = 65534
ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as nobody: needs root")

# What the client as nobody runs: one `version`, and what came back (or the error).
_CLIENT = """
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    s.sendall(b"version\\r\\n")
    print(repr(s.recv(200)))
except OSError as exc:
    print(type(exc).__name__)
"""


def refused(f: protocols.Front, reason: str) -> float:
    return f.front.metrics.value("sessionbus_cache_refused_total", {"reason": reason})


async def version_as(uid: int, port: int) -> str:
    """What a memcached client running as ``uid`` gets for ``version``."""
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-I", "-S", "-c", _CLIENT, str(port),
        user=uid, group=uid, extra_groups=[], cwd="/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return out.decode().strip()


# --- service contexts -----------------------------------------------------------------------------


async def test_front_refuses_a_context_it_does_not_serve(front_with: Any, clients: Any) -> None:
    f = await front_with(access=AccessPolicy(services=frozenset({HTTPD_CTX})))
    c = await clients(f.mc_port)
    r = await clients(f.redis_port)
    mine, theirs = tls_session(ctx=HTTPD_CTX), tls_session(ctx=OTHER_CTX)
    before, refused_set = refused(f, "service"), requests(f, "set", "refused")
    assert await c.ask(mc_set(mc_key(mine), mine)) == b"STORED\r\n"
    # answered at once (a deferred set), then refused: counted, never stored nor published
    assert await c.ask(mc_set(mc_key(theirs), theirs)) == b"STORED\r\n"
    assert await c.ask(b"get " + mc_key(theirs) + b"\r\n", b"END\r\n") == b"END\r\n"
    assert requests(f, "set", "refused") == refused_set + 1
    assert [e[1] for e in f.events.new] == [HTTPD_CTX]
    assert f.store.dead_sets[-1].key == mc_key(theirs)
    # a session of the other service held anyway (a peer replicated it): not served, not deleted
    sid = bytes.fromhex(mc_key(theirs)[13:].decode())
    assert f.store.cache.put(sid, theirs, expires=time.time() + 60, origin="peer",
                             sid_ctx=OTHER_CTX, event_time=time.time())
    assert await c.ask(b"get " + mc_key(theirs) + b"\r\n", b"END\r\n") == b"END\r\n"
    assert await r.ask(resp(b"GET", mc_key(theirs))) == b"$-1\r\n"
    assert await c.ask(b"delete " + mc_key(theirs) + b" 0\r\n") == b"NOT_FOUND\r\n"
    assert await r.ask(resp(b"DEL", mc_key(theirs))) == b":0\r\n"
    # nor an id held nowhere here: its context cannot be known, so no farm-wide REMOVE
    assert await c.ask(b"delete " + mc_key(tls_session()) + b" 0\r\n") == b"NOT_FOUND\r\n"
    assert not f.events.remove
    assert sid in f.store.cache
    # opaque keys are a context of their own, not served unless listed
    got = await c.ask(mc_set(b"app:token", b"v"))
    assert got == b"CLIENT_ERROR this cache does not serve that service context\r\n"
    assert (await r.ask(resp(b"SET", b"app:token", b"v"))).startswith(b"-ERR this cache")
    assert refused(f, "service") == before + 8  # set, get x2, delete x3, opaque set x2
    # its own service is served in full
    assert (await c.ask(b"get " + mc_key(mine) + b"\r\n", b"END\r\n")).startswith(b"VALUE")
    assert await c.ask(b"delete " + mc_key(mine) + b" 0\r\n") == b"DELETED\r\n"


async def test_opaque_keys_are_served_when_listed(front_with: Any, clients: Any) -> None:
    f = await front_with(access=AccessPolicy(services=frozenset({OPAQUE_SID_CTX})))
    c = await clients(f.mc_port)
    assert await c.ask(mc_set(b"app:token", b"v")) == b"STORED\r\n"
    assert await c.ask(b"get app:token\r\n", b"END\r\n") == b"VALUE app:token 0 1\r\nv\r\nEND\r\n"
    der = tls_session()
    assert await c.ask(mc_set(mc_key(der), der)) == b"STORED\r\n"
    assert await c.ask(b"get " + mc_key(der) + b"\r\n", b"END\r\n") == b"END\r\n"


def test_service_names() -> None:
    assert service_context("@opaque") == OPAQUE_SID_CTX
    assert service_context(HTTPD_CTX.decode()) == HTTPD_CTX
    with pytest.raises(ValueError):
        service_context("x" * 33)


# --- loopback and uid ---------------------------------------------------------------------------


def test_peer_uid_is_read_from_proc_net_tcp() -> None:
    """Both families, and an IPv4 client of a dual-stack listener (::ffff:127.0.0.1)."""
    cases = [(socket.AF_INET, "127.0.0.1", "127.0.0.1"), (socket.AF_INET6, "::1", "::1"),
             (socket.AF_INET6, "::", "127.0.0.1")]
    for family, bind, target in cases:
        with socket.socket(family) as listener:
            if bind == "::":
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind((bind, 0))
            listener.listen()
            with socket.create_connection((target, listener.getsockname()[1])) as client:
                server, _ = listener.accept()
                with server:
                    assert peer_uid(server) == os.geteuid()
                    assert peer_uid(server, files=()) is None  # not found: refused
                    assert client.fileno() >= 0


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.3.4.5") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("::") and not is_loopback("x")


def test_a_non_loopback_address_is_refused_unless_meant(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sessionbus.cli import main

    assert main(["cache", "--node-id", "cache-1", "--memcache", "0.0.0.0:11311"]) == 3
    err = capsys.readouterr().err
    assert "not a loopback address" in err and "--allow-remote" in err
    assert "Traceback" not in err
    assert main(["cache", "--node-id", "cache-1", "--memcache", "127.0.0.1:11311",
                 "--service", "x" * 40]) == 3
    assert main(["cache", "--node-id", "cache-1", "--memcache", "127.0.0.1:11311",
                 "--allow-uid", "no-such-user-here"]) == 3


def test_a_peer_off_loopback_is_refused() -> None:
    class Peer:
        family = socket.AF_INET

        def __init__(self, host: str) -> None:
            self.host = host

        def getpeername(self) -> tuple[str, int]:
            return self.host, 40000

    assert AccessPolicy().refusal(Peer("192.0.2.7")) == "remote"  # type: ignore[arg-type]
    assert AccessPolicy(allow_remote=True).refusal(Peer("192.0.2.7")) is None  # type: ignore[arg-type]
    # the uid of a remote peer cannot be known: refused when the filter is on
    policy = AccessPolicy(allow_remote=True, uids=frozenset({0}))
    assert policy.refusal(Peer("192.0.2.7")) == "uid"  # type: ignore[arg-type]


@needs_root
async def test_a_client_of_another_uid_is_refused(front_with: Any, clients: Any) -> None:
    f = await front_with(access=AccessPolicy(uids=frozenset({0})))
    assert await version_as(NOBODY, f.mc_port) == repr(b"SERVER_ERROR access denied\r\n")
    assert refused(f, "uid") == 1
    c = await clients(f.mc_port)  # root, this process
    assert await c.ask(b"version\r\n") == b"VERSION 1.6.0-sessionbus\r\n"
    # and the other way round: nobody allowed, root refused
    g = await front_with(access=AccessPolicy(uids=frozenset({NOBODY})))
    assert await version_as(NOBODY, g.mc_port) == repr(b"VERSION 1.6.0-sessionbus\r\n")
    r = await clients(g.redis_port)
    assert await r.line() == b"-NOPERM this client may not use this cache\r\n"
    assert await r.closed()
    assert refused(g, "uid") == 1 and refused(f, "uid") == 1
    # without the filter, any local user is served
    h = await front_with()
    assert await version_as(NOBODY, h.mc_port) == repr(b"VERSION 1.6.0-sessionbus\r\n")


# --- the nftables owner rule --------------------------------------------------------------------

_NFT_SCRIPT = """
import encodings.idna, os, socket, subprocess, sys  # idna: not importable after setuid
ruleset, port, allowed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["nft", "-f", ruleset], check=True)
subprocess.run(["nft", "-f", ruleset], check=True)  # loading it again replaces the table
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen()

def attempt(uid):
    pid = os.fork()
    if pid == 0:
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=3).close()
            os._exit(0)
        except ConnectionRefusedError:
            os._exit(1)
        except OSError:
            os._exit(2)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

print(attempt(allowed), attempt(65534), attempt(0))
"""


@needs_root
@pytest.mark.skipif(shutil.which("nft") is None or shutil.which("unshare") is None
                    or shutil.which("ip") is None, reason="needs nft, unshare and ip")
def test_nftables_owner_rule(tmp_path: Path) -> None:
    """ops/httpd/sessionbus-cache.nft, with its defines set, in a private network namespace:
    the allowed uid connects, nobody gets a reset."""
    allowed = 1  # daemon: any uid other than nobody and root
    text = (ROOT / "ops/httpd/sessionbus-cache.nft").read_text()
    port = 11311
    assert "define cache_ports = { 11311, 6380 }" in text
    text = text.replace("define cache_users = { 0, 33 }", f"define cache_users = {{ {allowed} }}")
    assert f"define cache_users = {{ {allowed} }}" in text
    ruleset = tmp_path / "rules.nft"
    ruleset.write_text(text)
    ruleset.chmod(0o644)
    tmp_path.chmod(0o755)
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip("cannot make a network namespace here")
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", _NFT_SCRIPT, str(ruleset), str(port),
         str(allowed)],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    # allowed: connected; nobody: reset (refused); root, not listed: refused too
    assert done.stdout.split() == ["0", "1", "1"]
