"""docs/metrics.md and the Grafana dashboard agree with the metrics the daemon defines.

Promises checked: every metric in the registry is in the catalogue table with its type and
labels, and the table lists nothing else; every metric named anywhere on the page exists,
and the page's PromQL and alert rules (valid YAML) use only series Prometheus really
receives (`_total` for counters; `_bucket`, `_sum`, `_count` for histograms); the dashboard
has a Prometheus data-source variable its panels use, and its expressions chart every
metric and name only real series.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from notifyd.metrics import Metrics
from tests.helpers import ROOT

DOC = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "docs" / "grafana" / "notifyd-dashboard.json"
# a metric name: lower case, never ending in "_" (NOTIFYD_* settings and notifyd:* keys differ)
NAME = re.compile(r"\bnotifyd_[a-z0-9_]*[a-z0-9]\b")
ROW = re.compile(r"^\| `(notifyd_[a-z0-9_]+)` \| (\w+) \|([^|]*)\|", re.M)


@dataclass(frozen=True)
class Defined:
    documented: str  # the name the catalogue gives it: counters with _total
    type: str
    labels: frozenset[str]
    series: frozenset[str]  # what Prometheus stores and queries can name


def defined() -> dict[str, Defined]:
    metrics = Metrics()
    found: dict[str, Defined] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        # prometheus_client has no public accessor for a wrapper's name, type and labels
        name, kind, labels = metric._name, str(metric._type), frozenset(metric._labelnames)
        if kind == "counter":
            documented, series = f"{name}_total", {f"{name}_total"}
        elif kind == "histogram":
            documented, series = name, {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            documented, series = name, {name}
        found[documented] = Defined(documented, kind, labels, frozenset(series))
    # the registry is what /metrics renders: nothing is defined outside the Metrics object
    assert {family.name for family in metrics.registry.collect()} == {
        d.documented.removesuffix("_total") if d.type == "counter" else d.documented
        for d in found.values()
    }
    return found


def series_names() -> set[str]:
    return {name for d in defined().values() for name in d.series}


def promql_blocks(text: str) -> list[str]:
    return re.findall(r"```promql\n(.*?)```", text, re.S)


def alert_rules(text: str) -> list[dict[str, Any]]:
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "groups:" in b]
    loaded = yaml.safe_load(block)
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    exprs = [node["expr"] for node in walk(board["panels"]) if "expr" in node]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def unknown(text: str, allowed: set[str]) -> set[str]:
    return set(NAME.findall(text)) - allowed


# --- docs/metrics.md ---------------------------------------------------------------------------


def test_every_defined_metric_is_in_the_catalogue_with_its_type_and_labels() -> None:
    rows = {name: (kind, labels) for name, kind, labels in ROW.findall(DOC.read_text())}
    for metric in defined().values():
        assert metric.documented in rows, f"{metric.documented} is not in docs/metrics.md"
        kind, labels = rows[metric.documented]
        assert kind == metric.type, metric.documented
        written = frozenset(label.strip() for label in labels.split(",") if label.strip())
        assert written == metric.labels, (metric.documented, sorted(metric.labels))


def test_the_catalogue_lists_only_defined_metrics() -> None:
    rows = {name for name, _, _ in ROW.findall(DOC.read_text())}
    assert rows, "no catalogue table found"
    assert rows <= set(defined()), rows - set(defined())


def test_every_metric_named_on_the_page_exists() -> None:
    allowed = set(defined()) | series_names()
    assert unknown(DOC.read_text(), allowed) == set()


def test_page_queries_and_alert_rules_name_only_real_series() -> None:
    text = DOC.read_text()
    series = series_names()
    blocks = promql_blocks(text)
    assert blocks, "no promql blocks found"
    for block in blocks:
        assert unknown(block, series) == set(), block
    rules = alert_rules(text)
    assert rules, "no alert rules found"
    for rule in rules:
        assert rule["alert"] and rule["expr"], rule
        assert NAME.search(rule["expr"]), rule["alert"]
        assert unknown(rule["expr"], series) == set(), rule["alert"]


@pytest.mark.parametrize(
    ("wanted", "alert"),
    [
        ("notifyd_dead_letters_total", "NotifydDeadLettersRising"),
        ("notifyd_stream_lag", "NotifydStreamLagGrowing"),
        ("notifyd_actor_restarts_total", "NotifydActorRestarting"),
        ("notifyd_reminder_lateness_ms_bucket", "NotifydReminderLatenessP99"),
    ],
)
def test_the_issue_s_alerts_are_suggested(wanted: str, alert: str) -> None:
    rules = {rule["alert"]: rule["expr"] for rule in alert_rules(DOC.read_text())}
    assert wanted in NAME.findall(rules[alert])


# --- docs/grafana/notifyd-dashboard.json -------------------------------------------------------


def board() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_dashboard_queries_name_only_real_series() -> None:
    series = series_names()
    exprs = dashboard_exprs(board())
    assert len(exprs) > 10
    for expr in exprs:
        assert NAME.search(expr), expr
        assert unknown(expr, series) == set(), expr
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_dashboard_charts_every_metric() -> None:
    charted = {name for expr in dashboard_exprs(board()) for name in NAME.findall(expr)}
    for metric in defined().values():
        assert metric.series & charted, f"no dashboard panel uses {metric.documented}"


def test_dashboard_takes_its_prometheus_data_source_from_a_variable() -> None:
    loaded = board()
    assert 36 <= loaded["schemaVersion"] <= 41
    variables = {v["name"]: v for v in loaded["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in loaded["panels"]]
    assert len(ids) == len(set(ids))
    for panel in loaded["panels"]:
        for node in [panel, *panel.get("targets", [])]:
            if panel["type"] != "row":
                assert node["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel[
                    "title"
                ]
