"""docs/METRICS.md, the Grafana dashboard and the alert rules against the worker's real registry.

A metric added without a row in the reference, a row or a panel or a rule naming a series the
worker does not expose, and a rules file that lost a field all fail here. ``promtool`` is not
installed in the development environment (and the tests fetch no binaries), so the PromQL is
checked for structure only: the series it names, balanced brackets, durations. Where promtool
is installed, ``promtool check rules k8s/monitoring/alerts.yaml`` checks the expressions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from stream_worker.observability import Metrics

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "METRICS.md"
DASHBOARD = REPO / "k8s" / "monitoring" / "grafana-dashboard.json"
RULES = REPO / "k8s" / "monitoring" / "alerts.yaml"
PROMETHEUS_RULE = REPO / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
METRIC_NAME = re.compile(r"\blookout_[a-z0-9_]+")
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
SEVERITIES = {"critical", "warning", "info"}


@dataclass(frozen=True)
class Family:
    """One metric family: what a row of the reference states about it."""

    type: str
    labels: frozenset[str]
    series: frozenset[str]  # the sample names it exposes, without ``_created``


def registry_families() -> dict[str, Family]:
    """Every family a worker's registry exports, with one child per labelled metric so that
    each family shows the sample names it exposes."""
    metrics = Metrics()
    wrappers = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    # prometheus_client has no public accessor for a metric's label names.
    label_names = {w._name: tuple(w._labelnames) for w in wrappers}
    for w in wrappers:
        if w._labelnames:
            w.labels(*(["x"] * len(w._labelnames)))
    families: dict[str, Family] = {}
    for family in metrics.registry.collect():
        assert family.name in label_names, f"{family.name} is registered but not an attribute of Metrics"
        series = {s.name for s in family.samples if not s.name.endswith("_created")}
        families[family.name] = Family(family.type, frozenset(label_names[family.name]), frozenset(series))
    return families


def exposed_series() -> dict[str, str]:
    """Every sample name the worker can expose (``_created`` included) -> its family."""
    out: dict[str, str] = {}
    for name, family in registry_families().items():
        for series in family.series:
            out[series] = name
        if family.type in ("counter", "histogram"):
            out[f"{name}_created"] = name
    return out


def reference_rows() -> dict[str, Family]:
    """The rows of the table under "Every metric" in docs/METRICS.md."""
    rows: dict[str, Family] = {}
    for line in REFERENCE.read_text().splitlines():
        if not line.startswith("| `lookout_"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 6, f"a metric row has 6 cells, this one {len(cells)}: {line}"
        name, kind, labels, series = cells[0].strip("`"), cells[1], cells[2], cells[3]
        assert name not in rows, f"{name} has two rows"
        rows[name] = Family(
            kind, frozenset(re.findall(r"`([^`]+)`", labels)), frozenset(re.findall(r"`([^`]+)`", series))
        )
    return rows


def names_in(text: str) -> set[str]:
    """The ``lookout_*`` names a text mentions."""
    return set(METRIC_NAME.findall(text))


def assert_names_exist(text: str, where: str, *, prose: bool = False) -> None:
    """Every ``lookout_*`` name in ``text`` is a series the worker exposes; in ``prose`` (docs,
    annotations, panel descriptions) a family's own name, as in ``lookout_sink_seconds``, is fine."""
    known = exposed_series().keys() | (registry_families().keys() if prose else set())
    unknown = names_in(text) - known
    assert not unknown, (
        f"{where} names series the worker does not expose: {sorted(unknown)} "
        "(counters are lookout_x_total, histograms lookout_x_bucket/_sum/_count)"
    )


def assert_balanced(expr: str) -> None:
    """Brackets balance outside string literals (the most promtool-free structure check there is)."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    quote: str | None = None
    for ch in expr:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in closing:
            assert stack and stack.pop() == closing[ch], f"unbalanced {ch!r} in {expr!r}"
    assert not stack and quote is None, f"unclosed {stack or quote} in {expr!r}"


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the variables' queries."""
    exprs = [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


# ----------------------------------------------------------------------------- the reference


def test_every_metric_has_one_row_in_the_reference_and_every_row_a_metric() -> None:
    families, rows = registry_families(), reference_rows()
    missing = sorted(families.keys() - rows.keys())
    assert not missing, f"metrics without a row in docs/METRICS.md: {missing}"
    stale = sorted(rows.keys() - families.keys())
    assert not stale, f"rows in docs/METRICS.md for metrics the worker does not have: {stale}"


def test_each_row_states_the_metrics_type_labels_and_series() -> None:
    families = registry_families()
    for name, row in reference_rows().items():
        assert row == families[name], f"docs/METRICS.md row of {name}: {row}, the registry: {families[name]}"


def test_every_metric_name_the_reference_mentions_exists() -> None:
    assert_names_exist(REFERENCE.read_text(), "docs/METRICS.md", prose=True)


def test_the_reference_lists_every_alert() -> None:
    documented = set(re.findall(r"^\| `(Lookout\w+)` \|", REFERENCE.read_text(), re.MULTILINE))
    assert documented == {r["alert"] for r in rules()}


# ----------------------------------------------------------------------------- the dashboard


def test_dashboard_loads_with_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39  # Grafana 11 and later
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard_panels(dashboard):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} queries nothing"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"]


def test_dashboard_queries_name_only_exposed_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for expr in dashboard_exprs(dashboard):
        assert_balanced(expr)
        assert_names_exist(expr, f"the dashboard query {expr!r}")
    assert_names_exist(DASHBOARD.read_text(), str(DASHBOARD.relative_to(REPO)), prose=True)


def test_dashboard_charts_every_metric() -> None:
    exposed = exposed_series()
    dashboard = json.loads(DASHBOARD.read_text())
    charted = {exposed[n] for expr in dashboard_exprs(dashboard) for n in names_in(expr)}
    assert not registry_families().keys() - charted, "metrics without a panel on the dashboard"


# ----------------------------------------------------------------------------- the alert rules


def test_every_rule_has_the_fields_an_operator_needs() -> None:
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules():
        assert re.fullmatch(r"Lookout[A-Z]\w+", rule["alert"])
        assert rule.keys() <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert DURATION.match(str(rule["for"])), f"{rule['alert']}: for {rule['for']!r}"
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert_balanced(rule["expr"])


def test_rules_name_only_exposed_series() -> None:
    for rule in rules():
        assert_names_exist(rule["expr"], f"the expr of {rule['alert']}")
    assert_names_exist(RULES.read_text(), str(RULES.relative_to(REPO)), prose=True)
    alerted = {exposed_series()[n] for r in rules() for n in names_in(r["expr"])}
    # The four conditions the issue asks for, plus `up` for a worker that does not answer.
    assert {
        "lookout_consumer_lag",
        "lookout_frames_dead_lettered",
        "lookout_drift_low_confidence_share",
        "lookout_ready",
    } <= alerted
    assert any(r["expr"].startswith("up{") for r in rules())


def test_the_prometheus_rule_carries_the_plain_rules_file() -> None:
    manifest = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == yaml.safe_load(RULES.read_text()), (
        "k8s/components/monitoring/prometheusrule.yaml's spec differs from k8s/monitoring/alerts.yaml"
    )
