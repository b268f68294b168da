"""``sessionbus up``: a whole farm on one machine, as child processes, stopped together."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sessionbus.schemas.codec import sender_user
from sessionbus.schemas.sealing import write_new_key_file, write_signing_key_pair


@dataclass(frozen=True, slots=True)
class FarmSettings:
    directory: Path
    nodes: int = 3
    base_port: int = 8443
    metrics_base: int = 9400
    host: str = "127.0.0.1"
    cert: Path | None = None
    key: Path | None = None
    rotate_every: int = 3600
    tickets: str = "stateful"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A P-256 certificate for localhost, valid 30 days (for the local farm only)."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class Farm:
    def __init__(self, settings: FarmSettings, env: dict[str, str]) -> None:
        self.s = settings
        self.env = env
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._signing_key = settings.directory / "ring-signing.key"

    def prepare(self) -> tuple[Path, Path]:
        d = self.s.directory
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        bus_key = d / "bus.key"
        if not bus_key.exists():
            write_new_key_file(bus_key)
            print(f"created bus key {bus_key}")
        sign, public = d / "ring-signing.key", d / "ring-public.key"
        if not sign.exists():
            write_signing_key_pair(sign, public, force=True)
        # One broker user runs the whole farm here: it is allowed to speak for every origin
        # (refused by every role unless the broker is on loopback).
        user = sender_user(self.env.get("SESSIONBUS_AMQP_URL", ""))
        self.env = {**self.env, "SESSIONBUS_BUS_KEY_FILE": str(bus_key),
                    "SESSIONBUS_RING_PUBLIC_KEY_FILE": str(public),
                    "SESSIONBUS_ANY_ORIGIN_USERS": user}
        self._signing_key = sign
        if self.s.cert and self.s.key:
            return self.s.cert, self.s.key
        return self_signed(d)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.s.directory / f"{name}.log", "ab")  # noqa: SIM115 - lives with child
        # Children get their own process group: the farm forwards one SIGTERM to each and a
        # terminal's Ctrl-C reaches only the farm, which then stops them in order.
        p = subprocess.Popen(
            [sys.executable, "-m", "sessionbus", *args], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.children.append((name, p))

    def start(self) -> list[str]:
        cert, key = self.prepare()
        s = self.s
        lines = []
        self._spawn("keys", ["keys", "--ring-signing-key-file", str(self._signing_key),
                             "--rotate-every", str(s.rotate_every),
                             "--metrics", f"{s.host}:{s.metrics_base}"])
        lines.append(f"key publisher  metrics http://{s.host}:{s.metrics_base}/metrics")
        self._spawn("worker", ["worker", "--metrics", f"{s.host}:{s.metrics_base + 1}"])
        lines.append(f"worker         metrics http://{s.host}:{s.metrics_base + 1}/metrics")
        for i in range(1, s.nodes + 1):
            port = s.base_port + i - 1
            mport = s.metrics_base + 1 + i
            self._spawn(f"node-{i}", [
                "node", "--node-id", f"node-{i}", "--listen", f"{s.host}:{port}",
                "--cert", str(cert), "--key", str(key), "--tickets", s.tickets,
                "--metrics", f"{s.host}:{mport}",
            ])
            lines.append(f"node-{i}         https://{s.host}:{port}/  "
                         f"metrics http://{s.host}:{mport}/metrics")
        return lines

    def poll(self) -> str | None:
        """The name of a child that exited, if any."""
        for name, p in self.children:
            if p.poll() is not None:
                return name
        return None

    def stop(self, timeout: float = 15.0) -> None:
        for _, p in self.children:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, p in self.children:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
