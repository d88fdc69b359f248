"""Every metric shoal writes: its name (Ray Serve's where Ray has one), type, labels and meaning.

:data:`METRICS` is the table in docs/observability.md. Labels follow one scheme everywhere (see
:mod:`shoal.observability.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.kubernetes import names
from shoal.observability.buckets import (
    BATCH_SIZE_BUCKETS,
    BATCH_UTILIZATION_BUCKETS,
    LATENCY_BUCKETS_MS,
    MODEL_LOAD_BUCKETS_MS,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOCAL_NAMESPACE = "local"
FLUSH_INTERVAL_S = 1.0


# ---- names ------------------------------------------------------------------------------------
# HTTP, written by whatever serves HTTP: the proxy process and ingress replicas serving it themselves.
HTTP_REQUESTS = "ray_serve_num_http_requests"
HTTP_ERRORS = "ray_serve_num_http_error_requests"
HTTP_DEPLOYMENT_ERRORS = "ray_serve_num_deployment_http_error_requests"
HTTP_LATENCY = "ray_serve_http_request_latency_ms"
HTTP_ONGOING = "ray_serve_num_ongoing_http_requests"
# gRPC, written by the proxy process's gRPC ingress (``method`` is the RPC's path, ``status_code`` its code's name).
GRPC_REQUESTS = "ray_serve_num_grpc_requests"
GRPC_ERRORS = "ray_serve_num_grpc_error_requests"
GRPC_LATENCY = "ray_serve_grpc_request_latency_ms"
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
    MetricDef(GRPC_REQUESTS, "counter", _HTTP, "gRPC calls answered, by route, RPC method and status code.", "grpc"),
    MetricDef(GRPC_ERRORS, "counter", _HTTP, "gRPC calls answered with a status other than OK.", "grpc"),
    MetricDef(GRPC_LATENCY, "histogram", _HTTP,
              "Time from receiving a gRPC call to its last response message, in milliseconds.", "grpc",
              LATENCY_BUCKETS_MS),
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

DEPLOYMENT_STATUS_CODES = {"DEPLOY_FAILED": 1, "UNHEALTHY": 2, "UPDATING": 3, "UPSCALING": 4, "DOWNSCALING": 5,
                            "HEALTHY": 6}
APPLICATION_STATUS_CODES = {"DEPLOY_FAILED": 1, "UNHEALTHY": 2, "NOT_STARTED": 3, "DELETING": 4, "DEPLOYING": 5,
                             "RUNNING": 6}
REPLICA_STATES = ("STARTING", "UPDATING", "RUNNING", "STOPPING", "PENDING_MIGRATION")
# Methods outside this set are counted as OTHER: a client must not be able to mint label values.
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
