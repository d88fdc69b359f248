"""serve.status() inside a Kubernetes pod (issue 17: "serve.status() called inside a replica returns
the real status", in the pod runtime too): built from the app's spec and cluster DNS."""

from __future__ import annotations

import asyncio

from shoal import serve
from shoal.deployment import build_app_spec
from shoal.handle import DeploymentHandle
from shoal.kubernetes import names
from shoal.kubernetes.pod.status import pod_status
from shoal.status import ApplicationStatus, DeploymentStatus


@serve.deployment(num_replicas=2)
class Model:
    def __call__(self, x: int) -> int:
        return x


@serve.deployment(autoscaling_config={"min_replicas": 0, "max_replicas": 3})
class Sleeper:
    def __call__(self) -> str:
        return "z"


@serve.deployment
class Front:
    def __init__(self, model: DeploymentHandle, sleeper: DeploymentHandle) -> None:
        self.model, self.sleeper = model, sleeper


class FakeDNS:
    def __init__(self, answers: dict[str, list[str] | None]) -> None:
        self.answers = answers

    async def resolve(self, name: str) -> list[str] | None:
        return self.answers.get(name, [])


def dns(deployment: str) -> str:
    return names.service_dns("shop", deployment, "prod", "cluster.local")


def test_every_deployment_ready_is_running() -> None:
    spec = build_app_spec(Front.bind(Model.bind(), Sleeper.bind()), "shop", "/shop")
    resolver = FakeDNS({dns("Front"): ["10.0.0.1"], dns("Model"): ["10.0.0.2", "10.0.0.3"], dns("Sleeper"): []})
    st = asyncio.run(pod_status(spec, resolver, "prod", "cluster.local", "Front"))
    app = st.applications["shop"]
    assert app.status == ApplicationStatus.RUNNING and app.route_prefix == "/shop" and app.ingress == "Front"
    assert app.deployments["Model"].replica_states == {"RUNNING": 2} and app.deployments["Model"].target_replicas == 2
    sleeper = app.deployments["Sleeper"]  # scaled to zero on purpose: healthy
    assert sleeper.status == DeploymentStatus.HEALTHY and sleeper.replica_states == {} and sleeper.target_replicas == 0


def test_a_deployment_without_ready_pods_or_dns_is_unhealthy() -> None:
    spec = build_app_spec(Front.bind(Model.bind(), Sleeper.bind()), "shop", "/shop")
    resolver = FakeDNS({dns("Front"): ["10.0.0.1"], dns("Model"): [], dns("Sleeper"): None})
    st = asyncio.run(pod_status(spec, resolver, "prod", "cluster.local", "Front"))
    app = st.applications["shop"]
    assert app.status == ApplicationStatus.DEPLOYING and "not every deployment" in app.message
    assert app.deployments["Model"].status == DeploymentStatus.UNHEALTHY
    assert app.deployments["Model"].message == "no ready pod"
    assert app.deployments["Sleeper"].status == DeploymentStatus.UNHEALTHY
    assert "cluster DNS did not answer" in app.deployments["Sleeper"].message


def test_this_pod_starting_is_updating() -> None:
    spec = build_app_spec(Front.bind(Model.bind(), Sleeper.bind()), "shop", "/shop")
    resolver = FakeDNS({dns("Model"): ["10.0.0.2"]})
    st = asyncio.run(pod_status(spec, resolver, "prod", "cluster.local", "Front", constructed=False))
    assert st.applications["shop"].deployments["Front"].status == DeploymentStatus.UPDATING
