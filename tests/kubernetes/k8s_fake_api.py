"""A small in-memory fake of the Kubernetes API, implementing shoal.kubernetes.apply.ClusterAPI.

It keeps objects by (apiVersion, kind, namespace, name), bumps resourceVersion when an apply
changes something, adds a server default to Deployments (so server-side and local diffs differ),
answers label-selector lists, can refuse kinds it does not serve (no KEDA installed), can refuse
dry runs, and can pretend another field manager owns an object.

It also plays the parts of a cluster that matter to ``shoal k8s apply`` and ``shoal k8s doctor``:

* **KEDA** (unless ScaledObject is unserved): its admission webhook refuses a ScaledObject whose
  workload another HPA (not owned by that ScaledObject) or another ScaledObject already scales,
  with KEDA's message; its operator creates ``keda-hpa-<name>``, labelled with the ScaledObject's
  labels (as KEDA copies them) and owned by it; deleting an owner deletes what it owns.
* **Immutable selectors**: applying a Deployment whose ``spec.selector`` differs from the live
  one is refused, as the API server does.
* **Field validation**: with ``gateway_api="v1.1.0"`` the HTTPRoute CRD has no ``timeouts``;
  an apply with ``fieldValidation=Strict`` is refused, any other drops the field (Warn).
* **Discovery**: ``server_version()`` and cluster-scoped objects (CRDs, GatewayClasses) under
  namespace ``""``; :func:`platform` fills in what a complete cluster has.
"""

from __future__ import annotations

import copy
from typing import Any

from shoal.kubernetes.apply import (
    FIELD_MANAGER,
    ApplyConflict,
    ApplyRejected,
    ClusterUnreachable,
    KindNotServed,
    Ref,
)

Obj = dict[str, Any]
Key = tuple[str, str, str, str]


