"""One replica of one deployment in a Kubernetes pod: ``shoal replica --deployment NAME``.

This is the container command the Kubernetes compiler writes. There is no controller in a
cluster: the pod reads the serve config file (mounted from the app's ConfigMap), builds the
application, constructs its own deployment and serves it, and Kubernetes does the rest
(scheduling, restarts, rolling updates, autoscaling from the metrics served here).

* **RPC** on ``$SHOAL_POD_IP:9000``: the framed protocol of :mod:`shoal.runtime.wire` over
  mutual TLS (the app's certificate and CA, mounted at ``$SHOAL_TLS_DIR``:
  :mod:`~shoal.kubernetes.pod.tls`), with the HMAC handshake on ``$SHOAL_RPC_SECRET`` inside it
  (and ``$SHOAL_RPC_SECRET_PREVIOUS`` during a rotation; nothing is unpickled before it
  succeeds). ``max_ongoing_requests`` is enforced: a request beyond it is refused and the
  caller's router tries another pod.
* **HTTP** on ``:8000`` when the deployment is its app's ingress (the same in-process path a
  local ingress replica uses; ``route_prefix`` and ``http_options`` from the config file).
* **Admin** on ``:8001``: ``/-/healthz`` (the startup and liveness probes: 503 until the
  constructor finished, which may block the process for minutes loading a model; then 200 while
  the process answers, draining included, until ``check_health`` fails 3 times in a row: then
  503 for good, so the kubelet restarts the container as Ray Serve replaces the replica),
  ``/-/ready`` (the readiness probe: 200 once the constructor finished and the latest
  ``check_health`` passed; 503 before, after a failed check, and while draining) and
  ``/metrics`` (Prometheus text: ongoing requests in this replica, requests this pod holds for
  each callee, request counters and latencies). In a cluster the HTTP and admin ports also
  listen on 127.0.0.1, for ``kubectl port-forward``.
* **Handles** in the deployment's constructor arguments route through a :class:`PodBackend`:
  one router per callee, fed by resolving the callee's headless Service every second (or
  the JSON file named by ``$SHOAL_RESOLVER_FILE``, the pod simulation's stand-in for cluster
  DNS). With no pod to call, requests wait in the caller up to the wake deadline (counted in
  ``shoal_handle_queued_requests`` and posted as demand to the app's scaler, which wakes a
  deployment from zero through KEDA), then fail with a 503 at the ingress.
* **Gang ranks** (``--rank-from-env``, a LeaderWorkerSet pod): rank 0 runs every request on
  ranks 1..N-1 too and is ready only while they are; see :mod:`shoal.kubernetes.gang_pod`.
* **Replica ranks** of a plain Deployment's pod (``get_replica_context().rank``): its place,
  by address, among its deployment's ready pods (:mod:`~shoal.kubernetes.pod.ranks`).
* **Routing stats** of custom request routers: kept by the callee pod, asked for by callers
  over RPC (:mod:`~shoal.kubernetes.pod.routing_stats`).
* **SIGTERM** drains: ``/-/ready`` turns 503, new requests are refused, in-flight ones finish
  within ``graceful_shutdown_timeout_s``, then the process exits 0.

Logs are written to stderr, one line per record, for ``kubectl logs``.

The parts: :mod:`~shoal.kubernetes.pod.config` (settings, the config file),
:mod:`~shoal.kubernetes.pod.discovery` (callees' pods from DNS), :mod:`~shoal.kubernetes.pod.admin`
(the admin port), :mod:`~shoal.kubernetes.pod.metrics`, :mod:`~shoal.kubernetes.pod.replica`
(the replica core composed for a pod) and :mod:`~shoal.kubernetes.pod.command` (the click command).
:mod:`~shoal.kubernetes.pod.front` is ``shoal front``, the holding front of an app whose HTTP
ingress scales to zero (it forwards HTTP to the ingress pods through a :class:`PodBackend`).
"""


from __future__ import annotations

from shoal.exceptions import PodConfigError
from shoal.kubernetes.pod.admin import AdminServer, needs_loopback
from shoal.kubernetes.pod.command import OneLineFormatter, replica, run_pod, setup_logging
from shoal.kubernetes.pod.config import PodSettings, load_deployment, secret_from_env
from shoal.kubernetes.pod.discovery import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    DNS_INTERVAL_S,
    FILE_INTERVAL_S,
    CalleeConfig,
    DNSResolver,
    FileResolver,
    PodBackend,
    Resolver,
)
from shoal.kubernetes.pod.metrics import (
    METRIC_ERRORS,
    METRIC_IN_FLIGHT,
    METRIC_LATENCY,
    METRIC_READY,
    METRIC_REJECTED,
    METRIC_REQUESTS,
    PodCollector,
)
from shoal.kubernetes.pod.replica import DRAIN_QUIET_S, PodReplica

__all__ = [
    "BACKOFF_INITIAL_S",
    "BACKOFF_MAX_S",
    "DNS_INTERVAL_S",
    "DRAIN_QUIET_S",
    "FILE_INTERVAL_S",
    "METRIC_ERRORS",
    "METRIC_IN_FLIGHT",
    "METRIC_LATENCY",
    "METRIC_READY",
    "METRIC_REJECTED",
    "METRIC_REQUESTS",
    "AdminServer",
    "CalleeConfig",
    "DNSResolver",
    "FileResolver",
    "OneLineFormatter",
    "PodBackend",
    "PodCollector",
    "PodConfigError",
    "PodReplica",
    "PodSettings",
    "Resolver",
    "load_deployment",
    "needs_loopback",
    "replica",
    "run_pod",
    "secret_from_env",
    "setup_logging",
]
