"""ops/grafana/sessionbus.json loads as a dashboard, and every metric the dashboard and the alert
rules query is one the code exports (a misspelt or renamed metric fails here, not on a graph).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from sessionbus.metrics import catalogue

OPS = Path(__file__).resolve().parent.parent / "ops"
DASHBOARD = OPS / "grafana" / "sessionbus.json"
OPERATIONS = OPS.parent / "docs" / "operations.md"
RULES = OPS / "prometheus" / "rules" / "sessionbus.yml"

# Not exported by sessionbus but by Prometheus itself.
BUILTIN = {"up"}

PROMQL_WORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
    "group_right", "inf", "nan", "Inf", "NaN",
}


def exported_names() -> set[str]:
    """Series names the processes serve: counters as _total, histograms as _bucket/_sum/_count."""
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in catalogue().collect():
        if family.name.startswith("sessionbus_"):
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels left out)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables ($__rate_interval, ...)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.group() in PROMQL_WORDS or s[m.end():].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation call
        names.add(m.group())
    return names


def test_metric_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (instance, le) (rate(sessionbus_replication_lag_seconds'
        '_bucket{instance=~"$instance"}[$__rate_interval]))) > 0.5'
    ) == {"sessionbus_replication_lag_seconds_bucket"}
    assert metric_names(
        'sum(rate(a_total{result="cross"}[5m])) / on (job) group_left sum(rate(b_total[5m])) '
        "and c_gauge > 2 * 3600 or up{job=~\"x|y\"} == 0"
    ) == {"a_total", "b_total", "c_gauge", "up"}
    # The check below does catch a misspelt name.
    assert "sessionbus_handshake_total" not in exported_names()
    assert "sessionbus_handshakes_total" in exported_names()
    assert "sessionbus_replication_lag_seconds_bucket" in exported_names()
    assert "sessionbus_handshakes" not in exported_names()


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_exprs(d: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(d) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            assert m, f"variable {v['name']}: unexpected query {q}"
            exprs.append(m.group(1))
    return exprs


def rule_exprs() -> list[str]:
    """The ``expr`` of every rule (single-line or a ``|`` block), without a YAML parser."""
    lines = RULES.read_text().splitlines()
    exprs = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2)
        if value in ("|", ">", "|-", ">-"):
            block = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(block)
        exprs.append(value)
    return exprs


def test_dashboard_is_a_loadable_grafana_dashboard() -> None:
    d = load_dashboard()
    assert d["title"] == "sessionbus" and d["uid"] == "sessionbus"
    assert 36 <= d["schemaVersion"] <= 41
    assert d.get("id") is None  # Grafana assigns one on import
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for p in panels(d):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat")
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip()
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]


def test_dashboard_covers_what_operators_watch() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs(load_dashboard())))
    for name in (
        "sessionbus_handshakes_total", "sessionbus_farm_lookups_total",
        "sessionbus_lookups_total", "sessionbus_replication_lag_seconds_bucket",
        "sessionbus_events_published_total", "sessionbus_events_consumed_total",
        "sessionbus_events_dropped_total", "sessionbus_messages_dead_lettered_total",
        "sessionbus_replica_sessions", "sessionbus_outbox_depth", "sessionbus_broker_connected",
        "sessionbus_ticket_key_newest_age_seconds",
    ):
        assert name in used, f"no panel shows {name}"


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_queried_metric_is_exported(source: str) -> None:
    exprs = dashboard_exprs(load_dashboard()) if source == "dashboard" else rule_exprs()
    assert exprs
    known = exported_names() | BUILTIN
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        unknown = names - known
        assert not unknown, f"{source}: {sorted(unknown)} not exported (in {expr!r})"


def test_every_exported_metric_is_documented() -> None:
    """docs/operations.md's metric table names exactly the metrics the code registers."""
    queried_as = {"counter": "_total", "gauge": "", "histogram": "", "summary": "",
                  "info": "_info"}
    exported = {f.name + queried_as.get(f.type, "") for f in catalogue().collect()
                if f.name.startswith("sessionbus_")}
    table = set(re.findall(r"^\| `(sessionbus_\w+)` \|", OPERATIONS.read_text(), re.MULTILINE))
    assert exported - table == set(), "exported but not in docs/operations.md's table"
    assert table - exported == set(), "in docs/operations.md's table but not exported"
