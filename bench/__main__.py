"""``python -m bench``: run every benchmark and print one table.

Each benchmark module exposes ``run() -> list[dict]`` with rows ``{figure, value, unit, baseline,
ratio, target, ok}`` (and optionally ``note``). Baselines are measured in the same run, so the
ratios hold on a busy machine where absolute figures do not. Everything runs over loopback
against the broker at ``SESSIONBUS_BENCH_AMQP_URL`` (default ``SESSIONBUS_AMQP_URL``, else
guest@127.0.0.1:5672), under a unique name prefix that is deleted afterwards; every process a
benchmark starts is stopped by its PID.

    python -m bench                     # everything (a few minutes)
    python -m bench --quick             # shorter runs, noisier figures
    python -m bench --only replication  # one benchmark (repeatable)
    python -m bench --json out.json     # the rows as JSON too
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> module; the last two belong to other engineers and may be absent.
BENCHMARKS: dict[str, str] = {
    "replication": "bench.bench_replication",
    "node": "bench.bench_node",
    "peer_cache": "bench.bench_peer_cache",
    "httpd_cache": "bench.bench_httpd_cache",
    "fanout": "bench.bench_fanout",
}
OPTIONAL = {"peer_cache", "httpd_cache"}


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "ok" if v else "NOT OK"
    if isinstance(v, float):
        if v != v:  # nan
            return "—"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["benchmark", "figure", "value", "unit", "baseline (same run)", "ratio", "target", "ok"]
    body = []
    for r in rows:
        ratio = r.get("ratio")
        body.append([
            str(r.get("bench", "")), str(r.get("figure", "")), _fmt(r.get("value")),
            str(r.get("unit", "")), _fmt(r.get("baseline")),
            "—" if ratio is None else f"{_fmt(float(ratio))}x", _fmt(r.get("target")),
            "skipped" if r.get("ok") is None and r.get("skipped") else _fmt(r.get("ok")),
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in b) + " |" for b in body]
    notes = [f"- {r.get('bench', '')}: {r['figure']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(format_table(rows), flush=True)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _load(name: str) -> Callable[[], list[dict[str, Any]]] | str:
    """The module's run(), or why it is skipped."""
    module_name = BENCHMARKS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return "not present"
        return f"import failed: {type(exc).__name__}: {exc}"
    except Exception as exc:
        return f"import failed: {type(exc).__name__}: {exc}"
    fn = getattr(module, "run", None)
    if not callable(fn):
        return "has no run()"
    return fn  # type: ignore[no-any-return]


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="shorter runs (noisier figures)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.quick:
        os.environ["SESSIONBUS_BENCH_QUICK"] = "1"
    # SIGTERM unwinds like Ctrl-C: every benchmark's finally stops its processes and deletes
    # its queues (and children get SIGTERM from the kernel if this process dies anyway).
    signal.signal(signal.SIGTERM, _terminate)
    names = args.only or list(BENCHMARKS)
    print(f"machine: {machine()}", flush=True)
    rows: list[dict[str, Any]] = []
    failed = False
    t_all = time.monotonic()
    for name in names:
        fn = _load(name)
        if isinstance(fn, str):
            if name not in OPTIONAL or args.only:
                failed = failed or name not in OPTIONAL
            rows.append({"bench": name, "figure": f"(skipped: {fn})", "ok": None,
                         "skipped": True})
            print(f"[{name}] skipped: {fn}", flush=True)
            continue
        print(f"[{name}] running ...", flush=True)
        t0 = time.monotonic()
        try:
            got = fn()
        except Exception as exc:
            failed = True
            traceback.print_exc()
            rows.append({"bench": name, "figure": f"(failed: {type(exc).__name__}: {exc})",
                         "ok": False})
            continue
        for r in got:
            rows.append({"bench": name, **r})
        print(f"[{name}] done in {time.monotonic() - t0:.0f} s", flush=True)
    print()
    print_table(rows)
    print(f"\n{machine()}; total {time.monotonic() - t_all:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
