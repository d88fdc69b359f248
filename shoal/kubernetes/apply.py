"""``shoal k8s apply``: server-side apply of a build, pruning what the build no longer has.

The logic is written against :class:`ClusterAPI`, a five-method view of the Kubernetes API,
so it is tested against a fake; :class:`KubernetesAPI` implements it with the official
``kubernetes`` client (the optional ``kubernetes`` extra).

* **Apply**: every object of the build, in build order (identity and config before
  workloads, routes last), by server-side apply with field manager ``shoal``. Conflicts with
  other managers fail unless forced. A Secret that already exists is never overwritten
  (``--create-secret`` would otherwise rotate the RPC secret under running pods).
  Every apply asks for ``fieldValidation=Strict``: a field the cluster's schema does not know
  (e.g. an HTTPRoute's ``timeouts`` on Gateway API v1.0/v1.1 CRDs) is an error, not silently
  dropped. A kind the cluster does not serve (a CRD not installed: KEDA, the Prometheus
  Operator...) is found while planning, and the apply refuses to start, naming each missing CRD
  and the build flag that leaves its objects out: it never stops half-way for that.
* **Prune**: objects of the kinds shoal generates, labelled ``app.kubernetes.io/part-of=APP``
  and ``app.kubernetes.io/managed-by=shoal`` (plus ``shoal.dev/instance`` for a
  canary build), that the new build does not contain. Secrets are never pruned, nor objects
  another object owns (``ownerReferences``: KEDA's ``keda-hpa-*`` HPA copies the ScaledObject's
  labels; the garbage collector removes it with its owner).
* **Order**: an autoscaler being pruned whose scale target is also the target of an autoscaler
  the build applies is deleted *before* anything is applied: KEDA's admission webhook refuses a
  ScaledObject for a workload another HPA or ScaledObject already scales ("already managed by
  the hpa"), and two autoscalers must never fight over one workload. Everything else is pruned
  after the apply, routes first.
* **Diff** (``--dry-run``): live object against the server's dry-run result when the server
  accepts a dry-run apply; otherwise against the build's object, comparing only the fields
  the build sets. Secret values are masked.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from shoal.kubernetes.addons import missing_kind_hint
from shoal.kubernetes.compiler import L_INSTANCE, L_PART_OF, L_VERSION, MANAGED_BY, label_value

__all__ = [
    "AUTOSCALER_KINDS",
    "FIELD_MANAGER",
    "FIELD_VALIDATION",
    "PRUNE_KINDS",
    "ApplyConflict",
    "ApplyPlan",
    "ApplyRejected",
    "ClusterAPI",
    "ClusterUnreachable",
    "KindNotServed",
    "KubernetesAPI",
    "NotAllowed",
    "Ref",
    "Scope",
    "execute",
    "plan_apply",
    "render_diff",
]

Obj = dict[str, Any]
FIELD_MANAGER = "shoal"
# Server-side apply refuses unknown or duplicate fields instead of dropping them without a word.
FIELD_VALIDATION = "Strict"
# Connect and read timeout of one API request (seconds): nothing waits without a bound.
REQUEST_TIMEOUT_S = 30.0

# Kinds shoal generates and may prune, in the order they are deleted (routes first).
PRUNE_KINDS: tuple[tuple[str, str], ...] = (
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
    ("networking.k8s.io/v1", "Ingress"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("v1", "ConfigMap"),
    ("v1", "ServiceAccount"),
)


class KindNotServed(Exception):
    """The cluster does not serve this apiVersion/kind (e.g. KEDA or the Gateway API is not installed)."""


class ClusterUnreachable(Exception):
    """The API server cannot be reached or the credentials are missing."""


class NotAllowed(ClusterUnreachable):
    """The API server answered 403: these credentials may not do this (RBAC)."""


class ApplyConflict(Exception):
    """Server-side apply found fields owned by another manager (retry with force to take them)."""


class ApplyRejected(Exception):
    """The API server refused an object (validation, admission, quota...)."""


class ClusterAPI(Protocol):
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None: ...

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Obj]: ...

    def apply(self, obj: Obj, *, field_manager: str, force: bool, dry_run: bool,
              field_validation: str = "Warn") -> Obj:
        """Server-side apply; ``field_validation`` is the API's ``fieldValidation`` (Ignore, Warn, Strict)."""
        ...

    def delete(self, api_version: str, kind: str, namespace: str, name: str, *, dry_run: bool) -> None: ...


