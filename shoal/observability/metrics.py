"""Prometheus metrics of every shoal process, and one ``/metrics`` page for a local instance.

Names follow Ray Serve's documented metrics wherever Ray has one (``ray_serve_*``), so that
dashboards and alerts written for Ray Serve carry over; what Ray has no name for is
``shoal_*``. :data:`METRICS` lists every metric with its type, labels and meaning (the table
in docs/observability.md is this list).

Labels, one scheme everywhere:

* ``namespace`` and ``pod``: the process that wrote the series (a replica's id or the proxy's
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
import time
import weakref
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from shoal.observability.buckets import (
    BATCH_SIZE_BUCKETS,
    BATCH_UTILIZATION_BUCKETS,
    LATENCY_BUCKETS_MS,
    MODEL_LOAD_BUCKETS_MS,
)
from shoal.observability.controller_metrics import ControllerMetrics
from shoal.observability.metric_defs import (
    APPLICATION_STATUS,
    APPLICATION_STATUS_CODES,
    AT_REPLICAS,
    AUTOSCALING_DECISIONS,
    AUTOSCALING_TARGET,
    AUTOSCALING_TOTAL_REQUESTS,
    BATCH_EXECUTION,
    BATCH_SIZE,
    BATCH_UTILIZATION,
    BATCH_WAIT,
    BATCHES,
    BY_NAME,
    CALLER_QUEUED,
    DEPLOYMENT_STATUS,
    DEPLOYMENT_STATUS_CODES,
    ERRORS,
    FLUSH_INTERVAL_S,
    GRPC_ERRORS,
    GRPC_LATENCY,
    GRPC_REQUESTS,
    HTTP_DEPLOYMENT_ERRORS,
    HTTP_ERRORS,
    HTTP_LATENCY,
    HTTP_METHODS,
    HTTP_ONGOING,
    HTTP_REQUESTS,
    LATENCY,
    LOCAL_NAMESPACE,
    METRICS,
    MODEL_LOAD_LATENCY,
    MODEL_LOADS,
    MODEL_REQUESTS,
    MODEL_UNLOAD_LATENCY,
    MODEL_UNLOADS,
    MODELS,
    MULTIPROC_ENV,
    ONGOING,
    PROCESSING,
    QUEUED,
    REPLICA_HEALTHY,
    REPLICA_STARTS,
    REPLICA_STATES,
    REPLICAS,
    REQUESTS,
    TARGET,
    MetricDef,
)
from shoal.observability.multiproc import Drops, collect_directory, content_type, drop_dead_gauges, install_safe_files

__all__ = [
    "APPLICATION_STATUS",
    "APPLICATION_STATUS_CODES",
    "AT_REPLICAS",
    "AUTOSCALING_DECISIONS",
    "AUTOSCALING_TARGET",
    "AUTOSCALING_TOTAL_REQUESTS",
    "BATCHES",
    "BATCH_EXECUTION",
    "BATCH_SIZE",
    "BATCH_UTILIZATION",
    "BATCH_WAIT",
    "BY_NAME",
    "CALLER_QUEUED",
    "DEPLOYMENT_STATUS",
    "DEPLOYMENT_STATUS_CODES",
    "ERRORS",
    "FLUSH_INTERVAL_S",
    "GRPC_ERRORS",
    "GRPC_LATENCY",
    "GRPC_REQUESTS",
    "HTTP_DEPLOYMENT_ERRORS",
    "HTTP_ERRORS",
    "HTTP_LATENCY",
    "HTTP_METHODS",
    "HTTP_ONGOING",
    "HTTP_REQUESTS",
    "LATENCY",
    "LOCAL_NAMESPACE",
    "METRICS",
    "MODELS",
    "MODEL_LOADS",
    "MODEL_LOAD_LATENCY",
    "MODEL_REQUESTS",
    "MODEL_UNLOADS",
    "MODEL_UNLOAD_LATENCY",
    "MULTIPROC_ENV",
    "ONGOING",
    "PROCESS",
    "PROCESSING",
    "QUEUED",
    "REPLICAS",
    "REPLICA_HEALTHY",
    "REPLICA_STARTS",
    "REPLICA_STATES",
    "REQUESTS",
    "TARGET",
    "ControllerMetrics",
    "MetricDef",
    "ProcessMetrics",
    "collect_directory",
    "content_type",
    "drop_dead_gauges",
    "local_page",
    "process_exit",
    "serve_page",
]

logger = logging.getLogger("shoal.observability.metrics")

if os.environ.get(MULTIPROC_ENV):
    # A replica or proxy process: every multiprocess file it creates (its user's own metrics'
    # too, which may come before the first flush) must have its blocks allocated.
    install_safe_files()


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


def _observe_ms(hists: dict[Any, _Hist], key: Any, started: float) -> _Hist:
    """Count the milliseconds since ``started`` (its ``time.monotonic()``) into ``hists[key]``."""
    ms = (time.monotonic() - started) * 1000.0
    h = hists.get(key)
    if h is None:
        h = hists[key] = _Hist(LATENCY_BUCKETS_MS)
    h.counts[bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
    h.n += 1
    h.total += ms
    return h


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
        self.grpc: dict[tuple[str, str, str, str, str], _Hist] = {}
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
        if method not in HTTP_METHODS:
            method = "OTHER"
        _observe_ms(self.http, (app, deployment, route, method, status), started)

    def grpc_done(self, app: str, deployment: str, route: str, method: str, code: str, started: float) -> None:
        """A gRPC call to RPC ``method`` (its path) answered with status ``code`` (its name)."""
        _observe_ms(self.grpc, (app, deployment, route, method, code), started)

    def request_done(self, route: str, started: float, failed: bool) -> None:
        """A request this replica finished; ``started`` is its ``time.monotonic()``."""
        h = _observe_ms(self.requests, route, started)
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
        self._flush_http(prom)
        if self.deployment:
            self._flush_replica(prom)
        if self.routers is not None:
            self._flush_routers(prom)

    def _flush_http(self, prom: _Prom) -> None:
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
        for (app, dep, route, method, code), h in list(self.grpc.items()):
            if not h.n:
                continue
            labels = (app, app, dep, route, method, code, ns, pod)
            prom.inc(GRPC_REQUESTS, labels, h.n)
            prom.add_hist(GRPC_LATENCY, labels, h)
            if code != "OK":
                prom.inc(GRPC_ERRORS, labels, h.n)
            h.reset()
        fronts = list(self.fronts)
        if fronts:
            self._gauge(prom, HTTP_ONGOING, {(ns, pod): float(sum(f.ongoing for f in fronts))})

    def _flush_replica(self, prom: _Prom) -> None:
        ns, pod, app, dep, rep = self.namespace, self.pod, self.app, self.deployment, self.replica
        for route, h in list(self.requests.items()):
            if not h.n:
                continue
            labels: tuple[str, ...] = (app, app, dep, rep, route, ns, pod)
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

    def _flush_routers(self, prom: _Prom) -> None:
        assert self.routers is not None
        ns, pod = self.namespace, self.pod
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
    at the first flush, so that importing this module never imports prometheus-client).

    A sample that cannot be written (its multiprocess file cannot grow: a full disk) is
    dropped and counted in :attr:`drops`; serving never notices."""

    def __init__(self) -> None:
        install_safe_files()
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.drops = Drops()
        self._made: set[tuple[str, tuple[str, ...]]] = set()  # series created in the files
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

    def _child(self, name: str, labels: tuple[str, ...]) -> Any:
        """The series ``labels`` of ``name``; None when it is new and its file could not grow
        (a full disk: the sample is dropped)."""
        try:
            child = self.metrics[name].labels(*labels)
        except OSError as e:
            self.drops.dropped(e)
            return None
        key = (name, labels)
        if key not in self._made:  # a new series was written: the files can grow again
            self._made.add(key)
            self.drops.written()
        return child

    def inc(self, name: str, labels: tuple[str, ...], amount: float) -> None:
        child = self._child(name, labels)
        if child is not None:
            child.inc(amount)

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        child = self._child(name, labels)
        if child is not None:
            child.set(value)

    def add_hist(self, name: str, labels: tuple[str, ...], h: _Hist) -> None:
        # prometheus-client's Histogram has no "observe many": add the per-bucket counts and the
        # sum to the child's values (stored per bucket, made cumulative when collected).
        child = self._child(name, labels)
        if child is None:
            return
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


