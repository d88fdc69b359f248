"""The autoscaler on a fake clock: plain floats for ``now``, no sleeps."""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

import pytest

from shoal.config import AggregationFunction, AutoscalingConfig, DeploymentConfig, auto_autoscaling_config
from shoal.serving.autoscaling import (
    POLICY_STATE_KEY,
    Autoscaler,
    AutoscalingContext,
    DeploymentID,
    MetricsWindow,
    PolicyLoadError,
    apply_scaling_rules,
    default_policy,
    downscaling_factor,
    load_policy,
    upscaling_factor,
)

# --------------------------------------------------------------------------------------------
# Policies imported by path from this module
# --------------------------------------------------------------------------------------------

SEEN: list[AutoscalingContext] = []


def my_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Wants 3 replicas; counts its calls in policy_state."""
    SEEN.append(ctx)
    calls = int(ctx.policy_state.get("calls", 0)) + 1
    return 3, {"calls": calls}


def float_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    return 2.2, {}


def raising_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    if ctx.policy_state.get("ok"):
        return 4, {"ok": True}
    raise RuntimeError("metrics backend down")


class ClassPolicy:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        self.calls += 1
        return 2, {}


class KwargsPolicy:
    def __init__(self, replicas: int, label: str = "x") -> None:
        self.replicas, self.label = replicas, label

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        return self.replicas, {"label": self.label}


def metrics_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """One replica more while any replica's aggregated cpu is above 80."""
    cpu = ctx.aggregated_metrics.get("cpu", {})
    if cpu and max(cpu.values()) > 80:
        return ctx.current_num_replicas + 1, {}
    return ctx.current_num_replicas, {}


NOT_CALLABLE = 42

_GARBAGE: list[Any] = []


def garbage_policy(ctx: AutoscalingContext) -> Any:
    return _GARBAGE[0]


async def async_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    return 5, {}


# pytest may import this file under another module name than the policy paths below use;
# shared state and identities are read through the module those paths import.
PATH = "tests.unit.test_autoscaling"


def this() -> Any:
    return importlib.import_module(PATH)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def cfg(**kw: Any) -> AutoscalingConfig:
    base: dict[str, Any] = {"min_replicas": 1, "max_replicas": 10, "target_ongoing_requests": 1.0}
    base.update(kw)
    return AutoscalingConfig(**base)


def make(config: AutoscalingConfig, initial: int = 1, **kw: Any) -> Autoscaler:
    return Autoscaler(config, "Model", "app", initial, **kw)


def tick(a: Autoscaler, now: float, load: float, queued: float = 0.0, current: int | None = None) -> int:
    """One controller tick; by default the replicas follow the target at once."""
    cur = a.target if current is None else current
    a.record(now, load, queued)
    return a.decide(now, cur, cur)


def run(a: Autoscaler, start: float, stop: float, load: float, step: float = 0.5) -> list[tuple[float, int]]:
    """Ticks at start, start+step, ... < stop (exact binary steps); returns (now, target) pairs."""
    out = []
    i = 0
    while (now := start + i * step) < stop:
        out.append((now, tick(a, now, load)))
        i += 1
    return out


def ctx(
    config: AutoscalingConfig,
    *,
    current: int,
    target: int | None = None,
    total: float = 0.0,
    queued: float = 0.0,
    now: float = 0.0,
    state: dict[str, Any] | None = None,
) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID("Model", "app"),
        deployment_name="Model",
        app_name="app",
        current_num_replicas=current,
        target_num_replicas=current if target is None else target,
        running_replicas=tuple(f"r{i}" for i in range(current)),
        total_num_requests=total,
        total_queued_requests=queued,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


# --------------------------------------------------------------------------------------------
# MetricsWindow
# --------------------------------------------------------------------------------------------


