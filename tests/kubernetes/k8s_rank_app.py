"""An app for the pod simulation tests of replica ranks and routing stats in pods: Front -> Ranked.

``Ranked`` (3 replicas) answers with its pod's replica rank and reports it, with its pod name, as
its routing stats; its custom router (in the ``Front`` pod) keeps what it last saw of every
replica's stats, which ``GET /seen`` returns.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request

from shoal import serve
from shoal.config import RequestRouterConfig
from shoal.handle import DeploymentHandle
from shoal.request_router import PendingRequest, RequestRouter, RunningReplica


def _pod() -> str:
    return os.environ.get("SHOAL_POD_NAME", "?")


def _rank() -> dict[str, Any]:
    ctx = serve.get_replica_context()
    return {"pod": _pod(), "rank": int(ctx.rank), "world_size": ctx.world_size}


class SeenRouter(RequestRouter):
    """Routes to any replica; remembers each replica's routing stats as it last saw them."""

    seen: dict[str, dict[str, Any]] = {}

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        SeenRouter.seen = {r.replica_id.unique_id: dict(r.routing_stats) for r in replicas}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return [list(candidate_replicas)]


@serve.deployment(num_replicas=3, graceful_shutdown_timeout_s=2,
                  request_router_config=RequestRouterConfig(request_router_class=SeenRouter,
                                                            request_routing_stats_period_s=0.2,
                                                            request_routing_stats_timeout_s=2))
class Ranked:
    def __call__(self) -> dict[str, Any]:
        return _rank()

    def record_routing_stats(self) -> dict[str, Any]:
        return _rank()


@serve.deployment
class Front:
    def __init__(self, ranked: DeploymentHandle) -> None:
        self.ranked = ranked

    async def __call__(self, request: Request) -> Any:
        if request.url.path.endswith("/seen"):
            return SeenRouter.seen
        result: dict[str, Any] = await self.ranked.remote()
        return result


app = Front.bind(Ranked.bind())
