"""Replica autoscaling: the metrics window, the policy context, the default policy, the autoscaler.

Everything here is pure: no clocks, no asyncio, no I/O. The controller passes ``now``
(monotonic seconds) into every call, which is what makes the module testable on a fake clock.

How the pieces fit, once per controller tick for each autoscaling deployment::

    autoscaler.record(now, total_ongoing, queued)   # feed the load seen right now
    target = autoscaler.decide(now, current, running)  # run the policy, get the new target

``total_ongoing`` is the deployment's whole load: every running replica's last reported
ongoing count (requests executing plus requests queued inside the replica) plus the requests
waiting in callers' routers for a replica. ``queued`` is that last part alone.

The pure policy parts (window, context, scaling rules, default policy) live in
:mod:`shoal.serving.scaling_policy` and are re-exported here; this module loads custom
policies and holds the per-deployment :class:`Autoscaler`.

Semantics follow Ray Serve's autoscaling documentation (field names, the queue-length policy,
upscale/downscale delays, scaling factors, scale to and from zero, custom policies that get an
``AutoscalingContext`` and return ``(target_replicas, policy_state)``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any

from shoal.config import (
    DEFAULT_POLICY_PATHS,
    AggregationFunction,
    AutoscalingConfig,
    AutoscalingContext,
    AutoscalingPolicy,
    DeploymentID,
)
from shoal.exceptions import PolicyLoadError
from shoal.serving.scaling_policy import (
    POLICY_STATE_KEY,
    MetricsWindow,
    PendingDecision,
    PolicyFunction,
    apply_scaling_rules,
    ceil_replicas,
    clamp,
    default_policy,
    downscaling_factor,
    replica_queue_length_autoscaling_policy,
    upscaling_factor,
)

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

# --------------------------------------------------------------------------------------------
# Loading custom policies
# --------------------------------------------------------------------------------------------


# Ray's own default policy paths mean the default policy here.
_DEFAULT_POLICY_PATHS = DEFAULT_POLICY_PATHS


def is_default_policy(policy_function: object) -> bool:
    """Whether ``policy_function`` (an import path or a callable) is the default policy."""
    if isinstance(policy_function, str):
        return policy_function.strip() in _DEFAULT_POLICY_PATHS
    return policy_function is default_policy


def load_policy(policy: AutoscalingPolicy | str) -> PolicyFunction:
    """The callable of a policy: an :class:`AutoscalingPolicy`, or an import path
    (``"module:function"`` or ``"module.function"``).

    The working directory is importable (as for application import paths). A class (imported
    or given) is instantiated once with ``policy_kwargs`` and its instance is the policy (Ray's
    class-based policies); a function is the policy itself and takes no ``policy_kwargs``.
    Ray's default-policy paths (``ray.serve.autoscaling_policy:default_autoscaling_policy`` and
    ``...:replica_queue_length_autoscaling_policy``) give :func:`default_policy`.

    Raises :class:`PolicyLoadError` (a ``ValueError``) naming the policy and the reason when it
    cannot be imported, has no such attribute, is not callable, or the class cannot be
    instantiated.
    """
    if isinstance(policy, str):
        if not policy.strip():
            raise PolicyLoadError(f"autoscaling policy must be an import path string, got {policy!r}")
        policy = AutoscalingPolicy(policy_function=policy)
    if not isinstance(policy, AutoscalingPolicy):
        raise PolicyLoadError(f"autoscaling policy must be an AutoscalingPolicy or an import path, got {policy!r}")
    name, kwargs = policy.name, policy.policy_kwargs
    if is_default_policy(policy.policy_function):
        if kwargs:
            raise PolicyLoadError(f"autoscaling policy {name!r} takes no policy_kwargs")
        return default_policy
    obj: Any = policy.policy_function
    if isinstance(obj, str):
        from shoal.loader import import_attr  # lazy: keeps this module light to import

        try:
            obj = import_attr(obj)
        except (ImportError, AttributeError) as e:
            raise PolicyLoadError(f"cannot load autoscaling policy {name!r}: {e}") from e
    if isinstance(obj, type):
        try:
            obj = obj(**kwargs)
        except Exception as e:
            raise PolicyLoadError(
                f"cannot load autoscaling policy {name!r}: instantiating class {obj.__name__} "
                f"with policy_kwargs {sorted(kwargs)} raised {type(e).__name__}: {e}"
            ) from e
    elif kwargs:
        raise PolicyLoadError(f"autoscaling policy {name!r} is a function: policy_kwargs "
                              f"({', '.join(sorted(kwargs))}) are only passed to a policy class")
    if not callable(obj):
        raise PolicyLoadError(
            f"autoscaling policy {name!r} is not callable (it is a {type(obj).__name__}); "
            "expected a function taking an AutoscalingContext and returning (num_replicas, policy_state)"
        )
    result: PolicyFunction = obj
    return result


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


_Aggregated = dict[str, dict[str, float]]
_Raw = dict[str, dict[str, tuple[tuple[float, float], ...]]]


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
        # Custom metrics replicas report (record_autoscaling_stats): name -> replica id -> window.
        self._custom: dict[str, dict[str, MetricsWindow]] = {}

    @staticmethod
    def _load(policy: AutoscalingPolicy | None) -> PolicyFunction:
        return default_policy if policy is None else load_policy(policy)

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

    def record_custom(self, now: float, replica_id: str, values: Sequence[tuple[str, float]]) -> None:
        """Feed the custom metrics one replica reported at ``now`` (its ``record_autoscaling_stats``)."""
        cfg = self._config
        for name, value in values:
            windows = self._custom.setdefault(name, {})
            window = windows.get(replica_id)
            if window is None:
                window = windows[replica_id] = MetricsWindow(cfg.look_back_period_s, cfg.aggregation_function)
            window.record(now, value)

    def _custom_metrics(self, now: float, running: Sequence[str] | None) -> tuple[_Aggregated, _Raw]:
        """(aggregated, raw) custom metrics of the running replicas (``running``: their ids; the
        metrics of replicas not among them are forgotten; None: every replica's, forgetting none)."""
        aggregated: _Aggregated = {}
        raw: _Raw = {}
        for name, windows in list(self._custom.items()):
            if running is not None:
                for replica_id in [r for r in windows if r not in running]:
                    del windows[replica_id]
            if not windows:
                del self._custom[name]
                continue
            for replica_id, window in windows.items():
                window.look_back_period_s = self._config.look_back_period_s
                window.aggregation_function = AggregationFunction(self._config.aggregation_function)
                value = window.aggregate(now)
                if value is not None:
                    aggregated.setdefault(name, {})[replica_id] = value
                    raw.setdefault(name, {})[replica_id] = window.samples
        return aggregated, raw

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
        aggregated, raw = self._custom_metrics(now, None if isinstance(running_replicas, int) else running)
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
            aggregated_metrics=aggregated,
            raw_metrics=raw,
        )

    def decide(self, now: float, current_num_replicas: int, running_replicas: int | Sequence[str]) -> int:
        """Run the policy at ``now`` and return the new target replica count.

        ``current_num_replicas`` counts running and starting replicas; ``running_replicas``
        is the running replicas' ids or their count. Never raises because of the policy.
        """
        ctx = self.context(now, current_num_replicas, running_replicas)
        try:
            result = self._policy(ctx)
        except Exception as e:
            return self.fail(ctx, f"raised {type(e).__name__}: {e}")
        return self.settle(ctx, result, custom=self.is_custom_policy)

    def settle(self, ctx: AutoscalingContext, result: object, *, custom: bool = True) -> int:
        """Turn a policy's answer for ``ctx`` into the new target and keep its state.

        ``result`` is what a policy returned: ``(num_replicas, policy_state)`` or a bare number.
        A ``custom`` policy's answer goes through the autoscaling config's rules (delays,
        factors, scale from zero) unless ``apply_rules_to_custom_policy`` is off; the target is
        always clamped to the bounds. Never raises: an unusable answer is :meth:`fail`.
        """
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        try:
            desired, state = _parse_answer(result, ctx.policy_state)
        except _BadAnswer as e:
            return self.fail(ctx, str(e))
        if custom and self.apply_rules_to_custom_policy:
            # The rules' bookkeeping is ours: take it from our copy, not the policy's answer.
            state[POLICY_STATE_KEY] = self.policy_state.get(POLICY_STATE_KEY)
            try:
                new, state = apply_scaling_rules(ctx, desired, state)
            except Exception as e:  # defensive: the rules should not fail
                return self.fail(ctx, f"applying the autoscaling config failed: {type(e).__name__}: {e}")
        else:
            new = ceil_replicas(desired)
        new = clamp(new, lo, hi)
        now = ctx.current_time if ctx.current_time is not None else 0.0
        if new > self.target:
            self.last_scale_up_time = now
        elif new < self.target:
            self.last_scale_down_time = now
        self.target = new
        self.policy_state = state
        self.last_error = None
        return new

    def fail(self, ctx: AutoscalingContext, why: str, *, policy_name: str | None = None) -> int:
        """Record a policy failure (``why``) and keep the current target, clamped to the bounds."""
        if policy_name is None:
            name = getattr(self._policy, "__qualname__", None) or type(self._policy).__name__
            policy_name = repr(self._config.policy.name if self._config.policy else name)
        self.last_error = f"autoscaling policy {policy_name} {why}"
        self.error_count += 1
        kept = clamp(self.target, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
        if kept > self.target:
            self.last_scale_up_time = ctx.current_time
        elif kept < self.target:
            self.last_scale_down_time = ctx.current_time
        self.target = kept
        return kept

