"""shoal.observability.metrics without processes: accumulation, flushing, the controller's part, the docs table,
and the Grafana dashboard (its queries only use metric names shoal exposes)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from shoal.kubernetes import names
from shoal.observability import grafana
from shoal.observability import metrics as m
from shoal.status import ApplicationStatus, DeploymentStatus, ReplicaState

ROOT = Path(__file__).resolve().parents[2]


def samples(text: bytes | str) -> list[tuple[str, dict[str, str], float]]:
    raw = text.decode() if isinstance(text, bytes) else text
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(raw) for s in f.samples]


def total(text: bytes | str, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples(text) if n == name and all(lab.get(k) == x for k, x in labels.items()))


@dataclass
class FakeServer:
    ongoing: int = 0
    local_waiters: list[Any] = field(default_factory=list)
    model_ids: tuple[str, ...] = ()


@dataclass
class FakeRouter:
    num_queued: int = 0
    num_in_flight: int = 0


class FakeFront:
    ongoing = 2


def test_process_metrics_accumulate_and_flush() -> None:
    pm = m.ProcessMetrics()
    server = FakeServer(ongoing=3, local_waiters=[object()], model_ids=("a",))
    routers = {("app1", "Down"): FakeRouter(num_queued=4, num_in_flight=1)}
    pm.setup("Up-123", namespace="ml", app="app1", deployment="Up", server=server,
             routers=lambda: list(routers.items()), autoscaler_metrics=False)
    front = FakeFront()
    pm.fronts.add(front)
    t0 = m.time.monotonic() - 0.003  # about 3 ms ago
    pm.http_done("app1", "Up", "/api", "GET", 200, t0)
    pm.http_done("app1", "Up", "/api", "GET", 200, t0)
    pm.http_done("app1", "Up", "/api", "GET", 503, t0)
    pm.http_done("app1", "Up", "/api", "BREW", 200, t0)  # unknown methods are OTHER
    pm.request_done("/api", t0, False)
    pm.request_done("/api", t0, True)
    pm.batch_done("Up.embed", 3, 4, 0.002, 0.001)
    pm.model_requested()
    pm.model_loaded(0.05)
    pm.model_unloaded(0.0)
    text = pm.render()
    who = {"namespace": "ml", "pod": "Up-123"}
    http = {"application": "app1", "app": "app1", "deployment": "Up", "route": "/api", **who}
    assert total(text, "ray_serve_num_http_requests_total", status_code="200", method="GET", **http) == 2
    assert total(text, "ray_serve_num_http_requests_total", status_code="200", method="OTHER", **http) == 1
    assert total(text, "ray_serve_num_http_error_requests_total", error_code="503", **http) == 1
    assert total(text, "ray_serve_num_deployment_http_error_requests_total", error_code="503", **http) == 1
    assert total(text, "ray_serve_num_http_error_requests_total", error_code="200") == 0
    # Histograms: cumulative buckets, +Inf == count, and the ~3 ms observations above le=2.
    buckets = [(float(lab["le"]), v) for n, lab, v in samples(text)
               if n == "ray_serve_http_request_latency_ms_bucket" and lab["status_code"] == "200"
               and lab["method"] == "GET"]
    assert [v for _, v in sorted(buckets)] == sorted(v for _, v in buckets)
    assert dict(buckets)[float("inf")] == 2 and dict(buckets)[2.0] == 0
    assert total(text, "ray_serve_http_request_latency_ms_count", status_code="200", method="GET") == 2
    assert 5 < total(text, "ray_serve_http_request_latency_ms_sum", status_code="200", method="GET") < 10_000
    rep = {"application": "app1", "deployment": "Up", "replica": "Up-123", **who}
    assert total(text, "ray_serve_deployment_request_counter_total", route="/api", **rep) == 2
    assert total(text, "ray_serve_deployment_error_counter_total", route="/api", **rep) == 1
    assert total(text, "ray_serve_deployment_processing_latency_ms_count", **rep) == 2
    assert total(text, "ray_serve_replica_processing_queries", **rep) == 3
    assert total(text, "ray_serve_num_multiplexed_models", **rep) == 1
    assert total(text, "ray_serve_num_ongoing_http_requests", **who) == 2
    callee = {"application": "app1", "deployment": "Down", **who}
    assert total(text, "ray_serve_deployment_queued_queries", **callee) == 4
    assert total(text, "ray_serve_num_ongoing_requests_at_replicas", **callee) == 1
    batch = {"function_name": "Up.embed", **rep}
    assert total(text, "ray_serve_batches_processed_total", **batch) == 1
    assert total(text, "ray_serve_actual_batch_size_sum", **batch) == 3
    assert total(text, "ray_serve_batch_utilization_percent_sum", **batch) == 75
    assert total(text, "ray_serve_batch_wait_time_ms_count", **batch) == 1
    assert total(text, "ray_serve_multiplexed_models_load_counter_total", **rep) == 1
    assert total(text, "ray_serve_multiplexed_models_unload_counter_total", **rep) == 1
    assert total(text, "ray_serve_multiplexed_get_model_requests_counter_total", **rep) == 1
    assert total(text, "ray_serve_multiplexed_model_load_latency_ms_sum", **rep) == 50
    # In a pod its own collector exports the autoscaler metrics: not duplicated here.
    exposed = {n for n, _, _ in samples(text)}
    assert names.METRIC_ONGOING not in exposed and names.METRIC_CALLER_QUEUED not in exposed
    # A second flush adds nothing new; a router that went away reads 0.
    routers.clear()
    again = pm.render()
    assert total(again, "ray_serve_num_http_requests_total", status_code="200", method="GET", **http) == 2
    assert total(again, "ray_serve_deployment_request_counter_total", **rep) == 2
    assert total(again, "ray_serve_deployment_queued_queries", **callee) == 0


def test_nothing_is_flushed_before_the_process_knows_who_it_is() -> None:
    pm = m.ProcessMetrics()
    pm.request_done("", m.time.monotonic(), False)
    pm.flush()  # a spare replica: no identity, nothing written
    assert pm._prom is None
    pm.setup("Model-1", app="a", deployment="Model")
    assert total(pm.render(), "ray_serve_deployment_request_counter_total", replica="Model-1") == 1


@dataclass
class _Rec:
    replica_id: str
    app: str
    deployment: str
    state: ReplicaState
    health_failures: int = 0


@dataclass
class _Dep:
    target: int
    status: DeploymentStatus
    autoscaler: Any = None


@dataclass
class _App:
    status: ApplicationStatus
    deployments: dict[str, _Dep]


@dataclass
class _Controller:
    apps: dict[str, _App]
    replicas: dict[str, _Rec]


def test_controller_metrics(tmp_path: Path) -> None:
    cm = m.ControllerMetrics(str(tmp_path))
    cm.prepare()
    assert cm.env == {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    (tmp_path / "metrics" / "counter_999999999.db").write_bytes(b"")  # a process long gone
    cm.prepare()
    assert not list((tmp_path / "metrics").iterdir())
    cm.replica_started("app1", "Down")
    cm.replica_started("app1", "Down")
    cm.autoscale_tick("app1", "Down", 3.0, 1, 2)
    cm.autoscale_tick("app1", "Down", 5.0, 2, 2)  # no decision
    cm.autoscale_tick("app1", "Down", 0.0, 2, 1)
    ctl = _Controller(
        apps={"app1": _App(ApplicationStatus.RUNNING, {
            "Up": _Dep(1, DeploymentStatus.HEALTHY),
            "Down": _Dep(2, DeploymentStatus.UPSCALING, autoscaler=object())})},
        replicas={"Up-1": _Rec("Up-1", "app1", "Up", ReplicaState.RUNNING),
                  "Down-1": _Rec("Down-1", "app1", "Down", ReplicaState.RUNNING, health_failures=1),
                  "Down-2": _Rec("Down-2", "app1", "Down", ReplicaState.STARTING)})
    text = cm.render(ctl)
    down = {"application": "app1", "app": "app1", "deployment": "Down", "namespace": "local"}
    assert total(text, "shoal_deployment_replicas", state="RUNNING", **down) == 1
    assert total(text, "shoal_deployment_replicas", state="STARTING", **down) == 1
    assert total(text, "shoal_deployment_replicas", state="STOPPING", **down) == 0
    assert total(text, "shoal_deployment_target_replicas", **down) == 2
    assert total(text, "ray_serve_autoscaling_target_replicas", **down) == 2
    assert total(text, "ray_serve_autoscaling_target_replicas", deployment="Up") == 0  # not autoscaling
    assert total(text, "ray_serve_autoscaling_total_requests", **down) == 0
    assert total(text, "shoal_autoscaling_decisions_total", direction="up", **down) == 1
    assert total(text, "shoal_autoscaling_decisions_total", direction="down", **down) == 1
    assert total(text, "ray_serve_deployment_replica_starts_total", **down) == 2
    assert total(text, "ray_serve_deployment_replica_healthy", replica="Up-1", pod="Up-1") == 1
    assert total(text, "ray_serve_deployment_replica_healthy", replica="Down-1") == 0  # failing health checks
    assert total(text, "ray_serve_deployment_status", **down) == 4
    assert total(text, "ray_serve_application_status", application="app1") == 6
    cm.remove()
    assert not (tmp_path / "metrics").exists()


def test_every_metric_is_in_the_docs_table() -> None:
    doc = (ROOT / "docs" / "observability.md").read_text()
    assert len({d.name for d in m.METRICS}) == len(m.METRICS)
    missing = [d.exposed for d in m.METRICS if f"`{d.exposed}`" not in doc]
    assert not missing, f"docs/observability.md does not describe {missing}"


def _names_in(expr: str) -> set[str]:
    # Metric names: identifiers followed by a selector, minus PromQL's functions and keywords.
    found = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))
    found |= set(re.findall(r"label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*)", expr))
    return found


def dashboard_metric_names(board: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for q in grafana.queries(board):
        out |= _names_in(q)
    return out


def exposed_base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in m.BY_NAME:
            return name[: -len(suffix)]
    return name


def test_dashboard_file_is_the_generated_one_and_uses_known_metrics() -> None:
    path = ROOT / "deploy" / "grafana" / "shoal-dashboard.json"
    text = path.read_text()
    regen = "regenerate: python -m shoal.observability.grafana > deploy/grafana/shoal-dashboard.json"
    assert text == grafana.dashboard_json(), regen
    board = json.loads(text)
    assert board["panels"] and all(p["targets"] for p in board["panels"])
    used = dashboard_metric_names(board)
    assert {"ray_serve_deployment_request_counter_total", "ray_serve_actual_batch_size_bucket",
            "shoal_deployment_replicas"} <= used
    from shoal.llm._serving_metrics import EXPOSED as LLM_SERVING

    known = {d.exposed for d in m.METRICS} | set(LLM_SERVING)
    unknown = {n for n in used if exposed_base(n) not in known and n not in known
               and n.removesuffix("_bucket") not in LLM_SERVING}
    assert not unknown, f"the dashboard queries metrics shoal does not expose: {unknown}"
