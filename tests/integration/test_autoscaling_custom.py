"""Custom autoscaling on real replica processes (Ray Serve's policy API): a policy given as an
``AutoscalingPolicy`` with a class and ``policy_kwargs``, reading the custom metrics replicas
report from ``record_autoscaling_stats()``; a function policy given as an object; and a
``record_autoscaling_stats`` that fails, which the policy never sees and which does not stop
the replica from serving."""

from __future__ import annotations

from typing import Any

from conftest import Instance, wait_until

from shoal import serve
from shoal.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

FAST: dict[str, Any] = {"metrics_interval_s": 0.1, "look_back_period_s": 0.5, "upscale_delay_s": 0.0,
                        "downscale_delay_s": 0.0}


class PressurePolicy:
    """Wants one replica per ``per_replica`` units of the replicas' summed "pressure" metric."""

    def __init__(self, per_replica: float) -> None:
        self.per_replica = per_replica

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        pressure = sum(ctx.aggregated_metrics.get("pressure", {}).values())
        seen = sorted(ctx.aggregated_metrics.get("pressure", {}))
        return max(1, round(pressure / self.per_replica)), {"seen": seen}


@serve.deployment(autoscaling_config=AutoscalingConfig(
    min_replicas=1, max_replicas=3, **FAST,
    policy=AutoscalingPolicy(policy_function=PressurePolicy, policy_kwargs={"per_replica": 10.0})))
class Pressured:
    def __init__(self) -> None:
        self.pressure = 0.0

    def set(self, value: float) -> str:
        self.pressure = value
        return serve.get_replica_context().replica_tag

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"pressure": self.pressure}


def running(dep: str, app: str = "default") -> int:
    return serve.status().applications[app].deployments[dep].replica_states.get("RUNNING", 0)


def test_class_policy_with_kwargs_scales_on_custom_metrics(instance: Instance) -> None:
    h = serve.run(Pressured.bind())
    assert running("Pressured") == 1
    h.set.remote(25.0).result()  # one replica reports 25: round(25 / 10) = 2 replicas
    assert wait_until(lambda: running("Pressured") == 2, 30), serve.status().applications["default"]
    # Both replicas report; the new one 0. Pressure back to 0 everywhere: one replica again.
    for _ in range(20):
        h.set.remote(0.0).result()
    assert wait_until(lambda: running("Pressured") == 1, 30)
    assert serve.status().applications["default"].deployments["Pressured"].message == ""


def ticks_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    calls = int(ctx.policy_state.get("calls", 0)) + 1
    metrics = dict(ctx.aggregated_metrics)
    return (2 if metrics == {} and calls > 3 else 1), {"calls": calls}


@serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 2, **FAST, "policy": ticks_policy})
class BrokenStats:
    def __call__(self) -> str:
        return "served"

    def record_autoscaling_stats(self) -> dict[str, float]:
        raise RuntimeError("stats backend down")


def test_failing_stats_report_nothing_and_a_function_object_policy_runs(instance: Instance) -> None:
    h = serve.run(BrokenStats.bind(), name="broken", route_prefix="/broken")
    # The function policy (an object, not a path) ran and saw no custom metrics: it asked for 2.
    assert wait_until(lambda: running("BrokenStats", "broken") == 2, 30)
    assert h.remote().result() == "served"
