"""The scaler's pure core: load samples in, desired replica counts out.

One :class:`~shoal.serving.autoscaling.Autoscaler` per autoscaling deployment (the very code
local mode runs: the default policy or a custom one, delays, factors, bounds, scale to and from
zero). No clock, no sockets: every call takes ``now`` (monotonic seconds), which is what makes
it testable on a fake clock. The shell (:mod:`shoal.kubernetes.scaler.service`) scrapes the pods
and calls :meth:`ScalerCore.observe` then :meth:`ScalerCore.decide`; the HTTP server answers
KEDA from :meth:`ScalerCore.desired` and feeds :meth:`ScalerCore.demand`.

Load of a deployment, as local mode counts it: the requests in its replicas (their
``names.METRIC_ONGOING``) plus the requests callers hold for it (``names.METRIC_CALLER_QUEUED``
from every pod of the app, labelled by callee). Its running replicas are the pods that
answered. A demand signal (a caller holding a request for a deployment that has no pod) counts
as one held request until ``demand_hold_s`` has passed or a scrape sees the deployment's pods.

With an application-level policy (the config file's ``applications[].autoscaling_policy``),
:meth:`ScalerCore.decide` makes one call over every deployment's context, as local mode does
(:class:`~shoal.serving.app_policy.AppPolicy`), instead of each deployment's own policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.config import AutoscalingConfig
from shoal.serving.app_policy import AppPolicy, DeploymentInput
from shoal.serving.autoscaling import Autoscaler

__all__ = ["DEMAND_HOLD_S", "PodSample", "ScalerCore", "Scrape", "UnknownDeployment"]

# How long one demand signal counts as a held request without a scrape confirming it.
DEMAND_HOLD_S = 10.0


class UnknownDeployment(KeyError):
    """A deployment the scaler does not autoscale (the HTTP server answers 404)."""


@dataclass(frozen=True)
class PodSample:
    """What one pod's ``/metrics`` said.

    ``deployment``: the pod's own deployment; ``ongoing``: requests in it (None when it did not
    report any); ``queued``: requests it holds per callee deployment; ``custom``: the custom
    autoscaling metrics it reported (``record_autoscaling_stats``), if any.
    """

    pod: str
    deployment: str
    ongoing: float | None = None
    queued: Mapping[str, float] = field(default_factory=dict)
    custom: tuple[tuple[str, float], ...] = ()


@dataclass
class Scrape:
    """One round of scraping: the samples of the pods that answered, and per deployment how
    many pods did not answer and the last such error."""

    samples: list[PodSample] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class _State:
    """The scaler's view of one deployment between decisions."""

    autoscaler: Autoscaler
    running: tuple[str, ...] = ()
    load: float = 0.0
    queued: float = 0.0
    demand_at: float | None = None
    demands: int = 0
    unanswered: int = 0
    scrape_error: str | None = None
    observed_at: float | None = None


