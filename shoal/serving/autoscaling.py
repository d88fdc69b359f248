"""Replica autoscaling: the metrics window, the policy context, the default policy, the autoscaler.

Everything here is pure: no clocks, no asyncio, no I/O. The controller passes ``now``
(monotonic seconds) into every call, which is what makes the module testable on a fake clock.

How the pieces fit, once per controller tick for each autoscaling deployment::

    autoscaler.record(now, total_ongoing, queued)   # feed the load seen right now
    target = autoscaler.decide(now, current, running)  # run the policy, get the new target

``total_ongoing`` is the deployment's whole load: every running replica's last reported
ongoing count (requests executing plus requests queued inside the replica) plus the requests
waiting in callers' routers for a replica. ``queued`` is that last part alone.

Semantics follow Ray Serve's autoscaling documentation (field names, the queue-length policy,
upscale/downscale delays, scaling factors, scale to and from zero, custom policies that get an
``AutoscalingContext`` and return ``(target_replicas, policy_state)``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

from shoal.config import AggregationFunction, AutoscalingConfig

__all__ = [
    "Autoscaler",
    "AutoscalingContext",
    "DeploymentID",
    "MetricsWindow",
    "PendingDecision",
    "PolicyFunction",
    "PolicyLoadError",
    "apply_scaling_rules",
    "default_policy",
    "downscaling_factor",
    "load_policy",
    "replica_queue_length_autoscaling_policy",
    "upscaling_factor",
]

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
    * ``aggregated_metrics`` / ``raw_metrics``: custom per-replica metrics; shoal does not
      collect them yet, so they are empty mappings (present so that policies reading them
      with ``.get`` keep working).
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


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def _clamp(n: int, lo: int, hi: int) -> int:
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
        return _ceil(current + upscaling_factor(config) * delta)
    if delta < 0:
        scaled = _ceil(current + downscaling_factor(config) * delta)
        if _ceil(desired) < current and scaled >= current:
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
        cold = max(1, target, _ceil(upscaling_factor(cfg) * max(0.0, desired_num_replicas)))
        return _clamp(cold, max(lo, 1), hi), state

    # 2.-4. Factors, bounds, two-step scale to zero.
    wanted = _clamp(_apply_factors(desired_num_replicas, current, cfg), lo, hi)
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
        return _clamp(target, lo, hi), state
    if pending is None or pending.direction != direction or pending.from_target != target:
        pending = PendingDecision(direction, now, target)
    if now - pending.since >= delay - _EPS:
        if two_step:
            # At 1 and still wanting 0: the 1->0 delay starts now, not at the next tick.
            state[POLICY_STATE_KEY] = PendingDecision("down", now, 1).to_state()
        return wanted, state
    state[POLICY_STATE_KEY] = pending.to_state()
    return _clamp(target, lo, hi), state


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


# --------------------------------------------------------------------------------------------
# Loading custom policies
# --------------------------------------------------------------------------------------------


class PolicyLoadError(ValueError):
    """An autoscaling ``policy`` import path that cannot be used."""


# Ray's own default policy paths mean the default policy here.
_DEFAULT_POLICY_PATHS = frozenset(
    f"{module}{sep}{name}"
    for module in ("ray.serve.autoscaling_policy", "shoal.serving.autoscaling")
    for sep in (":", ".")
    for name in ("default_autoscaling_policy", "replica_queue_length_autoscaling_policy", "default_policy")
)


def load_policy(import_path: str) -> PolicyFunction:
    """Import a policy from ``"module:function"`` or ``"module.function"``.

    The working directory is importable (as for application import paths). A class is
    instantiated once with no arguments and its instance is the policy (Ray's class-based
    policies; ``policy_kwargs`` are not supported). Ray's default-policy paths
    (``ray.serve.autoscaling_policy:default_autoscaling_policy`` and
    ``...:replica_queue_length_autoscaling_policy``) give :func:`default_policy`.

    Raises :class:`PolicyLoadError` (a ``ValueError``) naming the path and the reason when it
    cannot be imported, has no such attribute, is not callable, or the class cannot be
    instantiated.
    """
    if not isinstance(import_path, str) or not import_path.strip():
        raise PolicyLoadError(f"autoscaling policy must be an import path string, got {import_path!r}")
    path = import_path.strip()
    if path in _DEFAULT_POLICY_PATHS:
        return default_policy

    from shoal.loader import import_attr  # lazy: keeps this module light to import

    try:
        obj = import_attr(path)
    except (ImportError, AttributeError) as e:
        raise PolicyLoadError(f"cannot load autoscaling policy {path!r}: {e}") from e
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as e:
            raise PolicyLoadError(
                f"cannot load autoscaling policy {path!r}: instantiating class {obj.__name__} "
                f"with no arguments raised {type(e).__name__}: {e}"
            ) from e
    if not callable(obj):
        raise PolicyLoadError(
            f"autoscaling policy {path!r} is not callable (it is a {type(obj).__name__}); "
            "expected a function taking an AutoscalingContext and returning (num_replicas, policy_state)"
        )
    policy: PolicyFunction = obj
    return policy


# --------------------------------------------------------------------------------------------
# The per-deployment autoscaler
# --------------------------------------------------------------------------------------------


class _BadAnswer(Exception):
    """A policy's return value that cannot be used."""


