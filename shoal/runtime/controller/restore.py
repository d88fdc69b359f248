"""A detached instance's memory: a restarted controller redeploys the saved apps and adopts
the replicas and the proxy that still run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from shoal.deployment import AppSpec, DeploymentSpec
from shoal.runtime.controller.canary import AppKey, CanaryTable
from shoal.runtime.controller.records import ADOPT_WAIT_S, AppRecord, DeploymentRecord, ReplicaRecord
from shoal.runtime.controller.registry import Registry
from shoal.runtime.controller.supervisor import Supervisor
from shoal.runtime.state import ProcessRow, Store
from shoal.serving.app_policy import AppPolicy, load_app_policy
from shoal.serving.resources import Ledger, Pending, Request

logger = logging.getLogger("shoal.controller")

Plan = Callable[[str, DeploymentSpec], DeploymentRecord]


def _app_policy(key: str, spec: AppSpec) -> AppPolicy | None:
    """The saved app's application-level policy; a policy that no longer loads is logged and
    left out (the deployments then scale by their own policies) rather than stopping the restore."""
    try:
        return load_app_policy(key, getattr(spec, "autoscaling_policy", None))
    except Exception as e:
        logger.error("application %r: its autoscaling_policy no longer loads (%s); its deployments scale by "
                     "their own policies until it is redeployed", key, e)
        return None


@dataclass
class Restored:
    """How many replicas were adopted."""

    adopted: int = 0


def restore(store: Store, registry: Registry, canaries: CanaryTable, supervisor: Supervisor, ledger: Ledger,
            plan: Plan, adopt_proxy: Callable[[ProcessRow], bool], now: float) -> Restored:
    """Read the store: redeploy its apps, adopt the replicas and proxy still running.
    ``adopt_proxy`` takes over a live proxy and says whether it could."""
    for key, spec, deployed_at in store.load_apps():
        deps = {n: plan(key, d) for n, d in spec.deployments.items()}
        registry.apps[key] = AppRecord(spec, deps, deployed_at=deployed_at, policy=_app_policy(key, spec))
    canaries.load(set(registry.apps))
    out = Restored()
    for row in store.load_processes():
        alive = supervisor.alive(row.pid)
        if row.role == "proxy":
            if alive and adopt_proxy(row):
                continue
            if alive:  # it holds the port but would not hand it over: replace it
                supervisor.adopt(row.pid).kill()
            store.delete_process(row.process_id)
            continue
        if _adopt_replica(row, alive, store, registry, supervisor, ledger, now):
            out.adopted += 1
    _keep_autoscaled_scale(registry)
    return out


def _adopt_replica(row: ProcessRow, alive: bool, store: Store, registry: Registry, supervisor: Supervisor,
                   ledger: Ledger, now: float) -> bool:
    info = row.info
    dep = registry.deployment(str(info.get("app")), str(info.get("deployment")))
    # Gangs are not adopted (their ranks rendezvous once): they are started afresh.
    if not alive or dep is None or row.role == "rank" or info.get("gang"):
        if alive:
            supervisor.adopt(row.pid).kill()
        store.delete_process(row.process_id)
        return False
    gpus = tuple(int(g) for g in info.get("gpus", ()))
    placement = ledger.place(row.process_id, Request.of(dep.spec.config.ray_actor_options), pin=gpus)
    if isinstance(placement, Pending):
        logger.warning("adopted replica %s does not fit the resources any more: %s", row.process_id, placement.reason)
    registry.add(ReplicaRecord(
        row.process_id, str(info["app"]), str(info["deployment"]), str(info["version"]), str(info["socket_path"]),
        supervisor.adopt(row.pid), started_at=now, serves_http=bool(info.get("serves_http")), gpus=gpus,
        adopted=True, adopt_deadline=now + ADOPT_WAIT_S, replica_rank=int(info.get("rank", -1))))
    return True


def _keep_autoscaled_scale(registry: Registry) -> None:
    """Autoscaled deployments keep the scale they had."""
    for app in registry.apps.values():
        for name, dep in app.deployments.items():
            if dep.autoscaler is None:
                continue
            n = sum(1 for r in registry.of(app.spec.name, name) if r.version == dep.version)
            if n:
                cfg = dep.autoscaler.config
                dep.target = dep.autoscaler.target = min(max(n, cfg.min_replicas), cfg.max_replicas)


def restored_apps(registry: Registry) -> int:
    return sum(1 for k in registry.apps if not AppKey.parse(k).is_canary)
