"""Gang deployments for the Kubernetes tests (torch is imported only when a replica starts).

``app``: a 2-rank tensor-parallel linear layer (the model of tests/integration/test_gang.py) as
the HTTP ingress, on CPU with gloo. ``pipeline``: an ``Api`` ingress calling that layer as a
gang of two GPU ranks that autoscales, placed one rank per node.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.requests import Request

from shoal import serve
from shoal.handle import DeploymentHandle


@serve.deployment(num_ranks=2, max_ongoing_requests=4, graceful_shutdown_timeout_s=2,
                  health_check_period_s=1)
class TPLinear:
    """A linear layer whose output rows are split between the ranks; an all_gather joins them."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        ctx = serve.get_replica_context()
        self.rank, self.world_size = ctx.rank, ctx.world_size
        dist.init_process_group("gloo")  # MASTER_ADDR/PORT, RANK and WORLD_SIZE come from the pod's env
        gen = torch.Generator().manual_seed(0)
        self.full = torch.randn(6, 4, generator=gen)  # the same on every rank
        self.shard = self.full.chunk(self.world_size, dim=0)[self.rank]

    def _forward(self, x: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        v = torch.tensor(x)
        part = self.shard @ v
        parts = [torch.empty_like(part) for _ in range(self.world_size)]
        dist.all_gather(parts, part)
        return [float(f) for f in torch.cat(parts)]

    def _pods(self) -> list[str]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, os.environ.get("SHOAL_POD_NAME", ""))
        return out

    async def pods(self) -> list[str]:
        return await asyncio.to_thread(self._pods)

    async def forward(self, x: list[float]) -> dict[str, Any]:
        import torch

        y = await asyncio.to_thread(self._forward, x)
        return {"y": y, "rank": self.rank, "world_size": self.world_size,
                "reference": [float(f) for f in self.full @ torch.tensor(x)],
                "pod": os.environ.get("SHOAL_POD_NAME", "")}

    async def __call__(self, request: Request) -> dict[str, Any]:
        if request.method == "POST":
            x = (await request.json())["x"]
        else:  # GET /?q=...: an input derived from the query, so that requests differ
            q = request.query_params.get("q", "")
            x = [float(len(q)), 1.0, -0.5, float(sum(map(ord, q)) % 7)]
        return await self.forward(x)


@serve.deployment(num_replicas=2)
class Api:
    def __init__(self, model: DeploymentHandle) -> None:
        self.model = model

    async def __call__(self, request: Request) -> dict[str, Any]:
        x = [float(v) for v in request.query_params.get("x", "1,0,0,0").split(",")]
        return dict(await self.model.forward.remote(x))


app = TPLinear.bind()

GPUTPLinear = TPLinear.options(
    name="TPLinear",
    num_ranks=None,
    placement_group_bundles=[{"CPU": 4, "GPU": 1, "memory": 16 * 1024**3}] * 2,
    placement_group_strategy="STRICT_SPREAD",
    autoscaling_config={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2},
)
pipeline = Api.bind(GPUTPLinear.bind())
