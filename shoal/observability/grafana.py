"""A Grafana dashboard for shoal's metrics (:mod:`shoal.observability.metrics`).

``deploy/grafana/shoal-dashboard.json`` in the repository is :func:`dashboard` written out
(``python -m shoal.observability.grafana > deploy/grafana/shoal-dashboard.json``; a test keeps the two the
same), for importing by hand; ``shoal k8s build --grafana`` emits one per application as a
ConfigMap that Grafana's dashboard sidecar picks up (label ``grafana_dashboard: "1"``).

Every query uses Ray Serve's metric names where shoal has them (so the panels also work for
an application still on Ray Serve, and Ray's own dashboards work for shoal) and filters by
the ``namespace``, ``application`` and ``deployment`` variables.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from shoal.observability import metrics as m

__all__ = ["dashboard", "dashboard_json", "queries"]

_SEL = 'namespace=~"$namespace", application=~"$application", deployment=~"$deployment"'
_RATE = "$__rate_interval"


def _q(expr: str, legend: str) -> dict[str, str]:
    return {"expr": expr, "legendFormat": legend}


def _quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{_SEL}}}[{_RATE}])))"


def _rate(metric: str, by: str, extra: str = "") -> str:
    sel = _SEL + (", " + extra if extra else "")
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{_RATE}]))"


_DEP = "application, deployment"

# (title, unit, queries); each panel is half the dashboard's width.
_PANELS: tuple[tuple[str, str, tuple[dict[str, str], ...]], ...] = (
    ("HTTP requests / s by route and status", "reqps", (
        _q(_rate(m.HTTP_REQUESTS + "_total", "application, route, status_code"),
           "{{application}} {{route}} {{status_code}}"),)),
    ("HTTP errors / s by code", "reqps", (
        _q(_rate(m.HTTP_ERRORS + "_total", "application, route, error_code"),
           "{{application}} {{route}} {{error_code}}"),)),
    ("Requests / s by deployment", "reqps", (
        _q(_rate(m.REQUESTS + "_total", _DEP), "{{application}}/{{deployment}}"),)),
    ("Error ratio by deployment", "percentunit", (
        _q(f"{_rate(m.ERRORS + '_total', _DEP)} / {_rate(m.REQUESTS + '_total', _DEP)}",
           "{{application}}/{{deployment}}"),)),
    ("Processing latency p50 / p99 by deployment", "ms", (
        _q(_quantile(0.5, m.LATENCY, _DEP), "p50 {{application}}/{{deployment}}"),
        _q(_quantile(0.99, m.LATENCY, _DEP), "p99 {{application}}/{{deployment}}"))),
    ("HTTP latency p50 / p99 by route", "ms", (
        _q(_quantile(0.5, m.HTTP_LATENCY, "application, route"), "p50 {{application}} {{route}}"),
        _q(_quantile(0.99, m.HTTP_LATENCY, "application, route"), "p99 {{application}} {{route}}"))),
    ("Ongoing requests in replicas", "short", (
        _q(f"sum by ({_DEP}) ({m.PROCESSING}{{{_SEL}}})", "processing {{application}}/{{deployment}}"),)),
    ("Requests queued in callers", "short", (
        _q(f"sum by ({_DEP}) ({m.QUEUED}{{{_SEL}}})", "queued {{application}}/{{deployment}}"),
        _q(f"sum by ({_DEP}) ({m.AT_REPLICAS}{{{_SEL}}})", "sent {{application}}/{{deployment}}"))),
    ("Replicas", "short", (
        _q(f"count by ({_DEP}) ({m.PROCESSING}{{{_SEL}}})", "reporting {{application}}/{{deployment}}"),
        _q(f"sum by ({_DEP}, state) ({m.REPLICAS}{{{_SEL}}}) > 0", "{{state}} {{application}}/{{deployment}}"),
        _q(f"max by ({_DEP}) ({m.TARGET}{{{_SEL}}})", "target {{application}}/{{deployment}}"))),
    ("Autoscaling", "short", (
        _q(f"max by ({_DEP}) ({m.AUTOSCALING_TARGET}{{{_SEL}}})", "target {{application}}/{{deployment}}"),
        _q(f"max by ({_DEP}) ({m.AUTOSCALING_TOTAL_REQUESTS}{{{_SEL}}})", "load {{application}}/{{deployment}}"),
        _q(f"sum by ({_DEP}, direction) (increase({m.AUTOSCALING_DECISIONS}_total{{{_SEL}}}[{_RATE}]))",
           "scale {{direction}} {{application}}/{{deployment}}"))),
    ("Batch size (mean, p99)", "short", (
        _q(f"sum by ({_DEP}, function_name) (rate({m.BATCH_SIZE}_sum{{{_SEL}}}[{_RATE}])) / "
           f"sum by ({_DEP}, function_name) (rate({m.BATCH_SIZE}_count{{{_SEL}}}[{_RATE}]))",
           "mean {{deployment}} {{function_name}}"),
        _q(_quantile(0.99, m.BATCH_SIZE, f"{_DEP}, function_name"), "p99 {{deployment}} {{function_name}}"))),
    ("Batch wait p99 and batches / s", "ms", (
        _q(_quantile(0.99, m.BATCH_WAIT, f"{_DEP}, function_name"), "wait p99 {{deployment}} {{function_name}}"),
        _q(_rate(m.BATCHES + "_total", f"{_DEP}, function_name"), "batches/s {{deployment}} {{function_name}}"))),
    ("Multiplexed model loads and evictions / s", "ops", (
        _q(_rate(m.MODEL_LOADS + "_total", _DEP), "loads {{application}}/{{deployment}}"),
        _q(_rate(m.MODEL_UNLOADS + "_total", _DEP), "evictions {{application}}/{{deployment}}"))),
    ("Multiplexed model load latency p99", "ms", (
        _q(_quantile(0.99, m.MODEL_LOAD_LATENCY, _DEP), "p99 {{application}}/{{deployment}}"),)),
    # shoal.llm's model servers, under vLLM's names (shoal.llm._serving_metrics).
    ("LLM time to first token p50 / p99", "s", (
        _q(_quantile(0.5, "vllm:time_to_first_token_seconds", "model_name"), "p50 {{model_name}}"),
        _q(_quantile(0.99, "vllm:time_to_first_token_seconds", "model_name"), "p99 {{model_name}}"))),
    ("LLM time per output token p50 / p99", "s", (
        _q(_quantile(0.5, "vllm:time_per_output_token_seconds", "model_name"), "p50 {{model_name}}"),
        _q(_quantile(0.99, "vllm:time_per_output_token_seconds", "model_name"), "p99 {{model_name}}"))),
    ("LLM end-to-end latency p50 / p99 and queue time p99", "s", (
        _q(_quantile(0.5, "vllm:e2e_request_latency_seconds", "model_name"), "e2e p50 {{model_name}}"),
        _q(_quantile(0.99, "vllm:e2e_request_latency_seconds", "model_name"), "e2e p99 {{model_name}}"),
        _q(_quantile(0.99, "vllm:request_queue_time_seconds", "model_name"), "queue p99 {{model_name}}"))),
    ("LLM requests running / waiting", "short", (
        _q(f"sum by (model_name) (vllm:num_requests_running{{{_SEL}}})", "running {{model_name}}"),
        _q(f"sum by (model_name) (vllm:num_requests_waiting{{{_SEL}}})", "waiting {{model_name}}"))),
)


def _variable(name: str, label: str, query_metric: str, current: str | None) -> dict[str, Any]:
    var: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": f"label_values({query_metric}, {name})", "refId": f"{name}-values"},
        "definition": f"label_values({query_metric}, {name})",
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "sort": 1,
    }
    var["current"] = ({"selected": True, "text": [current], "value": [current]} if current
                      else {"selected": True, "text": ["All"], "value": ["$__all"]})
    return var


def dashboard(application: str | None = None, uid: str = "shoal") -> dict[str, Any]:
    """The dashboard; ``application`` preselects one application (all by default)."""
    panels: list[dict[str, Any]] = []
    for i, (title, unit, queries) in enumerate(_PANELS):
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [{**q, "refId": chr(ord("A") + j), "datasource": {"type": "prometheus",
                                                                         "uid": "${datasource}"}}
                        for j, q in enumerate(queries)],
        })
    return {
        "uid": uid,
        "title": f"shoal: {application}" if application else "shoal",
        "description": "Requests, errors, latency, queues, replicas, batching and multiplexing of shoal "
                       "(Ray Serve's metric names).",
        "tags": ["shoal", "ray-serve"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            _variable("namespace", "Namespace", m.REQUESTS + "_total", None),
            _variable("application", "Application", m.REQUESTS + "_total", application),
            _variable("deployment", "Deployment", m.REQUESTS + "_total", None),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def dashboard_json(application: str | None = None, uid: str = "shoal") -> str:
    return json.dumps(dashboard(application, uid), indent=2) + "\n"


def queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression in a dashboard (panel targets and variable queries)."""
    out = [t["expr"] for p in board.get("panels", []) for t in p.get("targets", [])]
    for var in board.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            out.append(str(q.get("query", "")))
    return out


if __name__ == "__main__":
    sys.stdout.write(dashboard_json())