class TestMetricsWindow:
    def test_empty_is_none(self) -> None:
        w = MetricsWindow(30)
        assert w.aggregate(100.0) is None
        assert len(w) == 0

    def test_prunes_samples_older_than_look_back(self) -> None:
        w = MetricsWindow(10)
        for t in (0.0, 5.0, 10.0):
            w.record(t, t)
        assert [t for t, _ in w.samples] == [0.0, 5.0, 10.0]  # 0.0 is exactly at the boundary
        w.record(12.0, 1.0)
        assert [t for t, _ in w.samples] == [5.0, 10.0, 12.0]
        w.prune(20.0)
        assert [t for t, _ in w.samples] == [10.0, 12.0]
        assert w.aggregate(30.0) is None  # everything fell out
        assert len(w) == 0

    def test_time_weighted_mean(self) -> None:
        w = MetricsWindow(30, "mean")
        w.record(0.0, 0.0)
        w.record(5.0, 10.0)
        w.record(20.0, 4.0)
        # 0 for 5 s, 10 for 15 s, 4 for 10 s (held until now) over 30 s; a sample mean would be 4.67.
        assert w.aggregate(30.0) == pytest.approx((0 * 5 + 10 * 15 + 4 * 10) / 30)

    def test_mean_of_samples_spanning_no_time_is_latest(self) -> None:
        w = MetricsWindow(30)
        w.record(7.0, 3.0)
        assert w.aggregate(7.0) == 3.0
        w.record(7.0, 5.0)
        assert w.aggregate(7.0) == 5.0
        assert w.aggregate(8.0) == 5.0

    def test_mean_after_pruning_uses_retained_span(self) -> None:
        w = MetricsWindow(10)
        w.record(0.0, 100.0)
        w.record(6.0, 2.0)
        w.record(8.0, 4.0)
        # At 15 the window is [5, 15]: 0.0 is dropped; 2 for 2 s, 4 for 7 s over 9 s.
        assert w.aggregate(15.0) == pytest.approx((2 * 2 + 4 * 7) / 9)

    def test_max_and_min(self) -> None:
        for fn, expected in ((AggregationFunction.MAX, 9.0), (AggregationFunction.MIN, 1.0)):
            w = MetricsWindow(30, fn)
            for t, v in ((0.0, 3.0), (1.0, 9.0), (2.0, 1.0), (3.0, 4.0)):
                w.record(t, v)
            assert w.aggregate(3.0) == expected
        w = MetricsWindow(2, "max")
        w.record(0.0, 50.0)
        w.record(1.0, 1.0)
        w.record(3.0, 2.0)
        assert w.aggregate(3.0) == 2.0  # the spike at 0 is out of the window

    def test_out_of_order_and_nan(self) -> None:
        w = MetricsWindow(30)
        w.record(2.0, 1.0)
        w.record(1.0, 5.0)
        w.record(3.0, float("nan"))
        assert w.samples == ((1.0, 5.0), (2.0, 1.0))

    def test_bad_look_back(self) -> None:
        with pytest.raises(ValueError):
            MetricsWindow(0)


# --------------------------------------------------------------------------------------------
# Delays
# --------------------------------------------------------------------------------------------


