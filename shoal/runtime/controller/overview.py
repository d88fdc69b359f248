"""``serve.status()`` of a local instance, built from the controller's records (read only)."""

from __future__ import annotations

from shoal.config import HTTPOptions
from shoal.runtime.controller.availability import status_message
from shoal.runtime.controller.canary import AppKey, CanaryTable
from shoal.runtime.controller.records import AppRecord, ProxyRecord, RequestTotals, fingerprint
from shoal.runtime.controller.registry import Registry
from shoal.status import (
    ApplicationStatusOverview,
    DeploymentStatusOverview,
    ProxyStatus,
    ServeStatus,
    summarize_requests,
)


def serve_status(registry: Registry, canaries: CanaryTable, proxy: ProxyRecord | None, http: HTTPOptions,
                 http_port: int, resources: str, proxy_message: str = "", now: float = 0.0) -> ServeStatus:
    """Every app (its canary nested in it), the proxy, and the resources in use."""
    out = ServeStatus(http_address=f"{http.scheme}://{http.host}:{http_port}" if proxy else "",
                      resources=resources)
    if proxy is not None:
        alive = proxy.proc.poll() is None
        out.proxies[proxy.process_id] = (ProxyStatus.HEALTHY if proxy.ready and alive
                                    else ProxyStatus.STARTING if alive else ProxyStatus.UNHEALTHY)
        if proxy_message:
            out.proxy_messages[proxy.process_id] = proxy_message
    for name, app in registry.apps.items():
        if AppKey.parse(name).is_canary:
            continue
        overview = app_overview(registry, name, app, now)
        canary = registry.apps.get(AppKey.canary(name).key)
        if canary is not None and not canary.deleting:
            c = app_overview(registry, canary.spec.name, canary, now)
            overview.canary = {"weight": canaries.get(name, 0.0), "status": c.status.value,
                               "message": c.message, "version": c.version, "metrics": c.metrics,
                               "deployments": {k: {"status": d.status.value, "replica_states": d.replica_states,
                                                   "message": d.message} for k, d in c.deployments.items()}}
        out.applications[name] = overview
    return out


def app_overview(registry: Registry, key: str, app: AppRecord, now: float = 0.0) -> ApplicationStatusOverview:
    deps = {}
    for dname, dep in app.deployments.items():
        counts: dict[str, int] = {}
        totals = RequestTotals(dep.finished.requests, dep.finished.errors, list(dep.finished.hist))
        for r in registry.of(key, dname):
            counts[r.state.value] = counts.get(r.state.value, 0) + 1
            if r.requests and r.version == dep.version:
                totals.add(r.requests, r.errors, r.latency_hist)
        deps[dname] = DeploymentStatusOverview(
            dep.status, counts, status_message(dep.message, dep.waiting, dep.fault, now - dep.fault_at),
            version=dep.version, target_replicas=dep.target,
            metrics=summarize_requests(totals.requests, totals.errors, totals.hist))
    ingress = deps.get(app.spec.ingress)
    return ApplicationStatusOverview(
        app.status, app.message, app.deployed_at, deps, app.spec.route_prefix, app.spec.ingress,
        version=fingerprint(app.spec), metrics=dict(ingress.metrics) if ingress is not None else {})