@dataclass(frozen=True)
class Ref:
    api_version: str
    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, obj: Obj) -> Ref:
        """The object's reference; cluster-scoped kinds (a Namespace) have namespace ``""``."""
        meta = obj.get("metadata") or {}
        kind = str(obj["kind"])
        namespace = "" if kind in CLUSTER_SCOPED_KINDS else str(meta.get("namespace", "default"))
        return cls(str(obj["apiVersion"]), kind, namespace, str(meta["name"]))

    def __str__(self) -> str:
        group = self.api_version.split("/")[0] if "/" in self.api_version else ""
        kind = self.kind.lower() + (f".{group}" if group else "")
        return f"{kind}/{self.name}"


@dataclass(frozen=True)
class Scope:
    """Where prune looks: one namespace and one label selector (one app, or one canary instance)."""

    namespace: str
    selector: str
    # For a canary build: the stable version whose pods the old backend Service selects.
    canary_of: str | None = None
    app: str | None = None


@dataclass
class ApplyPlan:
    apply: list[Obj] = field(default_factory=list)
    live: dict[Ref, Obj | None] = field(default_factory=dict)
    skip: list[tuple[Ref, str]] = field(default_factory=list)
    prune: list[Ref] = field(default_factory=list)
    # Subset of ``prune`` deleted before anything is applied (autoscalers the build replaces).
    prune_first: list[Ref] = field(default_factory=list)
    # Objects of ``apply`` whose live version has an immutable field the build changes (a
    # Deployment's spec.selector, e.g. after shoal's selector label changed): deleted, then
    # created again. Their pods restart.
    recreate: list[Ref] = field(default_factory=list)
    # (apiVersion, kind) of the build the cluster does not serve (no CRD): execute refuses to start.
    unserved: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def unserved_message(self) -> str:
        """Which kinds the cluster lacks, each with its CRD and the flag that drops it."""
        lines = [f"the cluster does not serve {av} {kind}{missing_kind_hint(av, kind)}" for av, kind in self.unserved]
        return "; ".join(lines) + "; nothing was applied"


# Kinds that live outside namespaces, among those shoal writes or reads.
CLUSTER_SCOPED_KINDS = frozenset({"Namespace", "CustomResourceDefinition", "GatewayClass", "IngressClass",
                                  "PriorityClass", "RuntimeClass"})
# Kinds whose spec.selector cannot change once created (apps/v1 workloads).
IMMUTABLE_SELECTOR_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet"})
# Kinds that scale a workload through spec.scaleTargetRef; one workload must have at most one.
AUTOSCALER_KINDS = frozenset({"HorizontalPodAutoscaler", "ScaledObject"})


def plan_apply(objects: Sequence[Obj], api: ClusterAPI, scopes: Iterable[Scope], *, prune: bool = True) -> ApplyPlan:
    """What applying ``objects`` does: which to apply, which to leave alone, which to prune."""
    plan = ApplyPlan()
    wanted = {Ref.of(o) for o in objects}
    for obj in objects:
        ref = Ref.of(obj)
        try:
            live = api.get(ref.api_version, ref.kind, ref.namespace, ref.name)
        except KindNotServed:
            live = None
            if (ref.api_version, ref.kind) not in plan.unserved:
                plan.unserved.append((ref.api_version, ref.kind))
        if ref.kind == "Secret" and live is not None:
            plan.skip.append((ref, "exists; shoal never overwrites a Secret"))
            continue
        plan.live[ref] = live
        plan.apply.append(obj)
        if live is not None and ref.kind in IMMUTABLE_SELECTOR_KINDS and \
                (live.get("spec") or {}).get("selector") != (obj.get("spec") or {}).get("selector"):
            plan.recreate.append(ref)
            plan.warnings.append(f"{ref}: its selector changed, which Kubernetes does not allow in place; it is "
                                 "deleted and created again, so its pods restart")
    if plan.unserved:
        plan.warnings.append(plan.unserved_message().replace("; nothing was applied", "; apply will refuse to start"))
    for scope in scopes:
        if scope.canary_of is not None and scope.app is not None:
            stable = (f"{L_PART_OF}={label_value(scope.app)},{L_INSTANCE}={label_value(scope.app)},"
                      f"app.kubernetes.io/managed-by={MANAGED_BY}")
            deployments = (_list(api, "apps/v1", "Deployment", scope.namespace, stable)
                           + _list(api, "leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", scope.namespace, stable))
            versions = sorted({(d.get("metadata", {}).get("labels") or {}).get(L_VERSION, "") for d in deployments})
            if scope.canary_of not in versions:
                plan.warnings.append(
                    f"no Deployment of application {scope.app!r} has version {scope.canary_of!r} in namespace "
                    f"{scope.namespace!r} (found: {', '.join(v for v in versions if v) or 'none'}); the canary's "
                    "old backend would select no pods"
                )
        if not prune:
            continue
        targets = {(scope.namespace, t) for t in _scale_targets(objects, scope.namespace)}
        for api_version, kind in PRUNE_KINDS:
            for item in _list(api, api_version, kind, scope.namespace, scope.selector):
                ref = Ref(api_version, kind, scope.namespace, item["metadata"]["name"])
                if ref in wanted or ref in plan.prune or item["metadata"].get("ownerReferences"):
                    continue
                plan.prune.append(ref)
                if kind in AUTOSCALER_KINDS and (scope.namespace, _scale_target(item)) in targets:
                    plan.prune_first.append(ref)
    return plan


