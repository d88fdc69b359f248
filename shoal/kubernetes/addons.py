"""The custom resource kinds a build may hold: each one's CRD, what installs it and the build flag
that leaves it out. ``shoal k8s doctor`` and ``shoal k8s apply`` say the same thing from here."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ADDONS", "Addon", "missing_kind_hint"]

_KEDA = "https://keda.sh/docs/latest/deploy/"
_PROM_OP = "https://prometheus-operator.dev/docs/getting-started/installation/"
_CERT_MANAGER = "https://cert-manager.io/docs/installation/"


@dataclass(frozen=True)
class Addon:
    """A custom resource kind: its CRD's name, what to install for it (or which flag drops it), a link."""

    crd: str
    install: str
    link: str


ADDONS: dict[str, Addon] = {
    "ScaledObject": Addon("scaledobjects.keda.sh", "install KEDA (helm install keda kedacore/keda -n keda "
                          "--create-namespace), or build with --autoscaler hpa", _KEDA),
    "TriggerAuthentication": Addon("triggerauthentications.keda.sh", "install KEDA (2.5 or later), or build with "
                                   "--scaler-auth none", _KEDA),
    "HTTPRoute": Addon("httproutes.gateway.networking.k8s.io", "install the Gateway API CRDs (standard channel) and "
                       "a Gateway controller, or build with --ingress-class",
                       "https://gateway-api.sigs.k8s.io/guides/#installing-gateway-api"),
    "GRPCRoute": Addon("grpcroutes.gateway.networking.k8s.io", "install the Gateway API CRDs (standard channel, "
                       "v1.1 or later) and a Gateway controller that serves GRPCRoute, or build with "
                       "--gateway-api-version 1.0 (no gRPC route)",
                       "https://gateway-api.sigs.k8s.io/guides/#installing-gateway-api"),
    "LeaderWorkerSet": Addon("leaderworkersets.leaderworkerset.x-k8s.io", "install LeaderWorkerSet (gang "
                             "deployments need it)", "https://lws.sigs.k8s.io/docs/installation/"),
    "Certificate": Addon("certificates.cert-manager.io", "install cert-manager, or build with --tls secret",
                         _CERT_MANAGER),
    "Issuer": Addon("issuers.cert-manager.io", "install cert-manager, or build with --tls secret", _CERT_MANAGER),
    "PodMonitor": Addon("podmonitors.monitoring.coreos.com", "install the Prometheus Operator (e.g. "
                        "kube-prometheus-stack), or build with --no-pod-monitor", _PROM_OP),
    "ServiceMonitor": Addon("servicemonitors.monitoring.coreos.com", "install the Prometheus Operator", _PROM_OP),
    "PrometheusRule": Addon("prometheusrules.monitoring.coreos.com", "install the Prometheus Operator (e.g. "
                            "kube-prometheus-stack), or build with --no-alerts (or --no-pod-monitor)", _PROM_OP),
}


def missing_kind_hint(api_version: str, kind: str) -> str:
    """``(no CRD <name>: <what to install, or the flag that drops it>)``, or "" for a kind not listed."""
    addon = ADDONS.get(kind)
    if addon is None:
        return ""
    return f" (no CRD {addon.crd}: {addon.install})"
