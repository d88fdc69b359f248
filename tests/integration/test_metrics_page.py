"""GET /metrics on a local instance: every process's metrics on one page, after real traffic.

An ingress calls a downstream deployment that batches, multiplexes and autoscales (from zero);
the page, whether the ingress replica or the proxy process answers it, shows the HTTP and
replica counters with the right labels and counts, errors by code, latency buckets, live gauges,
batch sizes, model loads, replica counts and autoscaling decisions; a replica killed with
SIGKILL leaves no live gauge behind (its counters stay).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from pathlib import Path

import httpx
from conftest import Instance, child_pids, wait_until
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from shoal import serve
from shoal.observability import grafana
from shoal.observability import metrics as m

ROOT = Path(__file__).resolve().parents[2]

AUTOSCALE = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1,
             "metrics_interval_s": 0.1, "look_back_period_s": 0.5, "upscale_delay_s": 0.0,
             "downscale_delay_s": 600.0}


@serve.deployment(autoscaling_config=AUTOSCALE)
class Downstream:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def embed(self, xs: list[float]) -> list[float]:
        return [x * 2 for x in xs]

    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str) -> str:
        return f"model-{model_id}"

    async def predict(self, x: float) -> str:
        return f"{await self.get_model(serve.get_multiplexed_model_id())}:{x}"

    def whoami(self) -> tuple[str, int]:
        return serve.get_replica_context().replica_tag, os.getpid()


@serve.deployment
class Ingress:
    def __init__(self, down: serve.DeploymentHandle) -> None:
        self.down = down

    async def __call__(self, request: Request) -> object:
        q = request.query_params
        op = q["op"]
        if op == "embed":
            return {"y": await self.down.embed.remote(float(q["x"]))}
        if op == "model":
            return {"y": await self.down.options(multiplexed_model_id=q["m"]).predict.remote(1.0)}
        if op == "slow":
            while not os.path.exists(q["f"]):
                await asyncio.sleep(0.01)
            return "done"
        if op == "who":
            return list(await self.down.whoami.remote())
        raise ValueError("boom")


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(text: str, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples(text) if n == name and all(lab.get(k) == x for k, x in labels.items()))


def has(text: str, name: str, **labels: str) -> bool:
    return any(n == name and all(lab.get(k) == x for k, x in labels.items()) for n, lab, _ in samples(text))


def page(url: str) -> str:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def exposed_names(text: str) -> set[str]:
    out = set()
    for name, _, _ in samples(text):
        out.add(name)
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix):
                out.add(name[: -len(suffix)])
    return out


def test_one_page_for_the_whole_instance(instance: Instance, tmp_path: Path) -> None:
    serve.run(Ingress.bind(Downstream.bind()), route_prefix="/api")
    url = instance.url
    api = url + "/api"
    with httpx.Client(timeout=30) as c:
        for x in range(4):
            assert c.get(api, params={"op": "embed", "x": x}).json() == {"y": 2.0 * x}
        for model in ("a", "b", "a"):  # one model per replica: load a, load b (evict a), load a (evict b)
            assert c.get(api, params={"op": "model", "m": model}).json() == {"y": f"model-{model}:1.0"}
        for _ in range(2):
            assert c.get(api, params={"op": "fail"}).status_code == 500
        assert c.get(url + "/elsewhere").status_code == 404

    app = {"application": "default", "app": "default"}
    http = {**app, "deployment": "Ingress", "route": "/api", "method": "GET"}

    def settled() -> bool:  # every process flushes once a second
        text = page(url)
        return (total(text, "ray_serve_num_http_requests_total", status_code="200", **http) == 7
                and total(text, "ray_serve_deployment_request_counter_total", deployment="Downstream") == 7
                and total(text, "ray_serve_deployment_request_counter_total", deployment="Ingress") == 9
                and total(text, "ray_serve_num_http_requests_total", status_code="404") == 1)

    assert wait_until(settled, 20, 0.2), page(url)
    text = page(url)
    # HTTP: by route, method and status; errors by code; latency buckets.
    assert total(text, "ray_serve_num_http_requests_total", status_code="500", **http) == 2
    assert total(text, "ray_serve_num_http_error_requests_total", error_code="500", **http) == 2
    assert total(text, "ray_serve_num_deployment_http_error_requests_total", error_code="500", **http) == 2
    assert total(text, "ray_serve_num_http_error_requests_total", error_code="404", application="", route="") == 1
    buckets = sorted((float(lab["le"]), v) for n, lab, v in samples(text)
                     if n == "ray_serve_http_request_latency_ms_bucket" and lab.get("status_code") == "200"
                     and lab.get("route") == "/api")
    assert buckets and buckets[-1] == (float("inf"), 7)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert total(text, "ray_serve_http_request_latency_ms_count", status_code="200", **http) == 7
    # Replicas: requests, errors, processing latency, live gauges (one series per replica).
    ingress = {**app, "deployment": "Ingress", "namespace": "local"}
    down = {**app, "deployment": "Downstream", "namespace": "local"}
    assert total(text, "ray_serve_deployment_error_counter_total", **ingress) == 2
    assert total(text, "ray_serve_deployment_error_counter_total", **down) == 0
    assert total(text, "ray_serve_deployment_processing_latency_ms_count", **down) == 7
    for labels in (ingress, down):
        series = [lab for n, lab, _ in samples(text) if n == "ray_serve_replica_processing_queries"
                  and all(lab.get(k) == v for k, v in labels.items())]
        assert len(series) == 1 and series[0]["replica"] == series[0]["pod"]
        assert has(text, "shoal_replica_ongoing_requests", **labels)
    # Callers: the ingress replica's router to Downstream, the proxy's to Ingress.
    assert has(text, "ray_serve_deployment_queued_queries", **down)
    assert any(lab.get("pod", "").startswith("proxy-") for n, lab, _ in samples(text)
               if n == "ray_serve_deployment_queued_queries")
    assert has(text, "shoal_handle_queued_requests", **down)
    # @serve.batch and @serve.multiplexed.
    assert total(text, "ray_serve_actual_batch_size_sum", function_name="Downstream.embed", **down) == 4
    assert total(text, "ray_serve_batches_processed_total", **down) >= 1
    assert total(text, "ray_serve_batch_wait_time_ms_count", **down) == total(
        text, "ray_serve_batches_processed_total", **down)
    assert total(text, "ray_serve_multiplexed_models_load_counter_total", **down) == 3
    assert total(text, "ray_serve_multiplexed_models_unload_counter_total", **down) == 2
    assert total(text, "ray_serve_multiplexed_get_model_requests_counter_total", **down) == 3
    assert total(text, "ray_serve_multiplexed_model_load_latency_ms_count", **down) == 3
    # The controller: replica counts and states, targets, autoscaling, health, status.
    assert total(text, "shoal_deployment_replicas", state="RUNNING", **ingress) == 1
    assert total(text, "shoal_deployment_replicas", state="RUNNING", **down) == 1
    assert total(text, "shoal_deployment_target_replicas", **down) == 1
    assert total(text, "ray_serve_autoscaling_target_replicas", **down) == 1
    assert total(text, "shoal_autoscaling_decisions_total", direction="up", **down) >= 1  # from zero
    assert total(text, "ray_serve_deployment_replica_starts_total", **down) == 1
    assert total(text, "ray_serve_deployment_replica_healthy", **ingress) == 1
    assert total(text, "ray_serve_application_status", **app) == 6  # RUNNING

    # The Grafana dashboard's queries only name metrics this page has.
    board = json.loads((ROOT / "deploy" / "grafana" / "shoal-dashboard.json").read_text())
    names = exposed_names(text)
    # (The LLM panels' vllm:* series come from shoal.llm's model servers, which this app has none
    # of: tests/unit/test_llm_tokenize.py checks them.)
    wanted = {n for q in grafana.queries(board) for n in _metric_names(q) if not n.startswith("vllm:")}
    assert wanted and not wanted - names, f"not on the page: {sorted(wanted - names)}"

    # Live gauges follow a request in flight.
    release = tmp_path / "release"
    slow = threading.Thread(target=lambda: httpx.get(api, params={"op": "slow", "f": str(release)}, timeout=30))
    slow.start()
    try:
        assert wait_until(lambda: total(page(url), "ray_serve_replica_processing_queries", **ingress) == 1
                          and total(page(url), "ray_serve_num_ongoing_http_requests") == 1, 20, 0.2)
    finally:
        release.touch()
        slow.join()
    assert wait_until(lambda: total(page(url), "ray_serve_replica_processing_queries", **ingress) == 0, 20, 0.2)

    # A replica that dies leaves no live gauge behind; its counters stay.
    tag, pid = httpx.get(api, params={"op": "who"}, timeout=30).json()
    assert pid in child_pids()
    os.kill(pid, signal.SIGKILL)

    def gone() -> bool:
        text = page(url)
        return not any(has(text, name, replica=tag) for name in (
            "ray_serve_replica_processing_queries", "shoal_replica_ongoing_requests",
            "ray_serve_deployment_replica_healthy"))

    assert wait_until(gone, 20, 0.2)
    assert total(page(url), "ray_serve_deployment_request_counter_total", replica=tag) >= 7


def _metric_names(expr: str) -> set[str]:
    import re

    found = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))
    return found | set(re.findall(r"label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*)", expr))


@serve.deployment
def hello(request: Request) -> str:
    return "hello"


def test_the_proxy_process_serves_the_same_page(proxied: Instance) -> None:
    serve.run(hello.bind())
    for _ in range(3):
        assert httpx.get(proxied.url + "/", timeout=30).text == "hello"

    def counted() -> bool:
        text = page(proxied.url)
        proxy = [lab["pod"] for n, lab, _ in samples(text) if n == "ray_serve_num_http_requests_total"]
        return (total(text, "ray_serve_num_http_requests_total", application="default", status_code="200") == 3
                and bool(proxy) and all(p.startswith("proxy-") for p in proxy)
                and total(text, "ray_serve_deployment_request_counter_total", deployment="hello") == 3)

    assert wait_until(counted, 20, 0.2), page(proxied.url)
    text = page(proxied.url)
    assert total(text, "shoal_deployment_replicas", deployment="hello", state="RUNNING") == 1
    assert {d.exposed for d in m.METRICS if d.source in ("http", "replica", "controller")
            and d.name not in (m.AUTOSCALING_TARGET, m.AUTOSCALING_TOTAL_REQUESTS, m.AUTOSCALING_DECISIONS,
                               m.HTTP_ERRORS, m.HTTP_DEPLOYMENT_ERRORS)} <= exposed_names(text)
