"""A pod's own Prometheus metrics, served on its admin port's ``/metrics``.

The two in the contract with the autoscaler (``names.METRIC_ONGOING`` and
``names.METRIC_CALLER_QUEUED``, read by KEDA), and the replica's request counters, latency
and readiness; :mod:`shoal.observability.metrics` adds Ray Serve's metric names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from shoal.kubernetes import names
from shoal.kubernetes.pod.discovery import PodBackend
from shoal.runtime.replica.core import ReplicaCore
from shoal.runtime.wire import LATENCY_BUCKETS_MS

__all__ = ["PodCollector", "PodView", "callee_metrics"]

# Metrics beyond the two in the contract (names.METRIC_*); counters get a _total suffix.
METRIC_IN_FLIGHT = "shoal_handle_in_flight_requests"
METRIC_REQUESTS = "shoal_replica_requests"
METRIC_ERRORS = "shoal_replica_request_errors"
METRIC_REJECTED = "shoal_replica_rejected_requests"
METRIC_LATENCY = "shoal_replica_request_latency_seconds"
METRIC_READY = "shoal_replica_ready"

_LABELS = ["app", "deployment"]


def callee_metrics(backend: PodBackend) -> Iterator[Any]:
    """Per callee of a pod (its routers): requests held for it (``names.METRIC_CALLER_QUEUED``,
    which the scaler reads), requests in flight to it, and requests failed at the wake deadline."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    queued = GaugeMetricFamily(names.METRIC_CALLER_QUEUED,
                               "Requests this pod holds for a deployment it cannot send them to yet.",
                               labels=_LABELS)
    in_flight = GaugeMetricFamily(METRIC_IN_FLIGHT, "Requests this pod has in flight to a deployment.",
                                  labels=_LABELS)
    wake = CounterMetricFamily(names.METRIC_WAKE_TIMEOUTS, "Requests this pod failed because no pod of the "
                               "deployment became ready within the wake deadline.", labels=_LABELS)
    for (a, d), router in backend.routers():
        queued.add_metric([a, d], router.num_queued)
        in_flight.add_metric([a, d], router.num_in_flight)
        wake.add_metric([a, d], getattr(router, "wake_timeouts", 0))
    yield queued
    yield in_flight
    yield wake


class PodView(Protocol):
    """What the metrics are read from: the pod replica."""

    @property
    def key(self) -> tuple[str, str]:
        """(app, deployment)"""

    @property
    def rank(self) -> int: ...

    @property
    def core(self) -> ReplicaCore: ...

    @property
    def backend(self) -> PodBackend: ...

    @property
    def ready(self) -> bool: ...

    @property
    def custom_stats(self) -> tuple[tuple[str, float], ...]:
        """What record_autoscaling_stats() last returned (empty if it is not defined)."""


class PodCollector:
    """A ``prometheus_client`` collector of one pod's metrics (see the module docstring)."""

    def __init__(self, pod: PodView) -> None:
        self.pod = pod

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        pod = self.pod
        labels = list(pod.key)
        core = pod.core
        ongoing = GaugeMetricFamily(names.METRIC_ONGOING, "Requests running or waiting in this replica.",
                                    labels=_LABELS)
        # A gang's requests are counted once, at rank 0 (the other ranks run the same ones).
        ongoing.add_metric(labels, core.slots.load if pod.rank == 0 else 0)
        yield ongoing
        yield from self._callees()
        yield from self._requests(labels)
        ready = GaugeMetricFamily(METRIC_READY, "1 when this replica is ready to serve.", labels=_LABELS)
        ready.add_metric(labels, 1 if pod.ready else 0)
        yield ready
        if pod.custom_stats:
            custom = GaugeMetricFamily(names.METRIC_AUTOSCALING_CUSTOM,
                                       "What the deployment's record_autoscaling_stats() last returned, per metric.",
                                       labels=[*_LABELS, "metric"])
            for metric, value in pod.custom_stats:
                custom.add_metric([*labels, metric], value)
            yield custom

    def _callees(self) -> Iterator[Any]:
        return callee_metrics(self.pod.backend)

    def _requests(self, labels: list[str]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        core = self.pod.core
        counters = core.counters
        requests = CounterMetricFamily(METRIC_REQUESTS, "Requests this replica finished.", labels=_LABELS)
        requests.add_metric(labels, counters.requests)
        yield requests
        errors = CounterMetricFamily(METRIC_ERRORS, "Requests this replica finished with an error (HTTP: 5xx).",
                                     labels=_LABELS)
        errors.add_metric(labels, counters.errors)
        yield errors
        rejected = CounterMetricFamily(METRIC_REJECTED, "Requests refused at max_ongoing_requests or while draining "
                                       "(their callers sent them to another pod).", labels=_LABELS)
        rejected.add_metric(labels, core.rejected)
        yield rejected
        latency = HistogramMetricFamily(METRIC_LATENCY, "Time to finish a request in this replica.", labels=_LABELS)
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(LATENCY_BUCKETS_MS, counters.hist, strict=False):
            total += n
            buckets.append((repr(bound / 1000.0), total))
        buckets.append(("+Inf", sum(counters.hist)))
        latency.add_metric(labels, buckets, None)
        yield latency