class TestDelays:
    def test_upscale_after_exactly_upscale_delay(self) -> None:
        a = make(cfg(upscale_delay_s=30.0))
        history = run(a, 0.0, 30.0, load=5.0)
        assert all(t == 1 for _, t in history)  # 0 .. 29.5: still waiting
        assert history[-1][0] == 29.5
        assert tick(a, 30.0, 5.0) == 5
        assert a.last_scale_up_time == 30.0
        assert a.last_scale_down_time is None
        assert a.pending is None

    def test_upscale_not_before_delay_even_a_hair(self) -> None:
        a = make(cfg(upscale_delay_s=30.0))
        tick(a, 100.0, 5.0)
        assert a.pending is not None and a.pending.direction == "up" and a.pending.since == 100.0
        assert tick(a, 129.99, 5.0) == 1
        assert tick(a, 130.0, 5.0) == 5

    def test_load_blip_shorter_than_delay_does_not_scale(self) -> None:
        a = make(cfg(upscale_delay_s=30.0, look_back_period_s=2.0))
        run(a, 0.0, 10.0, load=5.0)  # 10 s of load, shorter than the 30 s delay
        history = run(a, 10.0, 60.0, load=0.0)
        assert all(t == 1 for _, t in history)
        assert a.pending is None

    def test_interrupted_load_restarts_the_clock(self) -> None:
        a = make(cfg(upscale_delay_s=30.0, look_back_period_s=1.0))
        run(a, 0.0, 20.0, load=5.0)
        run(a, 20.0, 25.0, load=0.0)  # idle long enough for the 1 s window to empty
        assert a.pending is None
        # The first loaded sample holds from its own tick on, so it first weighs at 25.5.
        tick(a, 25.0, 5.0)
        assert a.pending is None
        tick(a, 25.5, 5.0)
        assert a.pending is not None and a.pending.since == 25.5
        history = run(a, 26.0, 55.5, load=5.0)
        assert all(t == 1 for _, t in history)
        assert tick(a, 55.5, 5.0) == 5

    def test_upscale_target_is_latest_desired(self) -> None:
        a = make(cfg(upscale_delay_s=10.0, look_back_period_s=0.5))
        run(a, 0.0, 5.0, load=3.0)
        run(a, 5.0, 10.0, load=7.0)  # still "up" from 1: the clock keeps running
        assert tick(a, 10.0, 7.0) == 7

    def test_downscale_after_downscale_delay_of_idleness(self) -> None:
        a = make(cfg(downscale_delay_s=600.0, look_back_period_s=1.0), initial=5)
        history = run(a, 0.0, 600.0, load=0.0, step=2.5)
        assert all(t == 5 for _, t in history)
        assert tick(a, 600.0, 0.0) == 1
        assert a.last_scale_down_time == 600.0

    def test_downscale_blip_of_load_restarts_the_clock(self) -> None:
        a = make(cfg(downscale_delay_s=60.0, look_back_period_s=1.0), initial=5)
        run(a, 0.0, 50.0, load=0.0)
        run(a, 50.0, 55.0, load=5.0)  # back at 5 per target: no downscale wanted
        assert a.pending is None
        history = run(a, 55.0, 115.0, load=0.0)
        assert all(t == 5 for _, t in history)
        # The window still held load at 55, so idleness began at the first all-zero window.
        assert tick(a, 200.0, 0.0) == 1

    def test_zero_delays_apply_at_once(self) -> None:
        a = make(cfg(upscale_delay_s=0.0, downscale_delay_s=0.0, look_back_period_s=0.5))
        assert tick(a, 0.0, 4.0) == 4
        assert tick(a, 1.0, 0.0) == 1


# --------------------------------------------------------------------------------------------
# Desired count, factors, bounds
# --------------------------------------------------------------------------------------------


