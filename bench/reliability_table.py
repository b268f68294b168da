"""The reliability table of ``docs/reliability.md``: run the fault-injection tests, print the table.

    python bench/reliability_table.py               # run the scenarios, print the markdown table
    python bench/reliability_table.py --update-doc  # ... and put it in docs/reliability.md
    python bench/reliability_table.py -k forgery    # only some scenarios (pytest -k)

It runs ``tests/test_reliability_*.py``, ``tests/test_fuzz_*.py`` and ``tests/test_cluster.py``
(the three-node cluster: about 3 more minutes) (slow ones included) under
pytest, with ``SESSIONBUS_RELIABILITY_OUT`` naming a file: each scenario, once its assertions have
passed, appends one JSON line per row with ``record()`` below.  A scenario that fails writes no row,
and the command exits non-zero.  Bounded: the run is stopped after ``--timeout`` seconds (default
1200; it takes about 5 minutes here).  Loopback only: the shared broker on 127.0.0.1:5672 (unique
name prefixes, deleted afterwards) and a private RabbitMQ node the broker-restart tests start and
stop themselves.
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
DOC = REPO / "docs" / "reliability.md"
ENV = "SESSIONBUS_RELIABILITY_OUT"
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"

# The order of the table: fault groups as the doc discusses them.
GROUPS = ("broker-loss", "consumer-crash", "bad-input", "forgery", "overload")


def record(
    fault: str,
    *,
    injected: str,
    lost: int,
    rejected: int | str,
    recover_s: float | None,
    note: str = "",
    group: str = "",
) -> None:
    """Append one row for the table (a no-op unless ``$SESSIONBUS_RELIABILITY_OUT`` is set)."""
    path = os.environ.get(ENV)
    if not path:
        return
    row = {"fault": fault, "injected": injected, "lost": lost, "rejected": rejected,
           "recover_s": recover_s, "note": note, "group": group, "at": time.time()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _cell(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _seconds(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"


def format_table(rows: list[dict[str, Any]]) -> str:
    order = {g: i for i, g in enumerate(GROUPS)}
    rows = sorted(rows, key=lambda r: (order.get(r.get("group", ""), len(GROUPS)), r["at"]))
    head = ["fault", "injected (count, duration)", "lost (acked NEW/REMOVE)", "rejected",
            "time to recover", "notes"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        rej = r["rejected"]
        out.append("| " + " | ".join(_cell(c) for c in (
            r["fault"], r["injected"], r["lost"],
            f"{rej:,}" if isinstance(rej, int) else rej, _seconds(r["recover_s"]), r["note"],
        )) + " |")
    return "\n".join(out)


def machine() -> str:
    return (f"{os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def run(pytest_args: list[str], timeout: float) -> tuple[list[dict[str, Any]], int, str]:
    """Run the scenarios; returns (rows, pytest exit code, pytest's summary line)."""
    with tempfile.TemporaryDirectory(prefix="sb-reliability-") as d:
        out = Path(d) / "rows.jsonl"
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if p.name.startswith(("test_reliability_", "test_fuzz_", "test_cluster")))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "",
               *files, *pytest_args]
        try:
            done = subprocess.run(
                cmd, cwd=REPO, env={**os.environ, ENV: str(out)}, capture_output=True,
                text=True, timeout=timeout,
            )
            code, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            code = 124
            text = f"{exc.stdout or ''}\nstopped after {timeout:.0f}s"
        rows = ([json.loads(line) for line in out.read_text().splitlines() if line]
                if out.exists() else [])
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else ""
    if code != 0:
        sys.stderr.write(text[-6000:] + "\n")
    return rows, code, summary


def update_doc(table: str, header: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{header}\n\n{table}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
    DOC.write_text(pattern.sub(lambda _: block, text), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--update-doc", action="store_true", help=f"write the table into {DOC}")
    p.add_argument("--timeout", type=float, default=1200.0, metavar="SECONDS")
    p.add_argument("-k", dest="keyword", help="only scenarios matching (pytest -k)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    rows, code, summary = run(["-k", args.keyword] if args.keyword else [], args.timeout)
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
