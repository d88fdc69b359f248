"""Ray Serve behaviours (issue 17) in real replica processes: serve.status() inside a replica,
zero-argument handlers, a deployment bound twice, an ingress built by a factory."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import Instance

from shoal import serve
from shoal.handle import DeploymentHandle


@serve.deployment
def healthy_apps() -> list[str]:
    status = serve.status()  # inside a replica: the instance's status, from the controller
    return sorted(name for name, app in status.applications.items() if app.status == "RUNNING")


@serve.deployment
class Adder:
    def __init__(self, increment: int) -> None:
        self.increment = increment

    def add(self, x: int) -> int:
        return x + self.increment


@serve.deployment
class NoArgs:
    def __init__(self, first: DeploymentHandle, second: DeploymentHandle) -> None:
        self.first, self.second = first, second

    async def __call__(self) -> list[int]:  # Ray calls it without the request
        return [await self.first.add.remote(1), await self.second.add.remote(1)]


def make_api() -> Any:
    from fastapi import FastAPI

    api = FastAPI()

    @api.get("/pid")
    async def pid() -> dict[str, str]:
        return {"built": "in the replica"}

    return api


@serve.deployment
@serve.ingress(make_api)
class Factory:
    pass


def test_ray_behaviours_in_replica_processes(instance: Instance) -> None:
    serve.run(healthy_apps.bind(), name="monitor", route_prefix="/monitor")
    serve.run(NoArgs.bind(Adder.bind(1), Adder.bind(10)), name="adders", route_prefix="/adders")
    serve.run(Factory.bind(), name="factory", route_prefix="/factory")
    assert httpx.get(instance.url + "/monitor", timeout=20).json() == ["adders", "factory", "monitor"]
    assert httpx.get(instance.url + "/adders", timeout=20).json() == [2, 11]
    assert set(serve.status().applications["adders"].deployments) == {"NoArgs", "Adder", "Adder_1"}
    assert httpx.get(instance.url + "/factory/pid", timeout=20).json() == {"built": "in the replica"}
