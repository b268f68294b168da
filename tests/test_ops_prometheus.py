"""ops/prometheus: the scrape config and alert rules pass promtool, and the rules' unit tests pass.

promtool comes with Debian's ``prometheus`` package (``apt-get install prometheus``; the service
itself is not needed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parent.parent / "ops" / "prometheus"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install Debian's `prometheus` package to check ops/prometheus",
)


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=OPS, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


@needs_promtool
def test_rules_are_valid() -> None:
    assert "SUCCESS: 10 rules found" in promtool("check", "rules", "rules/sessionbus.yml")


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", "rules/sessionbus_test.yml")


@needs_promtool
def test_scrape_config_is_valid() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert "is valid prometheus config file syntax" in out


def test_every_alert_has_a_unit_test_and_every_role_is_scraped() -> None:
    # Plain text checks (PyYAML is not a dependency); promtool checks the structure above.
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", (OPS / "rules" / "sessionbus.yml").read_text(),
                            re.MULTILINE))
    assert len(alerts) == 10
    tests = (OPS / "rules" / "sessionbus_test.yml").read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", tests))
    assert alerts == firing, f"alerts without a test that fires them: {alerts - firing}"
    config = re.sub(r"^\s*#.*\n", "", (OPS / "prometheus.yml").read_text(), flags=re.MULTILINE)
    jobs = dict(re.findall(r"^  - job_name: (\S+)\n(.*?)(?=^  - job_name|\Z)", config,
                           re.MULTILINE | re.DOTALL))
    assert {"sessionbus-keys", "sessionbus-worker", "sessionbus-node", "sessionbus-cache",
            "rabbitmq"} <= set(jobs)

    def targets(job: str) -> list[str]:
        return re.findall(r'targets: \["([^"]+)"\]', jobs[job])

    # The local farm's ports (sessionbus up: keys :9400, worker :9401, nodes from :9402).
    assert targets("sessionbus-keys") == ["127.0.0.1:9400"]
    assert targets("sessionbus-worker") == ["127.0.0.1:9401"]
    assert targets("sessionbus-node") == ["127.0.0.1:9402", "127.0.0.1:9403", "127.0.0.1:9404"]
    assert targets("rabbitmq") == ["127.0.0.1:15692"]
