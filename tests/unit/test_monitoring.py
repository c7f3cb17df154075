"""deployments/monitoring/: the Grafana dashboard and the Prometheus alert rules load, parse, and use only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

promql_parser = pytest.importorskip("promql_parser")

from lmaas.ops.logs import JsonFormatter, request_id_from  # noqa: E402
from lmaas.ops.metrics import METRICS, RAY_SERVE_METRICS  # noqa: E402

MONITORING = Path(__file__).resolve().parents[2] / "deployments" / "monitoring"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())
ALERTS = yaml.safe_load((MONITORING / "prometheus-alerts.yaml").read_text())
KNOWN = {series for spec in METRICS for series in spec.series()} | set(RAY_SERVE_METRICS)


def metric_names(node) -> set[str]:  # noqa: ANN001 - a promql_parser expression
    """Every metric a parsed PromQL expression selects."""
    if node is None:
        return set()
    if type(node).__name__ == "VectorSelector":
        return {node.name}
    found: set[str] = set()
    for attr in ("args", "expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        for item in child if isinstance(child, (list, tuple)) else [child]:
            if item is not None and not isinstance(item, (str, int, float)):
                found |= metric_names(item)
    return found


def grafana_expr(expr: str) -> str:
    """Grafana's variables as a Prometheus would see them after substitution."""
    return expr.replace("$model", ".*").replace("$run", ".*")


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(panel["title"], grafana_expr(t["expr"])) for panel in DASHBOARD["panels"] for t in panel["targets"]]


def alert_rules() -> list[dict]:
    return [rule for group in ALERTS["groups"] for rule in group["rules"]]


def test_dashboard_structure():
    assert DASHBOARD["uid"] and DASHBOARD["title"] and isinstance(DASHBOARD["schemaVersion"], int)
    panels = DASHBOARD["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert "datasource" in names
    for panel in panels:
        assert panel["type"] in ("timeseries", "stat", "gauge", "table"), panel["title"]
        assert panel["datasource"]["type"] == "prometheus" and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and 0 < panel["gridPos"]["w"] <= 24
        assert panel["targets"], f"{panel['title']} has no queries"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for variable in re.findall(r"\$(\w+)", "".join(t["expr"] for t in panel["targets"])):
            assert variable in names, f"{panel['title']} uses undefined variable ${variable}"


@pytest.mark.parametrize("title,expr", dashboard_exprs(), ids=lambda v: v[:40])
def test_dashboard_queries_parse_and_use_known_metrics(title: str, expr: str):
    used = metric_names(promql_parser.parse(expr))
    assert used, f"{title}: selects no metric"
    assert used <= KNOWN, f"{title}: unknown metrics {sorted(used - KNOWN)}"


def test_alert_rules_structure():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])
    # what issue 10 asks alerts for
    text = " ".join(r["expr"] for r in rules)
    for needed in ('status=~"5.."', "histogram_quantile(0.99", "ray_lmaas_quota_rejections_total", "ray_serve_deployment_replica_healthy",
                   'ray_lmaas_jobs_finished_total{state="failed"}'):
        assert needed in text, needed


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_expressions_parse_and_use_known_metrics(rule: dict):
    used = metric_names(promql_parser.parse(rule["expr"]))
    assert used and used <= KNOWN, f"unknown metrics {sorted(used - KNOWN)}"


def test_every_lmaas_metric_is_on_the_dashboard():
    used = set().union(*(metric_names(promql_parser.parse(e)) for _, e in dashboard_exprs()))
    missing = [spec.name for spec in METRICS if not set(spec.series()) & used]
    assert not missing, f"add panels for {missing}"


def test_metric_names_follow_prometheus_conventions():
    for spec in METRICS:
        assert re.fullmatch(r"lmaas_[a-z0-9_]+", spec.name)
        assert not spec.name.endswith("_total"), "Ray adds _total to counters"
        assert spec.kind in ("counter", "gauge", "histogram")
        assert (spec.kind == "histogram") == bool(spec.boundaries)
        assert list(spec.boundaries) == sorted(spec.boundaries)


def test_recorders_are_no_ops_without_ray():
    from lmaas.ops.metrics import GatewayMetrics, JobMetrics, ServingMetrics, TrainMetrics
    from lmaas.serve.engine import EngineStats

    GatewayMetrics().request(model="m", version="m:1", route="/v1/completions", status=200, seconds=0.1)
    served = ServingMetrics("m", "m:1")
    served.first_token(0.1), served.token(0.01), served.finished(3, 4), served.engine(EngineStats(1, 2, 8, 0, 0, 64, 1024))
    TrainMetrics("run", "m").report({"step": 1, "loss": 2.0, "checkpoint_stall_s": 0.5})
    JobMetrics().counts({"queued": 1})


def test_recent_requests_count_server_errors_in_a_sliding_window():
    from lmaas.ops.metrics import RecentRequests

    recent = RecentRequests(window_s=300)
    for t, status in ((1000, 200), (1000, 500), (1100, 429), (1200, 503), (1299, 200)):
        recent.add("m", status, now=t)
    assert recent.counts(now=1299) == {"m": (5, 2)}  # a 429 is the client's, not a server error
    assert recent.counts(now=1300) == {"m": (3, 1)}  # the two requests of second 1000 left the window
    assert recent.add("other", 502, now=1600) == (1, 1)
    assert recent.counts(now=1600) == {"m": (0, 0), "other": (1, 1)}
    recent.add("m", 200, now=1601, ttft_s=0.02), recent.add("m", 200, now=1602, ttft_s=0.04), recent.add("m", 200, now=1602)
    recent.add("m@staging", 200, now=1602, ttft_s=0.03)
    assert recent.traffic(["m", "m@staging", "absent"], now=1602) == {
        "window_s": 300, "requests": 4, "requests_per_s": 4 / 300, "errors": 0, "error_rate": 0.0, "ttft_p50_ms": 30.0}
    assert recent.traffic(["other"], now=1901)["ttft_p50_ms"] is None and recent.traffic(["m"], now=1910)["error_rate"] is None


def test_json_log_lines_carry_the_request_id():
    import logging

    from lmaas.ops.logs import REQUEST_ID

    record = logging.makeLogRecord({"name": "lmaas.serve", "levelname": "INFO", "msg": "done %s", "args": ("x",), "model": "tiny"})
    token = REQUEST_ID.set("abc123")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    assert line["message"] == "done x" and line["request_id"] == "abc123" and line["model"] == "tiny" and line["level"] == "info"
    assert request_id_from("ok-id_1.2:3") == "ok-id_1.2:3"
    assert request_id_from('bad"id\n') != 'bad"id\n' and len(request_id_from(None)) == 32
