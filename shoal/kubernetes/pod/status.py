"""``serve.status()`` inside a Kubernetes pod: the application as this pod sees it.

A pod has no controller to ask. Its deployment's code may still call ``serve.status()`` (Ray's
documentation does, to wait for its app), so the pod answers from what it can know: the app's
spec (every deployment, its options) and cluster DNS (the ready pods behind each deployment's
headless Service, the same lookup its handles use). Each deployment is ``HEALTHY`` while it has
a ready pod, or when it may scale to zero and has none; otherwise ``UNHEALTHY`` (``UPDATING``
while this pod itself starts). The application is ``RUNNING`` when every deployment is
``HEALTHY``, else ``DEPLOYING``. Replica counts are ready pods (``RUNNING``); nothing is known
of pods that are not ready, and ``target_replicas`` is the configured count (or the autoscaling
minimum), not the autoscaler's current goal (``shoal k8s status`` or ``kubectl`` has those).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from shoal.deployment import AppSpec
from shoal.kubernetes import names
from shoal.status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    ServeStatus,
)

__all__ = ["pod_status"]

RESOLVE_TIMEOUT_S = 3.0


class _Resolver(Protocol):
    async def resolve(self, name: str) -> list[str] | None: ...


def _floor(config: Any) -> int:
    """The fewest replicas the deployment is configured to run (0: it may scale to zero)."""
    auto = config.resolved_autoscaling()
    if auto is not None:
        return int(auto.min_replicas)
    return int(config.num_replicas if isinstance(config.num_replicas, int) else 1)


async def pod_status(spec: AppSpec, resolver: _Resolver, namespace: str, cluster_domain: str,
                     pod_name: str = "", constructed: bool = True) -> ServeStatus:
    """The :class:`ServeStatus` of ``spec``'s application seen from this pod (see the module docstring)."""

    async def ready(deployment: str) -> list[str] | None:
        name = names.service_dns(spec.name, deployment, namespace, cluster_domain)
        try:
            return await asyncio.wait_for(resolver.resolve(name), RESOLVE_TIMEOUT_S)
        except (TimeoutError, OSError):
            return None

    found = await asyncio.gather(*(ready(d) for d in spec.deployments))
    deployments: dict[str, DeploymentStatusOverview] = {}
    for (name, dspec), ips in zip(spec.deployments.items(), found, strict=True):
        floor = _floor(dspec.config)
        count = len(ips) if ips is not None else 0
        if ips is None:
            status, message = DeploymentStatus.UNHEALTHY, "cluster DNS did not answer for its Service"
        elif count > 0 or floor == 0:
            status, message = DeploymentStatus.HEALTHY, ""
        elif not constructed and name == pod_name:
            status, message = DeploymentStatus.UPDATING, "this pod is starting"
        else:
            status, message = DeploymentStatus.UNHEALTHY, "no ready pod"
        deployments[name] = DeploymentStatusOverview(
            status=status, replica_states={"RUNNING": count} if count else {}, message=message,
            target_replicas=floor, status_trigger="seen from a pod through cluster DNS")
    healthy = all(d.status == DeploymentStatus.HEALTHY for d in deployments.values())
    app = ApplicationStatusOverview(
        status=ApplicationStatus.RUNNING if healthy else ApplicationStatus.DEPLOYING,
        message="" if healthy else "not every deployment has a ready pod",
        deployments=deployments, route_prefix=spec.route_prefix, ingress=spec.ingress)
    return ServeStatus(applications={spec.name: app})