class FakeCluster:
    def __init__(self, *, unserved: tuple[str, ...] = (), refuse_dry_run: bool = False,
                 gateway_api: str = "v1.2.0", version: str = "v1.31.4", unreachable: bool = False) -> None:
        self.objects: dict[Key, Obj] = {}
        self.unserved = set(unserved)
        self.refuse_dry_run = refuse_dry_run
        self.gateway_api = gateway_api
        self.version = version
        self.unreachable = unreachable
        self.owners: dict[Key, str] = {}
        self.calls: list[tuple[str, Any]] = []
        self._rv = 0
        self._uids = 0

    def server_version(self) -> str:
        if self.unreachable:
            raise ClusterUnreachable("cannot reach the Kubernetes API: connection refused")
        return self.version

    def _check(self, kind: str) -> None:
        if self.unreachable:
            raise ClusterUnreachable("cannot reach the Kubernetes API: connection refused")
        if kind in self.unserved:
            raise KindNotServed(kind)

    def _keda_webhook(self, so: Obj) -> None:
        """KEDA's validating webhook: one autoscaler per workload."""
        ns, name = so["metadata"]["namespace"], so["metadata"]["name"]
        target = so["spec"]["scaleTargetRef"]
        for (_, kind, ons, oname), other in self.objects.items():
            if ons != ns or kind not in ("HorizontalPodAutoscaler", "ScaledObject"):
                continue
            ref = other["spec"].get("scaleTargetRef") or {}
            if (ref.get("kind"), ref.get("name")) != (target.get("kind", "Deployment"), target["name"]):
                continue
            if kind == "ScaledObject" and oname != name:
                raise ApplyRejected(f"admission webhook \"vscaledobject.kb.io\" denied the request: the workload "
                                    f"'{target['name']}' is already managed by the ScaledObject '{oname}'")
            owned = any(o.get("kind") == "ScaledObject" and o.get("name") == name
                        for o in other["metadata"].get("ownerReferences") or [])
            if kind == "HorizontalPodAutoscaler" and not owned:
                raise ApplyRejected(f"admission webhook \"vscaledobject.kb.io\" denied the request: the workload "
                                    f"'{target['name']}' of type 'apps/v1.{target.get('kind', 'Deployment')}' is "
                                    f"already managed by the hpa '{oname}'")

    def _keda_operator(self, so: Obj) -> None:
        """What KEDA's operator does with a ScaledObject: an HPA of its own, owned by it, with its labels."""
        meta = so["metadata"]
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": f"keda-hpa-{meta['name']}", "namespace": meta["namespace"],
                            "labels": {"app.kubernetes.io/managed-by": "keda-operator", **(meta.get("labels") or {})},
                            "ownerReferences": [{"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                                                 "name": meta["name"], "uid": meta["uid"], "controller": True}]},
               "spec": {"scaleTargetRef": so["spec"]["scaleTargetRef"], "minReplicas": 1,
                        "maxReplicas": so["spec"].get("maxReplicaCount", 100)}}
        self.objects[self.key(hpa)] = self._persisted(hpa, self.objects.get(self.key(hpa)))

    def _validate_fields(self, obj: Obj, field_validation: str) -> Obj:
        """Gateway API before v1.2 (standard channel): HTTPRoute rules have no ``timeouts``."""
        if obj["kind"] != "HTTPRoute" or self.gateway_api >= "v1.2.0":
            return obj
        unknown = [i for i, r in enumerate(obj["spec"].get("rules") or []) if "timeouts" in r]
        if not unknown:
            return obj
        if field_validation == "Strict":
            raise ApplyRejected(f"HTTPRoute/{obj['metadata']['name']}: .spec.rules[{unknown[0]}].timeouts: "
                                "field not declared in schema")
        obj = copy.deepcopy(obj)
        for rule in obj["spec"]["rules"]:
            rule.pop("timeouts", None)
        return obj

    @staticmethod
    def key(obj: Obj) -> Key:
        ref = Ref.of(obj)
        return (ref.api_version, ref.kind, ref.namespace, ref.name)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        self._check(kind)
        obj = self.objects.get((api_version, kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Obj]:
        self._check(kind)
        self.calls.append(("list", (kind, label_selector)))
        want = dict(part.split("=", 1) for part in label_selector.split(",")) if label_selector else {}
        return [copy.deepcopy(o) for (av, k, ns, _), o in self.objects.items()
                if av == api_version and k == kind and ns == namespace
                and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in want.items())]

    def _persisted(self, obj: Obj, old: Obj | None) -> Obj:
        new = copy.deepcopy(obj)
        if new["kind"] == "Deployment":
            new["spec"]["template"]["spec"].setdefault("dnsPolicy", "ClusterFirst")  # a server default
            if "replicas" not in obj["spec"]:  # 1 on creation, then the autoscaler's
                new["spec"]["replicas"] = old["spec"].get("replicas", 1) if old is not None else 1
        meta = new["metadata"]
        body = {k: v for k, v in new.items() if k != "metadata"}
        old_body = {k: v for k, v in (old or {}).items() if k not in ("metadata", "status")}
        same = old is not None and body == old_body and \
            {k: old["metadata"].get(k) for k in ("labels", "annotations")} == \
            {k: meta.get(k) for k in ("labels", "annotations")}
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
        else:
            self._uids += 1
            meta["uid"] = f"uid-{self._uids}"
        if same and old is not None:
            meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        else:
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
        meta["managedFields"] = [{"manager": FIELD_MANAGER}]
        new["status"] = {"observedGeneration": 1}
        return new

    def apply(self, obj: Obj, *, field_manager: str, force: bool, dry_run: bool,
              field_validation: str = "Warn") -> Obj:
        assert field_manager == FIELD_MANAGER
        self._check(obj["kind"])
        self.calls.append(("field_validation", field_validation))
        if dry_run and self.refuse_dry_run:
            raise ApplyRejected("dry run not allowed by an admission webhook")
        obj = self._validate_fields(obj, field_validation)
        if obj["kind"] == "ScaledObject":
            self._keda_webhook(obj)
        key = self.key(obj)
        old = self.objects.get(key)
        if obj["kind"] == "Deployment" and old is not None \
                and old["spec"].get("selector") != obj["spec"].get("selector"):
            raise ApplyRejected(f"Deployment.apps \"{key[3]}\" is invalid: spec.selector: Invalid value: "
                                "field is immutable")
        owner = self.owners.get(key)
        if owner and owner != field_manager and not force:
            raise ApplyConflict(f"{obj['kind']}/{key[3]}: conflict with {owner!r}")
        persisted = self._persisted(obj, self.objects.get(key))
        if not dry_run:
            self.calls.append(("apply", key))
            self.objects[key] = persisted
            self.owners[key] = field_manager
            if obj["kind"] == "ScaledObject":
                self._keda_operator(persisted)
        return copy.deepcopy(persisted)

    def delete(self, api_version: str, kind: str, namespace: str, name: str, *, dry_run: bool) -> None:
        self._check(kind)
        if not dry_run:
            self.calls.append(("delete", (kind, name)))
            gone = self.objects.pop((api_version, kind, namespace, name), None)
            if gone is not None:  # the garbage collector: what the deleted object owned goes too
                uid = gone["metadata"].get("uid")
                for key, o in list(self.objects.items()):
                    if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or []):
                        del self.objects[key]

    def names(self, kind: str) -> list[str]:
        return sorted(k[3] for k in self.objects if k[1] == kind)


