"""shoal's compatibility table with Ray Serve: every public name of the Ray modules shoal mirrors.

One entry per (Ray module, name): its status, where it lives in shoal, and a short note (what
differs, or why it is not supported). ``docs/compatibility.md`` is generated from this table
(``scripts/gen_compat_docs.py``), and ``tests/unit/test_compat_table.py`` checks it against
``shoal/_ray_names.json`` (Ray's public names, read from a Ray wheel by
``scripts/ray_public_names.py``): every Ray name has exactly one entry, every supported or
partial name resolves in shoal, and every other name raises :class:`~shoal.exceptions.NotSupportedError`.

The mirror modules (``shoal.serve``, ``shoal.handle``, ...) import this module only inside their
module-level ``__getattr__``, i.e. when a name is not one of their attributes: replica processes
import ``shoal.serve`` at start, so this stays plain data and one small function.
"""

from __future__ import annotations

import importlib
from typing import Any

SUPPORTED = "supported"
PARTIAL = "partial"
NOT_SUPPORTED = "not supported"
STATUSES = (SUPPORTED, PARTIAL, NOT_SUPPORTED)

#: The Ray module each shoal module mirrors.
MIRRORS: dict[str, str] = {
    "ray.serve": "shoal.serve",
    "ray.serve.handle": "shoal.handle",
    "ray.serve.config": "shoal.config",
    "ray.serve.schema": "shoal.schema",
    "ray.serve.exceptions": "shoal.exceptions",
    "ray.serve.llm": "shoal.llm",
}

DOCS_PAGE = "docs/compatibility.md"

_S, _P, _N = SUPPORTED, PARTIAL, NOT_SUPPORTED

_GRPC = ("`port` (0 picks a free port; served on `http_options.host`), `grpc_servicer_functions`, "
         "`request_timeout_s`, `grpc_servicer_func_callable`; shoal adds `ingress_serves_grpc` (ingress replicas "
         "serve the port too); unary and server-streaming methods; started by `serve.start(grpc_options=...)`, a "
         "config file's `grpc_options` (`shoal run serve.yaml`) or `shoal start --grpc-servicer-functions`; on "
         "Kubernetes the ingress pods serve it; see the gRPC guide")
_NO_CONTROLLER_OPTIONS = ("the controller runs in the process that starts shoal, so there is nothing to configure "
                          "apart from that process's environment (Ray's only option is `runtime_env.env_vars`)")
_NO_DEPLOYMENT_ACTORS = ("deployment-scoped actors are a Ray actor feature and shoal has no actors; "
                         "share state through a deployment and its handle")
_NO_TRACING_CONFIG = ("tracing is turned on with the SHOAL_TRACING environment variable (console, otlp, file:PATH), "
                      "not a config object")
_NO_GANG_CONFIG = ("gangs are declared with `placement_group_bundles` (one rank process per bundle) and "
                   "replaced as a whole; see the gang replicas guide")
_NO_DETAILS = "shoal has no REST details API; `serve.status()` and `shoal status --json` give `ServeStatus`"
_NO_AUTOSCALING_DETAILS = ("not reported as models; `shoal status` shows UPSCALING / DOWNSCALING and policy errors, "
                           "and the controller exports autoscaling metrics")
_NO_TASKS = "asynchronous task processing (Celery task queues) is not implemented"
_NO_CONTROLLER_HEALTH = "Ray's controller health report; shoal's controller exports its own Prometheus metrics"