class TestDesiredAndFactors:
    def test_queue_length_formula(self) -> None:
        c = cfg(target_ongoing_requests=2.0, upscale_delay_s=0.0)
        assert default_policy(ctx(c, current=1, total=7.0))[0] == 4  # ceil(7 / 2)
        assert default_policy(ctx(c, current=1, total=8.0))[0] == 4
        assert default_policy(ctx(c, current=2, total=2.5))[0] == 2  # 1.25 -> 2 is no change

    def test_factor_fallbacks(self) -> None:
        assert upscaling_factor(cfg()) == 1.0
        assert upscaling_factor(cfg(smoothing_factor=2.0)) == 2.0
        assert upscaling_factor(cfg(smoothing_factor=2.0, upscale_smoothing_factor=3.0)) == 3.0
        assert upscaling_factor(cfg(upscale_smoothing_factor=3.0, upscaling_factor=0.5)) == 0.5
        assert downscaling_factor(cfg(smoothing_factor=2.0)) == 2.0
        assert downscaling_factor(cfg(smoothing_factor=2.0, downscale_smoothing_factor=0.3)) == 0.3
        assert downscaling_factor(cfg(downscale_smoothing_factor=0.3, downscaling_factor=0.7)) == 0.7

    def test_upscaling_factor_scales_the_change(self) -> None:
        c = cfg(max_replicas=100, upscale_delay_s=0.0, upscaling_factor=0.5)
        assert default_policy(ctx(c, current=2, total=10.0))[0] == 6  # 2 + 0.5 * 8
        c = cfg(max_replicas=100, upscale_delay_s=0.0, upscaling_factor=2.0)
        assert default_policy(ctx(c, current=2, total=10.0))[0] == 18  # 2 + 2 * 8
        c = cfg(max_replicas=100, upscale_delay_s=0.0, upscaling_factor=0.1)
        assert default_policy(ctx(c, current=2, total=3.0))[0] == 3  # 2.1 rounds up: at least +1

    def test_downscaling_factor_scales_the_change(self) -> None:
        c = cfg(max_replicas=100, downscale_delay_s=0.0, downscaling_factor=0.5)
        assert default_policy(ctx(c, current=10, total=2.0))[0] == 6  # 10 - 0.5 * 8
        c = cfg(max_replicas=100, downscale_delay_s=0.0, downscaling_factor=0.1)
        assert default_policy(ctx(c, current=2, total=1.0))[0] == 1  # 1.9 would stick: -1

    def test_smoothing_factor_is_the_last_fallback(self) -> None:
        c = cfg(max_replicas=100, upscale_delay_s=0.0, downscale_delay_s=0.0, smoothing_factor=0.5)
        assert default_policy(ctx(c, current=2, total=10.0))[0] == 6
        assert default_policy(ctx(c, current=10, total=2.0))[0] == 6
        c = cfg(max_replicas=100, upscale_delay_s=0.0, smoothing_factor=0.5, upscale_smoothing_factor=2.0)
        assert default_policy(ctx(c, current=2, total=10.0))[0] == 18

    def test_clamped_to_max_and_min(self) -> None:
        a = make(
            cfg(min_replicas=2, max_replicas=4, upscale_delay_s=0.0, downscale_delay_s=0.0, look_back_period_s=0.5),
            initial=2,
        )
        assert tick(a, 0.0, 1000.0) == 4
        assert tick(a, 1.0, 0.0) == 2
        assert tick(a, 2.0, 0.0) == 2

    def test_at_max_no_pending_upscale(self) -> None:
        a = make(cfg(max_replicas=3, upscale_delay_s=10.0), initial=3)
        tick(a, 0.0, 100.0)
        assert a.pending is None

    def test_new_bounds_apply_at_once(self) -> None:
        a = make(cfg(min_replicas=1, max_replicas=10, look_back_period_s=0.5), initial=2)
        tick(a, 0.0, 2.0)
        a.update_config(cfg(min_replicas=5, max_replicas=10, look_back_period_s=0.5))
        assert tick(a, 1.0, 2.0) == 5  # no upscale delay for the new minimum
        a.update_config(cfg(min_replicas=1, max_replicas=3, look_back_period_s=0.5))
        assert tick(a, 2.0, 2.0) == 3
        assert a.last_scale_down_time == 2.0


# --------------------------------------------------------------------------------------------
# Zero
# --------------------------------------------------------------------------------------------


