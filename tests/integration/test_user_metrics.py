"""``from shoal import metrics`` (Ray Serve's ``ray.serve.metrics``): counters, gauges and
histograms a deployment defines show up on the instance's ``/metrics`` page with the replica's
labels, from real replica processes; misuse raises Ray's errors."""

from __future__ import annotations

from collections import defaultdict

import httpx
import pytest
from conftest import Instance, wait_until
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from shoal import metrics, serve


@serve.deployment(num_replicas=2)
class Counted:
    def __init__(self) -> None:
        self.calls = 0
        self.odd = metrics.Counter("shoaltest_odd_requests", description="Odd-numbered requests.",
                                   tag_keys=("model",))
        self.odd.set_default_tags({"model": "123"})
        self.last = metrics.Gauge("shoaltest_last_size", description="Size of the last request.",
                                  tag_keys=("route",))
        self.sizes = metrics.Histogram("shoaltest_sizes", description="Request sizes.", boundaries=[2, 8],
                                       tag_keys=("kind",))

    async def __call__(self, request: Request) -> dict[str, object]:
        self.calls += 1
        size = int(request.query_params.get("n", "1"))
        if self.calls % 2 == 1:
            self.odd.inc()
        self.odd.inc(0.5, tags={"model": "other"})
        self.last.set(size)
        self.sizes.observe(size, tags={"kind": "q"})
        return {"replica": serve.get_replica_context().replica_tag, "calls": self.calls}


def _page(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def test_user_metrics_reach_the_page_with_replica_labels(instance: Instance) -> None:
    serve.run(Counted.bind(), name="umetrics", route_prefix="/um")
    calls: dict[str, int] = defaultdict(int)
    for i in range(40):
        body = httpx.get(f"{instance.url}/um?n={1 + i % 10}", timeout=10).json()
        calls[body["replica"]] = max(calls[body["replica"]], body["calls"])
    assert sum(calls.values()) == 40

    def counted() -> bool:
        page = _page(instance.url)
        return sum(v for labels, v in page["shoaltest_odd_requests_total"] if labels.get("model") == "other") == 20

    assert wait_until(counted, 15), "the user counter never reached the page"
    page = _page(instance.url)
    odd = {labels["replica"]: v for labels, v in page["shoaltest_odd_requests_total"] if labels["model"] == "123"}
    # Each replica counted its own odd-numbered calls: ceil(calls / 2).
    assert odd == {replica: float((n + 1) // 2) for replica, n in calls.items()}
    for labels, _ in page["shoaltest_odd_requests_total"]:
        assert labels["application"] == "umetrics" and labels["deployment"] == "Counted"
    # A declared `route` tag takes the request's route.
    assert {labels["route"] for labels, _ in page["shoaltest_last_size"]} == {"/um"}
    assert {labels["replica"] for labels, _ in page["shoaltest_last_size"]} == set(calls)
    count = sum(v for labels, v in page["shoaltest_sizes_count"] if labels["kind"] == "q")
    le2 = sum(v for labels, v in page["shoaltest_sizes_bucket"] if labels["le"] == "2.0")
    assert count == 40 and le2 == 8  # sizes 1..10 four times: 1 and 2 are <= 2
    help_lines = httpx.get(instance.url + "/metrics", timeout=10).text
    assert "# HELP shoaltest_odd_requests_total Odd-numbered requests." in help_lines


def test_misuse_raises_rays_errors() -> None:
    with pytest.raises(ValueError, match="Empty name"):
        metrics.Counter("")
    with pytest.raises(ValueError, match="not a valid Prometheus name"):
        metrics.Counter("bad name")
    with pytest.raises(TypeError, match="tuple"):
        metrics.Counter("shoaltest_list_keys", tag_keys=["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="boundaries"):
        metrics.Histogram("shoaltest_no_bounds")
    with pytest.raises(ValueError, match="positive"):
        metrics.Histogram("shoaltest_neg_bounds", boundaries=[-1.0])
    c = metrics.Counter("shoaltest_tags", tag_keys=("a", "b")).set_default_tags({"a": "x"})
    assert isinstance(c, metrics.Counter)
    with pytest.raises(ValueError, match="Missing value for tag key"):
        c.inc()
    with pytest.raises(ValueError, match="Unrecognized tag key"):
        c.inc(tags={"b": "y", "c": "z"})
    with pytest.raises(ValueError, match=">0"):
        c.inc(0, tags={"b": "y"})
    c.inc(2, tags={"b": "y"})
    assert c.info["tag_keys"] == ("a", "b") and c.info["default_tags"] == {"a": "x"}
    # The same name again in one process: the same series if it is the same kind, else an error.
    again = metrics.Counter("shoaltest_tags", tag_keys=("a", "b"))
    again.inc(tags={"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="already exists"):
        metrics.Gauge("shoaltest_tags", tag_keys=("a", "b"))
    text = metrics.registry()
    from prometheus_client import generate_latest

    assert 'shoaltest_tags_total{a="x",b="y"} 3.0' in generate_latest(text).decode()
