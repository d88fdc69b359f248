"""A deployment bound more than once in one application: each further binding gets a unique
name (Adder, Adder_1, ...), as Ray Serve names them, and each keeps its own arguments."""

from __future__ import annotations

from shoal import serve, testing
from shoal.deployment import build_app_spec
from shoal.handle import DeploymentHandle


@serve.deployment
class Adder:
    def __init__(self, increment: int) -> None:
        self.increment = increment

    def add(self, x: int) -> int:
        return x + self.increment


@serve.deployment
class Combine:
    def __init__(self, first: DeploymentHandle, second: DeploymentHandle) -> None:
        self.first = first
        self.second = second

    async def __call__(self, x: int) -> list[int]:
        return [await self.first.add.remote(x), await self.second.add.remote(x)]


def test_each_binding_is_a_deployment_of_its_own() -> None:
    app = Combine.bind(Adder.bind(1), Adder.bind(10))
    spec = build_app_spec(app, "default", "/")
    assert set(spec.deployments) == {"Combine", "Adder", "Adder_1"}
    assert spec.deployments["Combine"].calls == ["Adder", "Adder_1"]
    assert spec.deployments["Adder"].init_args == (1,)
    assert spec.deployments["Adder_1"].init_args == (10,)


def test_one_binding_passed_twice_stays_one_deployment() -> None:
    shared = Adder.bind(5)
    spec = build_app_spec(Combine.bind(shared, shared), "default", "/")
    assert set(spec.deployments) == {"Combine", "Adder"}


def test_both_bindings_serve_their_own_arguments() -> None:
    with testing.run(Combine.bind(Adder.bind(1), Adder.bind(10))) as rt:
        assert rt.handle.remote(5).result(timeout_s=10) == [6, 15]
