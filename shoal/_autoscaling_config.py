"""Autoscaling settings (Ray Serve's ``AutoscalingConfig``, ``AutoscalingPolicy``) and the context a
custom policy gets (``AutoscalingContext``). :mod:`shoal.config` re-exports every name here; the
policies themselves are :mod:`shoal.serving.scaling_policy` and :mod:`shoal.serving.autoscaling`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from shoal._model import Strict as _Strict

__all__ = [
    "DEFAULT_AUTOSCALING_POLICY",
    "DEFAULT_POLICY_PATHS",
    "AggregationFunction",
    "AutoscalingConfig",
    "AutoscalingContext",
    "AutoscalingPolicy",
    "DeploymentID",
    "auto_autoscaling_config",
]


class AggregationFunction(StrEnum):
    MEAN = "mean"
    MAX = "max"
    MIN = "min"


# Ray's default policy, by the name Ray's configs use for it (shoal maps it to its own).
DEFAULT_AUTOSCALING_POLICY = "ray.serve.autoscaling_policy:default_autoscaling_policy"
# Every import path that means the default policy: Ray's and shoal's.
DEFAULT_POLICY_PATHS = frozenset(
    f"{module}{sep}{name}"
    for module in ("ray.serve.autoscaling_policy", "shoal.serving.autoscaling")
    for sep in (":", ".")
    for name in ("default_autoscaling_policy", "replica_queue_length_autoscaling_policy", "default_policy")
)


class AutoscalingPolicy(_Strict):
    """A custom autoscaling policy (Ray Serve's ``AutoscalingPolicy``).

    ``policy_function`` is an import path (``"module:function"``, ``"module.Class"``) or the
    function or class itself (it travels to the controller by value). A class is instantiated
    once per deployment with ``policy_kwargs`` and its instance is called every tick; a function
    takes no ``policy_kwargs``. Either way the policy takes an :class:`AutoscalingContext` and
    returns ``(num_replicas, policy_state)``."""

    policy_function: str | Callable[..., Any] = DEFAULT_AUTOSCALING_POLICY
    policy_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("policy_function")
    @classmethod
    def _function(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("must be an import path such as 'module:function', got an empty string")
            return v.strip()
        return v

    @property
    def name(self) -> str:
        """The policy's import path, or the name of the function or class given."""
        fn = self.policy_function
        if isinstance(fn, str):
            return fn
        return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"

    def is_default(self) -> bool:
        """Whether this names the default (queue-length) policy (by one of its import paths;
        ``shoal.serving.autoscaling.is_default_policy`` also knows the function itself)."""
        fn = self.policy_function
        return isinstance(fn, str) and fn.strip() in DEFAULT_POLICY_PATHS


class AutoscalingConfig(_Strict):
    """Autoscaling settings of one deployment (Ray Serve's ``autoscaling_config``)."""

    min_replicas: NonNegativeInt = 1
    initial_replicas: NonNegativeInt | None = None
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = 2.0
    metrics_interval_s: PositiveFloat = 10.0
    look_back_period_s: PositiveFloat = 30.0
    smoothing_factor: PositiveFloat = 1.0
    upscale_smoothing_factor: PositiveFloat | None = None
    downscale_smoothing_factor: PositiveFloat | None = None
    upscaling_factor: PositiveFloat | None = None
    downscaling_factor: PositiveFloat | None = None
    downscale_delay_s: NonNegativeFloat = 600.0
    downscale_to_zero_delay_s: NonNegativeFloat | None = None
    upscale_delay_s: NonNegativeFloat = 30.0
    aggregation_function: AggregationFunction = AggregationFunction.MEAN
    # A custom policy: an AutoscalingPolicy, its dict form ({"policy_function": ...,
    # "policy_kwargs": {...}}), an import path string, or the function or class itself.
    policy: AutoscalingPolicy | None = None

    @field_validator("policy", mode="before")
    @classmethod
    def _policy_forms(cls, v: Any) -> Any:
        if isinstance(v, str) or (callable(v) and not isinstance(v, AutoscalingPolicy)):
            return AutoscalingPolicy(policy_function=v)
        return v

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be less than or equal to max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must be between min_replicas and max_replicas")
        return self


def auto_autoscaling_config(**overrides: Any) -> AutoscalingConfig:
    """The configuration ``num_replicas="auto"`` stands for, with user overrides applied."""
    base: dict[str, Any] = {"min_replicas": 1, "max_replicas": 100, "target_ongoing_requests": 2.0}
    base.update(overrides)
    return AutoscalingConfig(**base)


# The context a custom autoscaling policy gets (ray.serve.config.AutoscalingContext); the policy
# code is shoal.serving.scaling_policy.


@dataclass(frozen=True)
class DeploymentID:
    """Identifies a deployment within an application (Ray's ``DeploymentID``)."""

    name: str
    app_name: str = "default"


@dataclass(frozen=True, kw_only=True)
class AutoscalingContext:
    """What a policy sees on each tick; field names are Ray Serve's ``AutoscalingContext``'s.

    * ``current_num_replicas``: replicas running or starting.
    * ``target_num_replicas``: the autoscaler's current decision.
    * ``running_replicas``: ids of the replicas that are running (Ray passes replica ids here,
      so ``len(ctx.running_replicas)`` is the count; ``num_running_replicas`` is a shortcut).
    * ``total_num_requests``: total ongoing requests (in replicas plus waiting in callers),
      aggregated over ``look_back_period_s`` with ``aggregation_function``.
    * ``total_queued_requests``: requests waiting in callers' routers right now.
    * ``aggregated_metrics`` / ``raw_metrics``: the custom metrics running replicas report from
      their ``record_autoscaling_stats()`` method, every ``metrics_interval_s``:
      ``{metric: {replica_id: value}}``, each replica's samples aggregated over
      ``look_back_period_s`` with ``aggregation_function``, and ``{metric: {replica_id:
      ((timestamp, value), ...)}}``, the samples themselves (oldest first). Empty when the
      deployment defines no such method.
    * ``capacity_adjusted_min_replicas`` / ``capacity_adjusted_max_replicas``: the replica
      bounds. shoal runs on one machine and does not shrink them for capacity, so they equal
      ``config.min_replicas`` / ``config.max_replicas``.
    * ``policy_state``: what the policy returned last tick (``{}`` at first). A copy: mutating
      it changes nothing unless the policy returns it.
    * ``last_scale_up_time`` / ``last_scale_down_time``: when the target last went up / down
      (the controller's monotonic clock), or None.
    * ``current_time``: ``now`` as passed by the controller (monotonic seconds). Policies must
      use it instead of reading a clock.
    """

    deployment_id: DeploymentID
    deployment_name: str
    app_name: str | None
    current_num_replicas: int
    target_num_replicas: int
    running_replicas: tuple[str, ...]
    total_num_requests: float
    total_queued_requests: float
    capacity_adjusted_min_replicas: int
    capacity_adjusted_max_replicas: int
    policy_state: dict[str, Any]
    last_scale_up_time: float | None
    last_scale_down_time: float | None
    current_time: float
    config: AutoscalingConfig
    aggregated_metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    raw_metrics: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]] = field(default_factory=dict)

    @property
    def num_running_replicas(self) -> int:
        return len(self.running_replicas)