def _scale_target(obj: Obj) -> tuple[str, str]:
    """The (kind, name) an autoscaler scales; the API group is left out as KEDA's webhook does."""
    ref = (obj.get("spec") or {}).get("scaleTargetRef") or {}
    return str(ref.get("kind", "Deployment")), str(ref.get("name", ""))


def _scale_targets(objects: Sequence[Obj], namespace: str) -> set[tuple[str, str]]:
    """The workloads the build's autoscalers in ``namespace`` scale."""
    return {_scale_target(o) for o in objects
            if o.get("kind") in AUTOSCALER_KINDS and Ref.of(o).namespace == namespace}


def _get(api: ClusterAPI, ref: Ref) -> Obj | None:
    try:
        return api.get(ref.api_version, ref.kind, ref.namespace, ref.name)
    except KindNotServed:
        return None


def _list(api: ClusterAPI, api_version: str, kind: str, namespace: str, selector: str) -> list[Obj]:
    try:
        return api.list(api_version, kind, namespace, selector)
    except KindNotServed:
        return []


def execute(plan: ApplyPlan, api: ClusterAPI, *, force: bool = False,
            echo: Callable[[str], None] = lambda s: None) -> dict[str, int]:
    """Prune the replaced autoscalers, apply, then prune the rest.

    A kind of the build the cluster does not serve (its CRD is missing) stops it before anything
    changes (:class:`ApplyRejected` naming each CRD and the flag that drops it), never half-way.
    Returns counts by outcome (created, configured, unchanged, skipped, pruned).
    """
    if plan.unserved:
        raise ApplyRejected(plan.unserved_message())
    counts = {"created": 0, "configured": 0, "unchanged": 0, "skipped": 0, "pruned": 0}
    for ref in plan.prune_first:
        api.delete(ref.api_version, ref.kind, ref.namespace, ref.name, dry_run=False)
        counts["pruned"] += 1
        echo(f"{ref} pruned (replaced by another autoscaler of the same workload)")
    for ref, why in plan.skip:
        counts["skipped"] += 1
        echo(f"{ref} unchanged ({why})")
    for obj in plan.apply:
        ref = Ref.of(obj)
        before = plan.live.get(ref)
        if ref in plan.recreate:
            api.delete(ref.api_version, ref.kind, ref.namespace, ref.name, dry_run=False)
            echo(f"{ref} deleted (its selector changed; created again below)")
            before = None
        try:
            after = api.apply(obj, field_manager=FIELD_MANAGER, force=force, dry_run=False,
                              field_validation=FIELD_VALIDATION)
        except KindNotServed:
            raise ApplyRejected(
                f"{ref}: the cluster does not serve {ref.api_version} {ref.kind}"
                + missing_kind_hint(ref.api_version, ref.kind)
            ) from None
        if before is None:
            outcome = "created"
        elif _rv(before) != _rv(after):
            outcome = "configured"
        else:
            outcome = "unchanged"
        counts[outcome] += 1
        echo(f"{ref} {outcome}")
    for ref in plan.prune:
        if ref in plan.prune_first:
            continue
        api.delete(ref.api_version, ref.kind, ref.namespace, ref.name, dry_run=False)
        counts["pruned"] += 1
        echo(f"{ref} pruned")
    return counts


