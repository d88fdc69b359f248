"""Compile a shoal application into plain Kubernetes objects.

:func:`compile_app` is a pure function: from an :class:`~shoal.deployment.AppSpec` (the
built graph), the serve-config entry that describes the application (what every pod reads
back from its ConfigMap) and :class:`CompileOptions`, it returns Kubernetes object dicts
ready to be written as YAML or applied with server-side apply. Nothing here talks to a
cluster or reads the clock; the only randomness is the optional generated Secrets when no
stored material is passed in (``shoal k8s build --create-secret`` passes it: the same build
twice writes the same bytes).

Per shoal deployment it emits a ``Deployment`` running ``shoal replica --deployment NAME`` (for a
gang deployment a ``LeaderWorkerSet``, one group of pods per replica: :mod:`shoal.kubernetes.lws`), a
headless ``Service`` on the RPC port (callers discover pod IPs through its DNS records), a
``PodDisruptionBudget``, a ``NetworkPolicy`` admitting exactly its callers, and a KEDA
``ScaledObject`` or ``autoscaling/v2`` HPA when it autoscales. Per application: a
``ServiceAccount`` without a token, the ``ConfigMap`` holding the serve config, a default-deny
``NetworkPolicy`` plus DNS egress, with KEDA and autoscaling deployments the shoal scaler's
``Deployment``, ``Service`` and NetworkPolicies and KEDA ``TriggerAuthentication`` (:mod:`.autoscaling`),
for the ingress deployment a ClusterIP ``Service`` with a Gateway API ``HTTPRoute`` (or a classic
``Ingress``), with an ingress that scales to zero the holding front in front of it (:mod:`.front`),
and a Prometheus Operator ``PodMonitor`` and ``PrometheusRule`` (:mod:`.monitoring`).
Names, ports and environment variables come from :mod:`shoal.kubernetes.names`, the contract with the pod runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from shoal.deployment import AppSpec
from shoal.exceptions import CompileError
from shoal.kubernetes import names
from shoal.kubernetes.compiler.autoscaling import (
    add_scaler_env,
    autoscaler,
    check_autoscaling_options,
    keda_query,
    scaler_bearer,
    scaler_env,
    scaler_network_policies,
    scaler_objects,
)
from shoal.kubernetes.compiler.common import (
    A_APP,
    A_DEPLOYMENT,
    CACHE_DIR,
    HPA_EXTERNAL_METRIC,
    L_INSTANCE,
    L_PART_OF,
    L_VERSION,
    MANAGED_BY,
    PSA_LABELS,
    RUN_AS_USER,
    AppContext,
    CompileOptions,
    CompileResult,
    Obj,
    check_options,
    cpu_quantity,
    default_version,
    instance_name,
    label_value,
    memory_quantity,
    prune_selector,
)
from shoal.kubernetes.compiler.credentials import api_keys, cert_manager_objects, generated_secrets, hash_gateway_keys
from shoal.kubernetes.compiler.front import front_objects
from shoal.kubernetes.compiler.grpc_ingress import grpc_plan
from shoal.kubernetes.compiler.monitoring import pod_monitor, prometheus_rule
from shoal.kubernetes.compiler.scheduling import check_pod_options, check_targets
from shoal.kubernetes.compiler.traffic import (
    grafana_dashboard,
    http_objects,
    network_policies,
)
from shoal.kubernetes.compiler.workloads import (
    config_map,
    deployment_hashes,
    headless_service,
    pdb,
    service_account,
    workload,
)

__all__ = [
    "CACHE_DIR",
    "HPA_EXTERNAL_METRIC",
    "L_INSTANCE",
    "L_PART_OF",
    "L_VERSION",
    "MANAGED_BY",
    "RUN_AS_USER",
    "CompileError",
    "CompileOptions",
    "CompileResult",
    "check_collisions",
    "check_options",
    "compile_app",
    "compile_apps",
    "cpu_quantity",
    "default_version",
    "instance_name",
    "keda_query",
    "label_value",
    "memory_quantity",
    "prune_selector",
    "to_yaml",
    "to_yaml_stream",
]


def compile_app(spec: AppSpec, entry: Mapping[str, Any], opts: CompileOptions, *,
                http_options: Mapping[str, Any] | None = None, targets_checked: bool = False,
                grpc_options: Mapping[str, Any] | None = None, grpc_default_route: bool = True) -> CompileResult:
    """The Kubernetes objects of one application.

    ``entry`` is the application's serve-config entry (``name``, ``route_prefix``,
    ``import_path``, ``args``, ``deployments``) in JSON-friendly form; it is written into the
    ConfigMap the pods read, with ``name`` replaced by the canary instance name when compiling
    a canary. ``http_options`` (optional) are copied into that file too, with the host and
    port the pods listen on. ``targets_checked``: the caller checked the options' ``DEPLOYMENT:``
    prefixes against every app of the build (:func:`compile_apps`). ``grpc_options`` (the config's,
    JSON form) make the ingress pods serve gRPC (:mod:`.grpc_ingress`); ``grpc_default_route``: the
    app's GRPCRoute also takes the calls that name no application.
    """
    check_options(opts)
    check_pod_options(opts)
    check_autoscaling_options(opts)
    if not targets_checked:
        check_targets(opts, spec.deployments)
    canary = opts.canary_of is not None
    entry = hash_gateway_keys(entry)  # no usable LLM gateway key goes further than this line
    version = opts.version or default_version(opts.image, entry)
    keys = tuple(api_keys(http_options or {}))
    ctx = AppContext(spec=spec, opts=opts, app=spec.name, instance=instance_name(spec.name, version, canary),
                     version=version, canary=canary, entry=entry, warnings=[],
                     api_keys=keys if spec.route_prefix is not None else (),
                     grpc=grpc_plan(grpc_options, http_options, grpc_default_route))
    _check_names(ctx)

    config_text = _serve_config_text(ctx, entry, http_options or {})
    # Per deployment: what its pods read (workloads.deployment_hashes); without --version, also its version label.
    hashes = deployment_hashes(ctx, config_text)
    if opts.version is None:
        ctx.dep_versions = {dep: h[:10] for dep, h in hashes.items()}

    objects: list[Obj] = [service_account(ctx)]
    if opts.create_secret:
        objects.extend(generated_secrets(ctx, ctx.api_keys, scaler_token=scaler_bearer(ctx)))
    if opts.tls == "cert-manager":
        objects.extend(cert_manager_objects(ctx))
    elif opts.tls == "off":
        ctx.warn("--tls off: RPC between pods is plain TCP; anyone on the network path can read it and inject "
                 "code (pickles). For development only")
    objects.append(config_map(ctx, config_text))
    objects.extend(network_policies(ctx))
    objects.extend(scaler_network_policies(ctx))
    for dep in spec.deployments.values():
        objects.append(headless_service(ctx, dep))
        objects.append(add_scaler_env(ctx, workload(ctx, dep, hashes[dep.name])))
        objects.append(pdb(ctx, dep))
        objects.extend(autoscaler(ctx, dep))
    objects.extend(scaler_objects(ctx, config_text))
    objects.extend(front_objects(ctx, config_text, scaler_env(ctx)))
    if spec.route_prefix is not None:
        objects.extend(http_objects(ctx))
    if opts.pod_monitor:
        objects.append(pod_monitor(ctx))
        if opts.alerts:
            objects.append(prometheus_rule(ctx))
    if opts.grafana:
        objects.append(grafana_dashboard(ctx))
    check_collisions(objects)
    return CompileResult(objects=objects, warnings=ctx.warnings)


def compile_apps(apps: Sequence[tuple[AppSpec, Mapping[str, Any]]], opts: CompileOptions, *,
                 http_options: Mapping[str, Any] | None = None,
                 grpc_options: Mapping[str, Any] | None = None) -> CompileResult:
    """:func:`compile_app` for several applications; refuses two objects of one kind and name. With
    ``grpc_options``, the first app with a route prefix takes the gRPC calls that name no application."""
    out = CompileResult(objects=[namespace_object(opts)] if opts.create_namespace else [])
    check_targets(opts, [dep for spec, _ in apps for dep in spec.deployments])
    routed = [spec.name for spec, _ in apps if spec.route_prefix is not None]
    if grpc_plan(grpc_options, http_options) is not None and not routed:
        out.warnings.append("grpc_options: no application has a route_prefix, so no pod serves gRPC "
                            "(gRPC reaches the applications that have an HTTP route, as on one machine)")
    for spec, entry in apps:
        res = compile_app(spec, entry, opts, http_options=http_options, targets_checked=True,
                          grpc_options=grpc_options, grpc_default_route=bool(routed) and spec.name == routed[0])
        out.objects.extend(res.objects)
        out.warnings.extend(res.warnings)
    check_collisions(out.objects)
    return out


def namespace_object(opts: CompileOptions) -> Obj:
    """The Namespace (``--create-namespace``): Pod Security admission enforces, warns and audits
    the restricted profile there, which every pod shoal generates meets (tests check it)."""
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": opts.namespace,
                         "labels": {**PSA_LABELS, "app.kubernetes.io/managed-by": MANAGED_BY}}}


def check_collisions(objects: Sequence[Obj]) -> None:
    """Refuse two objects of one kind and name (they would overwrite each other)."""
    seen: dict[tuple[str, str], str] = {}
    for obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        ann = obj["metadata"].get("annotations", {})
        owner = ann.get(A_DEPLOYMENT) or ann.get(A_APP, "")
        if key in seen:
            raise CompileError(
                f"name collision: two {key[0]} objects named {key[1]!r} (from {seen[key]!r} and {owner!r}); "
                "rename an application or deployment"
            )
        seen[key] = owner


def _check_names(ctx: AppContext) -> None:
    by_name: dict[str, str] = {}
    reserved = {names.ingress_service_name(ctx.instance): "the app's HTTP Service"}
    for dep in ctx.spec.deployments:
        wl = ctx.workload(dep)
        if wl in by_name:
            raise CompileError(
                f"application {ctx.app!r}: deployments {by_name[wl]!r} and {dep!r} both map to the Kubernetes "
                f"name {wl!r}; rename one with .options(name=...)"
            )
        if wl in reserved and ctx.spec.route_prefix is not None:
            raise CompileError(
                f"application {ctx.app!r}: deployment {dep!r} maps to {wl!r}, the name of {reserved[wl]}; "
                "rename the deployment"
            )
        by_name[wl] = dep
        lv = label_value(dep)
        for other in ctx.spec.deployments:
            if other != dep and label_value(other) == lv:
                raise CompileError(
                    f"application {ctx.app!r}: deployments {dep!r} and {other!r} get the same label value {lv!r}; "
                    "rename one with .options(name=...)"
                )
    # A LeaderWorkerSet makes a headless Service of its own name: it must not meet another Service.
    services = {**by_name, **{k: v for k, v in reserved.items() if ctx.spec.route_prefix is not None}}
    for dep, spec in ctx.spec.deployments.items():
        if spec.config.world_size > 1:
            gang = names.gang_name(ctx.instance, dep)
            if gang in services:
                raise CompileError(
                    f"application {ctx.app!r}: the LeaderWorkerSet of gang deployment {dep!r} is named {gang!r}, "
                    f"which is also the Service of {services[gang]!r}; rename a deployment"
                )
            services[gang] = dep


def _serve_config_text(ctx: AppContext, entry: Mapping[str, Any], http_options: Mapping[str, Any]) -> str:
    app_entry = dict(entry)
    app_entry["name"] = ctx.instance
    app_entry.setdefault("route_prefix", ctx.spec.route_prefix)
    # Inline API keys go to a Secret (credentials.py); the ingress pods read them from its file.
    http = {k: v for k, v in http_options.items() if k not in ("host", "port", "location", "api_keys")}
    doc: dict[str, Any] = {"http_options": {"host": "0.0.0.0", "port": names.HTTP_PORT, **http}}
    if ctx.grpc is not None and ctx.spec.route_prefix is not None:
        doc["grpc_options"] = ctx.grpc.config()
    doc["applications"] = [app_entry]
    header = (
        f"# Written by `shoal k8s build` for application {ctx.app!r}; every pod of it reads this file\n"
        f"# ({names.CONFIG_MOUNT_DIR}/{names.CONFIG_FILE_NAME}) and serves the deployment named in "
        f"${names.ENV_DEPLOYMENT}.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False)


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing multi-line strings (the ConfigMap's serve.yaml) as literal blocks, and
    never YAML anchors/aliases: a dict shared by two objects is written out in full in each (an
    ``&id001`` in generated manifests confuses readers, diffs and some tools)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_representer)


def to_yaml(obj: Obj) -> str:
    """One object as YAML, keys in the order the compiler wrote them."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=1000)


def to_yaml_stream(objects: Sequence[Obj], header: str = "") -> str:
    """Every object as one multi-document YAML stream."""
    docs = [to_yaml(o) for o in objects]
    return header + "".join("---\n" + d for d in docs)


# The file `shoal k8s build -o DIR` writes next to the objects (kustomize's default name).
KUSTOMIZATION = "kustomization.yaml"


def kustomization(files: Sequence[str]) -> str:
    """A kustomize ``Kustomization`` listing ``files`` in order (what ``kubectl apply -k`` reads)."""
    doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(files)}
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
