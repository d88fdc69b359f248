"""An application-level autoscaling policy on real replica processes: a config file entry's
``autoscaling_policy`` decides for both deployments of the app at once, keeps per-deployment
state, overrides a deployment-level policy, and a policy that cannot be loaded fails the deploy
naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Instance, wait_until

from shoal import api, serve
from shoal.config import AutoscalingContext, DeploymentID
from shoal.deployment import build_app_spec
from shoal.exceptions import DeployError
from shoal.loader import build_application
from shoal.schema import ServeDeploySchema

FAST: dict[str, Any] = {"min_replicas": 1, "max_replicas": 3, "metrics_interval_s": 0.1,
                        "look_back_period_s": 0.5, "upscale_delay_s": 0.0, "downscale_delay_s": 0.0}
CALLS: dict[str, int] = {}


def never_called(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    return 1, {}


@serve.deployment(autoscaling_config=FAST)
class Pre:
    def __call__(self, x: str) -> str:
        return f"pre-{x}"


@serve.deployment(autoscaling_config={**FAST, "policy": never_called})
class Model:
    def __call__(self, x: str) -> str:
        return f"model-{x}"


@serve.deployment
class Driver:
    def __init__(self, pre: Any, model: Any) -> None:
        self.pre, self.model = pre, model

    async def __call__(self, x: str) -> str:
        return await self.model.remote(await self.pre.remote(x))


app = Driver.bind(Pre.bind(), Model.bind())


def coordinated(contexts: dict[DeploymentID, AutoscalingContext]) -> tuple[dict[DeploymentID, int], dict[Any, Any]]:
    """Pre gets 2 replicas and Model one more than Pre; each deployment counts its calls in its state."""
    assert {d.name for d in contexts} == {"Pre", "Model"}  # Driver has no autoscaling_config
    pre = next(d for d in contexts if d.name == "Pre")
    model = next(d for d in contexts if d.name == "Model")
    return ({pre: 2, model: 3},
            {d: {"calls": int(c.policy_state.get("calls", 0)) + 1} for d, c in contexts.items()})


def deploy(policy: object) -> None:
    config = ServeDeploySchema.from_dict({"applications": [{
        "name": "coord", "route_prefix": "/coord", "import_path": f"{__name__}:app",
        "autoscaling_policy": {"policy_function": policy},
    }]}, source="test")
    entry = config.applications[0]
    spec = build_app_spec(build_application(entry, source="test"), entry.name, entry.route_prefix)
    inst = api._require()
    inst.loop.run(inst.controller.deploy(spec))


def running(dep: str) -> int:
    return serve.status().applications["coord"].deployments[dep].replica_states.get("RUNNING", 0)


def test_the_app_policy_scales_both_deployments_and_keeps_their_state(instance: Instance) -> None:
    serve.start()
    deploy(coordinated)
    # Driver (no autoscaling_config) keeps its one replica; its constructor may finish after the others.
    assert wait_until(lambda: running("Pre") == 2 and running("Model") == 3 and running("Driver") == 1, 60), \
        serve.status().applications
    inst = api._require()
    rec = inst.controller.apps["coord"]
    assert rec.policy is not None
    calls = {n: rec.deployments[n].autoscaler.policy_state.get("calls", 0)  # type: ignore[union-attr]
             for n in ("Pre", "Model")}
    assert calls["Pre"] >= 2 and calls["Model"] == calls["Pre"], calls
    handle = serve.get_app_handle("coord")
    assert handle.remote("x").result(timeout_s=30) == "model-pre-x"
    assert serve.status().applications["coord"].deployments["Model"].message == ""


def test_a_policy_that_does_not_load_fails_the_deploy_naming_the_field(instance: Instance) -> None:
    serve.start()
    with pytest.raises(DeployError, match=r"application 'coord': autoscaling_policy: .*no_such_module_q"):
        deploy("no_such_module_q:policy")


def test_shutdown_async_stops_every_replica_from_a_running_loop(instance: Instance) -> None:
    import asyncio
    import os

    serve.start()
    deploy(coordinated)
    assert wait_until(lambda: running("Pre") >= 1, 60)
    pids = [r.proc.pid for r in api._require().controller.registry.replicas.values() if r.proc is not None]
    assert pids

    async def main() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        await serve.shutdown_async()
        task.cancel()
        assert ticks > 1  # the loop kept running while replicas stopped

    asyncio.run(main())
    assert api._instance is None

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert wait_until(lambda: all(gone(p) for p in pids), 15)
