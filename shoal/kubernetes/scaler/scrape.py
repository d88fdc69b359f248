"""The scaler's scrape step: find every pod of the application through its deployments' headless
Services (cluster DNS, or the simulation's resolver file) and read each pod's ``/metrics`` on its
admin port, every fetch under a deadline. A pod that does not answer is skipped and counted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.kubernetes import names
from shoal.kubernetes.pod.discovery import Resolver
from shoal.kubernetes.scaler.client import HttpCallError, http_call
from shoal.kubernetes.scaler.core import PodSample, Scrape

__all__ = ["ScrapeTargets", "parse_pod_metrics", "scrape"]

logger = logging.getLogger("shoal.scaler")

# Pods read at once (the rest wait their turn, each still under its own deadline).
MAX_CONCURRENT = 32


@dataclass(frozen=True)
class ScrapeTargets:
    """Where the application's pods are: per deployment its headless Service's DNS name."""

    app: str
    dns_names: dict[str, str]  # deployment -> DNS name
    admin_port: int = names.ADMIN_PORT
    timeout_s: float = 2.0


def parse_pod_metrics(text: str, app: str, deployment: str, pod: str) -> PodSample:
    """The load one pod's Prometheus text reports: its own ongoing requests, the requests it
    holds per callee of ``app``, and custom autoscaling metrics (ValueError if unparsable)."""
    from prometheus_client.parser import text_string_to_metric_families

    ongoing: float | None = None
    queued: dict[str, float] = {}
    custom: list[tuple[str, float]] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == names.METRIC_ONGOING and labels.get("deployment") == deployment:
                ongoing = (ongoing or 0.0) + float(s.value)
            elif s.name == names.METRIC_CALLER_QUEUED and labels.get("app") == app:
                callee = labels.get("deployment", "")
                queued[callee] = queued.get(callee, 0.0) + float(s.value)
            elif s.name == names.METRIC_AUTOSCALING_CUSTOM and labels.get("deployment") == deployment:
                custom.append((labels.get("metric", ""), float(s.value)))
    return PodSample(pod=pod, deployment=deployment, ongoing=ongoing, queued=queued, custom=tuple(custom))


async def scrape(targets: ScrapeTargets, resolver: Resolver) -> Scrape:
    """One round over every deployment's pods (see the module docstring)."""
    out = Scrape()
    gate = asyncio.Semaphore(MAX_CONCURRENT)
    jobs: list[tuple[str, str]] = []
    for deployment, dns_name in targets.dns_names.items():
        try:
            ips = await asyncio.wait_for(resolver.resolve(dns_name), targets.timeout_s)
        except Exception as e:  # a resolver that fails must not end the loop
            ips = None
            out.errors[deployment] = f"resolving {dns_name}: {type(e).__name__}: {e}"
        if ips is None:
            out.errors.setdefault(deployment, f"cannot resolve {dns_name}")
            continue
        jobs.extend((deployment, ip) for ip in ips)

    async def one(deployment: str, ip: str) -> None:
        async with gate:
            try:
                status, body = await http_call(ip, targets.admin_port, "GET", "/metrics",
                                               timeout=targets.timeout_s)
                if status != 200:
                    raise HttpCallError(f"GET http://{ip}:{targets.admin_port}/metrics: HTTP {status}")
                out.samples.append(parse_pod_metrics(body.decode("utf-8", "replace"), targets.app, deployment, ip))
            except (HttpCallError, ValueError) as e:
                out.failed[deployment] = out.failed.get(deployment, 0) + 1
                out.errors[deployment] = str(e)

    await asyncio.gather(*(one(d, ip) for d, ip in jobs))
    return out


def dns_targets(app: str, deployments: Sequence[str], namespace: str, cluster_domain: str, *,
                admin_port: int = names.ADMIN_PORT, timeout_s: float = 2.0) -> ScrapeTargets:
    """The targets of an application: every deployment's headless Service."""
    return ScrapeTargets(app, {d: names.service_dns(app, d, namespace, cluster_domain) for d in deployments},
                         admin_port, timeout_s)
