"""The autoscaling policy's pure parts: the metrics window, the context a policy gets, the scaling
rules (delays, factors, bounds) shared by the default policy and custom ones, and the default
(queue-length) policy itself. No clocks, no I/O: callers pass ``now``."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

from shoal.config import AggregationFunction, AutoscalingConfig, AutoscalingContext
from shoal.config import DeploymentID as DeploymentID  # re-exported: callers import it from here

# Tolerance for float noise in time comparisons and in rounding replica counts up, so that
# 30.000000000000004 seconds count as 30 and 3.0000000000000004 replicas as 3.
_EPS = 1e-9

# The key under which the scaling rules keep their pending-decision bookkeeping inside
# ``policy_state``. Ray documents that policy_state is the policy's own except for internal
# keys used when the standard parameters are applied; this is shoal's one such key.
POLICY_STATE_KEY = "__shoal_autoscaling__"


# --------------------------------------------------------------------------------------------
# Metrics window
# --------------------------------------------------------------------------------------------


class MetricsWindow:
    """A sliding window of ``(timestamp, value)`` samples, aggregated over ``look_back_period_s``.

    Samples older than ``now - look_back_period_s`` are dropped (a sample exactly at the
    boundary is kept). Aggregation over the samples left:

    * ``"max"`` / ``"min"``: the largest / smallest sample.
    * ``"mean"``: a **time-weighted** mean. The samples are read as a step function (each
      value holds from its timestamp until the next sample, the last one until ``now``) and
      the mean is its integral divided by the span from the oldest sample to ``now``.
      Time-weighted rather than a plain sample mean because the controller's tick is uneven
      (0.05 to 0.1 s, with extra ticks on events): a plain mean would weigh a stretch of time by
      how many ticks happened to fall in it. It is also what Ray documents for ``"mean"``
      (metrics read as right-continuous step functions). One consequence: a sample recorded
      at ``now`` has no weight yet in ``aggregate(now)``; it counts from the next tick on.
      When the samples span no time at all (one sample, or all at ``now``) the mean is the
      latest value.

    An empty window aggregates to ``None``.
    """

    def __init__(
        self,
        look_back_period_s: float,
        aggregation_function: AggregationFunction | str = AggregationFunction.MEAN,
    ) -> None:
        self._samples: deque[tuple[float, float]] = deque()
        self.look_back_period_s = look_back_period_s
        self.aggregation_function = AggregationFunction(aggregation_function)

    @property
    def look_back_period_s(self) -> float:
        return self._look_back_period_s

    @look_back_period_s.setter
    def look_back_period_s(self, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"look_back_period_s must be a positive number, got {value!r}")
        self._look_back_period_s = float(value)

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def samples(self) -> tuple[tuple[float, float], ...]:
        """The retained samples, oldest first."""
        return tuple(self._samples)

    @property
    def latest(self) -> tuple[float, float] | None:
        return self._samples[-1] if self._samples else None

    def clear(self) -> None:
        self._samples.clear()

    def record(self, timestamp: float, value: float) -> None:
        """Add a sample, then drop the samples that fell out of the window ending at it.

        Samples are expected in time order; an out-of-order one is inserted where it belongs.
        NaN values are ignored.
        """
        timestamp, value = float(timestamp), float(value)
        if math.isnan(value) or math.isnan(timestamp):
            return
        if not self._samples or timestamp >= self._samples[-1][0]:
            self._samples.append((timestamp, value))
        else:
            i = len(self._samples)
            while i > 0 and self._samples[i - 1][0] > timestamp:
                i -= 1
            self._samples.insert(i, (timestamp, value))
        self.prune(self._samples[-1][0])

    def prune(self, now: float) -> None:
        """Drop samples with ``timestamp < now - look_back_period_s``."""
        cutoff = now - self._look_back_period_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()

    def aggregate(self, now: float) -> float | None:
        """Prune to the window ending at ``now`` and aggregate what is left (None if nothing)."""
        self.prune(now)
        if not self._samples:
            return None
        values = [v for _, v in self._samples]
        if self.aggregation_function == AggregationFunction.MAX:
            return max(values)
        if self.aggregation_function == AggregationFunction.MIN:
            return min(values)
        start = self._samples[0][0]
        end = max(now, self._samples[-1][0])
        span = end - start
        if span <= 0:
            return values[-1]
        area = 0.0
        for (t, v), (t_next, _) in pairwise(self._samples):
            area += v * (t_next - t)
        t_last, v_last = self._samples[-1]
        area += v_last * (end - t_last)
        return area / span


# --------------------------------------------------------------------------------------------
# Policy context
# --------------------------------------------------------------------------------------------


PolicyFunction = Callable[[AutoscalingContext], tuple[int | float, dict[str, Any]]]
"""A policy: takes the context, returns ``(target_replicas, policy_state)``."""


# --------------------------------------------------------------------------------------------
# Scaling rules shared by the default policy and custom policies
# --------------------------------------------------------------------------------------------


def upscaling_factor(config: AutoscalingConfig) -> float:
    """``upscaling_factor``, else the deprecated ``upscale_smoothing_factor``, else ``smoothing_factor``."""
    if config.upscaling_factor is not None:
        return config.upscaling_factor
    if config.upscale_smoothing_factor is not None:
        return config.upscale_smoothing_factor
    return config.smoothing_factor


def downscaling_factor(config: AutoscalingConfig) -> float:
    """``downscaling_factor``, else the deprecated ``downscale_smoothing_factor``, else ``smoothing_factor``."""
    if config.downscaling_factor is not None:
        return config.downscaling_factor
    if config.downscale_smoothing_factor is not None:
        return config.downscale_smoothing_factor
    return config.smoothing_factor


def ceil_replicas(x: float) -> int:
    return math.ceil(x - _EPS)


def clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def _apply_factors(desired: float, current: int, config: AutoscalingConfig) -> int:
    """Scale the change from ``current`` to ``desired`` by the up/down factor; round up.

    A downscale that the factor would round away entirely (``current=2``, ``desired=1``,
    factor 0.1 gives 1.9, rounded up to 2) still removes one replica, so a factor below 1
    slows downscaling but never stops it. Upscaling always adds at least one replica when
    ``desired > current`` because the result is rounded up.
    """
    delta = desired - current
    if delta > 0:
        return ceil_replicas(current + upscaling_factor(config) * delta)
    if delta < 0:
        scaled = ceil_replicas(current + downscaling_factor(config) * delta)
        if ceil_replicas(desired) < current and scaled >= current:
            scaled = current - 1
        return max(0, scaled)
    return current


Direction = Literal["up", "down"]


@dataclass(frozen=True)
class PendingDecision:
    """A scaling decision waiting out its delay: which way, since when, from which target."""

    direction: Direction
    since: float
    from_target: int

    def to_state(self) -> dict[str, Any]:
        return {"direction": self.direction, "since": self.since, "from_target": self.from_target}

    @classmethod
    def from_state(cls, raw: object) -> PendingDecision | None:
        """Read the bookkeeping back; anything malformed reads as "nothing pending"."""
        if not isinstance(raw, Mapping):
            return None
        direction, since, from_target = raw.get("direction"), raw.get("since"), raw.get("from_target")
        if direction not in ("up", "down"):
            return None
        if not isinstance(since, int | float) or isinstance(since, bool) or not math.isfinite(since):
            return None
        if not isinstance(from_target, int) or isinstance(from_target, bool):
            return None
        return cls(direction, float(since), from_target)


def apply_scaling_rules(
    ctx: AutoscalingContext, desired_num_replicas: float, policy_state: Mapping[str, Any]
) -> tuple[int, dict[str, Any]]:
    """Turn a raw desired replica count into the new target, applying the config's rules.

    Used by :func:`default_policy` and, by :class:`Autoscaler`, on the raw answer of a custom
    policy (Ray applies the same standard parameters to custom policies). Rules, in order:

    1. **Scale from zero.** With no replica running or starting (``current_num_replicas ==
       0``) and any request waiting or ongoing, the target becomes at once (no delay) at
       least 1: ``max(1, ceil(upscaling_factor * desired), current target)``, within bounds.
    2. **Scaling factors.** The change from ``current_num_replicas`` to the desired count is
       multiplied by ``upscaling_factor`` (going up) or ``downscaling_factor`` (going down),
       falling back to the deprecated ``*_smoothing_factor`` and then ``smoothing_factor``,
       and the result is rounded up. A factor below 1 still moves by at least one replica.
    3. **Bounds.** The result is clamped to ``[min_replicas, max_replicas]``.
    4. **Two-step scale to zero.** When ``downscale_to_zero_delay_s`` is set and the result is
       0 while the target is above 1, this step only goes to 1; the last 1→0 step is a
       separate decision (rule 5) whose delay starts the moment the target reaches 1.
    5. **Delays.** A result above the target must hold continuously for ``upscale_delay_s``,
       one below it for ``downscale_delay_s`` (``downscale_to_zero_delay_s``, when set, for
       1→0), before it becomes the target; until then the target stays. "Continuously" means
       every tick wanted to move the same way from the same target; a tick that wants no
       change, or the other way, restarts the clock. The value applied is the one wanted
       when the delay has run out. The bookkeeping lives in ``policy_state`` under
       ``POLICY_STATE_KEY`` (direction, since when, from which target) and is cleared when a
       decision is applied.
    6. **Bounds, again.** The returned target is always within ``[min_replicas,
       max_replicas]``, even when nothing else changes (e.g. after the bounds were edited).
    """
    cfg = ctx.config
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    current, target, now = ctx.current_num_replicas, ctx.target_num_replicas, ctx.current_time
    state = dict(policy_state)
    pending = PendingDecision.from_state(state.get(POLICY_STATE_KEY))
    state[POLICY_STATE_KEY] = None

    # 1. Scale from zero.
    if current == 0 and (ctx.total_num_requests > 0 or ctx.total_queued_requests > 0):
        cold = max(1, target, ceil_replicas(upscaling_factor(cfg) * max(0.0, desired_num_replicas)))
        return clamp(cold, max(lo, 1), hi), state

    # 2.-4. Factors, bounds, two-step scale to zero.
    wanted = clamp(_apply_factors(desired_num_replicas, current, cfg), lo, hi)
    to_zero_delay = cfg.downscale_to_zero_delay_s
    two_step = wanted == 0 and target > 1 and to_zero_delay is not None
    if two_step:
        wanted = 1

    # 5. Delays.
    direction: Direction
    if wanted > target:
        direction, delay = "up", cfg.upscale_delay_s
    elif wanted < target:
        direction = "down"
        delay = to_zero_delay if (wanted == 0 and to_zero_delay is not None) else cfg.downscale_delay_s
    else:
        return clamp(target, lo, hi), state
    if pending is None or pending.direction != direction or pending.from_target != target:
        pending = PendingDecision(direction, now, target)
    if now - pending.since >= delay - _EPS:
        if two_step:
            # At 1 and still wanting 0: the 1->0 delay starts now, not at the next tick.
            state[POLICY_STATE_KEY] = PendingDecision("down", now, 1).to_state()
        return wanted, state
    state[POLICY_STATE_KEY] = pending.to_state()
    return clamp(target, lo, hi), state


def default_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Ray Serve's queue-length policy.

    The desired replica count is ``total_num_requests / target_ongoing_requests`` (so that
    each replica has about ``target_ongoing_requests`` requests executing or queued), where
    ``total_num_requests`` is the deployment's total ongoing requests aggregated over the
    look-back window. :func:`apply_scaling_rules` then applies, as documented there: scale
    from zero at once when requests wait; the up/down scaling factors on the change from the
    current count, rounded up; the ``[min_replicas, max_replicas]`` bounds; the
    ``upscale_delay_s`` / ``downscale_delay_s`` delays, with ``downscale_to_zero_delay_s`` for
    the last 1→0 step when set. Returns ``(new_target, policy_state)``.
    """
    desired = max(0.0, ctx.total_num_requests) / ctx.config.target_ongoing_requests
    return apply_scaling_rules(ctx, desired, ctx.policy_state)


# Ray's name for its default policy, so import paths written against it read naturally.
replica_queue_length_autoscaling_policy = default_policy

