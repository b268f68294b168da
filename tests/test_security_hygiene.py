"""Host hygiene: no core dumps, no password in --help, no plaintext AMQP off loopback, the dev
allowance refused off loopback, key files private, amqps in every example."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bench.security_table import record
from sessionbus.cli import build_parser
from sessionbus.cli.safety import (
    UnsafeSetting,
    check_any_origin_users,
    redact_url,
    refuse_plaintext_remote,
)
from sessionbus.schemas.sealing import load_signing_key, write_signing_key_pair

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-Pa55%word"  # a % too: argparse formats help text with %


def sb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sessionbus", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=REPO)


def subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[arg-type]


def test_attack_help_of_every_subcommand_hides_the_broker_password() -> None:
    url = f"amqps://node-1:{PASSWORD}@broker.example.net:5671/sessionbus"
    names = subcommands()
    assert {"node", "keys", "keyfile", "cache", "worker", "revoke", "events", "up"} <= set(names)
    shown = 0
    for args in [[], *([n] for n in names)]:
        done = sb(*args, "--help", env={"SESSIONBUS_AMQP_URL": url})
        assert done.returncode == 0, (args, done.stderr)
        text = done.stdout + done.stderr
        assert PASSWORD not in text and "Pa55" not in text, args
        shown += ":***@broker.example.net" in text
    assert shown >= len(names) - 1  # every subcommand with broker options shows it redacted
    record("broker password printed by --help", role="any local user (reads --help output)",
           tried=len(names) + 1, accepted=0,
           result=f"SESSIONBUS_AMQP_URL with a password: redacted (user:***@host) in all "
                  f"{len(names) + 1} help texts")


def test_attack_core_dump_and_ptrace_of_a_role() -> None:
    code = (
        "import ctypes, sys\n"
        "from sessionbus.cli import main\n"
        "try:\n    main(['bus-key', '--help'])\nexcept SystemExit:\n    pass\n"
        "libc = ctypes.CDLL(None)\n"
        "sys.stderr.write('dumpable=%d' % libc.prctl(3, 0, 0, 0, 0))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert "dumpable=0" in done.stderr, done.stderr
    units = sorted((REPO / "ops" / "systemd").glob("*.service"))
    assert units and all("\nLimitCORE=0\n" in u.read_text() for u in units)
    record("core dump / ptrace of a role process", role="a local user of the same uid, a crash",
           tried=1 + len(units), accepted=0,
           result=f"PR_SET_DUMPABLE 0 at CLI start (prctl reads 0); LimitCORE=0 in all "
                  f"{len(units)} systemd units")


@pytest.mark.parametrize("url, ok", [
    ("amqp://guest:guest@127.0.0.1:5672/", True),
    ("amqp://guest:guest@localhost/", True),
    ("amqp://u:p@[::1]:5672/", True),
    ("amqps://u:p@broker.example.net:5671/", True),
    ("amqp://u:p@broker.example.net:5672/", False),
    ("amqp://u:p@10.0.0.5/", False),
])
def test_plaintext_only_on_loopback(url: str, ok: bool) -> None:
    if ok:
        refuse_plaintext_remote(url, plaintext_ok=False)
    else:
        with pytest.raises(UnsafeSetting) as info:
            refuse_plaintext_remote(url, plaintext_ok=False)
        assert "p@" not in str(info.value) and "--amqp-plaintext" in str(info.value)
        refuse_plaintext_remote(url, plaintext_ok=True)  # the operator said so


def test_attack_plaintext_amqp_to_a_remote_broker_is_refused() -> None:
    # 192.0.2.0/24 is TEST-NET: refused before any connection is tried
    url = f"amqp://node-1:{PASSWORD}@192.0.2.10:5672/"
    names = ["events", "revoke --session-id 00", "worker", "keys"]
    for name in names:
        done = sb(*name.split(), "--bus-key-file", "/nonexistent",
                  env={"SESSIONBUS_AMQP_URL": url})
        assert done.returncode == 3, (name, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and "plaintext" in done.stderr, done.stderr
        assert PASSWORD not in done.stderr and "Traceback" not in done.stderr
    record("plaintext amqp:// to a remote broker", role="a misconfiguration (or a downgrade)",
           tried=len(names), accepted=0,
           result="refused at start, exit 3, one line, password redacted, unless "
                  "--amqp-plaintext says the network is trusted")


def test_attack_dev_any_origin_allowance_on_a_real_broker_is_refused() -> None:
    assert check_any_origin_users("amqp://guest:guest@127.0.0.1/", ["guest"]) == {"guest"}
    with pytest.raises(UnsafeSetting):
        check_any_origin_users("amqps://u:p@broker.example.net:5671/", ["guest"])
    assert check_any_origin_users("amqps://u:p@broker.example.net:5671/", []) == frozenset()
    done = sb("events", "--bus-key-file", "/nonexistent", "--any-origin-user", "node-1",
              env={"SESSIONBUS_AMQP_URL": f"amqps://node-1:{PASSWORD}@192.0.2.10:5671/"})
    assert done.returncode == 3 and "loopback" in done.stderr, done.stderr
    assert PASSWORD not in done.stderr
    record("dev any-origin allowance used against a real broker", role="a misconfiguration",
           tried=2, accepted=0,
           result="--any-origin-user / SESSIONBUS_ANY_ORIGIN_USERS refused unless the broker "
                  "is on loopback (exit 3)")


def test_redact_url() -> None:
    assert redact_url("amqps://u:p%40x@h:5671/v") == "amqps://u:***@h:5671/v"
    assert redact_url("amqp://h/") == "amqp://h/"
    assert redact_url("amqp://u@h/") == "amqp://u@h/"


def test_key_files_made_by_the_cli(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert sb("bus-key", "new", str(tmp_path / "bus.key")).returncode == 0
        done = sb("bus-key", "ring-file", str(tmp_path / "bus.key"), str(tmp_path / "ring.key"))
        assert done.returncode == 0 and "no session key" in done.stdout, done.stderr
        done = sb("bus-key", "signing-key", str(tmp_path / "sign.key"), str(tmp_path / "pub.key"))
        assert done.returncode == 0, done.stderr
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert mode == {"bus.key": 0o600, "ring.key": 0o600, "sign.key": 0o600, "pub.key": 0o644}
    assert "sbr1:" in (tmp_path / "ring.key").read_text()
    assert "sbk1:" not in (tmp_path / "ring.key").read_text()
    # existing files are not overwritten; a readable signing key is refused
    again = sb("bus-key", "signing-key", str(tmp_path / "sign.key"), str(tmp_path / "pub.key"))
    assert again.returncode == 3 and "--force" in again.stderr
    (tmp_path / "sign.key").chmod(0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        load_signing_key(tmp_path / "sign.key")
    write_signing_key_pair(tmp_path / "s2", tmp_path / "p2")
    # the keys publisher refuses a world-readable signing key at start
    done = sb("keys", "--bus-key-file", str(tmp_path / "ring.key"),
              "--ring-signing-key-file", str(tmp_path / "sign.key"))
    assert done.returncode == 3 and "chmod 600" in done.stderr, done.stderr


def test_every_example_url_is_amqps_or_loopback() -> None:
    """Docs, ops files and the CLI's own help examples (tests use loopback brokers)."""
    files = [p for top in ("README.md", "docs", "ops", "sessionbus", "examples", "bench")
             for p in ([REPO / top] if (REPO / top).is_file() else (REPO / top).glob("**/*"))
             if p.is_file() and p.suffix in (".md", ".env", ".service", ".conf", ".py",
                                              ".json", ".cfg", ".yml")]
    assert len(files) > 20
    bad = []
    for p in files:
        text = p.read_text(errors="replace")
        for m in re.finditer(r"amqp://(?:[^@\s/'\"`]*@)?(\[[^\]]*\]|[^:/\s'\"`]+)", text):
            host = m.group(1)
            if host not in ("127.0.0.1", "localhost", "[::1]", "h", "{host}"):
                bad.append(f"{p.relative_to(REPO)}: {m.group(0)}")
    assert bad == [], bad