class TestZero:
    def test_scale_from_zero_is_immediate(self) -> None:
        a = make(cfg(min_replicas=0, max_replicas=5, upscale_delay_s=30.0), initial=0)
        assert tick(a, 0.0, 0.0) == 0
        assert tick(a, 1.0, 0.0) == 0
        # One request waits in a caller: total ongoing 1, queued 1.
        assert tick(a, 2.0, 1.0, queued=1.0) == 1
        assert a.last_scale_up_time == 2.0

    def test_scale_from_zero_on_queued_alone(self) -> None:
        c = cfg(min_replicas=0, max_replicas=5)
        new, _ = default_policy(ctx(c, current=0, target=0, total=0.0, queued=2.0))
        assert new == 1

    def test_scale_from_zero_keeps_a_higher_target(self) -> None:
        c = cfg(min_replicas=0, max_replicas=5)
        new, _ = default_policy(ctx(c, current=0, target=3, total=1.0, queued=1.0))
        assert new == 3

    def test_one_to_zero_uses_downscale_to_zero_delay(self) -> None:
        a = make(
            cfg(min_replicas=0, downscale_delay_s=10.0, downscale_to_zero_delay_s=100.0, look_back_period_s=1.0),
            initial=3,
        )
        history = run(a, 0.0, 10.0, load=0.0)
        assert all(t == 3 for _, t in history)
        assert tick(a, 10.0, 0.0) == 1  # first to 1 after downscale_delay_s
        assert a.pending is not None and (a.pending.direction, a.pending.since) == ("down", 10.0)
        history = run(a, 10.5, 110.0, load=0.0)
        assert all(t == 1 for _, t in history)
        assert tick(a, 110.0, 0.0) == 0  # then 1 -> 0 after downscale_to_zero_delay_s
        assert tick(a, 111.0, 0.0) == 0

    def test_one_to_zero_with_a_shorter_to_zero_delay(self) -> None:
        a = make(
            cfg(min_replicas=0, downscale_delay_s=600.0, downscale_to_zero_delay_s=5.0, look_back_period_s=1.0),
            initial=1,
        )
        run(a, 0.0, 5.0, load=0.0)
        assert a.target == 1
        assert tick(a, 5.0, 0.0) == 0

    def test_without_to_zero_delay_goes_straight_to_zero(self) -> None:
        a = make(cfg(min_replicas=0, downscale_delay_s=10.0, look_back_period_s=1.0), initial=3)
        run(a, 0.0, 10.0, load=0.0)
        assert a.target == 3
        assert tick(a, 10.0, 0.0) == 0

    def test_never_below_min(self) -> None:
        a = make(cfg(min_replicas=1, downscale_delay_s=0.0, downscale_to_zero_delay_s=0.0), initial=1)
        assert tick(a, 0.0, 0.0) == 1
        assert tick(a, 1000.0, 0.0) == 1


# --------------------------------------------------------------------------------------------
# Policy state and the context
# --------------------------------------------------------------------------------------------


class TestContext:
    def test_context_is_frozen_and_has_rays_fields(self) -> None:
        a = make(cfg(look_back_period_s=10.0), initial=2)
        a.record(0.0, 4.0, 1.0)
        c = a.context(0.0, 3, ["r1", "r2"])
        names = {f.name for f in dataclasses.fields(c)}
        assert {
            "deployment_id",
            "deployment_name",
            "app_name",
            "current_num_replicas",
            "target_num_replicas",
            "running_replicas",
            "total_num_requests",
            "total_queued_requests",
            "aggregated_metrics",
            "raw_metrics",
            "capacity_adjusted_min_replicas",
            "capacity_adjusted_max_replicas",
            "policy_state",
            "last_scale_up_time",
            "last_scale_down_time",
            "current_time",
            "config",
        } <= names
        assert c.deployment_id == DeploymentID("Model", "app")
        assert (c.current_num_replicas, c.target_num_replicas, c.num_running_replicas) == (3, 2, 2)
        assert c.running_replicas == ("r1", "r2")
        assert (c.total_num_requests, c.total_queued_requests) == (4.0, 1.0)
        assert (c.capacity_adjusted_min_replicas, c.capacity_adjusted_max_replicas) == (1, 10)
        assert c.current_time == 0.0
        with pytest.raises(dataclasses.FrozenInstanceError):
            c.target_num_replicas = 5  # type: ignore[misc]

    def test_running_replicas_as_a_count(self) -> None:
        a = make(cfg())
        assert len(a.context(0.0, 3, 2).running_replicas) == 2

    def test_stale_queue_report_reads_as_zero(self) -> None:
        a = make(cfg(look_back_period_s=5.0))
        a.record(0.0, 3.0, 3.0)
        assert a.context(5.0, 1, 1).total_queued_requests == 3.0
        assert a.context(6.0, 1, 1).total_queued_requests == 0.0

    def test_pending_state_lives_in_policy_state(self) -> None:
        a = make(cfg(upscale_delay_s=30.0))
        tick(a, 3.0, 5.0)
        assert a.policy_state[POLICY_STATE_KEY] == {"direction": "up", "since": 3.0, "from_target": 1}
        tick(a, 33.0, 5.0)
        assert a.policy_state[POLICY_STATE_KEY] is None

    def test_malformed_pending_state_is_ignored(self) -> None:
        c = cfg(upscale_delay_s=10.0)
        new, state = apply_scaling_rules(ctx(c, current=1, now=50.0), 5.0, {POLICY_STATE_KEY: {"since": "x"}})
        assert new == 1
        assert state[POLICY_STATE_KEY]["since"] == 50.0


