"""Real nginx and HAProxy (Debian's packages) kept on the farm's key ring by `sessionbus keyfile`.

Per kind of server: `sessionbus keys` rotates every few seconds; two servers, each with its own
`sessionbus keyfile --on-change '<its reload>'`; a client mints tickets on one server and resumes
them on the other, TLS 1.2 and TLS 1.3, all through at least three rotations, with zero failed
resumptions; a ticket minted under the previous key still resumes after a rotation; a ticket
older than the decrypt-only window gets a full handshake on both; and no key material shows in
the logs, metrics pages or argv of `keys` and `keyfile`.

Reloads: nginx runs in the foreground (``daemon off; master_process on``) and `keyfile` runs
``nginx -p DIR -c FILE -s reload`` (SIGHUP to the master); HAProxy runs as a master-worker
(``-W``, foreground) and `keyfile` runs ``kill -USR2 <master pid>``.  Session caches are off
(``ssl_session_cache off``, ``tune.ssl.cachesize 0``): resumption is by ticket only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sessionbus.bus.connection import BrokerSettings, connect
from sessionbus.bus.topology import Topology
from sessionbus.consumer.subscription import StreamSource, Subscription
from sessionbus.schemas.codec import decode_key_ring
from sessionbus.schemas.sealing import BusKeys
from sessionbus.schemas.ticket_keys import KeyRing, TicketKey
from tests.farm_support import (
    AMQP_URL,
    Proc,
    Processes,
    client_context,
    delete_topology,
    farm_files,
    free_port,
    handshake,
    make_cert,
    provisioned_prefix,
)
from tests.helpers_keys import keys_for

pytestmark = [pytest.mark.peers, pytest.mark.broker, pytest.mark.tls, pytest.mark.slow]

# The key publisher's timeline: keys encrypt for ROTATE s, decrypt KEEP*ROTATE s more, and are
# announced AHEAD s before they encrypt (> reload time + propagation, here well under 1 s).
ROTATE, KEEP, AHEAD = 4.0, 1, 2.0
ROTATIONS = 3
VERSIONS = ("1.2", "1.3")
SETTLE = 1.5  # after a timeline edge, both servers have surely rendered and reloaded


# --- the servers --------------------------------------------------------------------------------


@dataclass
class Server:
    kind: str
    name: str
    port: int
    home: Path
    keydir: Path
    popen: subprocess.Popen[bytes]
    reload: list[str]

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)  # its own group (new session)
                self.popen.wait(5)
        # nginx/HAProxy workers leave shortly after their master: wait, bounded
        for _ in range(50):
            try:
                os.killpg(self.popen.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def log(self) -> str:
        out = []
        for p in sorted(self.home.glob("*.log")):
            out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


def _wait_listening(port: int, popen: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"server exited with {popen.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def _private(path: Path) -> Path:
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    return path


NGINX_SLOTS = 4

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {home}/nginx.pid;
error_log {home}/error.log notice;
events {{ worker_connections 256; }}
http {{
    access_log off;
    keepalive_timeout 0;
    client_body_temp_path {home}/tmp;
    proxy_temp_path {home}/tmp;
    fastcgi_temp_path {home}/tmp;
    uwsgi_temp_path {home}/tmp;
    scgi_temp_path {home}/tmp;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets on;
{ticket_keys}
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""

HAPROXY_CFG = """\
global
    tune.ssl.cachesize 0
    pidfile {home}/haproxy.pid
{stats}defaults
    mode http
    option httpclose
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend tls
    bind 127.0.0.1:{port} ssl crt {pem} tls-ticket-keys {keydir}/tls-ticket-keys
    http-request return status 200 content-type text/plain string "{name}\\n"
