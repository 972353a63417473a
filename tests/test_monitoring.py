"""monitoring/: the Grafana dashboard and the Prometheus alert rules name only what the real endpoint exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from sd_testutil import scrape_metrics
from test_prometheus import fill
from test_prometheus import store as store  # the fixture: a fresh store with its base checkpoint

from selfdistill.prometheus import MetricsServer

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
METRIC = re.compile(r"\bselfdistill_[a-z_]+")
SELECTOR = re.compile(r"\b(selfdistill_[a-z_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
ADDED_BY_PROMETHEUS = {"instance", "job"}  # target labels the scrape adds to every sample


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_queries(dash: dict) -> list[str]:
    """Every PromQL text in the dashboard: the panels' targets and the query variables."""
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if "expr" in t]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def expressions() -> list[str]:
    return [r["expr"] for r in alert_rules()] + dashboard_queries(dashboard())


@pytest.fixture
def exposed(store) -> dict[str, set[str]]:
    """{sample name: label names} as the endpoint serves them, with a row in every table it reads."""
    fill(store)
    server = MetricsServer(store.path, "svc", "127.0.0.1", 0)
    try:
        samples = scrape_metrics(server.url)
    finally:
        server.close()
    names: dict[str, set[str]] = {}
    for name, labels in samples:
        names.setdefault(name, set()).update(k for k, _ in labels)
    return names


def test_every_metric_named_is_exposed_with_the_labels_matched(exposed):
    used = {m for e in expressions() for m in METRIC.findall(e)}
    assert len(used) >= 15, used  # the extraction found the expressions
    missing = sorted(used - exposed.keys())
    assert not missing, f"monitoring/ names metrics the endpoint does not expose: {missing} (exposed: {sorted(exposed)})"
    for e in expressions():
        for name, matchers in SELECTOR.findall(e):
            unknown = set(MATCHER.findall(matchers)) - exposed[name] - ADDED_BY_PROMETHEUS
            assert not unknown, f"{e!r}: {name} has no label {sorted(unknown)} (it has {sorted(exposed[name])})"


def test_every_alert_says_how_bad_and_what_to_do():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert {"NoRoundFinished", "JudgeUnhealthy", "RoundsFailing", "TrainingRunsFailing", "DiskNearlyFull",
            "TeacherUnavailable", "ExporterDown"} <= set(names)
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"].strip() and "selfdistill" in r["annotations"]["description"], r["alert"]
        assert r["expr"].count("(") == r["expr"].count(")") and r["expr"].count("[") == r["expr"].count("]"), r["alert"]
        if "for" in r:
            assert re.fullmatch(r"\d+[smhd]", r["for"]), r["alert"]


def test_every_panel_reads_the_chosen_prometheus():
    dash = dashboard()
    assert dash["uid"] == "selfdistill" and dash["schemaVersion"] >= 36
    assert any(v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource" for v in dash["templating"]["list"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 12
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        exprs = [t["expr"] for t in p["targets"] if t.get("expr")]
        assert exprs, p["title"]
        assert all(e.count("(") == e.count(")") and e.count("{") == e.count("}") for e in exprs), p["title"]
