"""The scaler's shell: scrape the application's pods every interval, run the core, answer KEDA.

Routes (:class:`ScalerService.handle`)::

    GET  /scale/<deployment>    {"desired": N, ...}: KEDA's metrics-api trigger (valueLocation "desired");
                                503 until the first scrape, 404 for a deployment not autoscaled here
    POST /demand/<deployment>   a caller holds a request for a deployment with no pod: counted as
                                load at once and decided on (0 -> 1 without waiting for a scrape)
    GET  /status                every deployment's desired and current replicas, load, errors
    GET  /-/healthz, /-/ready   liveness; readiness once the first scrape was taken

With ``shoal k8s scaler --auth bearer`` every route but the two probes needs the bearer token
(enforced by :class:`~shoal.kubernetes.scaler.server.ScalerServer` before these routes run).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from shoal.kubernetes.pod.discovery import Resolver
from shoal.kubernetes.scaler.core import ScalerCore, UnknownDeployment
from shoal.kubernetes.scaler.scrape import ScrapeTargets, scrape

__all__ = ["ScalerService"]

logger = logging.getLogger("shoal.scaler")


class ScalerService:
    """One application's scaler loop and routes (see the module docstring)."""

    def __init__(self, core: ScalerCore, targets: ScrapeTargets, resolver: Resolver, *, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError(f"--interval must be positive, got {interval_s!r}")
        self.core = core
        self.targets = targets
        self.resolver = resolver
        self.interval_s = interval_s
        self.clock = clock
        self.rounds = 0
        self.last_round_error: str | None = None

    async def tick(self) -> dict[str, int]:
        """One scrape and decision round; the new targets."""
        result = await scrape(self.targets, self.resolver)
        now = self.clock()
        before = {d: self.core.desired(d) for d in self.core.deployments}
        self.core.observe(now, result)
        targets = self.core.decide(now)
        self.rounds += 1
        for name, new in targets.items():
            if before[name] is not None and new != before[name]:
                logger.info("autoscaling %s/%s from %s to %d replicas", self.core.app, name, before[name], new)
        for name, n in result.failed.items():
            logger.debug("%d pod(s) of %s did not answer: %s", n, name, result.errors.get(name))
        return targets

    async def run(self, stopping: asyncio.Event) -> None:
        """Rounds every ``interval_s`` until ``stopping`` is set; a failing round is logged, never fatal."""
        while not stopping.is_set():
            try:
                await asyncio.wait_for(self.tick(), max(self.interval_s * 5, 10.0))
                self.last_round_error = None
            except Exception as e:
                self.last_round_error = f"{type(e).__name__}: {e}"
                logger.warning("scaler round failed: %s", self.last_round_error)
            try:
                await asyncio.wait_for(stopping.wait(), self.interval_s)
            except TimeoutError:
                pass

    # -- HTTP routes ---------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if path in ("/-/healthz", "/-/ready", "/status"):
            if method not in ("GET", "HEAD"):
                return 405, {"error": "method not allowed", "allow": "GET"}
            if path == "/-/healthz":
                return 200, {"status": "ok"}
            if path == "/-/ready":
                return (200, {"status": "ready"}) if self.core.observed else (503, {"status": "no scrape yet"})
            status = self.core.status(self.clock())
            status.update(rounds=self.rounds, last_round_error=self.last_round_error)
            return 200, status
        kind, _, deployment = path.lstrip("/").partition("/")
        want = {"scale": "GET", "demand": "POST"}.get(kind)
        if want is None or not deployment:
            return 404, {"error": "not found", "path": path,
                         "routes": ["GET /scale/<deployment>", "POST /demand/<deployment>", "GET /status"]}
        if method != want:
            return 405, {"error": "method not allowed", "allow": want}
        try:
            if kind == "demand":
                now = self.clock()
                self.core.demand(now, deployment)
                self.core.decide(now, [deployment])
            desired = self.core.desired(deployment)
        except UnknownDeployment:
            return 404, {"error": f"deployment {deployment!r} is not autoscaled by this scaler",
                         "deployments": self.core.deployments}
        if desired is None:
            return 503, {"error": "no scrape yet: the desired replica count is not known", "deployment": deployment}
        return (202 if kind == "demand" else 200), {"deployment": deployment, "desired": desired}
