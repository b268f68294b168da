"""The attack table of ``docs/security.md``: run the attack tests, print the table.

    python bench/security_table.py               # run every test_attack_*, print the markdown table
    python bench/security_table.py --update-doc  # ... and put it in docs/security.md
    python bench/security_table.py -k replay     # only some attacks (pytest -k, not for the doc)

It runs the tests named ``test_attack_*`` of ``tests/test_security_*.py`` under pytest, with
``SESSIONBUS_SECURITY_OUT`` naming a file: each attack, once its assertions have passed, appends
one JSON line with ``record()`` below.  A failing attack test writes no row, and the command exits
non-zero (the doc is then left alone).  Bounded by ``--timeout`` (default 600 s).  Loopback only:
the shared broker on 127.0.0.1:5672, with unique name prefixes and users, deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "security.md"
ENV = "SESSIONBUS_SECURITY_OUT"
BEGIN, END = "<!-- security-table:begin -->", "<!-- security-table:end -->"


def record(attack: str, *, role: str, tried: int, accepted: int, result: str) -> None:
    """One row: who attacked (``role``: whose credentials and material), how many attempts,
    how many the farm accepted, and what happened. A no-op unless ``$SESSIONBUS_SECURITY_OUT``
    is set."""
    path = os.environ.get(ENV)
    if not path:
        return
    row = {"attack": attack, "role": role, "tried": tried, "accepted": accepted,
           "result": result, "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
           "at": time.time()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def machine() -> str:
    return (f"{os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _cell(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def format_table(rows: list[dict[str, Any]]) -> str:
    rows = sorted(rows, key=lambda r: r["at"])
    head = ["attack", "attacker holds", "tried", "accepted", "result", "test"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        test = r.get("test", "").rsplit("::", 1)[-1]
        out.append("| " + " | ".join(_cell(c) for c in (
            r["attack"], r["role"], r["tried"], r["accepted"], r["result"], f"`{test}`",
        )) + " |")
    return "\n".join(out)


def run(only: str | None, timeout: float) -> tuple[list[dict[str, Any]], int, str]:
    keyword = f"test_attack_ and ({only})" if only else "test_attack_"
    with tempfile.TemporaryDirectory(prefix="sb-security-") as d:
        out = Path(d) / "rows.jsonl"
        files = sorted(str(p.relative_to(REPO))
                       for p in (REPO / "tests").glob("test_security_*.py"))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "",
               "-k", keyword, *files]
        try:
            done = subprocess.run(cmd, cwd=REPO, env={**os.environ, ENV: str(out)},
                                  capture_output=True, text=True, timeout=timeout)
            code, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            code, text = 124, f"{exc.stdout or ''}\nstopped after {timeout:.0f}s"
        rows = ([json.loads(line) for line in out.read_text().splitlines() if line]
                if out.exists() else [])
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if code != 0:
        sys.stderr.write(text[-6000:] + "\n")
    return rows, code, lines[-1] if lines else ""


def update_doc(table: str, header: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{header}\n\n{table}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
    DOC.write_text(pattern.sub(lambda _: block, text), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--update-doc", action="store_true", help=f"write the table into {DOC}")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    p.add_argument("-k", dest="keyword", help="only attacks matching (pytest -k)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    rows, code, summary = run(args.keyword, args.timeout)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; "
              f"{time.monotonic() - t0:.0f} s; pytest: {summary}")
    table = format_table(rows)
    print(header + "\n\n" + table, flush=True)
    if args.update_doc and code == 0 and not args.keyword:
        update_doc(table, header)
    elif args.update_doc:
        print("(docs not updated: the run failed or was partial)", file=sys.stderr)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
