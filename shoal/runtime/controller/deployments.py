"""Planning a (re)deployed deployment's record, and autoscaling it: decisions on records,
no processes and no clocks (``now`` is passed in)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from shoal.deployment import AppSpec, DeploymentSpec
from shoal.exceptions import DeployError
from shoal.observability.controller_metrics import ControllerMetrics
from shoal.runtime.controller.records import AppRecord, DeploymentRecord, ReplicaRecord
from shoal.serving.app_policy import AppPolicy, DeploymentInput, load_app_policy
from shoal.serving.autoscaling import Autoscaler, PolicyLoadError
from shoal.status import ReplicaState

logger = logging.getLogger("shoal.controller")


def plan_deployment(app: str, dspec: DeploymentSpec, prev: DeploymentRecord | None) -> DeploymentRecord:
    """The record for a (re)deployed deployment; the replica count carries over when it can."""
    version = dspec.code_version
    cfg = dspec.config
    auto = cfg.resolved_autoscaling()
    target = cfg.initial_target()
    autoscaler: Autoscaler | None = None
    try:
        if auto is not None:
            if prev is not None and prev.autoscaler is not None:
                autoscaler = prev.autoscaler
                autoscaler.update_config(auto)
                # Keep the current scale, within the new bounds.
                target = min(max(prev.target, auto.min_replicas), auto.max_replicas)
                autoscaler.target = target
            else:
                autoscaler = Autoscaler(auto, dspec.name, app, target)
    except PolicyLoadError as e:
        raise DeployError(f"deployment {dspec.name!r}: autoscaling_config.policy: {e}") from None
    if prev is not None and auto is None and prev.spec.config.num_replicas == cfg.num_replicas \
            and prev.autoscaler is None:
        target = prev.target
    rec = DeploymentRecord(dspec, version, target, autoscaler=autoscaler,
                           ready_once=prev is not None and prev.ready_once and prev.version == version)
    if prev is not None:
        rec.published = prev.published
        if prev.version == version:
            rec.finished = prev.finished
    return rec


def plan_app_policy(app: str, spec: AppSpec, prev: AppRecord | None) -> AppPolicy | None:
    """The (re)deployed app's application-level autoscaling policy, loaded (the previous one when
    unchanged); DeployError naming the field when it cannot be loaded."""
    try:
        policy = load_app_policy(app, spec.autoscaling_policy, prev.policy if prev is not None else None)
    except PolicyLoadError as e:
        raise DeployError(f"application {app!r}: autoscaling_policy: {e}") from None
    if policy is None:
        return None
    scaled = {n: d.config.resolved_autoscaling() for n, d in spec.deployments.items()}
    if not any(scaled.values()):
        logger.warning("application %r has an autoscaling_policy but no deployment with an autoscaling_config: "
                       "the policy is never called", app)
    both = sorted(n for n, auto in scaled.items() if auto is not None and auto.policy is not None)
    if both:
        logger.warning("application %r: its autoscaling_policy takes precedence over the deployment-level "
                       "policies of %s", app, ", ".join(both))
    return policy


def autoscale_app(app: AppRecord, replicas_of: Callable[[str], list[ReplicaRecord]],
                  handle_stats_of: Callable[[str], dict[int, tuple[float, int, int]]],
                  metrics: ControllerMetrics, now: float) -> None:
    """One autoscaling evaluation of every autoscaling deployment of ``app``: record their load,
    run the application's policy once (if it has one) or each deployment's own, move targets."""
    name = app.spec.name
    inputs: dict[str, DeploymentInput] = {}
    loads: dict[str, float] = {}
    for dep in app.deployments.values():
        if dep.autoscaler is None:
            continue  # not autoscaled: nothing to record (and no list of its replicas to make, each tick)
        got = _record_load(dep, replicas_of(dep.spec.name), handle_stats_of(dep.spec.name), now)
        if got is not None:
            inputs[dep.spec.name], loads[dep.spec.name] = got
    if not inputs:
        return
    if app.policy is not None:
        targets = app.policy.decide(now, inputs)
    else:
        targets = {n: i.scaler.decide(now, i.current_num_replicas, i.running_replicas) for n, i in inputs.items()}
    for dep_name, new in targets.items():
        dep = app.deployments[dep_name]
        metrics.autoscale_tick(name, dep_name, loads[dep_name], dep.target, new)
        if new != dep.target:
            logger.info("autoscaling %s/%s from %d to %d replicas", name, dep_name, dep.target, new)
            dep.scaling = "UPSCALING" if new > dep.target else "DOWNSCALING"
            dep.target = new
        scaler = inputs[dep_name].scaler
        if scaler.last_error:
            dep.message = f"autoscaling policy failed: {scaler.last_error}"


def _record_load(dep: DeploymentRecord, replicas: list[ReplicaRecord],
                 handle_stats: dict[int, tuple[float, int, int]], now: float) -> tuple[DeploymentInput, float] | None:
    """Feed ``dep``'s autoscaler the load seen now; its policy inputs and that load (None: not autoscaled)."""
    scaler = dep.autoscaler
    if scaler is None:
        return None
    fresh = max(3 * scaler.config.metrics_interval_s, 1.0)  # a report older than this no longer counts
    # Load = requests in the replicas (running or queued there, HTTP included) + requests
    # waiting in callers for a replica.
    queued = sum(q for t, q, _ in handle_stats.values() if now - t <= fresh)
    mine = [r for r in replicas
            if r.version == dep.version and r.state in (ReplicaState.STARTING, ReplicaState.RUNNING)]
    ongoing = sum(r.ongoing for r in mine if r.state == ReplicaState.RUNNING and now - r.stats_at <= fresh)
    scaler.record(now, queued + ongoing, queued)
    running = [r.replica_id for r in mine if r.state == ReplicaState.RUNNING]
    return DeploymentInput(scaler, len(mine), running), queued + ongoing
