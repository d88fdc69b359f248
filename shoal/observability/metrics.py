"""Prometheus metrics of every shoal process, and one ``/metrics`` page for a local instance.

Names follow Ray Serve's documented metrics wherever Ray has one (``ray_serve_*``), so that
dashboards and alerts written for Ray Serve carry over; what Ray has no name for is
``shoal_*``. :data:`METRICS` lists every metric with its type, labels and meaning (the table
in docs/observability.md is this list).

Labels, one scheme everywhere:

* ``namespace`` and ``pod``: the process that wrote the series (a replica's tag or the proxy's
  id locally, with ``namespace="local"``; the pod's name and namespace in Kubernetes), so that
  series join Kubernetes' own;
* ``application`` (Ray's name) and ``app`` (the same value, the label the Kubernetes
  autoscalers query) and ``deployment`` on everything about a deployment;
* ``replica`` on per-replica series (the same value as ``pod``), and Ray's ``route``,
  ``method``, ``status_code``, ``error_code``, ``function_name`` where Ray has them.

**Cost on the request path.** Updating a prometheus-client metric costs 3-15 µs per request
on a small machine (more in multiprocess mode, where every update writes an mmapped file), so
the request path never touches one: it adds to plain integers of this process
(:class:`ProcessMetrics`, well under a microsecond), and once a second a flusher moves the
increments into prometheus-client's objects; gauges (ongoing, queued) are read from the
runtime's own counters at that moment, costing the request path nothing at all.

**One page locally.** The controller starts every replica and proxy process with
``PROMETHEUS_MULTIPROC_DIR`` set to ``<run dir>/metrics``, so prometheus-client's multiprocess
mode writes each process's values to files there; the proxy's (and every HTTP-serving ingress
replica's) ``GET /metrics`` merges those files, and appends what the controller knows (replica
counts and states, targets, autoscaling decisions), asked over the control connection. Live
gauges of a process that exited are removed (``mark_process_dead``) by the controller when it
notices and by the page itself for any process no longer alive; counters and histograms of
exited processes stay, as counters should. In a Kubernetes pod (one process) the same objects
live in memory and are exported on the admin port by :mod:`shoal.kubernetes.pod`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
import weakref
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from shoal.kubernetes import names

logger = logging.getLogger("shoal.observability.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOCAL_NAMESPACE = "local"
FLUSH_INTERVAL_S = 1.0

# Histogram buckets. Latencies use Ray Serve's default boundaries (ms) with three sub-millisecond
# ones added in front: most shoal hops take well under a millisecond.
LATENCY_BUCKETS_MS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 1000, 2000,
                                         5000, 10000, 60000, 120000, 300000, 600000)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_UTILIZATION_BUCKETS: tuple[float, ...] = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 100)
MODEL_LOAD_BUCKETS_MS: tuple[float, ...] = (1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 30000, 60000, 120000, 300000)

# ---- names ------------------------------------------------------------------------------------
# HTTP, written by whatever serves HTTP: the proxy process and ingress replicas serving it themselves.
HTTP_REQUESTS = "ray_serve_num_http_requests"
HTTP_ERRORS = "ray_serve_num_http_error_requests"
HTTP_DEPLOYMENT_ERRORS = "ray_serve_num_deployment_http_error_requests"
HTTP_LATENCY = "ray_serve_http_request_latency_ms"
HTTP_ONGOING = "ray_serve_num_ongoing_http_requests"
# Replicas.
REQUESTS = "ray_serve_deployment_request_counter"
ERRORS = "ray_serve_deployment_error_counter"
LATENCY = "ray_serve_deployment_processing_latency_ms"
PROCESSING = "ray_serve_replica_processing_queries"
ONGOING = names.METRIC_ONGOING  # running + waiting in the replica: what the autoscalers read
# Callers (routers in the proxy, in replicas making handle calls, in pods).
QUEUED = "ray_serve_deployment_queued_queries"
AT_REPLICAS = "ray_serve_num_ongoing_requests_at_replicas"
CALLER_QUEUED = names.METRIC_CALLER_QUEUED
# @serve.batch.
BATCH_SIZE = "ray_serve_actual_batch_size"
BATCH_UTILIZATION = "ray_serve_batch_utilization_percent"
BATCH_WAIT = "ray_serve_batch_wait_time_ms"
BATCH_EXECUTION = "ray_serve_batch_execution_time_ms"
BATCHES = "ray_serve_batches_processed"
# @serve.multiplexed.
MODEL_LOAD_LATENCY = "ray_serve_multiplexed_model_load_latency_ms"
MODEL_UNLOAD_LATENCY = "ray_serve_multiplexed_model_unload_latency_ms"
MODELS = "ray_serve_num_multiplexed_models"
MODEL_LOADS = "ray_serve_multiplexed_models_load_counter"
MODEL_UNLOADS = "ray_serve_multiplexed_models_unload_counter"
MODEL_REQUESTS = "ray_serve_multiplexed_get_model_requests_counter"
# The controller (local instances only: in Kubernetes, kube-state-metrics and KEDA tell these).
REPLICAS = "shoal_deployment_replicas"
TARGET = "shoal_deployment_target_replicas"
REPLICA_HEALTHY = "ray_serve_deployment_replica_healthy"
REPLICA_STARTS = "ray_serve_deployment_replica_starts"
AUTOSCALING_TARGET = "ray_serve_autoscaling_target_replicas"
AUTOSCALING_TOTAL_REQUESTS = "ray_serve_autoscaling_total_requests"
AUTOSCALING_DECISIONS = "shoal_autoscaling_decisions"
DEPLOYMENT_STATUS = "ray_serve_deployment_status"
APPLICATION_STATUS = "ray_serve_application_status"

_WHO = ("namespace", "pod")
_DEP = ("application", "app", "deployment")
_REPLICA = (*_DEP, "replica", *_WHO)
_HTTP = (*_DEP, "route", "method", "status_code", *_WHO)
_HTTP_ERR = (*_DEP, "route", "method", "error_code", *_WHO)
_CALLER = (*_DEP, *_WHO)
_BATCH = (*_DEP, "replica", "function_name", *_WHO)


@dataclass(frozen=True)
class MetricDef:
    """One metric: its name (counters are exposed with a ``_total`` suffix), type, labels,
    meaning, and which part of shoal writes it."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    help: str
    source: str  # "http" | "replica" | "caller" | "batch" | "multiplex" | "controller"
    buckets: tuple[float, ...] = ()

    @property
    def exposed(self) -> str:
        """The name its samples carry (without a histogram's ``_bucket``/``_sum``/``_count``)."""
        return self.name + "_total" if self.kind == "counter" else self.name