def _parse_answer(result: object, previous_state: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Validate a policy's return value into ``(desired, state)``.

    Accepted: ``(number, dict)`` (a list works too; ``None`` as the state keeps the previous
    one) or a bare number (state unchanged). The number may be an int or a float (a float is
    rounded up by the caller, as Ray does); it must be finite and not negative. Booleans,
    strings, NaN, infinities, coroutines and anything else are rejected.
    """
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # avoid "coroutine was never awaited"
        raise _BadAnswer("returned an awaitable; autoscaling policies must be synchronous functions")
    state: dict[str, Any] = previous_state
    number: object = result
    if isinstance(result, tuple | list):
        if len(result) != 2:
            raise _BadAnswer(f"returned a sequence of length {len(result)}; expected (num_replicas, policy_state)")
        number, raw_state = result
        if raw_state is not None:
            if not isinstance(raw_state, dict):
                raise _BadAnswer(f"returned a policy_state of type {type(raw_state).__name__}; expected a dict")
            state = raw_state
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise _BadAnswer(f"returned num_replicas {number!r} of type {type(number).__name__}; expected an int or float")
    value = float(number)
    if not math.isfinite(value) or value < 0:
        raise _BadAnswer(f"returned num_replicas {number!r}; expected a finite, non-negative number")
    return value, dict(state)


class Autoscaler:
    """Autoscaling state of one deployment; the controller calls it every tick.

    State is explicit and clock-free: the metrics window, the current target, the policy's
    state, the last scale-up/down times and the last policy error. ``record`` feeds load
    samples; ``decide`` runs the policy and returns the new target.

    The policy is :func:`default_policy`, or the custom policy named by ``config.policy``,
    whose raw answer goes through :func:`apply_scaling_rules` (factors, delays, bounds, scale
    from zero) as Ray does for custom policies; set ``apply_rules_to_custom_policy=False``
    to use a custom policy's answer as is (still validated and clamped to the bounds).

    The control loop must never crash on a policy: if the policy raises or returns something
    unusable, ``decide`` keeps the current target (still clamped to the bounds), leaves
    ``policy_state`` as it was, stores a message in ``last_error`` and counts it in
    ``error_count``. ``last_error`` goes back to None after the next successful decision.
    """

    def __init__(
        self,
        config: AutoscalingConfig,
        deployment_name: str,
        app_name: str,
        initial_target: int,
        *,
        apply_rules_to_custom_policy: bool = True,
    ) -> None:
        """Raises :class:`PolicyLoadError` if ``config.policy`` cannot be loaded."""
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.apply_rules_to_custom_policy = apply_rules_to_custom_policy
        self._config = config
        self._policy: PolicyFunction = self._load(config.policy)
        self.window = MetricsWindow(config.look_back_period_s, config.aggregation_function)
        self.target: int = int(initial_target)
        self.policy_state: dict[str, Any] = {}
        self.last_scale_up_time: float | None = None
        self.last_scale_down_time: float | None = None
        self.last_error: str | None = None
        self.error_count = 0
        self._queued = 0.0
        self._queued_at: float | None = None

    @staticmethod
    def _load(path: str | None) -> PolicyFunction:
        return default_policy if path is None else load_policy(path)

    @property
    def config(self) -> AutoscalingConfig:
        return self._config

    @property
    def policy(self) -> PolicyFunction:
        return self._policy

    @property
    def is_custom_policy(self) -> bool:
        return self._policy is not default_policy

    @property
    def pending(self) -> PendingDecision | None:
        """The scaling decision waiting out its delay, if any (for status displays)."""
        return PendingDecision.from_state(self.policy_state.get(POLICY_STATE_KEY))

    def update_config(self, config: AutoscalingConfig) -> None:
        """Apply a changed autoscaling config in place.

        The window keeps its samples under the new look-back period and aggregation. A
        changed ``policy`` is loaded first (on failure :class:`PolicyLoadError` is raised and
        nothing changes) and starts from an empty ``policy_state``. New bounds apply at the
        next ``decide``.
        """
        policy = self._policy if config.policy == self._config.policy else self._load(config.policy)
        if config.policy != self._config.policy:
            self.policy_state = {}
        self._policy = policy
        self._config = config
        self.window.look_back_period_s = config.look_back_period_s
        self.window.aggregation_function = AggregationFunction(config.aggregation_function)

    def record(self, now: float, total_ongoing: float, queued: float = 0.0) -> None:
        """Feed the load seen at ``now``.

        ``total_ongoing`` is the deployment's total ongoing requests (in replicas plus waiting
        in callers; ``queued`` is included in it), ``queued`` the part waiting in callers.
        Negative values count as 0.
        """
        self.window.record(now, max(0.0, float(total_ongoing)))
        queued = float(queued)
        self._queued = queued if queued > 0 else 0.0
        self._queued_at = now

    def _queued_now(self, now: float) -> float:
        # A queue report older than the look-back window says nothing about now.
        if self._queued_at is None or now - self._queued_at > self._config.look_back_period_s:
            return 0.0
        return self._queued

    def context(
        self, now: float, current_num_replicas: int, running_replicas: int | Sequence[str]
    ) -> AutoscalingContext:
        """The context the policy gets at ``now`` (also handy for inspection and tests).

        ``running_replicas`` is the running replicas' ids, or just their count (then ids are
        made up as ``"<app>#<deployment>#<i>"`` so that ``len()`` is right).
        """
        if isinstance(running_replicas, int):
            running = tuple(f"{self.app_name}#{self.deployment_name}#{i}" for i in range(max(0, running_replicas)))
        else:
            running = tuple(str(r) for r in running_replicas)
        total = self.window.aggregate(now)
        cfg = self._config
        return AutoscalingContext(
            deployment_id=DeploymentID(self.deployment_name, self.app_name),
            deployment_name=self.deployment_name,
            app_name=self.app_name,
            current_num_replicas=int(current_num_replicas),
            target_num_replicas=self.target,
            running_replicas=running,
            total_num_requests=0.0 if total is None else total,
            total_queued_requests=self._queued_now(now),
            capacity_adjusted_min_replicas=cfg.min_replicas,
            capacity_adjusted_max_replicas=cfg.max_replicas,
            policy_state=dict(self.policy_state),
            last_scale_up_time=self.last_scale_up_time,
            last_scale_down_time=self.last_scale_down_time,
            current_time=now,
            config=cfg,
        )

    def decide(self, now: float, current_num_replicas: int, running_replicas: int | Sequence[str]) -> int:
        """Run the policy at ``now`` and return the new target replica count.

        ``current_num_replicas`` counts running and starting replicas; ``running_replicas``
        is the running replicas' ids or their count. Never raises because of the policy.
        """
        ctx = self.context(now, current_num_replicas, running_replicas)
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        try:
            result = self._policy(ctx)
        except Exception as e:
            return self._fail(ctx, f"raised {type(e).__name__}: {e}")
        try:
            desired, state = _parse_answer(result, ctx.policy_state)
        except _BadAnswer as e:
            return self._fail(ctx, str(e))

        if self.is_custom_policy and self.apply_rules_to_custom_policy:
            # The rules' bookkeeping is ours: take it from our copy, not the policy's answer.
            state[POLICY_STATE_KEY] = self.policy_state.get(POLICY_STATE_KEY)
            try:
                new, state = apply_scaling_rules(ctx, desired, state)
            except Exception as e:  # defensive: the rules should not fail
                return self._fail(ctx, f"applying the autoscaling config failed: {type(e).__name__}: {e}")
        else:
            new = _ceil(desired)
        new = _clamp(new, lo, hi)

        if new > self.target:
            self.last_scale_up_time = now
        elif new < self.target:
            self.last_scale_down_time = now
        self.target = new
        self.policy_state = state
        self.last_error = None
        return new

    def _fail(self, ctx: AutoscalingContext, why: str) -> int:
        name = getattr(self._policy, "__qualname__", None) or type(self._policy).__name__
        self.last_error = f"autoscaling policy {self._config.policy or name!r} {why}"
        self.error_count += 1
        kept = _clamp(self.target, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
        if kept > self.target:
            self.last_scale_up_time = ctx.current_time
        elif kept < self.target:
            self.last_scale_down_time = ctx.current_time
        self.target = kept
        return kept
