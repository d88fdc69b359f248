"""Custom request routers on real replica processes (Ray's ``RequestRouterConfig``): replicas
report ``record_routing_stats()`` through the controller to the callers' routers, and a router
that sends every request to the replica with the lowest reported value gets them all there; a
router class that raises or never answers still serves every request (shoal's default choice)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from conftest import Instance

from shoal import serve
from shoal.config import RequestRouterConfig
from shoal.request_router import PendingRequest, RequestRouter, RunningReplica

REPLICAS = 3


class LowestLoad(RequestRouter):
    """The replica whose routing stat "load" is lowest; no replica until all of them reported."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if len(candidate_replicas) < REPLICAS or any("load" not in r.routing_stats for r in candidate_replicas):
            return []  # the request waits; every membership update asks again
        return [[min(candidate_replicas, key=lambda r: r.routing_stats["load"])]]


@serve.deployment(num_replicas=REPLICAS, request_router_config=RequestRouterConfig(
    request_router_class=LowestLoad, request_routing_stats_period_s=0.2, request_routing_stats_timeout_s=2))
class Reporter:
    """Each replica reports a distinct load: 10 + its rank (0..N-1)."""

    def __init__(self) -> None:
        self.load = 10 + int(serve.get_replica_context().rank)

    def __call__(self) -> tuple[str, int]:
        return serve.get_replica_context().replica_tag, self.load

    def record_routing_stats(self) -> dict[str, Any]:
        return {"load": self.load}


def test_every_request_goes_to_the_replica_with_the_lowest_routing_stat(instance: Instance) -> None:
    h = serve.run(Reporter.bind())
    answers = [h.remote().result(timeout_s=60) for _ in range(20)]
    tags = {tag for tag, _ in answers}
    assert len(tags) == 1, answers
    assert answers[0][1] == 10  # rank 0 reports the lowest load


class Raises(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        raise RuntimeError("router bug")


class NeverAnswers(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        await asyncio.sleep(3600)
        return []


@serve.deployment(num_replicas=2)
class Echo:
    def __call__(self, x: int) -> int:
        return x


def test_a_router_that_raises_or_hangs_still_serves_every_request(instance: Instance) -> None:
    raising = serve.run(Echo.options(name="Raising", request_router_config=RequestRouterConfig(
        request_router_class=Raises)).bind(), name="raising", route_prefix=None)
    hanging = serve.run(Echo.options(name="Hanging", request_router_config=RequestRouterConfig(
        request_router_class=NeverAnswers, choose_replicas_timeout_s=0.5)).bind(), name="hanging",
        route_prefix=None)
    assert [raising.remote(i).result(timeout_s=30) for i in range(10)] == list(range(10))
    assert [hanging.remote(i).result(timeout_s=30) for i in range(10)] == list(range(10))


def test_http_requests_through_the_proxy_use_the_router(proxied: Instance) -> None:
    serve.run(Reporter.bind(), route_prefix="/r")
    answers = [httpx.get(proxied.url + "/r", timeout=60).json() for _ in range(10)]
    assert {tuple(a) for a in answers} == {(answers[0][0], 10)}, answers
