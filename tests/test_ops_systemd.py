"""ops/systemd: each unit parses, runs an existing ``sessionbus`` subcommand with flags it accepts,
stops gracefully and is sandboxed; ``systemd-analyze verify`` accepts them where it is installed.
"""

from __future__ import annotations

import configparser
import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "ops" / "systemd"
ENV = UNITS / "env"
INSTALLED = "/opt/sessionbus/bin/sessionbus"

# unit file -> (an instance name to verify it with, the example env file of that instance)
CASES = {
    "sessionbus-node@.service": ("node-1", "node-1.env"),
    "sessionbus-cache@.service": ("cache-1", "cache-1.env"),
    "sessionbus-worker@.service": ("worker-1", "worker-1.env"),
    "sessionbus-keys.service": (None, "keys.env"),
    "sessionbus-keyfile@.service": ("nginx", "nginx.env"),
}
DRAIN_TIMEOUT = 10.0  # the roles' default --drain-timeout


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd keys repeat, e.g. EnvironmentFile)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None and "=" in line, f"{path.name}: not INI: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env(path: Path) -> dict[str, str]:
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line)
        assert m, f"{path.name}: not KEY=VALUE: {raw!r}"
        out[m.group(1)] = m.group(2)
    return out


@functools.cache
def sessionbus_help(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "sessionbus", *args, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"sessionbus {' '.join(args)} --help:\n{done.stderr}"
    return done.stdout


def subcommands() -> set[str]:
    text = sessionbus_help()
    block = text.split("positional arguments:", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"^    (\S+)\s", block, re.MULTILINE))


def test_subcommands_are_read_from_help() -> None:
    assert {"node", "worker"} <= subcommands()


def test_units_and_env_files_exist() -> None:
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(CASES)
    for _, env in CASES.values():
        assert (ENV / env).is_file()
    common = parse_env(ENV / "common.env")
    assert {"SESSIONBUS_AMQP_URL", "SESSIONBUS_BUS_KEY_FILE"} <= set(common)


@pytest.mark.parametrize("unit", sorted(CASES))
def test_unit_parses_and_is_configured(unit: str) -> None:
    path = UNITS / unit
    configparser.ConfigParser(strict=False, interpolation=None).read_string(path.read_text())
    u = parse_unit(path)
    assert set(u) == {"Unit", "Service", "Install"}
    svc = {k: v[-1] for k, v in u["Service"].items()}
    template = unit.endswith("@.service")
    instance_env = "/etc/sessionbus/%i.env" if template else f"/etc/sessionbus/{CASES[unit][1]}"
    # common.env first, the instance's own file second (it overrides).
    assert u["Service"]["EnvironmentFile"] == ["/etc/sessionbus/common.env", instance_env]
    assert svc["Restart"] == "on-failure"
    assert svc["KillSignal"] == "SIGTERM"
    assert float(svc["TimeoutStopSec"]) > DRAIN_TIMEOUT
    assert svc["User"] == "sessionbus" and svc["Group"] == "sessionbus"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes"}.items():
        assert svc[key] == value, key
    assert u["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("unit", sorted(CASES))
def test_exec_start_runs_an_existing_subcommand_with_known_flags(unit: str) -> None:
    u = parse_unit(UNITS / unit)
    (exec_start,) = u["Service"]["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED
    sub = argv[1]
    assert sub in subcommands(), (
        f"{unit}: `sessionbus {sub}` is not a subcommand (have {sorted(subcommands())})"
    )
    env = parse_env(ENV / CASES[unit][1])
    # Every variable ExecStart uses is set in the example env file.
    used = re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", exec_start)
    assert used, unit
    missing = [v for v in used if v not in env]
    assert not missing, f"{unit}: ExecStart uses {missing}, not set in env/{CASES[unit][1]}"
    # Every flag, on the command line or in a word-split $VAR, is one the subcommand accepts.
    split_vars = re.findall(r"\$([A-Z_][A-Z0-9_]*)", exec_start)  # $VAR, not ${VAR}
    words = argv[2:] + [w for v in split_vars for w in shlex.split(env[v])]
    flags = {w.split("=", 1)[0] for w in words if w.startswith("--")}
    accepted = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", sessionbus_help(sub)))
    assert flags and flags <= accepted, f"{unit}: {sorted(flags - accepted)} unknown to {sub}"
    for name in ("SESSIONBUS_METRICS",):
        assert name in env, f"env/{CASES[unit][1]} should set {name}"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants ExecStart's binary to exist: point it at this checkout's console script.
    binary = Path(sys.executable).parent / "sessionbus"
    assert binary.exists(), f"{binary}: install the package (pip install -e .)"
    names = []
    for unit, (instance, _) in CASES.items():
        text = (UNITS / unit).read_text().replace(INSTALLED, str(binary))
        (tmp_path / unit).write_text(text)
        names.append(str(tmp_path / (unit.replace("@.", f"@{instance}.") if instance else unit)))
    done = subprocess.run([analyze, "verify", *names], capture_output=True, text=True,
                          timeout=120)
    # Unknown keys and bad values are only warnings (exit 0): any line about our units fails.
    ours = [line for line in (done.stdout + done.stderr).splitlines()
            if "sessionbus" in line or str(tmp_path) in line]
    assert done.returncode == 0 and not ours, "\n".join(ours) or done.stderr
