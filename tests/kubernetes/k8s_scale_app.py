"""An app for the autoscaling pod-simulation test: Front (the ingress, one replica) calls
Worker, which autoscales from zero with short delays; ``GET /idle`` calls Idle instead, a
deployment that also starts at zero but that nothing will scale (its ScaledObject is left out of
the simulation), to see the caller's wake deadline end in a 503."""

from __future__ import annotations

import asyncio
import os

from starlette.requests import Request

from shoal import serve
from shoal.handle import DeploymentHandle

QUICK = {"metrics_interval_s": 0.2, "look_back_period_s": 1.0, "upscale_delay_s": 0.5,
         "downscale_delay_s": 1.0, "downscale_to_zero_delay_s": 1.0}


@serve.deployment(max_ongoing_requests=2, health_check_period_s=0.2, graceful_shutdown_timeout_s=5,
                  autoscaling_config={"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1, **QUICK})
class Worker:
    def __init__(self) -> None:
        self.served = 0

    async def __call__(self, x: str) -> dict[str, str]:
        await asyncio.sleep(0.2)
        self.served += 1
        return {"x": x, "worker": os.environ.get("SHOAL_POD_NAME", "?")}

    def record_autoscaling_stats(self) -> dict[str, float]:
        # A custom autoscaling metric: the pod exports it on /metrics for the scaler.
        return {"served": float(self.served)}


@serve.deployment(max_ongoing_requests=2, health_check_period_s=0.2,
                  autoscaling_config={"min_replicas": 0, "max_replicas": 1, **QUICK})
class Idle:
    async def __call__(self, x: str) -> str:
        return x


@serve.deployment(max_ongoing_requests=64, health_check_period_s=0.2, graceful_shutdown_timeout_s=5)
class Front:
    def __init__(self, worker: DeploymentHandle, idle: DeploymentHandle) -> None:
        self.worker = worker
        self.idle = idle

    async def __call__(self, request: Request) -> dict[str, str]:
        x = request.query_params.get("q", "")
        if request.url.path.rstrip("/").endswith("idle"):
            return {"idle": await self.idle.remote(x)}
        result: dict[str, str] = await self.worker.remote(x)
        return result


app = Front.bind(Worker.bind(), Idle.bind())