"""


def start_nginx(name: str, root: Path, cert: Path, key: Path) -> Server:
    home = root / name
    home.mkdir()
    (home / "tmp").mkdir()
    keydir = _private(home / "keys")
    for i in range(NGINX_SLOTS):  # placeholders: nginx needs the files to start
        (keydir / f"ticket.{i}.key").write_bytes(os.urandom(80))
        os.chmod(keydir / f"ticket.{i}.key", 0o600)
    port = free_port()
    lines = "\n".join(f"        ssl_session_ticket_key {keydir}/ticket.{i}.key;"
                      for i in range(NGINX_SLOTS))
    conf = home / "nginx.conf"
    conf.write_text(NGINX_CONF.format(home=home, port=port, cert=cert, key=key, name=name,
                                      ticket_keys=lines))
    with open(home / "stderr.log", "wb") as err:
        popen = subprocess.Popen(["nginx", "-p", str(home), "-c", str(conf)],
                                 stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                 start_new_session=True)
    server = Server("nginx", name, port, home, keydir, popen,
                    ["nginx", "-p", str(home), "-c", str(conf), "-s", "reload"])
    try:
        _wait_listening(port, popen)
    except Exception:
        server.stop()
        raise RuntimeError(f"nginx {name} did not start:\n{server.log()}") from None
    return server


def start_haproxy(name: str, root: Path, cert: Path, key: Path, admin: bool = False) -> Server:
    """``admin``: a stats socket at level admin (``HOME/admin.sock``) for the runtime API."""
    home = root / name
    home.mkdir()
    keydir = _private(home / "keys")
    placeholder = b"".join(base64.b64encode(os.urandom(80)) + b"\n" for _ in range(3))
    (keydir / "tls-ticket-keys").write_bytes(placeholder)
    os.chmod(keydir / "tls-ticket-keys", 0o600)
    pem = home / "crt.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    port = free_port()
    cfg = home / "haproxy.cfg"
    stats = f"    stats socket {home}/admin.sock level admin\n" if admin else ""
    cfg.write_text(HAPROXY_CFG.format(home=home, port=port, pem=pem, keydir=keydir, name=name,
                                      stats=stats))
    with open(home / "stderr.log", "wb") as err:
        popen = subprocess.Popen(["haproxy", "-W", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                 stdout=err, stderr=err, start_new_session=True)
    # master-worker: SIGUSR2 to the master re-executes it, rereading config and key file
    server = Server("haproxy", name, port, home, keydir, popen,
                    ["kill", "-USR2", str(popen.pid)])
    try:
        _wait_listening(port, popen)
    except Exception:
        server.stop()
        raise RuntimeError(f"haproxy {name} did not start:\n{server.log()}") from None
    return server


def start_server(kind: str, name: str, farm: Farm, admin: bool = False) -> Server:
    if kind == "nginx":
        server = start_nginx(name, farm.root, farm.cert, farm.key)
    else:
        server = start_haproxy(name, farm.root, farm.cert, farm.key, admin)
    farm.servers.append(server)
    return server


def haproxy_live_keys(sock: Path, ref: Path) -> list[bytes]:
    """``show tls-keys FILE`` over the stats socket: HAProxy's keys in file order."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(f"show tls-keys {ref}\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [base64.b64decode(line.split()[1]) for line in data.decode().splitlines()
            if line and not line.startswith("#") and len(line.split()) == 2]


# --- the rings, as a test sees them ------------------------------------------------------------


