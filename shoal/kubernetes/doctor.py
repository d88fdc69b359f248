"""``shoal k8s doctor``: does the cluster have what a build needs?

From the objects ``shoal k8s build`` would write (same flags), :func:`diagnose` lists what they
need from the cluster and checks each through the same API view as ``shoal k8s apply``
(:class:`~shoal.kubernetes.apply.ClusterAPI`, plus the server version):

* the Kubernetes version, against the range shoal validates its output for;
* the namespace;
* image volumes (``--model-volume DEP=image:...``) against the version: beta from 1.33 behind a
  feature gate, on by default from 1.35;
* every custom resource kind in the build: its CRD and the version the build uses (KEDA
  ``ScaledObject`` and ``TriggerAuthentication``, Gateway API ``HTTPRoute``, ``LeaderWorkerSet``,
  cert-manager, ``PodMonitor`` and ``PrometheusRule``...), with the flag that leaves it out;
  for the HTTPRoute also whether the installed CRD has ``timeouts`` when the build sets them
  (``--gateway-api-version``);
* the controllers behind them: KEDA's operator and metrics server running (``--keda-namespace``),
  a GatewayClass and the ``--gateway`` Gateway, the ``--ingress-class``, the external metrics API
  for ``--autoscaler hpa``, the Prometheus Service KEDA's trigger queries.

Each finding says what is missing and what to install, with a link. The shell (cli.py) turns the
findings into exit status 0 (all present), 1 (something missing or not checkable) or 2 (the
cluster cannot be reached).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

from shoal.kubernetes.addons import ADDONS, Addon
from shoal.kubernetes.apply import ClusterAPI, KindNotServed, NotAllowed

__all__ = ["ADDONS", "SUPPORTED", "Addon", "DoctorAPI", "Finding", "diagnose", "render"]

Obj = dict[str, Any]
# Oldest and newest Kubernetes minor releases whose schemas shoal's output is validated against.
SUPPORTED = ((1, 30), (1, 37))
CRD_API = "apiextensions.k8s.io/v1"
# shoal's own page on the prerequisites (the docs ship with the source; no public site to link).
DOCS = "docs/kubernetes.md, 'Cluster prerequisites'"


class DoctorAPI(ClusterAPI, Protocol):
    def server_version(self) -> str: ...


@dataclass(frozen=True)
class Finding:
    status: Literal["ok", "missing", "unknown"]
    what: str
    detail: str = ""
    fix: str = ""


# API groups built into Kubernetes: no CRD to look for.
_BUILT_IN = re.compile(r"^(v1|[a-z]+/v[0-9a-z]+|[a-z.]*\.k8s\.io/v[0-9a-z]+)$")
_KEDA_LINK = "https://keda.sh/docs/latest/deploy/"


def _line(fix: str, link: str) -> str:
    return f"{fix} ({link})"


def _guard(what: str, check: Any) -> list[Finding]:
    """Run one check; a 403 makes it "unknown" (these credentials may not look), not a crash."""
    try:
        return list(check())
    except NotAllowed as e:
        return [Finding("unknown", what, str(e), "run doctor with credentials that may read it, or check by hand")]
    except KindNotServed as e:
        return [Finding("missing", what, f"the cluster does not serve {e}", DOCS)]


def diagnose(api: DoctorAPI, objects: Sequence[Obj], opts: Any) -> list[Finding]:
    """Every finding for ``objects`` built with ``opts`` (a CompileOptions); ClusterUnreachable propagates."""
    keda_namespace = str(getattr(opts, "keda_namespace", "keda"))
    git_version = api.server_version()
    findings = [_version(git_version, objects)]
    from shoal.kubernetes.validate import has_image_volume

    if has_image_volume(list(objects)):
        findings.append(_image_volumes(git_version))
    findings += _guard("namespace", lambda: _namespace(api, opts.namespace, bool(opts.create_namespace)))
    kinds = {(str(o["apiVersion"]), str(o["kind"])) for o in objects}
    for api_version, kind in sorted(kinds):
        if _BUILT_IN.match(api_version) and not api_version.startswith("gateway.networking.k8s.io/"):
            continue
        findings += _guard(f"{kind} CRD", lambda av=api_version, k=kind: _crd(api, av, k, objects))
    if any(k == "ScaledObject" for _, k in kinds):
        findings += _guard("KEDA", lambda: _keda(api, keda_namespace))
        findings += _guard("Prometheus", lambda: _prometheus(api, objects))
    if any(k == "HorizontalPodAutoscaler" for _, k in kinds):
        findings += _guard("external metrics API", lambda: _external_metrics(api))
    if any(k == "HTTPRoute" for _, k in kinds):
        findings += _guard("Gateway", lambda: _gateway(api, opts))
    if any(k == "Ingress" for _, k in kinds) and opts.ingress_class:
        findings += _guard("IngressClass", lambda: _ingress_class(api, opts.ingress_class))
    return findings


def parse_version(git_version: str) -> tuple[int, int] | None:
    """``v1.31.4-eks-1a2b`` or ``v1.29.3+k3s1`` as (1, 31)."""
    m = re.match(r"^v?([0-9]+)\.([0-9]+)", git_version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _uses_match_label_keys(node: Any, in_affinity: bool = False) -> bool:
    """Whether a pod (anti-)affinity term uses matchLabelKeys (alpha before 1.31; topology spread's is older)."""
    if isinstance(node, dict):
        if in_affinity and "matchLabelKeys" in node:
            return True
        return any(_uses_match_label_keys(v, in_affinity or k in ("podAffinity", "podAntiAffinity"))
                   for k, v in node.items())
    if isinstance(node, list):
        return any(_uses_match_label_keys(v, in_affinity) for v in node)
    return False


def _version(git_version: str, objects: Sequence[Obj]) -> Finding:
    (lo_maj, lo_min), (hi_maj, hi_min) = SUPPORTED
    supported = f"{lo_maj}.{lo_min} to {hi_maj}.{hi_min}"
    found = parse_version(git_version)
    what = f"Kubernetes {git_version}"
    if found is None:
        return Finding("unknown", what, "cannot read the version", f"shoal supports {supported}")
    if found < SUPPORTED[0]:
        return Finding("missing", what, f"older than {lo_maj}.{lo_min}",
                       _line(f"upgrade the cluster: shoal's output is validated for Kubernetes {supported}",
                             "https://kubernetes.io/releases/"))
    if _uses_match_label_keys(objects) and found < (1, 31):
        return Finding("missing", what, "gang placement uses matchLabelKeys in pod affinity, beta (on by default) "
                       "only from 1.31", _line("upgrade to 1.31 or later", "https://kubernetes.io/releases/"))
    if found > SUPPORTED[1]:
        return Finding("ok", what, f"newer than the releases shoal was validated for ({supported})")
    return Finding("ok", what, f"supported: {supported}")


def _image_volumes(git_version: str) -> Finding:
    """Image volumes (``--model-volume DEP=image:...``): beta from 1.33 behind the ImageVolume feature
    gate, on by default from 1.35; the API does not tell whether a gate is on."""
    what = "image volumes (--model-volume DEPLOYMENT=image:...)"
    link = "https://kubernetes.io/docs/tasks/configure-pod-container/image-volumes/"
    found = parse_version(git_version)
    if found is None:
        return Finding("unknown", what, "cannot read the version", "image volumes need Kubernetes 1.33 or later")
    if found < (1, 33):
        return Finding("missing", what, f"Kubernetes {found[0]}.{found[1]} has no beta image volumes (1.33+)",
                       _line("upgrade to 1.33 or later (1.35: on by default), or mount the model from a "
                             "PersistentVolumeClaim (--model-volume DEPLOYMENT=pvc:CLAIM)", link))
    if found < (1, 35):
        return Finding("unknown", what, f"beta in {found[0]}.{found[1]} behind the ImageVolume feature gate, off "
                       "by default; doctor cannot see feature gates",
                       _line("make sure the ImageVolume feature gate is on (API server and kubelets) and the "
                             "container runtime supports image volumes", link))
    return Finding("ok", what, "on by default from 1.35; the nodes' container runtime must support them")


def _namespace(api: DoctorAPI, namespace: str, created_by_apply: bool = False) -> list[Finding]:
    if api.get("v1", "Namespace", "", namespace) is None:
        if created_by_apply:
            return [Finding("ok", f"namespace {namespace!r}",
                            "does not exist yet; apply creates it (--create-namespace)")]
        return [Finding("missing", f"namespace {namespace!r}", "does not exist",
                        f"kubectl create namespace {namespace} (or build with --create-namespace)")]
    return [Finding("ok", f"namespace {namespace!r}")]


def _crd(api: DoctorAPI, api_version: str, kind: str, objects: Sequence[Obj]) -> list[Finding]:
    group, _, version = api_version.partition("/")
    addon = ADDONS.get(kind) or Addon(f"{kind.lower()}s.{group}", f"install the CRD of {kind} ({api_version})",
                                      DOCS)
    what = f"{kind} ({api_version})"
    crd = api.get(CRD_API, "CustomResourceDefinition", "", addon.crd)
    if crd is None:
        return [Finding("missing", what, f"no CustomResourceDefinition {addon.crd}", _line(addon.install, addon.link))]
    served = [v for v in (crd.get("spec") or {}).get("versions") or [] if v.get("served")]
    entry = next((v for v in served if v.get("name") == version), None)
    if entry is None:
        names = ", ".join(str(v.get("name")) for v in served) or "none"
        return [Finding("missing", what, f"{addon.crd} serves {names}, not {version}",
                        _line(f"upgrade: {addon.install}", addon.link))]
    annotations = (crd.get("metadata") or {}).get("annotations") or {}
    bundle = annotations.get("gateway.networking.k8s.io/bundle-version")
    channel = annotations.get("gateway.networking.k8s.io/channel")
    detail = f"Gateway API {bundle} ({channel} channel)" if bundle else ""
    if kind == "HTTPRoute" and _sets_timeouts(objects) and not _has_timeouts(entry):
        return [Finding("missing", what, f"{detail or addon.crd}: HTTPRoute rules have no 'timeouts', which the build "
                        "sets (--gateway-api-version 1.2 or later)",
                        _line("install Gateway API v1.2 or later (standard channel), or build with "
                              f"--gateway-api-version {_release(bundle)} (the route then has no timeout)", addon.link))]
    return [Finding("ok", what, detail)]


def _release(bundle: str | None) -> str:
    m = re.match(r"^v?([0-9]+\.[0-9]+)", bundle or "")
    return m.group(1) if m else "1.1"


def _sets_timeouts(objects: Sequence[Obj]) -> bool:
    return any("timeouts" in r for o in objects if o["kind"] == "HTTPRoute" for r in o["spec"].get("rules") or [])


def _has_timeouts(version_entry: Obj) -> bool:
    props: Any = ((version_entry.get("schema") or {}).get("openAPIV3Schema") or {})
    for key in ("spec", "rules"):
        props = ((props.get("properties") or {}).get(key) or {})
        if key == "rules":
            props = props.get("items") or {}
    return "timeouts" in (props.get("properties") or {})


def _available(deployment: Obj | None) -> bool:
    return deployment is not None and int(((deployment.get("status") or {}).get("availableReplicas")) or 0) > 0


def _keda(api: DoctorAPI, namespace: str) -> list[Finding]:
    out = []
    for name, role in (("keda-operator", "operator"), ("keda-operator-metrics-apiserver", "metrics server")):
        dep = api.get("apps/v1", "Deployment", namespace, name)
        what = f"KEDA {role} (Deployment {namespace}/{name})"
        if dep is None:
            out.append(Finding("missing", what, "not found", _line(
                f"install KEDA into namespace {namespace!r}, or point --keda-namespace at yours", _KEDA_LINK)))
        elif not _available(dep):
            out.append(Finding("missing", what, "no available replica",
                               f"kubectl -n {namespace} describe deployment {name}"))
        else:
            out.append(Finding("ok", what))
    return out


def _prometheus(api: DoctorAPI, objects: Sequence[Obj]) -> list[Finding]:
    """The in-cluster Service behind each Prometheus trigger's serverAddress (svc.ns.svc[.cluster.local])."""
    out: list[Finding] = []
    seen: set[str] = set()
    for obj in objects:
        if obj["kind"] != "ScaledObject":
            continue
        for trigger in obj["spec"].get("triggers") or []:
            address = str((trigger.get("metadata") or {}).get("serverAddress", ""))
            if trigger.get("type") != "prometheus" or not address or address in seen:
                continue
            seen.add(address)
            host = urlparse(address).hostname or ""
            parts = host.split(".")
            if len(parts) < 3 or parts[2] != "svc":
                out.append(Finding("unknown", f"Prometheus at {address}", "not an in-cluster Service address"))
                continue
            if api.get("v1", "Service", parts[1], parts[0]) is None:
                out.append(Finding("missing", f"Prometheus at {address}", f"no Service {parts[1]}/{parts[0]}",
                                   _line("install Prometheus (e.g. kube-prometheus-stack), or build with "
                                         "--prometheus-url of yours", "https://prometheus-operator.dev/")))
            else:
                out.append(Finding("ok", f"Prometheus at {address}"))
    return out


def _external_metrics(api: DoctorAPI) -> list[Finding]:
    name = "v1beta1.external.metrics.k8s.io"
    what = f"external metrics API ({name}, for --autoscaler hpa)"
    if api.get("apiregistration.k8s.io/v1", "APIService", "", name) is None:
        return [Finding("missing", what, "not registered", _line(
            "install a metrics adapter that serves shoal_deployment_requests (e.g. prometheus-adapter), or build "
            "with --autoscaler keda", "https://github.com/kubernetes-sigs/prometheus-adapter"))]
    return [Finding("ok", what)]


def _gateway(api: DoctorAPI, opts: Any) -> list[Finding]:
    link = "https://gateway-api.sigs.k8s.io/implementations/"
    out: list[Finding] = []
    try:
        classes = api.list("gateway.networking.k8s.io/v1", "GatewayClass", "", "")
    except KindNotServed:
        classes = []
    if not classes:
        out.append(Finding("missing", "GatewayClass", "none in the cluster",
                           _line("install a Gateway API implementation (it creates a GatewayClass)", link)))
    else:
        out.append(Finding("ok", "GatewayClass", ", ".join(sorted(c["metadata"]["name"] for c in classes))))
    if opts.gateway:
        ns = opts.gateway_namespace or opts.namespace
        try:
            gw = api.get("gateway.networking.k8s.io/v1", "Gateway", ns, opts.gateway)
        except KindNotServed:
            gw = None
        if gw is None:
            out.append(Finding("missing", f"Gateway {ns}/{opts.gateway}", "not found",
                               _line(f"create a Gateway {opts.gateway!r} in {ns!r} (or fix --gateway, "
                                     "--gateway-namespace)", "https://gateway-api.sigs.k8s.io/api-types/gateway/")))
        else:
            out.append(Finding("ok", f"Gateway {ns}/{opts.gateway}", str(gw["spec"].get("gatewayClassName", ""))))
    return out


def _ingress_class(api: DoctorAPI, name: str) -> list[Finding]:
    if api.get("networking.k8s.io/v1", "IngressClass", "", name) is None:
        return [Finding("missing", f"IngressClass {name!r}", "not found", _line(
            "install that ingress controller, or fix --ingress-class",
            "https://kubernetes.io/docs/concepts/services-networking/ingress-controllers/"))]
    return [Finding("ok", f"IngressClass {name!r}")]


def render(findings: Sequence[Finding]) -> str:
    """One line per finding, a fix line under each that needs one."""
    mark = {"ok": "ok     ", "missing": "MISSING", "unknown": "?      "}
    lines = []
    for f in findings:
        lines.append(f"{mark[f.status]} {f.what}" + (f": {f.detail}" if f.detail else ""))
        if f.status != "ok" and f.fix:
            lines.append(f"        -> {f.fix}")
    return "\n".join(lines) + "\n"