def _rv(obj: Obj | None) -> str | None:
    if obj is None:
        return None
    return str((obj.get("metadata") or {}).get("resourceVersion"))


# --------------------------------------------------------------------------------------------
# Diff
# --------------------------------------------------------------------------------------------

_SERVER_META = ("managedFields", "resourceVersion", "uid", "creationTimestamp", "generation", "selfLink")


def _clean(obj: Obj | None) -> Obj | None:
    """A copy without what the server maintains (status, managedFields, ...) and with Secret values masked."""
    if obj is None:
        return None
    out = copy.deepcopy(obj)
    out.pop("status", None)
    meta = out.get("metadata") or {}
    for key in _SERVER_META:
        meta.pop(key, None)
    ann = meta.get("annotations")
    if isinstance(ann, dict):
        ann.pop("kubectl.kubernetes.io/last-applied-configuration", None)
        if not ann:
            meta.pop("annotations")
    if out.get("kind") == "Secret":
        for key in ("data", "stringData"):
            if isinstance(out.get(key), dict):
                out[key] = {k: "***" for k in out[key]}
    return out


def _shape_like(live: Any, desired: Any) -> Any:
    """``live`` restricted to the keys ``desired`` has (recursively through mappings)."""
    if isinstance(live, dict) and isinstance(desired, dict):
        return {k: _shape_like(live[k], v) for k, v in desired.items() if k in live}
    if isinstance(live, list) and isinstance(desired, list) and len(live) == len(desired):
        return [_shape_like(a, b) for a, b in zip(live, desired, strict=True)]
    return live