# --- a complete platform, for shoal k8s doctor -------------------------------------------------

CRDS = {  # name: (kind, served versions)
    "scaledobjects.keda.sh": ("ScaledObject", ("v1alpha1",)),
    "triggerauthentications.keda.sh": ("TriggerAuthentication", ("v1alpha1",)),
    "httproutes.gateway.networking.k8s.io": ("HTTPRoute", ("v1", "v1beta1")),
    "gateways.gateway.networking.k8s.io": ("Gateway", ("v1", "v1beta1")),
    "gatewayclasses.gateway.networking.k8s.io": ("GatewayClass", ("v1", "v1beta1")),
    "leaderworkersets.leaderworkerset.x-k8s.io": ("LeaderWorkerSet", ("v1",)),
    "certificates.cert-manager.io": ("Certificate", ("v1",)),
    "issuers.cert-manager.io": ("Issuer", ("v1",)),
    "podmonitors.monitoring.coreos.com": ("PodMonitor", ("v1",)),
    "servicemonitors.monitoring.coreos.com": ("ServiceMonitor", ("v1",)),
    "prometheusrules.monitoring.coreos.com": ("PrometheusRule", ("v1",)),
}


def put(cluster: FakeCluster, obj: Obj, namespace: str = "") -> None:
    """Store an object as the cluster's own (namespace "" for a cluster-scoped one)."""
    obj = copy.deepcopy(obj)
    obj["metadata"].setdefault("uid", f"sys-{len(cluster.objects)}")
    cluster.objects[(obj["apiVersion"], obj["kind"], namespace, obj["metadata"]["name"])] = obj


def crd(name: str, kind: str, versions: tuple[str, ...], gateway_api: str = "v1.2.0") -> Obj:
    """A CustomResourceDefinition as the API returns it; an HTTPRoute's v1 schema has rules[].timeouts from v1.2."""
    out: Obj = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": name, "annotations": {}},
                "spec": {"group": name.split(".", 1)[1], "names": {"kind": kind},
                         "versions": [{"name": v, "served": True, "storage": i == 0,
                                       "schema": {"openAPIV3Schema": {"type": "object"}}}
                                      for i, v in enumerate(versions)]}}
    if name.endswith(".gateway.networking.k8s.io"):
        out["metadata"]["annotations"] = {"gateway.networking.k8s.io/bundle-version": gateway_api,
                                          "gateway.networking.k8s.io/channel": "standard"}
    if kind == "HTTPRoute":
        rule = {"backendRefs": {"type": "array"}, "matches": {"type": "array"}}
        if gateway_api >= "v1.2.0":
            rule["timeouts"] = {"type": "object"}
        out["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = {"type": "object", "properties": {"spec": {
            "type": "object", "properties": {"rules": {"type": "array", "items": {"type": "object",
                                                                                    "properties": rule}}}}}}
    return out


def platform(cluster: FakeCluster, *, namespace: str = "ml", gateway: str = "web", gateway_namespace: str = "ml",
             without: tuple[str, ...] = ()) -> FakeCluster:
    """Everything a shoal build may need: CRDs, KEDA running, a GatewayClass and Gateway, Prometheus,
    the external metrics API. ``without`` names CRDs or pieces ("keda", "gatewayclass", "gateway",
    "prometheus", "namespace", "external-metrics") to leave out."""
    for name, (kind, versions) in CRDS.items():
        if name not in without:
            put(cluster, crd(name, kind, versions, cluster.gateway_api))
    if "namespace" not in without:
        put(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    if "keda" not in without:
        for name in ("keda-operator", "keda-operator-metrics-apiserver"):
            put(cluster, {"apiVersion": "apps/v1", "kind": "Deployment",
                          "metadata": {"name": name, "namespace": "keda"},
                          "spec": {}, "status": {"availableReplicas": 1}}, "keda")
    if "gatewayclass" not in without:
        put(cluster, {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                      "metadata": {"name": "envoy"}, "spec": {"controllerName": "example.com/gateway"}})
    if "gateway" not in without:
        put(cluster, {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                      "metadata": {"name": gateway, "namespace": gateway_namespace},
                      "spec": {"gatewayClassName": "envoy", "listeners": []}}, gateway_namespace)
    if "prometheus" not in without:
        put(cluster, {"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "prometheus-operated", "namespace": "monitoring"}, "spec": {}}, "monitoring")
    if "external-metrics" not in without:
        put(cluster, {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
                      "metadata": {"name": "v1beta1.external.metrics.k8s.io"}, "spec": {}})
    return cluster