# --------------------------------------------------------------------------------------------
# Custom policies
# --------------------------------------------------------------------------------------------


class TestCustomPolicies:
    def test_by_import_path_colon(self) -> None:
        seen = this().SEEN
        seen.clear()
        a = make(cfg(policy="tests.unit.test_autoscaling:my_policy", upscale_delay_s=0.0))
        assert a.is_custom_policy
        assert tick(a, 0.0, 0.0) == 3
        assert a.policy_state["calls"] == 1
        tick(a, 1.0, 0.0)
        assert a.policy_state["calls"] == 2
        assert seen[-1].policy_state["calls"] == 1  # the state returned last time comes back
        assert seen[-1].target_num_replicas == 3
        assert a.last_error is None

    def test_by_import_path_dot(self) -> None:
        assert load_policy("tests.unit.test_autoscaling.my_policy") is this().my_policy

    def test_config_rules_apply_to_custom_policy(self) -> None:
        a = make(cfg(policy="tests.unit.test_autoscaling:my_policy", upscale_delay_s=10.0, max_replicas=2))
        history = run(a, 0.0, 10.0, load=0.0)
        assert all(t == 1 for _, t in history)
        assert tick(a, 10.0, 0.0) == 2  # 3 wanted, after the delay, clamped to max
        assert a.policy_state["calls"] == 21

    def test_custom_policy_answer_as_is(self) -> None:
        a = make(
            cfg(policy="tests.unit.test_autoscaling:my_policy", upscale_delay_s=10.0),
            apply_rules_to_custom_policy=False,
        )
        assert tick(a, 0.0, 0.0) == 3

    def test_float_answer_rounds_up(self) -> None:
        a = make(cfg(policy="tests.unit.test_autoscaling:float_policy", upscale_delay_s=0.0))
        assert tick(a, 0.0, 0.0) == 3

    def test_class_policy(self) -> None:
        p = load_policy("tests.unit.test_autoscaling:ClassPolicy")
        assert isinstance(p, this().ClassPolicy)
        a = make(cfg(policy="tests.unit.test_autoscaling:ClassPolicy", upscale_delay_s=0.0))
        assert tick(a, 0.0, 0.0) == 2

    def test_rays_default_policy_path_means_default(self) -> None:
        assert load_policy("ray.serve.autoscaling_policy:default_autoscaling_policy") is default_policy
        assert load_policy("ray.serve.autoscaling_policy:replica_queue_length_autoscaling_policy") is default_policy
        a = make(cfg(policy="shoal.serving.autoscaling:default_policy"))
        assert not a.is_custom_policy

    @pytest.mark.parametrize(
        ("path", "needle"),
        [
            ("no_such_module_xyz:policy", "no_such_module_xyz"),
            ("tests.unit.test_autoscaling:nope", "has no attribute 'nope'"),
            ("tests.unit.test_autoscaling:NOT_CALLABLE", "not callable"),
            ("not a path", "cannot load"),
            ("", "import path"),
        ],
    )
    def test_load_errors(self, path: str, needle: str) -> None:
        with pytest.raises(PolicyLoadError) as e:
            load_policy(path)
        assert needle in str(e.value)
        assert isinstance(e.value, ValueError)

    def test_bad_policy_fails_at_construction(self) -> None:
        with pytest.raises(PolicyLoadError):
            make(cfg(policy="tests.unit.test_autoscaling:nope"))

    def test_raising_policy_keeps_target_and_sets_last_error(self) -> None:
        a = make(cfg(policy="tests.unit.test_autoscaling:raising_policy", upscale_delay_s=0.0), initial=2)
        a.policy_state = {"kept": 1}
        assert tick(a, 0.0, 100.0) == 2
        assert a.last_error is not None
        assert "RuntimeError" in a.last_error and "metrics backend down" in a.last_error
        assert "raising_policy" in a.last_error
        assert a.error_count == 1
        assert a.policy_state == {"kept": 1}
        assert tick(a, 1.0, 100.0) == 2
        assert a.error_count == 2
        # Recovers: the next good answer clears last_error.
        a.policy_state = {"ok": True}
        assert tick(a, 2.0, 0.0) == 4
        assert a.last_error is None

    @pytest.mark.parametrize(
        "answer",
        ["three", None, True, (float("nan"), {}), (math.inf, {}), (-1, {}), (3, "state"), (1, 2, 3), ("3", {}), {}],
    )
    def test_garbage_answer_keeps_target(self, answer: Any) -> None:
        this()._GARBAGE[:] = [answer]
        a = make(cfg(policy="tests.unit.test_autoscaling:garbage_policy", upscale_delay_s=0.0), initial=2)
        assert tick(a, 0.0, 0.0) == 2
        assert a.last_error is not None and "garbage_policy" in a.last_error

    def test_lenient_answers(self) -> None:
        this()._GARBAGE[:] = [4]  # a bare number: the state stays
        a = make(cfg(policy="tests.unit.test_autoscaling:garbage_policy", upscale_delay_s=0.0))
        assert tick(a, 0.0, 0.0) == 4 and a.last_error is None
        this()._GARBAGE[:] = [[5, None]]  # a list, None state
        assert tick(a, 1.0, 0.0) == 5 and a.last_error is None

    def test_async_policy_is_rejected_without_warning(self, recwarn: pytest.WarningsRecorder) -> None:
        a = make(cfg(policy="tests.unit.test_autoscaling:async_policy", upscale_delay_s=0.0))
        assert tick(a, 0.0, 0.0) == 1
        assert a.last_error is not None and "synchronous" in a.last_error
        assert not [w for w in recwarn if "never awaited" in str(w.message)]

    def test_policy_object_with_kwargs_for_a_class(self) -> None:
        from shoal.config import AutoscalingPolicy

        pol = AutoscalingPolicy(policy_function=f"{PATH}:KwargsPolicy", policy_kwargs={"replicas": 4, "label": "k"})
        a = make(cfg(policy=pol, upscale_delay_s=0.0))
        assert tick(a, 0.0, 0.0) == 4 and a.policy_state["label"] == "k"
        # The class itself (not a path) works the same; its constructor's error names the policy.
        given = AutoscalingPolicy(policy_function=this().KwargsPolicy, policy_kwargs={"replicas": 2})
        assert tick(make(cfg(policy=given, upscale_delay_s=0.0)), 0.0, 0.0) == 2
        with pytest.raises(PolicyLoadError, match=r"KwargsPolicy.*policy_kwargs.*TypeError"):
            load_policy(AutoscalingPolicy(policy_function=f"{PATH}:KwargsPolicy", policy_kwargs={"nope": 1}))

    def test_function_object_policy_and_kwargs_refused_for_functions(self) -> None:
        from shoal.config import AutoscalingPolicy

        a = make(cfg(policy=this().my_policy, upscale_delay_s=0.0))
        assert a.is_custom_policy and tick(a, 0.0, 0.0) == 3
        with pytest.raises(PolicyLoadError, match="only passed to a policy class"):
            load_policy(AutoscalingPolicy(policy_function=this().my_policy, policy_kwargs={"a": 1}))
        with pytest.raises(PolicyLoadError, match="takes no policy_kwargs"):
            load_policy(AutoscalingPolicy(policy_kwargs={"a": 1}))  # the default policy
        assert load_policy(AutoscalingPolicy()) is default_policy

    def test_custom_metrics_reach_the_context(self) -> None:
        a = make(cfg(policy=f"{PATH}:metrics_policy", upscale_delay_s=0.0, look_back_period_s=10.0,
                     aggregation_function="max"), initial=2)
        a.record_custom(0.0, "r1", [("cpu", 50.0), ("mem", 10.0)])
        a.record_custom(0.5, "r2", [("cpu", 20.0)])
        ctx = a.context(1.0, 2, ["r1", "r2"])
        assert ctx.aggregated_metrics == {"cpu": {"r1": 50.0, "r2": 20.0}, "mem": {"r1": 10.0}}
        assert ctx.raw_metrics["cpu"]["r1"] == ((0.0, 50.0),)
        assert a.decide(1.0, 2, ["r1", "r2"]) == 2  # max 50: no change
        a.record_custom(2.0, "r2", [("cpu", 95.0)])
        assert a.decide(2.0, 2, ["r1", "r2"]) == 3  # r2's max in the window is 95
        # A replica that is no longer running is forgotten; samples older than the window drop.
        ctx = a.context(20.0, 3, ["r1"])
        assert ctx.aggregated_metrics == {} and ctx.raw_metrics == {}

    def test_update_config_changes_policy_and_window(self) -> None:
        a = make(cfg(look_back_period_s=30.0), initial=1)
        a.policy_state = {"x": 1}
        a.update_config(cfg(look_back_period_s=5.0, aggregation_function="max"))
        assert a.window.look_back_period_s == 5.0
        assert a.window.aggregation_function == AggregationFunction.MAX
        assert a.policy_state == {"x": 1}  # same policy: state kept
        a.update_config(cfg(policy="tests.unit.test_autoscaling:my_policy"))
        assert a.is_custom_policy and a.policy_state == {}
        with pytest.raises(PolicyLoadError):
            a.update_config(cfg(policy="tests.unit.test_autoscaling:nope"))
        assert a.policy is this().my_policy  # unchanged after the failed update