#: Ray module -> name -> (status, shoal location, note). The location is empty for names shoal
#: does not support; a note of a name not supported says why (it ends the error message).
TABLE: dict[str, dict[str, tuple[str, str, str]]] = {
    "ray.serve": {
        "Application": (_S, "shoal.serve.Application", ""),
        "ControllerOptions": (_N, "", _NO_CONTROLLER_OPTIONS),
        "Deployment": (_P, "shoal.serve.Deployment",
                       "`name`, `func_or_class`, `num_replicas`, `user_config`, `max_ongoing_requests`, "
                       "`max_queued_requests`, `ray_actor_options`, `bind()`, `options()`; "
                       "`options(func_or_class=...)` not yet"),
        "HTTPOptions": (_P, "shoal.serve.HTTPOptions", "see `ray.serve.config.HTTPOptions`"),
        "RunTarget": (_N, "", "`serve.run_many` is not implemented; call `serve.run` once per application, "
                              "or deploy a config file with several applications"),
        "TracingConfig": (_N, "", _NO_TRACING_CONFIG),
        "batch": (_S, "shoal.serve.batch",
                  "`max_batch_size`, `batch_wait_timeout_s`, `max_concurrent_batches`, `batch_size_fn`, "
                  "streaming batches, `set_max_batch_size` / `set_batch_wait_timeout_s`"),
        "delete": (_S, "shoal.serve.delete", ""),
        "deployment": (_S, "shoal.serve.deployment", "on classes and functions, bare or with options"),
        "get_app_handle": (_S, "shoal.serve.get_app_handle", ""),
        "get_deployment_actor": (_N, "", _NO_DEPLOYMENT_ACTORS),
        "get_deployment_actor_context": (_N, "", _NO_DEPLOYMENT_ACTORS),
        "get_deployment_handle": (_S, "shoal.serve.get_deployment_handle", ""),
        "get_multiplexed_model_id": (_S, "shoal.serve.get_multiplexed_model_id", ""),
        "get_replica_context": (_P, "shoal.serve.get_replica_context",
                                "`app_name`, `deployment`, `replica_tag`, `replica_id`, `servable_object`, `rank`, "
                                "`world_size` as in Ray; no `gang_context` (in a gang, `rank` and `world_size` are "
                                "the gang's) or `code_version`; on Kubernetes a plain Deployment's pods rank "
                                "themselves 0..N-1 by address among its ready pods (a rank can move when pods come "
                                "or go; Ray keeps it for the replica's life)"),
        "get_trace_context": (_N, "", "the request's trace context is not handed out; with SHOAL_TRACING on, "
                                      "spans started with the OpenTelemetry API in a replica are children "
                                      "of the request's span"),
        "ingress": (_S, "shoal.serve.ingress",
                    "FastAPI and other ASGI apps; a function that builds the app (`@serve.ingress(factory)`) "
                    "is called in each replica"),
        "multiplexed": (_S, "shoal.serve.multiplexed", "`max_num_models_per_replica`; LRU eviction; "
                                                       "model-aware routing"),
        "run": (_P, "shoal.serve.run",
                "`target`, `blocking`, `name`, `route_prefix`, `_local_testing_mode` as in Ray; "
                "`logging_config` accepted and ignored; `external_scaler_enabled` and `controller_options` "
                "not accepted; shoal adds `timeout_s`"),
        "run_many": (_N, "", "not implemented; call `serve.run` once per application, or deploy a config file "
                             "with several applications"),
        "shutdown": (_S, "shoal.serve.shutdown", "no process is left behind"),
        "shutdown_async": (_S, "shoal.serve.shutdown_async", "the same shutdown as `serve.shutdown()`, awaited"),
        "start": (_P, "shoal.serve.start",
                  "`http_options` and `grpc_options` as in Ray, but `http_options` is the first positional "
                  "parameter (Ray's is `proxy_location`); `proxy_location`, `logging_config`, `tracing_config`, "
                  "`controller_options` accepted and ignored; shoal adds `num_gpus`, `strict_cpus`"),
        "status": (_S, "shoal.serve.status",
                   "`ServeStatus` with Ray's structure and status names (also inside a replica, and in a "
                   "Kubernetes pod, where it shows the app as cluster DNS does: ready pods per deployment); "
                   "shoal adds `http_address` and `resources`"),
    },
    "ray.serve.handle": {
        "DeploymentBroadcastResponse": (_N, "", "a call goes to one replica; `handle.broadcast()` to every "
                                                "replica is not implemented"),
        "DeploymentHandle": (_P, "shoal.handle.DeploymentHandle",
                             "`.method.remote()`, `.remote()`, `.options(method_name=, stream=, "
                             "multiplexed_model_id=, use_new_handle_api=)`, picklable; `_by_reference`, "
                             "`_prefer_local_routing` accepted without effect (values always travel by value); "
                             "no `broadcast()`, `choose_replica()`, `dispatch()`"),
        "DeploymentResponse": (_P, "shoal.handle.DeploymentResponse",
                               "`await`, `.result(timeout_s=)`, `.cancel()`, passing responses as arguments; "
                               "no `cancelled()`, `request_id` or `_to_object_ref` (there are no object refs)"),
        "DeploymentResponseGenerator": (_S, "shoal.handle.DeploymentResponseGenerator",
                                        "`async for` and `for`, `.cancel()`; sync and async generators"),
    },
    "ray.serve.config": {
        "AggregationFunction": (_S, "shoal.config.AggregationFunction", "`mean` (time-weighted), `max`, `min`"),
        "AutoscalingConfig": (_S, "shoal.config.AutoscalingConfig",
                              "every field of Ray 2.60; `policy` takes an `AutoscalingPolicy`, its dict form, "
                              "and also an import path or the function itself"),
        "AutoscalingContext": (_S, "shoal.config.AutoscalingContext",
                               "`aggregated_metrics` / `raw_metrics` from the replicas' "
                               "`record_autoscaling_stats()`"),
        "AutoscalingPolicy": (_S, "shoal.config.AutoscalingPolicy",
                              "`policy_function` (import path, function or class) and `policy_kwargs`; "
                              "application-level policies (`DeploymentID` contexts) not yet"),
        "BackpressureConfig": (_N, "", "a full queue always answers HTTP 503 with `Retry-After`; the status "
                                       "code and delay are not configurable"),
        "ControllerOptions": (_N, "", _NO_CONTROLLER_OPTIONS),
        "DeploymentActorConfig": (_N, "", _NO_DEPLOYMENT_ACTORS),
        "GangPlacementStrategy": (_N, "", _NO_GANG_CONFIG),
        "GangRuntimeFailurePolicy": (_N, "", _NO_GANG_CONFIG),
        "GangSchedulingConfig": (_N, "", _NO_GANG_CONFIG),
        "HTTPOptions": (_P, "shoal.config.HTTPOptions",
                        "`host`, `port` (0 picks a free port), `root_path`, `request_timeout_s`, "
                        "`keep_alive_timeout_s`, `ssl_*`; shoal adds `ingress_serves_http`, request limits, "
                        "connection timeouts and API keys; Ray's deprecated `middlewares`, `num_cpus`, "
                        "`root_url` rejected"),
        "ProxyLocation": (_P, "shoal.config.ProxyLocation",
                          "`Disabled`, `HeadOnly`, `EveryNode`, as the enum or its strings; accepted in "
                          "`proxy_location` and not applied (one HTTP front per machine)"),
        "RequestRouterConfig": (_S, "shoal.config.RequestRouterConfig",
                                "`request_router_class` (import path or class), `request_router_kwargs`, "
                                "`request_routing_stats_period_s`, `request_routing_stats_timeout_s`; shoal adds "
                                "`choose_replicas_timeout_s` (a router that fails or is late falls back to the "
                                "default choice); on Kubernetes callers ask each target pod for its "
                                "`record_routing_stats()` on the same period"),
        "gRPCOptions": (_P, "shoal.config.gRPCOptions", _GRPC),
    },
    "ray.serve.schema": {
        "APIType": (_N, "", _NO_DETAILS),
        "ApplicationDetails": (_N, "", _NO_DETAILS),
        "ApplicationStatus": (_S, "shoal.schema.ApplicationStatus", "also in `shoal.status`"),
        "ApplicationStatusOverview": (_S, "shoal.schema.ApplicationStatusOverview", "also in `shoal.status`"),
        "AutoscalingMetricsHealth": (_N, "", _NO_AUTOSCALING_DETAILS),
        "AutoscalingStatus": (_N, "", _NO_AUTOSCALING_DETAILS),
        "CeleryAdapterConfig": (_N, "", _NO_TASKS),
        "ControllerHealthMetrics": (_N, "", _NO_CONTROLLER_HEALTH),
        "DeploymentAutoscalingDetail": (_N, "", _NO_AUTOSCALING_DETAILS),
        "DeploymentDetails": (_N, "", _NO_DETAILS),
        "DeploymentNode": (_N, "", "the deployment graph is not exposed as models; `shoal graph` draws it"),
        "DeploymentSchema": (_P, "shoal.schema.DeploymentSchema",
                             "validated strictly, errors name file and field; Ray 2.60's `backpressure_config`, "
                             "`placement_group_bundle_label_selector`, `max_replicas_per_node`, "
                             "`gang_scheduling_config`, `deployment_actors`, "
                             "`rolling_update_percentage`, `max_surge_percent` rejected"),
        "DeploymentStatusOverview": (_S, "shoal.schema.DeploymentStatusOverview", "also in `shoal.status`"),
        "DeploymentTopology": (_N, "", "the deployment graph is not exposed as models; `shoal graph` draws it"),
        "DurationStats": (_N, "", _NO_CONTROLLER_HEALTH),
        "EncodingType": (_S, "shoal.schema.EncodingType", "`TEXT` and `JSON`, as the enum or its strings"),
        "HTTPOptionsSchema": (_P, "shoal.config.HTTPOptions", "the same model as `HTTPOptions`"),
        "LoggingConfig": (_P, "shoal.schema.LoggingConfig",
                          "`encoding`, `log_level`, `logs_dir` applied per deployment; `enable_access_log`, "
                          "`additional_log_standard_attrs` accepted, not used"),
        "ProxyDetails": (_N, "", _NO_DETAILS),
        "ProxyStatus": (_S, "shoal.schema.ProxyStatus", "also in `shoal.status`"),
        "RayActorOptionsSchema": (_P, "shoal.config.RayActorOptions",
                                  "named `RayActorOptions` in shoal; `label_selector`, `fallback_strategy` rejected"),
        "ReplicaDetails": (_N, "", _NO_DETAILS),
        "ReplicaRank": (_S, "shoal.schema.ReplicaRank",
                        "`rank`, `node_rank` (0), `local_rank`; also the integer rank itself"),
        "ScaleDeploymentRequest": (_N, "", "the body of Ray's REST scaling endpoint, which shoal does not serve; "
                                           "scale with `num_replicas` or autoscaling"),
        "ScalingDecision": (_N, "", _NO_AUTOSCALING_DETAILS),
        "ServeActorDetails": (_N, "", _NO_DETAILS),
        "ServeApplicationSchema": (_P, "shoal.schema.ServeApplicationSchema",
                                   "`runtime_env` accepted and ignored; `host` and `port` (deprecated in Ray) "
                                   "rejected; `autoscaling_policy` (application-level policies) as in Ray"),
        "ServeDeploySchema": (_P, "shoal.schema.ServeDeploySchema",
                              "validated strictly, errors name file and field; `controller_options` and "
                              "`tracing_config` rejected"),
        "ServeInstanceDetails": (_N, "", _NO_DETAILS),
        "ServeStatus": (_S, "shoal.schema.ServeStatus", "also in `shoal.status`"),
        "Target": (_N, "", "Ray's proxy target list for external load balancers; shoal has one HTTP front "
                           "per machine (`serve.http_address()`)"),
        "TargetGroup": (_N, "", "Ray's proxy target list for external load balancers; shoal has one HTTP front "
                                "per machine (`serve.http_address()`)"),
        "TaskProcessorAdapter": (_N, "", _NO_TASKS),
        "TaskProcessorConfig": (_N, "", _NO_TASKS),
        "TaskResult": (_N, "", _NO_TASKS),
        "TracingConfig": (_N, "", _NO_TRACING_CONFIG),
        "gRPCOptionsSchema": (_P, "shoal.config.gRPCOptions", "the same model as `gRPCOptions`; a config file's "
                                                              "`grpc_options` is validated with it"),
    },
    "ray.serve.exceptions": {
        "BackPressureError": (_S, "shoal.exceptions.BackPressureError", "HTTP 503 with `Retry-After`"),
        "DeploymentUnavailableError": (_S, "shoal.exceptions.DeploymentUnavailableError", ""),
        "RayServeException": (_S, "shoal.exceptions.RayServeException", "base of shoal's errors"),
        "ReplicaUnavailableError": (_P, "shoal.exceptions.ReplicaDiedError",
                                    "a request whose replica died fails with `ReplicaDiedError` "
                                    "(alias `ActorDiedError`); this name refers to it"),
        "RequestCancelledError": (_S, "shoal.exceptions.RequestCancelledError", ""),
        "gRPCStatusError": (_S, "shoal.exceptions.gRPCStatusError",
                            "a method that sets a code on `grpc_context` and raises answers with that code; "
                            "raising it answers with its `code` and `details`"),
    },
    "ray.serve.llm": {
        "CloudMirrorConfig": (_N, "", "weights load from a local directory or a Hugging Face repo id; "
                                      "no cloud-storage mirrors"),
        "LLMConfig": (_P, "shoal.llm.LLMConfig",
                      "`model_loading_config`, `llm_engine`, `engine_kwargs`, `deployment_config`, `lora_config`, "
                      "`accelerator_type`; Ray's `runtime_env`, `accelerator_config`, `placement_group_config`, "
                      "`server_cls`, `experimental_configs`, `log_engine_metrics`, `callback_config` rejected"),
        "LLMServer": (_P, "shoal.llm.LLMServer",
                      "the deployment that serves one model; engines `transformers`, `vllm` (untested here), "
                      "`mock` or an engine class; its methods are shoal's own"),
        "LLMServingArgs": (_P, "shoal.llm.LLMServingArgs",
                           "`llm_configs` (objects or dicts), `ingress_deployment_config`; shoal adds "
                           "`embedding_configs` and `gateway` (keys, tenants, limits); no `ingress_cls_config`"),
        "LoraConfig": (_P, "shoal.llm.LoraConfig",
                       "`dynamic_lora_loading_path` (a local directory), `max_num_adapters_per_replica`; "
                       "no `download_timeout_s`, `max_download_tries`"),
        "ModelLoadingConfig": (_P, "shoal.llm.ModelLoadingConfig",
                               "`model_id`, `model_source` (a directory or a Hugging Face repo id); "
                               "no `tokenizer_source`, no `CloudMirrorConfig` source"),
        "build_dp_deployment": (_N, "", "data-parallel attention servers are not implemented; scale a model "
                                        "with `num_replicas` or autoscaling"),
        "build_dp_openai_app": (_N, "", "data-parallel attention servers are not implemented; scale a model "
                                        "with `num_replicas` or autoscaling"),
        "build_llm_deployment": (_P, "shoal.llm.build_llm_deployment",
                                 "`llm_config`, `name_prefix`; no `bind_kwargs`, `override_serve_options`, "
                                 "`deployment_cls`"),
        "build_openai_app": (_S, "shoal.llm.build_openai_app",
                             "usable as a config file's application builder; see the LLM gateway guide"),
        "build_pd_openai_app": (_N, "", "prefill/decode disaggregation is not implemented"),
    },
}


