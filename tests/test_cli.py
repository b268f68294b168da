"""The console script: help with examples everywhere, one-line errors, exit codes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sessionbus.cli import build_parser


def sb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessionbus", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)  # type: ignore[arg-type]


def test_top_level_help_lists_commands_examples_and_exit_codes() -> None:
    out = sb("--help")
    assert out.returncode == 0
    for word in ("examples:", "exit codes:", *subcommands()):
        assert word in out.stdout


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_help_has_usage_and_examples(command: str) -> None:
    out = sb(command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: sessionbus " + command)
    assert "examples:" in out.stdout and "exit codes:" in out.stdout


@pytest.mark.parametrize("command", [
    ["node", "--node-id", "a", "--listen", "127.0.0.1:1", "--cert", __file__, "--key", __file__],
    ["worker"], ["events"], ["revoke", "--session-id", "ab"], ["up"],
], ids=lambda c: c[0])
def test_unknown_flag_is_one_line_exit_2(command: list[str]) -> None:
    out = sb(*command, "--no-such-flag")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "no-such-flag" in out.stderr


def test_missing_files_are_one_line_errors(tmp_path: Path) -> None:
    out = sb("node", "--node-id", "a", "--listen", "127.0.0.1:0", "--cert", "/nonexistent.pem",
             "--key", "/nonexistent.pem")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "/nonexistent.pem does not exist" in out.stderr
    out = sb("events", env={"SESSIONBUS_BUS_KEY_FILE": str(tmp_path / "missing.key")})
    assert out.returncode == 3 and out.stderr.count("\n") == 1
    assert "does not exist" in out.stderr
    out = sb("events", env={"SESSIONBUS_BUS_KEY_FILE": ""})
    assert out.returncode == 3 and "no bus key" in out.stderr


def test_bus_key_new_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "bus.key"
    out = sb("bus-key", "new", str(path))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    assert first.split("sbk1:")[1].strip() not in out.stdout  # the key is never printed
    again = sb("bus-key", "new", str(path))
    assert again.returncode == 3 and "--force" in again.stderr
    assert path.read_text() == first
    forced = sb("bus-key", "new", "--force", str(path))
    assert forced.returncode == 0 and path.read_text() != first


def test_group_readable_bus_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bus.key"
    assert sb("bus-key", "new", str(path)).returncode == 0
    path.chmod(0o640)
    out = sb("events", env={"SESSIONBUS_BUS_KEY_FILE": str(path)})
    assert out.returncode == 3 and "chmod 600" in out.stderr


def test_bad_values_are_rejected(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    for args, needle in [
        (["node", "--node-id", "Bad_ID", "--listen", "127.0.0.1:1", "--cert", str(cert),
          "--key", str(cert)], "is not a node id"),
        (["node", "--node-id", "a", "--listen", "nocolon", "--cert", str(cert), "--key",
          str(cert)], "is not HOST:PORT"),
        (["events", "--type", "new,bogus"], "choose from"),
        (["revoke", "--session-id", "zz"], "is not hex"),
    ]:
        out = sb(*args)
        assert out.returncode == 2 and needle in out.stderr, (args, out.stderr)


def test_linger_out_of_range_is_one_line_and_exit_3(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    for args in (
        ["node", "--node-id", "a", "--listen", "127.0.0.1:1", "--cert", str(cert), "--key",
         str(cert), "--linger", "2"],
        ["cache", "--node-id", "a", "--memcache", "127.0.0.1:1", "--linger", "-1"],
    ):
        out = sb(*args)
        assert out.returncode == 3, (args, out.stderr)
        assert out.stderr.strip().endswith("--linger must be 0..1 seconds")
        assert out.stderr.count("\n") == 1
