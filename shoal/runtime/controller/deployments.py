"""Planning a (re)deployed deployment's record, and autoscaling it: decisions on records,
no processes and no clocks (``now`` is passed in)."""

from __future__ import annotations

import logging

from shoal.deployment import DeploymentSpec
from shoal.exceptions import DeployError
from shoal.observability.controller_metrics import ControllerMetrics
from shoal.runtime.controller.records import DeploymentRecord, ReplicaRecord
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


def autoscale(app: str, dep: DeploymentRecord, replicas: list[ReplicaRecord],
              handle_stats: dict[int, tuple[float, int, int]], metrics: ControllerMetrics, now: float) -> None:
    """One autoscaling evaluation of ``dep``: record its load, and move its target if the policy says so."""
    scaler = dep.autoscaler
    if scaler is None:
        return
    name = dep.spec.name
    fresh = max(3 * scaler.config.metrics_interval_s, 1.0)  # a report older than this no longer counts
    # Load = requests in the replicas (running or queued there, HTTP included) + requests
    # waiting in callers for a replica.
    queued = sum(q for t, q, _ in handle_stats.values() if now - t <= fresh)
    mine = [r for r in replicas
            if r.version == dep.version and r.state in (ReplicaState.STARTING, ReplicaState.RUNNING)]
    ongoing = sum(r.ongoing for r in mine if r.state == ReplicaState.RUNNING and now - r.stats_at <= fresh)
    scaler.record(now, queued + ongoing, queued)
    running = [r.replica_id for r in mine if r.state == ReplicaState.RUNNING]
    new = scaler.decide(now, len(mine), running)
    metrics.autoscale_tick(app, name, queued + ongoing, dep.target, new)
    if new != dep.target:
        logger.info("autoscaling %s/%s from %d to %d replicas", app, name, dep.target, new)
        dep.scaling = "UPSCALING" if new > dep.target else "DOWNSCALING"
        dep.target = new
    if scaler.last_error:
        dep.message = f"autoscaling policy failed: {scaler.last_error}"