def not_supported_message(ray_module: str, name: str, why: str) -> str:
    """The message of the error raised for a Ray name shoal does not support."""
    return f"{ray_module}.{name} is not supported by shoal: {why}. See {DOCS_PAGE}"


def missing_attribute(module: str, name: str, not_supported: type[Exception]) -> Any:
    """What ``module.name`` is when ``name`` is not an attribute of shoal's mirror module ``module``.

    Called by the mirrors' module-level ``__getattr__``: a Ray name shoal does not support raises
    ``not_supported`` (they pass :class:`~shoal.exceptions.NotSupportedError`; this module imports
    nothing of shoal's, so that no import cycle runs through it) with the reason; a supported name that lives
    elsewhere in shoal (``shoal.schema.RayActorOptionsSchema`` is ``shoal.config.RayActorOptions``)
    is returned from there; anything else raises the usual :class:`AttributeError`.
    """
    ray_module = next((ray for ray, mirror in MIRRORS.items() if mirror == module), None)
    entry = TABLE.get(ray_module, {}).get(name) if ray_module else None
    if entry is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    status, location, note = entry
    if status == NOT_SUPPORTED:
        raise not_supported(not_supported_message(str(ray_module), name, note))
    where, _, attr = location.rpartition(".")
    if where == module and attr == name:  # should have been a plain attribute: the table or the module is wrong
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return getattr(importlib.import_module(where), attr)
