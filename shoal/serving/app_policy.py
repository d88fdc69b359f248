"""Application-level autoscaling policies: one decision for every autoscaling deployment of an app.

Ray Serve's ``applications[].autoscaling_policy`` (config file only, as in Ray): the policy takes
``{DeploymentID: AutoscalingContext}`` (one context per deployment with an autoscaling config)
and returns ``(decisions, policy_state)``: ``decisions`` maps ``DeploymentID`` (or the
deployment's name) to a replica count, ``policy_state`` maps ``DeploymentID`` (or name) to the
state that deployment's context carries next time. A deployment the policy leaves out of
``decisions`` keeps its target. It takes precedence over deployment-level policies.

Each deployment's answer then goes through that deployment's :class:`Autoscaler` exactly as a
deployment-level custom policy's does (:meth:`Autoscaler.settle`: the config's delays and
factors, clamped to its bounds), so per-deployment status, errors and state work the same. The
control loop never fails because of the policy: if it raises or answers something unusable,
every deployment keeps its target and shows the error.

Pure: no clock, no processes; the caller passes ``now`` and the load inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.config import AutoscalingContext, AutoscalingPolicy, DeploymentID
from shoal.serving.autoscaling import Autoscaler, load_policy

__all__ = ["AppPolicy", "DeploymentInput"]


@dataclass(frozen=True)
class DeploymentInput:
    """One autoscaling deployment's inputs for a tick: its autoscaler (already fed this tick's
    load with :meth:`Autoscaler.record`) and its replicas (running and starting, and the running ones' ids)."""

    scaler: Autoscaler
    current_num_replicas: int
    running_replicas: Sequence[str]


class AppPolicy:
    """An application's policy, loaded once; :meth:`decide` runs it for one tick."""

    def __init__(self, app_name: str, policy: AutoscalingPolicy) -> None:
        """Raises :class:`~shoal.exceptions.PolicyLoadError` naming the policy when it cannot be loaded."""
        self.app_name = app_name
        self.policy = policy
        self._fn = load_policy(policy)
        self.last_error: str | None = None
        self.error_count = 0

    @property
    def name(self) -> str:
        return self.policy.name

    def same_policy(self, policy: AutoscalingPolicy | None) -> bool:
        return policy is not None and policy == self.policy

    def decide(self, now: float, inputs: Mapping[str, DeploymentInput]) -> dict[str, int]:
        """Run the policy once over ``inputs`` (deployment name → inputs) and return each
        deployment's new target. Never raises because of the policy."""
        contexts = {name: i.scaler.context(now, i.current_num_replicas, i.running_replicas)
                    for name, i in inputs.items()}
        by_id = {ctx.deployment_id: ctx for ctx in contexts.values()}
        try:
            answer = self._fn(by_id)  # type: ignore[arg-type]  # app-level policies take the dict
            decisions, states = self._parse(answer, set(contexts))
        except Exception as e:
            why = f"raised {type(e).__name__}: {e}" if not isinstance(e, _BadAppAnswer) else str(e)
            return self._fail(inputs, contexts, why)
        self.last_error = None
        out: dict[str, int] = {}
        for name, i in inputs.items():
            if name not in decisions:
                out[name] = i.scaler.target
                continue
            state = states.get(name, contexts[name].policy_state)
            out[name] = i.scaler.settle(contexts[name], (decisions[name], state))
        return out

    def _fail(self, inputs: Mapping[str, DeploymentInput], contexts: Mapping[str, AutoscalingContext],
              why: str) -> dict[str, int]:
        self.error_count += 1
        self.last_error = f"application autoscaling policy {self.name!r} {why}"
        label = f"{self.name!r} (application {self.app_name!r})"
        return {name: i.scaler.fail(contexts[name], why, policy_name=label) for name, i in inputs.items()}

    @staticmethod
    def _parse(answer: object, names: set[str]) -> tuple[dict[str, object], dict[str, Any]]:
        """``(decisions, states)`` keyed by deployment name, from the policy's answer."""
        if not isinstance(answer, tuple | list) or len(answer) != 2:
            raise _BadAppAnswer(f"returned {type(answer).__name__}; expected a (decisions, policy_state) "
                                "tuple of two dicts keyed by DeploymentID")
        decisions_raw, states_raw = answer
        if not isinstance(decisions_raw, Mapping):
            raise _BadAppAnswer(f"returned decisions of type {type(decisions_raw).__name__}; "
                                "expected a dict of DeploymentID to num_replicas")
        decisions = {_key(k, names, "decisions"): v for k, v in decisions_raw.items()}
        states: dict[str, Any] = {}
        if states_raw is not None:
            if not isinstance(states_raw, Mapping):
                raise _BadAppAnswer(f"returned a policy_state of type {type(states_raw).__name__}; "
                                    "expected a dict of DeploymentID to dict")
            for k, v in states_raw.items():
                if isinstance(k, DeploymentID | str) and _name_of(k) in names:
                    states[_name_of(k)] = v
            # Anything else in the state (Ray's examples return {} or per-deployment dicts) is ignored.
        return decisions, states


class _BadAppAnswer(Exception):
    """An application policy's answer that cannot be used."""


def _name_of(key: DeploymentID | str) -> str:
    return key.name if isinstance(key, DeploymentID) else key


def _key(key: object, names: set[str], where: str) -> str:
    if not isinstance(key, DeploymentID | str):
        raise _BadAppAnswer(f"returned a {where} key of type {type(key).__name__}; expected a DeploymentID")
    name = _name_of(key)
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise _BadAppAnswer(f"returned {where} for {name!r}, which is not an autoscaling deployment of this "
                            f"application (those are: {known})")
    return name


def load_app_policy(app_name: str, policy: AutoscalingPolicy | None,
                    previous: AppPolicy | None = None) -> AppPolicy | None:
    """The loaded policy of a (re)deployed app: the previous one when unchanged. Raises
    :class:`~shoal.exceptions.PolicyLoadError`."""
    if policy is None:
        return None
    if previous is not None and previous.same_policy(policy):
        return previous
    return AppPolicy(app_name, policy)