class _PlainDumper(yaml.SafeDumper):
    """No anchors and aliases: a dict the compiler shares between two fields reads as twice the same text,
    as the server returns it, so that sharing alone is never a difference."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _yaml(obj: Obj | None) -> list[str]:
    if obj is None:
        return []
    return yaml.dump(obj, Dumper=_PlainDumper, sort_keys=True).splitlines(keepends=True)


def render_diff(plan: ApplyPlan, api: ClusterAPI, *, force: bool = False) -> tuple[str, str]:
    """A unified diff of what applying ``plan`` would change, and how it was computed.

    The mode is ``"server"`` when every object went through a server-side dry-run apply, and
    ``"local"`` when at least one had to be compared locally (the server refused the dry run,
    e.g. a kind it does not serve yet).
    """
    chunks: list[str] = []
    mode = "server"
    for obj in plan.apply:
        ref = Ref.of(obj)
        live = plan.live.get(ref)
        try:
            new: Obj | None = api.apply(obj, field_manager=FIELD_MANAGER, force=force, dry_run=True,
                                        field_validation=FIELD_VALIDATION)
            old = live
        except (KindNotServed, ApplyRejected, ApplyConflict):
            mode = "local"
            new = obj
            old = _shape_like(live, obj) if live is not None else None
        a, b = _yaml(_clean(old)), _yaml(_clean(new))
        if a != b:
            chunks.extend(difflib.unified_diff(a, b, fromfile=f"live/{ref}", tofile=f"new/{ref}"))
    for ref in plan.prune:
        live = _get(api, ref)
        chunks.extend(difflib.unified_diff(_yaml(_clean(live)), [], fromfile=f"live/{ref}", tofile="(pruned)"))
    return "".join(chunks), mode


# --------------------------------------------------------------------------------------------
# The real API, through the official client
# --------------------------------------------------------------------------------------------


class KubernetesAPI:
    """:class:`ClusterAPI` over the ``kubernetes`` package's dynamic client (kubeconfig or in-cluster)."""

    def __init__(self, *, context: str | None = None, kubeconfig: str | None = None) -> None:
        import importlib

        try:
            # Imported by name: the package is optional and untyped, so everything from it is Any.
            client: Any = importlib.import_module("kubernetes.client")
            config: Any = importlib.import_module("kubernetes.config")
            dynamic: Any = importlib.import_module("kubernetes.dynamic")
            config_exception: Any = importlib.import_module("kubernetes.config.config_exception")
        except ImportError:
            raise ImportError(
                "shoal k8s apply needs the official Kubernetes client: install shoal's kubernetes extra "
                "(pip install -e '.[kubernetes]' in a clone of shoal, or pip install kubernetes)"
            ) from None
        try:
            config.load_kube_config(config_file=kubeconfig, context=context)
        except (config_exception.ConfigException, FileNotFoundError, TypeError) as e:
            if kubeconfig or context:
                raise ClusterUnreachable(f"cannot load the kubeconfig: {e}") from None
            try:
                config.load_incluster_config()
            except config_exception.ConfigException:
                raise ClusterUnreachable(f"no kubeconfig and not running in a cluster: {e}") from None
        self._api_client = client.ApiClient()
        _bound_requests(self._api_client)
        self._dyn: Any = None
        self._dynamic = dynamic

    def _resource(self, api_version: str, kind: str) -> Any:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        with self._errors(f"{api_version} {kind}"):
            if self._dyn is None:
                self._dyn = self._dynamic.DynamicClient(self._api_client)
            try:
                return self._dyn.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                raise KindNotServed(f"{api_version} {kind}") from None

    def _errors(self, what: str) -> Any:
        import contextlib

        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        @contextlib.contextmanager
        def guard() -> Any:
            try:
                yield
            except HTTPError as e:
                raise ClusterUnreachable(f"cannot reach the Kubernetes API: {e}") from None
            except ApiException as e:
                if e.status == 404:
                    raise
                if e.status == 409:
                    raise ApplyConflict(f"{what}: {_api_message(e)} (rerun with --force-conflicts to take over "
                                        "the conflicting fields)") from None
                if e.status == 403:
                    raise NotAllowed(f"{what}: not allowed: {_api_message(e)}") from None
                if e.status == 401:
                    raise ClusterUnreachable(f"{what}: not allowed: {_api_message(e)}") from None
                raise ApplyRejected(f"{what}: {_api_message(e)}") from None

        return guard()

    def server_version(self) -> str:
        """The API server's gitVersion, e.g. ``v1.31.4-eks-1a2b3c`` (``shoal k8s doctor``)."""
        from kubernetes.client.exceptions import ApiException

        try:
            with self._errors("version"):
                if self._dyn is None:
                    self._dyn = self._dynamic.DynamicClient(self._api_client)
                # Asked each time (discovery caches it on disk), as plain JSON (no model to fail on).
                info = self._dyn.request("get", "/version", serializer=lambda _client, data: data)
                return str(info.get("gitVersion", ""))
        except ApiException as e:  # a 404: not a Kubernetes API server
            raise ClusterUnreachable(f"the server answers no /version: {_api_message(e)}") from None

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self._resource(api_version, kind)
        try:
            with self._errors(f"{kind}/{name}"):
                return dict(res.get(name=name, namespace=namespace).to_dict())
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Obj]:
        res = self._resource(api_version, kind)
        with self._errors(f"{kind} list"):
            return list(res.get(namespace=namespace, label_selector=label_selector).to_dict().get("items") or [])

    def apply(self, obj: Obj, *, field_manager: str, force: bool, dry_run: bool,
              field_validation: str = "Warn") -> Obj:
        ref = Ref.of(obj)
        res = self._resource(ref.api_version, ref.kind)
        with self._errors(str(ref)):
            out = res.server_side_apply(body=obj, name=ref.name, namespace=ref.namespace,
                                        field_manager=field_manager, force_conflicts=force,
                                        dry_run="All" if dry_run else None,
                                        query_params=[("fieldValidation", field_validation)])
            return dict(out.to_dict())

    def delete(self, api_version: str, kind: str, namespace: str, name: str, *, dry_run: bool) -> None:
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self._resource(api_version, kind)
        try:
            with self._errors(f"{kind}/{name}"):
                res.delete(name=name, namespace=namespace, propagation_policy="Background",
                           dry_run="All" if dry_run else None)
        except NotFoundError:
            pass


def _bound_requests(api_client: Any) -> None:
    """Give every request of ``api_client`` (discovery included) a connect and read timeout.

    The client waits forever on a request without ``_request_timeout``, and the dynamic client's
    discovery passes none; ``call_api`` is where every request goes through.
    """
    call_api = api_client.call_api

    def bounded(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = (REQUEST_TIMEOUT_S, REQUEST_TIMEOUT_S)
        return call_api(*args, **kwargs)

    api_client.call_api = bounded


def _api_message(e: Any) -> str:
    import json

    try:
        return str(json.loads(e.body).get("message") or e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(e, "reason", e))