# --------------------------------------------------------------------------------------------
# num_replicas="auto"
# --------------------------------------------------------------------------------------------


class TestAuto:
    def test_auto_defaults(self) -> None:
        c = auto_autoscaling_config()
        assert (c.min_replicas, c.max_replicas, c.target_ongoing_requests) == (1, 100, 2.0)
        dc = DeploymentConfig(num_replicas="auto")
        resolved = dc.resolved_autoscaling()
        assert resolved == c
        a = Autoscaler(resolved, "Model", "app", dc.initial_target())
        assert a.target == 1
        assert not a.is_custom_policy
        # 20 ongoing requests at 2 per replica: 10 replicas after the default 30 s upscale delay.
        history = run(a, 0.0, 30.0, load=20.0)
        assert all(t == 1 for _, t in history)
        assert tick(a, 30.0, 20.0) == 10
        # Idle: the default 600 s downscale delay (window of 30 s drains first).
        run(a, 30.5, 600.0, load=0.0, step=2.5)
        assert a.target == 10
        run(a, 600.0, 700.0, load=0.0, step=2.5)
        assert a.target == 1

    def test_auto_with_overrides(self) -> None:
        dc = DeploymentConfig.model_validate(
            {"num_replicas": "auto", "autoscaling_config": {"max_replicas": 4, "min_replicas": 2}}
        )
        resolved = dc.resolved_autoscaling()
        assert resolved is not None
        a = Autoscaler(resolved, "Model", "app", dc.initial_target())
        assert a.target == 2
        run(a, 0.0, 31.0, load=1000.0)
        assert a.target == 4