class ScalerCore:
    """Desired replicas of an application's autoscaling deployments (see the module docstring).

    ``configs``: each autoscaling deployment's resolved :class:`AutoscalingConfig`;
    ``initial``: the target per deployment until the first scrape (default: its
    ``initial_replicas``, else ``min_replicas``); the first scrape replaces it by the running pod
    count, within the bounds. Raises :class:`~shoal.exceptions.PolicyLoadError` when a custom policy
    cannot be loaded.
    """

    def __init__(self, app: str, configs: Mapping[str, AutoscalingConfig], *,
                 initial: Mapping[str, int] | None = None, demand_hold_s: float = DEMAND_HOLD_S,
                 policy: AppPolicy | None = None) -> None:
        if demand_hold_s <= 0:
            raise ValueError(f"demand_hold_s must be positive, got {demand_hold_s!r}")
        self.app = app
        self.policy = policy  # the application-level policy, if any
        self.demand_hold_s = demand_hold_s
        self._deps: dict[str, _State] = {}
        for name, cfg in configs.items():
            start = (initial or {}).get(name)
            if start is None:
                start = cfg.initial_replicas if cfg.initial_replicas is not None else cfg.min_replicas
            self._deps[name] = _State(Autoscaler(cfg, name, app, int(start)))

    @property
    def deployments(self) -> list[str]:
        return list(self._deps)

    def _state(self, deployment: str) -> _State:
        try:
            return self._deps[deployment]
        except KeyError:
            raise UnknownDeployment(deployment) from None

    def autoscaler(self, deployment: str) -> Autoscaler:
        return self._state(deployment).autoscaler

    def desired(self, deployment: str) -> int | None:
        """The replica count KEDA should run now; None before the first scrape (the scaler does not
        know yet what runs); UnknownDeployment if not autoscaled here."""
        st = self._state(deployment)
        return None if st.observed_at is None else st.autoscaler.target

    @property
    def observed(self) -> bool:
        """Whether a scrape was taken (before it, no desired count is answered)."""
        return all(st.observed_at is not None for st in self._deps.values())

    def demand(self, now: float, deployment: str) -> None:
        """A caller holds a request for ``deployment`` and finds no pod: count it as load now."""
        st = self._state(deployment)
        st.demand_at = now
        st.demands += 1

    def _demanded(self, st: _State, now: float) -> bool:
        return st.demand_at is not None and now - st.demand_at <= self.demand_hold_s and not st.running

    def observe(self, now: float, scrape: Scrape) -> None:
        """Take one scrape: each deployment's load, running pods and custom metrics."""
        load = {name: 0.0 for name in self._deps}
        queued = {name: 0.0 for name in self._deps}
        running: dict[str, list[str]] = {name: [] for name in self._deps}
        for s in scrape.samples:
            for callee, n in s.queued.items():
                if callee in queued and n > 0:
                    queued[callee] += n
            if s.deployment not in self._deps:
                continue
            running[s.deployment].append(s.pod)
            if s.ongoing is not None and s.ongoing > 0:
                load[s.deployment] += s.ongoing
            if s.custom:
                self._deps[s.deployment].autoscaler.record_custom(now, s.pod, s.custom)
        for name, st in self._deps.items():
            if st.observed_at is None:
                # A (re)started scaler takes over what runs now, not its config's starting point:
                # answering min_replicas before the first look would scale a loaded deployment down.
                cfg = st.autoscaler.config
                st.autoscaler.target = max(cfg.min_replicas, min(cfg.max_replicas, len(running[name])))
            st.running = tuple(sorted(running[name]))
            st.load = load[name] + queued[name]
            st.queued = queued[name]
            st.unanswered = scrape.failed.get(name, 0)
            st.scrape_error = scrape.errors.get(name)
            st.observed_at = now
            if st.running:
                st.demand_at = None  # pods answer: their callers' held requests are in the scrape

    def _record(self, now: float, st: _State) -> None:
        load, queued = st.load, st.queued
        if self._demanded(st, now):
            load, queued = max(load, 1.0), max(queued, 1.0)
        st.autoscaler.record(now, load, queued)

    def decide(self, now: float, only: Sequence[str] | None = None) -> dict[str, int]:
        """Record the load and run each deployment's policy (of ``only`` those); the new targets.
        An application-level policy always decides for every deployment at once."""
        if self.policy is not None:
            inputs: dict[str, DeploymentInput] = {}
            for name, st in self._deps.items():
                self._record(now, st)
                inputs[name] = DeploymentInput(st.autoscaler, len(st.running), st.running)
            return self.policy.decide(now, inputs)
        out: dict[str, int] = {}
        for name in (only if only is not None else list(self._deps)):
            st = self._state(name)
            self._record(now, st)
            out[name] = st.autoscaler.decide(now, len(st.running), st.running)
        return out

    def status(self, now: float) -> dict[str, Any]:
        """Every deployment's desired and current replicas, load and last errors (for ``/status``)."""
        deps: dict[str, Any] = {}
        for name, st in self._deps.items():
            auto = st.autoscaler
            pending = auto.pending
            deps[name] = {
                "desired": auto.target,
                "current": len(st.running),
                "load": st.load,
                "queued_in_callers": st.queued,
                "demand_pending": self._demanded(st, now),
                "demands": st.demands,
                "unanswered_pods": st.unanswered,
                "scrape_error": st.scrape_error,
                "policy_error": auto.last_error,
                "policy_errors": auto.error_count,
                "pending": None if pending is None else {"direction": pending.direction,
                                                          "for_s": max(0.0, now - pending.since)},
                "seconds_since_scrape": None if st.observed_at is None else max(0.0, now - st.observed_at),
                "min_replicas": auto.config.min_replicas,
                "max_replicas": auto.config.max_replicas,
            }
        return {"app": self.app, "deployments": deps}
