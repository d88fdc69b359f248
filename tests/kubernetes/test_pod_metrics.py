"""Pods export shoal.observability.metrics (Ray Serve's names, namespace/pod labels) on the admin port beside
the pod runtime's own metrics, in one valid exposition."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from k8s_sim_support import admin, build_objects, get, metrics, running, wait_for
from prometheus_client.parser import text_string_to_metric_families

from shoal.kubernetes import names

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == x
                                                                          for k, x in labels.items()))


def test_pods_export_ray_serve_metrics(tmp_path: Path) -> None:
    with running(build_objects(tmp_path)) as sim:
        ingress, a, b = sim.pods_of("pipe-ingress")[0], sim.pods_of("pipe-a")[0], sim.pods_of("pipe-b")[0]
        for i in range(3):
            status, _ = get(ingress.ip, ingress.port("http"), f"/?q={i}")
            assert status == 200
        ns = sim.namespace
        who = {"application": "pipe", "app": "pipe", "namespace": ns}
        assert wait_for(lambda: value(metrics(b), "ray_serve_deployment_request_counter_total",
                                      deployment="B", replica=b.name, pod=b.name, **who) == 3)
        at_ingress = metrics(ingress)
        assert value(at_ingress, "ray_serve_num_http_requests_total", deployment="Ingress", route="/",
                     status_code="200", pod=ingress.name, **who) == 3
        assert value(at_ingress, "ray_serve_http_request_latency_ms_count", pod=ingress.name, **who) == 3
        at_a = metrics(a)
        assert value(at_a, "ray_serve_deployment_request_counter_total", deployment="A", pod=a.name, **who) == 3
        assert ("ray_serve_deployment_queued_queries", tuple(sorted(
            {**who, "deployment": "B", "pod": a.name}.items()))) in at_a
        assert value(at_a, "ray_serve_replica_processing_queries", deployment="A", replica=a.name) == 0
        # The autoscaler metrics come once, from the pod runtime's collector (the KEDA contract).
        _, body = admin(a, "/metrics")
        families = [f.name for f in text_string_to_metric_families(body.decode())]
        assert len(families) == len(set(families))
        assert families.count(names.METRIC_ONGOING) == 1 and families.count(names.METRIC_CALLER_QUEUED) == 1
        # The wake-deadline counter (the ShoalWakeTimeouts alert's series) is there, at 0, per callee.
        assert at_a.get((names.METRIC_WAKE_TIMEOUTS + "_total", (("app", "pipe"), ("deployment", "B")))) == 0