class RingWatcher:
    """Every ring on the key stream since the first (a thread with its own event loop)."""

    def __init__(self, topo: Topology, keys: BusKeys) -> None:
        self.topo, self.keys = topo, keys
        self.rings: list[KeyRing] = []
        self._stop = threading.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> RingWatcher:
        self._thread.start()
        if not self._started.wait(20):
            raise TimeoutError("ring watcher did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(15)

    async def _main(self) -> None:
        try:
            conn = await connect(BrokerSettings(url=AMQP_URL, name="keyfile-test-watcher"))
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        try:
            async def handle(ring: KeyRing) -> None:
                self.rings.append(ring)

            sub: Subscription[KeyRing] = Subscription(
                conn, self.topo, StreamSource(self.topo.key_stream, "first"),
                lambda body, headers: decode_key_ring(body, headers, self.keys), handle,
            )
            await sub.start()
            self._started.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
            await sub.stop(5)
        except BaseException as exc:
            self._error = exc
            self._started.set()
        finally:
            await conn.close()

    def latest(self) -> KeyRing | None:
        rings = list(self.rings)
        return max(rings, key=lambda r: (r.issued_at, r.seq), default=None)

    def all_keys(self) -> list[TicketKey]:
        seen: dict[bytes, TicketKey] = {}
        for r in list(self.rings):
            for k in r.keys:
                seen.setdefault(k.name, k)
        return list(seen.values())

    def current(self, t: float) -> TicketKey | None:
        ring = self.latest()
        return None if ring is None else ring.current(t)


# --- the farm -----------------------------------------------------------------------------------


@dataclass
class Farm:
    root: Path
    prefix: str
    key_file: Path
    cert: Path
    key: Path
    procs: Processes = field(default_factory=Processes)
    servers: list[Server] = field(default_factory=list)
    metrics: dict[str, int] = field(default_factory=dict)  # process label -> metrics port

    def env(self) -> dict[str, str]:
        return {"SESSIONBUS_AMQP_URL": AMQP_URL, "SESSIONBUS_BUS_KEY_FILE": str(self.key_file),
                "SESSIONBUS_PREFIX": self.prefix}

    def start(self, label: str, args: list[str]) -> Proc:
        port = free_port()
        self.metrics[label] = port
        return self.procs.start([*args, "--metrics", f"127.0.0.1:{port}"], self.env())

    def metrics_page(self, label: str) -> str:
        url = f"http://127.0.0.1:{self.metrics[label]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Farm]:
    key_file, cert, key = farm_files(tmp_path)
    f = Farm(tmp_path, provisioned_prefix(), key_file, cert, key)
    try:
        yield f
    finally:
        f.procs.stop_all()
        for s in f.servers:
            s.stop()
        delete_topology(f.prefix, [])


def metric(page: str, name: str) -> float:
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on the metrics page")


# --- key material must not leak ----------------------------------------------------------------


def secret_forms(keys: list[TicketKey]) -> dict[str, bytes]:
    """Every way a secret could be printed: raw, hex (both cases), base64 at every alignment;
    the 16-byte halves too (ATS/httpd keep 16 bytes of each secret)."""
    forms: dict[str, bytes] = {}
    for n, k in enumerate(keys):
        for label, s in (("hmac", k.hmac_secret), ("aes", k.aes_secret)):
            for part, chunk in ((label, s), (f"{label}[:16]", s[:16]), (f"{label}[16:]", s[16:])):
                tag = f"key{n}.{part}"
                forms[f"{tag} raw"] = chunk
                forms[f"{tag} hex"] = chunk.hex().encode()
                forms[f"{tag} HEX"] = chunk.hex().upper().encode()
                for i in range(3):
                    body = chunk[i:]
                    body = body[: len(body) - len(body) % 3]
                    forms[f"{tag} b64@{i}"] = base64.b64encode(body)
                    forms[f"{tag} b64url@{i}"] = base64.urlsafe_b64encode(body)
    return forms


def assert_no_key_material(where: dict[str, bytes], keys: list[TicketKey]) -> None:
    assert keys, "no keys to look for"
    forms = secret_forms(keys)
    leaks = [f"{form} in {name}" for name, text in where.items()
             for form, needle in forms.items() if needle in text]
    assert not leaks, leaks[:10]


# --- the scenario -------------------------------------------------------------------------------


@dataclass
class Ticket:
    version: str
    session: ssl.SSLSession
    minted_on: str
    minted_at: float
    key: TicketKey


@dataclass
class Tally:
    attempts: int = 0
    resumed: int = 0
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def try_resume(server: Server, ticket: Ticket) -> bool | None:
    """True: resumed; False: full handshake; None: the connection failed."""
    try:
        return handshake(server.port, client_context(ticket.version),
                         session=ticket.session).reused
    except (OSError, ssl.SSLError):
        return None


def mint(server: Server, version: str, watcher: RingWatcher) -> Ticket | None:
    t = time.time()
    try:
        h = handshake(server.port, client_context(version))
    except (OSError, ssl.SSLError):
        return None
    key = watcher.current(t)
    assert h.session is not None and h.session.has_ticket, f"{server.name}: no ticket issued"
    assert key is not None
    assert h.body.endswith(f"{server.name}\n".encode())
    return Ticket(version, h.session, server.name, t, key)


def settled(t: float, key: TicketKey) -> bool:
    """Minted well inside ``key``'s encrypt window: every server surely encrypted with it."""
    return key.encrypt_from + SETTLE <= t <= key.encrypt_until - 0.2


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_tickets_resume_across_servers_through_rotations(farm: Farm, kind: str) -> None:
    if shutil.which(kind) is None:
        pytest.skip(f"{kind} is not installed (apt-get install -y {kind})")
    # the key publisher, then the servers (placeholder keys), then one keyfile per server
    keys_proc = farm.start("keys", ["keys", "--rotate-every", str(ROTATE), "--keep", str(KEEP),
                                    "--announce-ahead", str(AHEAD)])
    keys_proc.wait_for("key publisher", 20)
    a = start_server(kind, f"{kind}-a", farm)
    # HAProxy b also takes rotations through its runtime API (`set ssl tls-key`), a reloads
    b = start_server(kind, f"{kind}-b", farm, admin=True)
    runtime = ["--haproxy-socket", str(b.home / "admin.sock")] if kind == "haproxy" else []
    keyfiles = {}
    for s in (a, b):
        p = farm.start(f"keyfile-{s.name}", [
            "keyfile", "--format", kind, "--out", str(s.keydir), "--on-change",
            shlex.join(s.reload), *(runtime if s is b else [])])
        keyfiles[s.name] = p
    for p in keyfiles.values():
        p.wait_for("key file(s) ready", 20)

    bus_keys = keys_for(farm.key_file)
    tally = Tally()
    previous_ok: list[str] = []  # "<version> <key> on <server>": a previous-key ticket resumed
    expired_full: list[str] = []
    with RingWatcher(Topology(prefix=farm.prefix), bus_keys) as watcher:
        deadline = time.monotonic() + 20
        while watcher.latest() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        ring = watcher.latest()
        assert ring is not None, "no ring on the key stream"
        first_key = ring.current(time.time())
        assert first_key is not None
        # Start measuring once both servers have loaded the farm's keys (the placeholders
        # are gone): the current key's window has settled.
        while time.time() < first_key.encrypt_from + SETTLE:
            time.sleep(0.05)

        first: dict[str, Ticket] = {}  # per version, minted under the first key
        last_by_key: dict[tuple[str, bytes], Ticket] = {}  # (version, key name) -> a ticket
        checked_previous: set[tuple[str, bytes, str]] = set()
        currents: list[bytes] = []
        stop_at: float | None = None
        hard_deadline = time.monotonic() + 60
        while time.monotonic() < hard_deadline:
            now = time.time()
            cur = watcher.current(now)
            assert cur is not None
            if not currents or currents[-1] != cur.name:
                currents.append(cur.name)
            rotations = len(currents) - 1
            if stop_at is None and rotations >= ROTATIONS and expired_full:
                stop_at = now + 0.5
            if stop_at is not None and now >= stop_at:
                break
            for version in VERSIONS:
                # minted on either, resumed on the other
                for src, dst in ((a, b), (b, a)):
                    ticket = mint(src, version, watcher)
                    if ticket is None:
                        tally.errors.append(f"{time.time():.2f} mint on {src.name} failed")
                        continue
                    if settled(ticket.minted_at, ticket.key):
                        first.setdefault(version, ticket)
                        last_by_key[(version, ticket.key.name)] = ticket
                    tally.attempts += 1
                    result = try_resume(dst, ticket)
                    if result is None:
                        tally.errors.append(f"{time.time():.2f} {dst.name} connection failed")
                    elif result:
                        tally.resumed += 1
                    else:
                        tally.failures.append(
                            f"{time.time():.2f}: TLS {version} ticket minted on {src.name} at "
                            f"{ticket.minted_at:.2f} not resumed on {dst.name}")
                # a ticket under the key before the current one, once every server rotated
                now = time.time()
                cur = watcher.current(now)
                assert cur is not None
                if cur.encrypt_from + SETTLE <= now:
                    for (v, name), old in list(last_by_key.items()):
                        if v != version or name == cur.name or now >= old.key.erase_at - 0.3:
                            continue
                        for dst in (a, b):
                            tag = (version, name, dst.name)
                            if tag in checked_previous:
                                continue
                            checked_previous.add(tag)
                            tally.attempts += 1
                            if try_resume(dst, old):
                                tally.resumed += 1
                                previous_ok.append(f"{version} {name[:4].hex()} on {dst.name}")
                            else:
                                tally.failures.append(
                                    f"TLS {version} ticket under the previous key "
                                    f"{name[:4].hex()} not resumed on {dst.name}")
                # the first ticket, once its key is erased: a full handshake everywhere
                ticket = first.get(version)
                if ticket is not None and now >= ticket.key.erase_at + SETTLE and not any(
                        e.startswith(version + " ") for e in expired_full):
                    results = [try_resume(s, ticket) for s in (a, b)]
                    assert results == [False, False], (
                        f"TLS {version}: a ticket past its key's erase_at: {results} "
                        "(True = resumed, None = connection failed)")
                    expired_full.append(f"{version} on both")
            time.sleep(0.1)
        else:
            pytest.fail(f"no {ROTATIONS} rotations within the time limit")
        rotations = len(currents) - 1
        all_keys = watcher.all_keys()

    reloads = {n: p.output().count("on-change command (") for n, p in keyfiles.items()}
    pushes = keyfiles[b.name].output().count("runtime API: 1 key(s) pushed")
    report = (f"{kind}: {rotations} rotations, {tally.attempts} cross-server resumptions tried, "
              f"{tally.resumed} resumed, {len(tally.failures)} failed, "
              f"{len(tally.errors)} connection errors; previous-key tickets resumed: "
              f"{len(previous_ok)}; expired tickets with a full handshake: {expired_full}; "
              f"reloads {reloads}, runtime API rotations on {b.name}: {pushes}")
    print(report)
    assert not tally.failures, report + "\n" + "\n".join(tally.failures[:20]) + a.log() + b.log()
    assert not tally.errors, report + "\n" + "\n".join(tally.errors[:20])
    assert rotations >= ROTATIONS, report
    assert {p.split()[0] for p in previous_ok} == set(VERSIONS), report
    assert len(previous_ok) >= 2 * len(VERSIONS) * 2, report  # several rotations, both servers
    assert len(expired_full) == len(VERSIONS), report
    for server_name in keyfiles:
        page = farm.metrics_page(f"keyfile-{server_name}")
        assert metric(page, "sessionbus_keyfile_command_failures_total") == 0.0, server_name
        assert metric(page, "sessionbus_keyfile_writes_total") >= 2 * ROTATIONS
    if kind == "haproxy":
        # every rotation on b went through the runtime API; announcements still reload
        assert pushes >= ROTATIONS, report
        assert reloads[b.name] < reloads[a.name], report
        file_keys = [base64.b64decode(x) for x in (b.keydir / "tls-ticket-keys").read_bytes()
                     .split()]
        assert haproxy_live_keys(b.home / "admin.sock", b.keydir / "tls-ticket-keys") \
            == file_keys

    # no key material in the logs, metrics pages or argv of `keys` and `keyfile`
    where: dict[str, bytes] = {}
    procs = {"keys": keys_proc, **{f"keyfile-{n}": p for n, p in keyfiles.items()}}
    for label, proc in procs.items():
        where[f"{label} metrics"] = farm.metrics_page(label).encode()
        where[f"{label} argv"] = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    for label, proc in procs.items():
        assert proc.stop() == 0, proc.output()
        where[f"{label} log"] = proc.output().encode()
    assert "ticket key ring" in where[f"keyfile-{a.name} log"].decode()  # the logs were read
    assert_no_key_material(where, all_keys)
    # ...and the search does find key material where it is: the servers' own key files
    for s in (a, b):
        files = {p.name: p.read_bytes() for p in s.keydir.iterdir()}
        with pytest.raises(AssertionError, match="key"):
            assert_no_key_material(files, all_keys)


# --- the ops/ snippets are what these servers accept ---------------------------------------------

OPS = Path(__file__).resolve().parent.parent / "ops"


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_ops_snippet_passes_the_servers_config_check(tmp_path: Path, kind: str) -> None:
    if shutil.which(kind) is None:
        pytest.skip(f"{kind} is not installed (apt-get install -y {kind})")
    cert, key = make_cert(tmp_path)
    keydir = _private(tmp_path / "keys")
    if kind == "nginx":
        snippet = (OPS / "nginx" / "sessionbus-ticket-keys.conf").read_text()
        snippet = snippet.replace("/var/lib/sessionbus/keyfiles/nginx", str(keydir))
        names = re.findall(r"ssl_session_ticket_key \S+/(ticket\.\d\.key);", snippet)
        assert names == [f"ticket.{i}.key" for i in range(NGINX_SLOTS)]
        for name in names:
            (keydir / name).write_bytes(os.urandom(80))
        (tmp_path / "snippet.conf").write_text(snippet)
        (tmp_path / "tmp").mkdir()
        conf = NGINX_CONF.format(home=tmp_path, port=free_port(), cert=cert, key=key,
                                 name="check", ticket_keys=f"include {tmp_path}/snippet.conf;")
        # the snippet carries its own cache and ticket settings
        conf = conf.replace("ssl_session_cache off;", "").replace("ssl_session_tickets on;", "")
        (tmp_path / "nginx.conf").write_text(conf)
        argv = ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    else:
        snippet = (OPS / "haproxy" / "sessionbus-ticket-keys.cfg").read_text()
        (keydir / "tls-ticket-keys").write_bytes(
            b"".join(base64.b64encode(os.urandom(80)) + b"\n" for _ in range(3)))
        pem = tmp_path / "site.pem"
        pem.write_bytes(cert.read_bytes() + key.read_bytes())
        snippet = (snippet.replace("/var/lib/sessionbus/keyfiles/haproxy", str(keydir))
                   .replace("/etc/haproxy/certs/site.pem", str(pem))
                   .replace("/run/haproxy/admin.sock", str(tmp_path / "admin.sock"))
                   .replace("bind :443", f"bind 127.0.0.1:{free_port()}"))
        global_part, _, frontend = snippet.partition("frontend https")
        assert frontend, "the snippet has a frontend https section"
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(global_part + "defaults\n    mode http\n    timeout connect 1s\n"
                       "    timeout client 1s\n    timeout server 1s\n\n"
                       "frontend https" + frontend + "\nbackend app\n    server app 127.0.0.1:9\n")
        argv = ["haproxy", "-c", "-f", str(cfg)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
