"""The OpenSSL binding's, the node's and the Farm API's tests pass on uvloop too.

uvloop drives CPython's ``ssl`` objects with its own transports, so the session-cache and
ticket-key callbacks must hold there as they do on asyncio's loop. This runs those test files
again, in a child pytest with ``SESSIONBUS_TEST_LOOP=uvloop`` (``tests/conftest.py``: async tests
and every process they start run on uvloop), so the README's one test command covers both loops.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FILES = ["tests/test_openssl_binding.py", "tests/test_node_e2e.py", "tests/test_farm_api.py",
         "tests/test_farm_api_servers.py"]


@pytest.mark.slow
@pytest.mark.tls
@pytest.mark.deadline(900)
def test_the_loop_sensitive_tests_pass_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    if os.environ.get("SESSIONBUS_TEST_LOOP") == "uvloop":
        pytest.skip("already running on uvloop")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         *FILES],
        cwd=REPO, env={**os.environ, "SESSIONBUS_TEST_LOOP": "uvloop"},
        capture_output=True, text=True, timeout=840,
    )
    tail = "\n".join(out.stdout.splitlines()[-30:])
    assert out.returncode == 0, tail
    summary = re.search(r"(\d+) passed", out.stdout.splitlines()[-1])
    assert summary is not None and int(summary.group(1)) >= 40, tail
    assert "failed" not in out.stdout.splitlines()[-1], tail
