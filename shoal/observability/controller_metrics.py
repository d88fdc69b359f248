"""What the controller adds to a local instance's ``/metrics`` page (replica counts and states,
targets, autoscaling decisions), and the multiprocess directory it owns."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from shoal.observability.metric_defs import (
    APPLICATION_STATUS,
    APPLICATION_STATUS_CODES,
    AUTOSCALING_DECISIONS,
    AUTOSCALING_TARGET,
    AUTOSCALING_TOTAL_REQUESTS,
    BY_NAME,
    DEPLOYMENT_STATUS,
    DEPLOYMENT_STATUS_CODES,
    LOCAL_NAMESPACE,
    MULTIPROC_ENV,
    REPLICA_HEALTHY,
    REPLICA_STARTS,
    REPLICA_STATES,
    REPLICAS,
    TARGET,
)
from shoal.observability.multiproc import db_files, process_alive
from shoal.runtime.rundir import RunDir
from shoal.status import ApplicationStatus, DeploymentStatus, ReplicaState


class _ReplicaView(Protocol):
    """What the page reads of a replica (``controller.records.ReplicaRecord``)."""

    @property
    def replica_id(self) -> str: ...
    @property
    def app(self) -> str: ...
    @property
    def deployment(self) -> str: ...
    @property
    def state(self) -> ReplicaState: ...
    @property
    def health_failures(self) -> int: ...


class _DeploymentView(Protocol):
    """What the page reads of a deployment (``controller.records.DeploymentRecord``)."""

    @property
    def target(self) -> int: ...
    @property
    def status(self) -> DeploymentStatus: ...
    @property
    def autoscaler(self) -> object | None: ...


class _AppView(Protocol):
    """What the page reads of an application (``controller.records.AppRecord``)."""

    @property
    def status(self) -> ApplicationStatus: ...
    @property
    def deployments(self) -> Mapping[str, _DeploymentView]: ...


class ControllerView(Protocol):
    """What :meth:`ControllerMetrics.render` reads of the controller: its apps (by app key)
    and its replicas (by replica id)."""

    @property
    def apps(self) -> Mapping[str, _AppView]: ...
    @property
    def replicas(self) -> Mapping[str, _ReplicaView]: ...


class ControllerMetrics:
    """What the controller adds to the page, and the multiprocess directory it owns.

    Gauges are computed from the controller's state when the page asks (``render``); the few
    counters (replica starts, autoscaling decisions) are plain integers kept here.
    """

    def __init__(self, run_dir: str) -> None:
        self.directory = RunDir(run_dir).metrics_dir
        self.starts: dict[tuple[str, str], int] = {}
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.load: dict[tuple[str, str], float] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment every replica and proxy process starts with."""
        return {MULTIPROC_ENV: self.directory}

    def prepare(self) -> None:
        """Create the directory; forget the files of processes that no longer run (a previous
        instance in the same run dir), keeping those of processes a restarted controller adopts."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for path, _kind, _mode, pid in db_files(self.directory):
            if not process_alive(pid):
                try:
                    os.remove(path)
                except OSError:
                    pass

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def process_exited(self, pid: int) -> None:
        """A replica or proxy exited: its live gauges go (its counters stay)."""
        if not os.path.isdir(self.directory):
            return
        from prometheus_client.multiprocess import mark_process_dead

        try:
            mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]
        except OSError:
            pass

    def replica_started(self, app: str, deployment: str) -> None:
        key = (app, deployment)
        self.starts[key] = self.starts.get(key, 0) + 1

    def autoscale_tick(self, app: str, deployment: str, total_requests: float, old: int, new: int) -> None:
        """One autoscaling evaluation: the load it saw; a decision when the target changes."""
        self.load[(app, deployment)] = total_requests
        if new != old:
            key = (app, deployment, "up" if new > old else "down")
            self.decisions[key] = self.decisions.get(key, 0) + 1

    def render(self, controller: ControllerView) -> bytes:
        """The controller's metrics in the Prometheus text format. ``controller`` is the
        :class:`~shoal.runtime.controller.Controller` (read only)."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ControllerCollector(self, controller))
        return generate_latest(registry)


class _ControllerCollector:
    def __init__(self, owner: ControllerMetrics, controller: ControllerView) -> None:
        self.owner = owner
        self.controller = controller

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def family(name: str) -> Any:
            m = BY_NAME[name]
            cls = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
            return cls(m.name, m.help, labels=list(m.labels))

        ns = LOCAL_NAMESPACE
        ctl = self.controller
        replicas, target, healthy, auto_target = (family(REPLICAS), family(TARGET), family(REPLICA_HEALTHY),
                                                  family(AUTOSCALING_TARGET))
        load, dep_status, app_status = family(AUTOSCALING_TOTAL_REQUESTS), family(DEPLOYMENT_STATUS), \
            family(APPLICATION_STATUS)
        counts: dict[tuple[str, str], dict[str, int]] = {}
        for r in list(ctl.replicas.values()):
            state = str(r.state.value)
            by_state = counts.setdefault((r.app, r.deployment), {})
            by_state[state] = by_state.get(state, 0) + 1
            ok = state == "RUNNING" and not r.health_failures
            healthy.add_metric([r.app, r.app, r.deployment, r.replica_id, ns, r.replica_id], 1.0 if ok else 0.0)
        for key, app in list(ctl.apps.items()):
            app_status.add_metric([key, key, ns], float(APPLICATION_STATUS_CODES.get(str(app.status.value), 0)))
            for name, dep in list(app.deployments.items()):
                labels = [key, key, name]
                by_state = counts.get((key, name), {})
                for state in REPLICA_STATES:
                    replicas.add_metric([*labels, state, ns], float(by_state.get(state, 0)))
                target.add_metric([*labels, ns], float(dep.target))
                dep_status.add_metric([*labels, ns], float(DEPLOYMENT_STATUS_CODES.get(str(dep.status.value), 0)))
                if dep.autoscaler is not None:
                    auto_target.add_metric([*labels, ns], float(dep.target))
                    load.add_metric([*labels, ns], float(self.owner.load.get((key, name), 0.0)))
        yield from (replicas, target, healthy, auto_target, load, dep_status, app_status)
        starts = family(REPLICA_STARTS)
        for (a, d), n in sorted(self.owner.starts.items()):
            starts.add_metric([a, a, d, ns], float(n))
        yield starts
        decisions = family(AUTOSCALING_DECISIONS)
        for (a, d, direction), n in sorted(self.owner.decisions.items()):
            decisions.add_metric([a, a, d, direction, ns], float(n))
        yield decisions


