"""A small 3-deployment app for the pod runtime and pod simulation tests: Ingress -> A -> B.

Plain Python, no ML. ``B`` sleeps a little per request (so requests are in flight when pods
come and go), reports its pod and version, and fails ``check_health`` while the file named in
its user_config (``unhealthy_file``) exists.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.requests import Request

from shoal import serve
from shoal.handle import DeploymentHandle


def _pod() -> str:
    return os.environ.get("SHOAL_POD_NAME", "?")


@serve.deployment(max_ongoing_requests=4, health_check_period_s=0.2, health_check_timeout_s=5,
                  graceful_shutdown_timeout_s=10)
class B:
    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self.version = "v1"
        self.unhealthy_file = ""

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.version = str(config.get("version", "v1"))
        self.delay_s = float(config.get("delay_s", self.delay_s))
        self.unhealthy_file = str(config.get("unhealthy_file", ""))

    def check_health(self) -> None:
        if self.unhealthy_file and os.path.exists(self.unhealthy_file):
            raise RuntimeError("told to be unhealthy")

    async def __call__(self, x: str) -> dict[str, str]:
        await asyncio.sleep(self.delay_s)
        return {"x": x, "b": _pod(), "version": self.version}

    async def slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    async def count(self, n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i


@serve.deployment(max_ongoing_requests=16, health_check_period_s=0.5, graceful_shutdown_timeout_s=10)
class A:
    def __init__(self, b: DeploymentHandle) -> None:
        self.b = b

    async def __call__(self, x: str) -> dict[str, str]:
        result: dict[str, str] = await self.b.remote(x)
        return {**result, "a": _pod()}


@serve.deployment(max_ongoing_requests=32, health_check_period_s=0.5, graceful_shutdown_timeout_s=10)
class Ingress:
    def __init__(self, a: DeploymentHandle) -> None:
        self.a = a

    async def __call__(self, request: Request) -> Any:
        if request.query_params.get("status"):  # serve.status() as this pod sees the app
            st = (await asyncio.to_thread(serve.status)).applications["pipe"]
            return {"app": st.status.value, "deployments": {n: [d.status.value, d.replica_states.get("RUNNING", 0)]
                                                            for n, d in st.deployments.items()}}
        result: dict[str, str] = await self.a.remote(request.query_params.get("q", ""))
        return {**result, "ingress": _pod()}


app = Ingress.bind(A.bind(B.bind()))