METRICS: tuple[MetricDef, ...] = (
    MetricDef(HTTP_REQUESTS, "counter", _HTTP, "HTTP requests answered, by route, method and status code.", "http"),
    MetricDef(HTTP_ERRORS, "counter", _HTTP_ERR, "HTTP requests answered with a status code of 400 or more.", "http"),
    MetricDef(HTTP_DEPLOYMENT_ERRORS, "counter", _HTTP_ERR,
              "HTTP requests answered with a status code of 400 or more, by ingress deployment.", "http"),
    MetricDef(HTTP_LATENCY, "histogram", _HTTP,
              "Time from receiving an HTTP request to its response's end, in milliseconds.", "http",
              LATENCY_BUCKETS_MS),
    MetricDef(HTTP_ONGOING, "gauge", _WHO, "HTTP requests this process is serving now.", "http"),
    MetricDef(REQUESTS, "counter", (*_DEP, "replica", "route", *_WHO), "Requests the replica finished.", "replica"),
    MetricDef(ERRORS, "counter", (*_DEP, "replica", "route", *_WHO),
              "Requests the replica finished with an exception (HTTP: a 5xx response).", "replica"),
    MetricDef(LATENCY, "histogram", (*_DEP, "replica", "route", *_WHO),
              "Time the replica took to process a request, in milliseconds (not counting time queued "
              "in callers).", "replica", LATENCY_BUCKETS_MS),
    MetricDef(PROCESSING, "gauge", _REPLICA, "Requests the replica is processing now.", "replica"),
    MetricDef(ONGOING, "gauge", _REPLICA,
              "Requests running or waiting in the replica: what the Kubernetes autoscalers read.", "replica"),
    MetricDef(QUEUED, "gauge", _CALLER,
              "Requests this process holds for a deployment, waiting for a replica to take them.", "caller"),
    MetricDef(AT_REPLICAS, "gauge", _CALLER,
              "Requests this process has sent to a deployment's replicas and not had answered yet.", "caller"),
    MetricDef(CALLER_QUEUED, "gauge", _CALLER,
              f"The same as {QUEUED}, under the name the Kubernetes autoscalers read.", "caller"),
    MetricDef(BATCH_SIZE, "histogram", _BATCH, "Requests in each batch a @serve.batch function ran.", "batch",
              BATCH_SIZE_BUCKETS),
    MetricDef(BATCH_UTILIZATION, "histogram", _BATCH, "Each batch's size as a percentage of max_batch_size.",
              "batch", BATCH_UTILIZATION_BUCKETS),
    MetricDef(BATCH_WAIT, "histogram", _BATCH,
              "How long each batch's first request waited for the batch to start, in milliseconds.", "batch",
              LATENCY_BUCKETS_MS),
    MetricDef(BATCH_EXECUTION, "histogram", _BATCH, "How long each batch took to run, in milliseconds.", "batch",
              LATENCY_BUCKETS_MS),
    MetricDef(BATCHES, "counter", _BATCH, "Batches a @serve.batch function ran.", "batch"),
    MetricDef(MODEL_LOAD_LATENCY, "histogram", _REPLICA, "Time to load a multiplexed model, in milliseconds.",
              "multiplex", MODEL_LOAD_BUCKETS_MS),
    MetricDef(MODEL_UNLOAD_LATENCY, "histogram", _REPLICA,
              "Time to evict a multiplexed model (drop it and run its __del__), in milliseconds.", "multiplex",
              MODEL_LOAD_BUCKETS_MS),
    MetricDef(MODELS, "gauge", _REPLICA, "Multiplexed models the replica holds now.", "multiplex"),
    MetricDef(MODEL_LOADS, "counter", _REPLICA, "Multiplexed models the replica loaded.", "multiplex"),
    MetricDef(MODEL_UNLOADS, "counter", _REPLICA, "Multiplexed models the replica evicted.", "multiplex"),
    MetricDef(MODEL_REQUESTS, "counter", _REPLICA,
              "Calls of the replica's @serve.multiplexed function (hits and loads).", "multiplex"),
    MetricDef(REPLICAS, "gauge", (*_DEP, "state", "namespace"),
              "Replicas of the deployment in each state (STARTING, RUNNING, STOPPING, ...).", "controller"),
    MetricDef(TARGET, "gauge", (*_DEP, "namespace"),
              "Replicas the deployment should have now (num_replicas, or the autoscaler's target).", "controller"),
    MetricDef(REPLICA_HEALTHY, "gauge", (*_DEP, "replica", *_WHO),
              "1 for a running replica whose last health check passed, else 0.", "controller"),
    MetricDef(REPLICA_STARTS, "counter", (*_DEP, "namespace"),
              "Replica processes started for the deployment (first starts, scale-ups and replacements).",
              "controller"),
    MetricDef(AUTOSCALING_TARGET, "gauge", (*_DEP, "namespace"),
              "Replicas the autoscaler wants (autoscaling deployments only).", "controller"),
    MetricDef(AUTOSCALING_TOTAL_REQUESTS, "gauge", (*_DEP, "namespace"),
              "Requests queued in callers plus ongoing in replicas, as the autoscaler last saw them.", "controller"),
    MetricDef(AUTOSCALING_DECISIONS, "counter", (*_DEP, "direction", "namespace"),
              "Times the autoscaler changed the target, by direction (up or down).", "controller"),
    MetricDef(DEPLOYMENT_STATUS, "gauge", (*_DEP, "namespace"),
              "The deployment's status as a number: 1 DEPLOY_FAILED, 2 UNHEALTHY, 3 UPDATING, 4 UPSCALING, "
              "5 DOWNSCALING, 6 HEALTHY.", "controller"),
    MetricDef(APPLICATION_STATUS, "gauge", ("application", "app", "namespace"),
              "The application's status as a number: 1 DEPLOY_FAILED, 2 UNHEALTHY, 3 NOT_STARTED, 4 DELETING, "
              "5 DEPLOYING, 6 RUNNING.", "controller"),
)
BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}

