"""A pod's /metrics read from its replica core and routers, with fakes (no pod, no sockets)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from shoal.kubernetes import names
from shoal.kubernetes.pod.metrics import (
    METRIC_ERRORS,
    METRIC_IN_FLIGHT,
    METRIC_READY,
    METRIC_REJECTED,
    METRIC_REQUESTS,
    PodCollector,
)
from shoal.runtime.replica.core import ReplicaCore
from shoal.runtime.replica.ports import NoControl


class FakeRouter:
    num_queued = 3
    num_in_flight = 2


class FakeBackend:
    def routers(self) -> list[tuple[tuple[str, str], Any]]:
        return [(("app", "callee"), FakeRouter())]


class FakePod:
    def __init__(self, rank: int = 0) -> None:
        self.key = ("app", "dep")
        self.rank = rank
        self.core = ReplicaCore(channel=NoControl(), routers=None, clock=lambda: 0.0)  # type: ignore[arg-type]
        self.backend = FakeBackend()
        self.ready = True
        self.custom_stats: tuple[tuple[str, float], ...] = ()


def scrape(pod: FakePod) -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PodCollector(pod))  # type: ignore[arg-type]
    out: dict[str, float] = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_pod_metrics_come_from_the_core_and_the_routers() -> None:
    pod = FakePod()
    pod.core.slots.take()
    pod.core.slots.take()
    pod.core.counters.record(0.0, failed=False)
    pod.core.counters.record(0.0, failed=True)
    pod.core.rejected = 4
    m = scrape(pod)
    mine = '{app="app",deployment="dep"}'
    assert m[names.METRIC_ONGOING + mine] == 2
    assert m[names.METRIC_CALLER_QUEUED + '{app="app",deployment="callee"}'] == 3
    assert m[METRIC_IN_FLIGHT + '{app="app",deployment="callee"}'] == 2
    assert m[METRIC_REQUESTS + "_total" + mine] == 2
    assert m[METRIC_ERRORS + "_total" + mine] == 1
    assert m[METRIC_REJECTED + "_total" + mine] == 4
    assert m[METRIC_READY + mine] == 1


def test_a_gangs_requests_are_counted_at_rank_0_only() -> None:
    pod = FakePod(rank=1)
    pod.core.slots.take()
    pod.ready = False
    m = scrape(pod)
    mine = '{app="app",deployment="dep"}'
    assert m[names.METRIC_ONGOING + mine] == 0
    assert m[METRIC_READY + mine] == 0


def test_custom_autoscaling_metrics_are_exported_for_the_scaler_to_read() -> None:
    from shoal.kubernetes.scaler.scrape import parse_pod_metrics

    pod = FakePod()
    assert not any(k.startswith(names.METRIC_AUTOSCALING_CUSTOM) for k in scrape(pod))  # none defined
    pod.custom_stats = (("queue_depth", 7.0), ("gpu_util", 0.5))
    m = scrape(pod)
    assert m[names.METRIC_AUTOSCALING_CUSTOM + '{app="app",deployment="dep",metric="queue_depth"}'] == 7.0
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PodCollector(pod))  # type: ignore[arg-type]
    sample = parse_pod_metrics(generate_latest(registry).decode(), pod="10.0.0.1", deployment="dep", app="app")
    assert dict(sample.custom) == {"queue_depth": 7.0, "gpu_util": 0.5}