_DEPLOYMENT_STATUS_CODES = {"DEPLOY_FAILED": 1, "UNHEALTHY": 2, "UPDATING": 3, "UPSCALING": 4, "DOWNSCALING": 5,
                            "HEALTHY": 6}
_APPLICATION_STATUS_CODES = {"DEPLOY_FAILED": 1, "UNHEALTHY": 2, "NOT_STARTED": 3, "DELETING": 4, "DEPLOYING": 5,
                             "RUNNING": 6}
_REPLICA_STATES = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "STOPPING", "PENDING_MIGRATION")
# Methods outside this set are counted as OTHER: a client must not be able to mint label values.
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


# ---- accumulation on the request path ---------------------------------------------------------


class _Hist:
    """A histogram in plain numbers: per-bucket counts (non-cumulative, the last one open), sum, count."""

    __slots__ = ("bounds", "counts", "errors", "n", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.n = 0
        self.errors = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.n += 1
        self.total += value

    def reset(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)
        self.n = 0
        self.errors = 0
        self.total = 0.0


class _Batch:
    __slots__ = ("execution", "size", "utilization", "wait")

    def __init__(self) -> None:
        self.size = _Hist(BATCH_SIZE_BUCKETS)
        self.utilization = _Hist(BATCH_UTILIZATION_BUCKETS)
        self.wait = _Hist(LATENCY_BUCKETS_MS)
        self.execution = _Hist(LATENCY_BUCKETS_MS)


class ProcessMetrics:
    """This process's metrics: plain counters the request path adds to, flushed into
    prometheus-client once a second (or when a page is rendered).

    The runtime tells it who this process is (:meth:`setup`) and where its live numbers are
    (the replica server, the routers); until then nothing is flushed (a spare replica).
    """

    def __init__(self) -> None:
        self.namespace = LOCAL_NAMESPACE
        self.pod = ""
        self.app = ""
        self.deployment = ""
        self.replica = ""
        # Emit the two autoscaler metrics (names.METRIC_*) here: locally yes; in a pod its own
        # collector already does.
        self.autoscaler_metrics = True
        # (app, deployment, route, method, status) -> latency histogram (ms) of finished HTTP requests.
        self.http: dict[tuple[str, str, str, str, int], _Hist] = {}
        # route -> latency histogram (ms) of requests this replica finished; ``errors`` counts failures.
        self.requests: dict[str, _Hist] = {}
        self.batches: dict[str, _Batch] = {}
        self.model_load = _Hist(MODEL_LOAD_BUCKETS_MS)
        self.model_unload = _Hist(MODEL_LOAD_BUCKETS_MS)
        self.model_requests = 0
        # Live numbers, read when flushing.
        self.fronts: weakref.WeakSet[Any] = weakref.WeakSet()  # ProxyApps (``ongoing``)
        self.server: Any = None  # the ReplicaServer (``ongoing``, ``local_waiters``, ``model_ids``)
        self.routers: Callable[[], Iterable[tuple[tuple[str, str], Any]]] | None = None
        # Where a local /metrics page gets the whole instance's metrics (a ControllerClient).
        self.page_source: Any = None
        self._prom: _Prom | None = None
        self._gauges_set: dict[str, set[tuple[str, ...]]] = {}
        self._multiplexed = False  # a @serve.multiplexed function was called here
        self._flusher: asyncio.Task[None] | None = None

    # -- identity
    def setup(self, pod: str, *, namespace: str = LOCAL_NAMESPACE, app: str = "", deployment: str = "",
              routers: Callable[[], Iterable[tuple[tuple[str, str], Any]]] | None = None,
              server: Any = None, page_source: Any = None, autoscaler_metrics: bool = True) -> None:
        """Say who this process is: the proxy (``pod`` only), or a replica of ``app``/``deployment``."""
        self.pod = pod
        self.namespace = namespace
        self.app = app
        self.deployment = deployment
        self.replica = pod if deployment else ""
        if routers is not None:
            self.routers = routers
        if server is not None:
            self.server = server
        if page_source is not None:
            self.page_source = page_source
        self.autoscaler_metrics = autoscaler_metrics

    def start_flusher(self, loop: asyncio.AbstractEventLoop | None = None, interval: float = FLUSH_INTERVAL_S) -> None:
        """Flush every ``interval`` seconds on ``loop`` (multiprocess mode: others read the files)."""
        if self._flusher is None:
            self._flusher = (loop or asyncio.get_running_loop()).create_task(self._flush_loop(interval))

    async def _flush_loop(self, interval: float) -> None:
        failed = False
        while True:
            await asyncio.sleep(interval)
            try:
                self.flush()
            except Exception:
                if not failed:  # say it once, not every second
                    logger.exception("flushing metrics failed")
                failed = True

    # -- the request path: plain arithmetic only
    def http_done(self, app: str, deployment: str, route: str, method: str, status: int, started: float) -> None:
        """An HTTP request answered with ``status``; ``started`` is its ``time.monotonic()``."""
        ms = (time.monotonic() - started) * 1000.0
        if method not in _METHODS:
            method = "OTHER"
        key = (app, deployment, route, method, status)
        h = self.http.get(key)
        if h is None:
            h = self.http[key] = _Hist(LATENCY_BUCKETS_MS)
        h.counts[bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        h.n += 1
        h.total += ms

    def request_done(self, route: str, started: float, failed: bool) -> None:
        """A request this replica finished; ``started`` is its ``time.monotonic()``."""
        ms = (time.monotonic() - started) * 1000.0
        h = self.requests.get(route)
        if h is None:
            h = self.requests[route] = _Hist(LATENCY_BUCKETS_MS)
        h.counts[bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        h.n += 1
        h.total += ms
        if failed:
            h.errors += 1

    def batch_done(self, function: str, size: int, max_size: int, wait_s: float, execution_s: float) -> None:
        b = self.batches.get(function)
        if b is None:
            b = self.batches[function] = _Batch()
        b.size.observe(size)
        b.utilization.observe(100.0 * size / max_size if max_size > 0 else 100.0)
        b.wait.observe(max(0.0, wait_s) * 1000.0)
        b.execution.observe(execution_s * 1000.0)

    def model_requested(self) -> None:
        self.model_requests += 1

    def model_loaded(self, seconds: float) -> None:
        self.model_load.observe(seconds * 1000.0)

    def model_unloaded(self, seconds: float) -> None:
        self.model_unload.observe(seconds * 1000.0)

    # -- flushing into prometheus-client
    def flush(self) -> None:
        """Move what accumulated since the last flush into prometheus-client; set the gauges."""
        if not self.pod:
            return
        prom = self._prom
        if prom is None:
            prom = self._prom = _Prom()
        ns, pod = self.namespace, self.pod
        for (app, dep, route, method, status), h in list(self.http.items()):
            if not h.n:
                continue
            labels: tuple[str, ...] = (app, app, dep, route, method, str(status), ns, pod)
            prom.inc(HTTP_REQUESTS, labels, h.n)
            prom.add_hist(HTTP_LATENCY, labels, h)
            if status >= 400:
                prom.inc(HTTP_ERRORS, labels, h.n)
                prom.inc(HTTP_DEPLOYMENT_ERRORS, labels, h.n)
            h.reset()
        fronts = list(self.fronts)
        if fronts:
            self._gauge(prom, HTTP_ONGOING, {(ns, pod): float(sum(f.ongoing for f in fronts))})
        app, dep, rep = self.app, self.deployment, self.replica
        if dep:
            for route, h in list(self.requests.items()):
                if not h.n:
                    continue
                labels = (app, app, dep, rep, route, ns, pod)
                prom.inc(REQUESTS, labels, h.n)
                prom.inc(ERRORS, labels, h.errors)  # even 0: an error ratio needs the series
                prom.add_hist(LATENCY, labels, h)
                h.reset()
            me = (app, app, dep, rep, ns, pod)
            for function, b in list(self.batches.items()):
                if not b.size.n:
                    continue
                labels = (app, app, dep, rep, function, ns, pod)
                prom.inc(BATCHES, labels, b.size.n)
                prom.add_hist(BATCH_SIZE, labels, b.size)
                prom.add_hist(BATCH_UTILIZATION, labels, b.utilization)
                prom.add_hist(BATCH_WAIT, labels, b.wait)
                prom.add_hist(BATCH_EXECUTION, labels, b.execution)
                for h in (b.size, b.utilization, b.wait, b.execution):
                    h.reset()
            if self.model_requests:
                prom.inc(MODEL_REQUESTS, me, self.model_requests)
                self.model_requests = 0
                self._multiplexed = True
            for hist, counter, name in ((self.model_load, MODEL_LOADS, MODEL_LOAD_LATENCY),
                                        (self.model_unload, MODEL_UNLOADS, MODEL_UNLOAD_LATENCY)):
                if hist.n:
                    prom.inc(counter, me, hist.n)
                    prom.add_hist(name, me, hist)
                    hist.reset()
            srv = self.server
            if srv is not None:
                running = int(srv.ongoing)
                self._gauge(prom, PROCESSING, {me: float(running)})
                if self._multiplexed:
                    self._gauge(prom, MODELS, {me: float(len(srv.model_ids))})
                if self.autoscaler_metrics:
                    self._gauge(prom, ONGOING, {me: float(running + len(srv.local_waiters))})
        if self.routers is not None:
            queued: dict[tuple[str, ...], float] = {}
            sent: dict[tuple[str, ...], float] = {}
            for (a, d), router in list(self.routers()):
                key = (a, a, d, ns, pod)
                queued[key] = float(router.num_queued)
                sent[key] = float(router.num_in_flight)
            self._gauge(prom, QUEUED, queued)
            self._gauge(prom, AT_REPLICAS, sent)
            if self.autoscaler_metrics:
                self._gauge(prom, CALLER_QUEUED, queued)

    def _gauge(self, prom: _Prom, name: str, values: dict[tuple[str, ...], float]) -> None:
        # Label sets that went away are set to 0: a multiprocess file cannot forget a key.
        before = self._gauges_set.get(name, set())
        for labels in before - values.keys():
            prom.set(name, labels, 0.0)
        for labels, value in values.items():
            prom.set(name, labels, value)
        self._gauges_set[name] = set(values)

    def render(self) -> bytes:
        """This process's metrics in the Prometheus text format (a pod's admin port)."""
        from prometheus_client import generate_latest

        self.flush()
        if self._prom is None:
            self._prom = _Prom()
        return generate_latest(self._prom.registry)


class _Prom:
    """The prometheus-client objects of :data:`METRICS` written by processes (created lazily,
    at the first flush, so that importing this module never imports prometheus-client)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=False)
        self.metrics: dict[str, Any] = {}
        for m in METRICS:
            if m.source == "controller":
                continue
            # The autoscaler metrics stay out of the registry: in a pod its own collector exports
            # them; locally they reach the page through the multiprocess files all the same.
            registry = None if m.name in (ONGOING, CALLER_QUEUED) else self.registry
            if m.kind == "counter":
                self.metrics[m.name] = Counter(m.name, m.help, m.labels, registry=registry)
            elif m.kind == "gauge":
                self.metrics[m.name] = Gauge(m.name, m.help, m.labels, registry=registry,
                                             multiprocess_mode="livesum")
            else:
                self.metrics[m.name] = Histogram(m.name, m.help, m.labels, registry=registry, buckets=m.buckets)

    def inc(self, name: str, labels: tuple[str, ...], amount: float) -> None:
        self.metrics[name].labels(*labels).inc(amount)

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self.metrics[name].labels(*labels).set(value)

    def add_hist(self, name: str, labels: tuple[str, ...], h: _Hist) -> None:
        # prometheus-client's Histogram has no "observe many": add the per-bucket counts and the
        # sum to the child's values (stored per bucket, made cumulative when collected).
        child = self.metrics[name].labels(*labels)
        for i, n in enumerate(h.counts):
            if n:
                child._buckets[i].inc(n)
        child._sum.inc(h.total)


PROCESS = ProcessMetrics()


def process_exit() -> None:
    """Before a runtime process exits: flush its metrics (and export its pending spans)."""
    try:
        PROCESS.flush()
    except Exception:
        logger.exception("flushing metrics at exit failed")
    from shoal.observability import tracing

    tracing.shutdown()


# ---- the local page ---------------------------------------------------------------------------

_DB_FILE = re.compile(r"^(?P<kind>[a-z]+)_(?:(?P<mode>[a-z]+)_)?(?P<pid>\d+)\.db$")


def _alive(pid: int) -> bool:
    if os.path.isdir("/proc"):
        from shoal.runtime.processes import is_shoal_process

        return is_shoal_process(pid)  # a zombie or a reused pid counts as gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _db_files(directory: str) -> Iterator[tuple[str, str, str, int]]:
    """(path, kind, gauge mode, pid) of each multiprocess file in ``directory``."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        m = _DB_FILE.match(entry)
        if m is not None:
            yield os.path.join(directory, entry), m.group("kind"), m.group("mode") or "", int(m.group("pid"))


def drop_dead_gauges(directory: str) -> None:
    """Remove the live gauges of processes that are gone (what ``mark_process_dead`` does for one)."""
    for path, kind, mode, pid in _db_files(directory):
        if kind == "gauge" and mode.startswith("live") and not _alive(pid):
            try:
                os.remove(path)
            except OSError:
                pass


def collect_directory(directory: str) -> bytes:
    """Every process's metrics from the multiprocess files in ``directory``, merged."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    drop_dead_gauges(directory)
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def content_type() -> str:
    from prometheus_client import CONTENT_TYPE_LATEST

    return str(CONTENT_TYPE_LATEST)


async def local_page(controller_timeout_s: float = 2.0) -> bytes:
    """The whole local instance's metrics: every process's (from the multiprocess directory)
    and the controller's (asked over this process's control connection)."""
    PROCESS.flush()
    directory = os.environ.get(MULTIPROC_ENV, "")
    loop = asyncio.get_running_loop()
    body = b""
    if directory and os.path.isdir(directory):
        body = await loop.run_in_executor(None, collect_directory, directory)
    source = PROCESS.page_source
    if source is not None:
        try:
            body += bytes(await source.call("metrics", timeout=controller_timeout_s))
        except Exception as e:  # the controller restarting: serve what the processes know
            body += f"# the controller's metrics are unavailable: {type(e).__name__}\n".encode()
    return body


async def serve_page(send: Callable[[dict[str, Any]], Awaitable[None]], request_id: str) -> None:
    """Answer ``GET /metrics`` (an ASGI response) with :func:`local_page`."""
    body = await local_page()
    headers = [(b"content-type", content_type().encode()), (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---- the controller's part --------------------------------------------------------------------


class ControllerMetrics:
    """What the controller adds to the page, and the multiprocess directory it owns.

    Gauges are computed from the controller's state when the page asks (``render``); the few
    counters (replica starts, autoscaling decisions) are plain integers kept here.
    """

    def __init__(self, run_dir: str) -> None:
        self.directory = os.path.join(run_dir, "metrics")
        self.starts: dict[tuple[str, str], int] = {}
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.load: dict[tuple[str, str], float] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment every replica and proxy process starts with."""
        return {MULTIPROC_ENV: self.directory}

    def prepare(self) -> None:
        """Create the directory; forget the files of processes that no longer run (a previous
        instance in the same run dir), keeping those of processes a restarted controller adopts."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for path, _kind, _mode, pid in _db_files(self.directory):
            if not _alive(pid):
                try:
                    os.remove(path)
                except OSError:
                    pass

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def process_exited(self, pid: int) -> None:
        """A replica or proxy exited: its live gauges go (its counters stay)."""
        if not os.path.isdir(self.directory):
            return
        from prometheus_client.multiprocess import mark_process_dead

        try:
            mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]
        except OSError:
            pass

    def replica_started(self, app: str, deployment: str) -> None:
        key = (app, deployment)
        self.starts[key] = self.starts.get(key, 0) + 1

    def autoscale_tick(self, app: str, deployment: str, total_requests: float, old: int, new: int) -> None:
        """One autoscaling evaluation: the load it saw; a decision when the target changes."""
        self.load[(app, deployment)] = total_requests
        if new != old:
            key = (app, deployment, "up" if new > old else "down")
            self.decisions[key] = self.decisions.get(key, 0) + 1

    def render(self, controller: Any) -> bytes:
        """The controller's metrics in the Prometheus text format. ``controller`` is the
        :class:`~shoal.runtime.controller.Controller` (read only)."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ControllerCollector(self, controller))
        return generate_latest(registry)


class _ControllerCollector:
    def __init__(self, owner: ControllerMetrics, controller: Any) -> None:
        self.owner = owner
        self.controller = controller

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def family(name: str) -> Any:
            m = BY_NAME[name]
            cls = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
            return cls(m.name, m.help, labels=list(m.labels))

        ns = LOCAL_NAMESPACE
        ctl = self.controller
        replicas, target, healthy, auto_target = (family(REPLICAS), family(TARGET), family(REPLICA_HEALTHY),
                                                  family(AUTOSCALING_TARGET))
        load, dep_status, app_status = family(AUTOSCALING_TOTAL_REQUESTS), family(DEPLOYMENT_STATUS), \
            family(APPLICATION_STATUS)
        counts: dict[tuple[str, str], dict[str, int]] = {}
        for r in list(ctl.replicas.values()):
            state = str(r.state.value)
            by_state = counts.setdefault((r.app, r.deployment), {})
            by_state[state] = by_state.get(state, 0) + 1
            ok = state == "RUNNING" and not r.health_failures
            healthy.add_metric([r.app, r.app, r.deployment, r.tag, ns, r.tag], 1.0 if ok else 0.0)
        for key, app in list(ctl.apps.items()):
            app_status.add_metric([key, key, ns], float(_APPLICATION_STATUS_CODES.get(str(app.status.value), 0)))
            for name, dep in list(app.deployments.items()):
                labels = [key, key, name]
                by_state = counts.get((key, name), {})
                for state in _REPLICA_STATES:
                    replicas.add_metric([*labels, state, ns], float(by_state.get(state, 0)))
                target.add_metric([*labels, ns], float(dep.target))
                dep_status.add_metric([*labels, ns], float(_DEPLOYMENT_STATUS_CODES.get(str(dep.status.value), 0)))
                if dep.autoscaler is not None:
                    auto_target.add_metric([*labels, ns], float(dep.target))
                    load.add_metric([*labels, ns], float(self.owner.load.get((key, name), 0.0)))
        yield from (replicas, target, healthy, auto_target, load, dep_status, app_status)
        starts = family(REPLICA_STARTS)
        for (a, d), n in sorted(self.owner.starts.items()):
            starts.add_metric([a, a, d, ns], float(n))
        yield starts
        decisions = family(AUTOSCALING_DECISIONS)
        for (a, d, direction), n in sorted(self.owner.decisions.items()):
            decisions.add_metric([a, a, d, direction, ns], float(n))
        yield decisions

