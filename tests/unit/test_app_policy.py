"""Application-level autoscaling policies (Ray's ``applications[].autoscaling_policy``): one call
over every autoscaling deployment's context, decisions and state per deployment, failures that
keep every target, and the config-file field that carries the policy to the app spec."""

from __future__ import annotations

from typing import Any

import pytest

from shoal import serve
from shoal.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy, DeploymentID
from shoal.deployment import build_app_spec
from shoal.exceptions import PolicyLoadError
from shoal.loader import build_application
from shoal.schema import ServeApplicationSchema, ServeDeploySchema
from shoal.serving.app_policy import AppPolicy, DeploymentInput
from shoal.serving.autoscaling import Autoscaler

NO_DELAY: dict[str, Any] = {"upscale_delay_s": 0.0, "downscale_delay_s": 0.0}


def scaler(name: str, lo: int = 1, hi: int = 10, target: int = 1) -> Autoscaler:
    return Autoscaler(AutoscalingConfig(min_replicas=lo, max_replicas=hi, **NO_DELAY), name, "app", target)


def inputs(*scalers: Autoscaler) -> dict[str, DeploymentInput]:
    return {s.deployment_name: DeploymentInput(s, s.target, [f"{s.deployment_name}#{i}" for i in range(s.target)])
            for s in scalers}


def coordinated(contexts: dict[DeploymentID, AutoscalingContext]) -> tuple[dict[DeploymentID, int], dict[Any, Any]]:
    pre = next(d for d in contexts if d.name == "Pre")
    model = next(d for d in contexts if d.name == "Model")
    n = max(1, int(contexts[pre].total_num_requests // 10))
    return {pre: n, model: 2 * n}, {}


def test_one_call_sees_every_deployment_and_decides_for_each() -> None:
    pre, model = scaler("Pre"), scaler("Model", hi=5)
    pre.record(0.0, 30.0)
    policy = AppPolicy("app", AutoscalingPolicy(policy_function=coordinated))
    assert policy.decide(1.0, inputs(pre, model)) == {"Pre": 3, "Model": 5}  # 6 clamped to Model's max 5
    assert (pre.target, model.target) == (3, 5)
    assert policy.last_error is None and pre.last_error is None


def test_state_is_kept_per_deployment_and_names_work_as_keys() -> None:
    seen: list[dict[str, Any]] = []

    def counting(contexts: dict[DeploymentID, AutoscalingContext]) -> tuple[dict[Any, int], dict[Any, Any]]:
        seen.append({d.name: dict(c.policy_state) for d, c in contexts.items()})
        return ({d.name: c.current_num_replicas for d, c in contexts.items()},
                {d: {"calls": int(c.policy_state.get("calls", 0)) + 1} for d, c in contexts.items()})

    a, b = scaler("A"), scaler("B")
    policy = AppPolicy("app", AutoscalingPolicy(policy_function=counting))
    for t in range(3):
        policy.decide(float(t), inputs(a, b))
    assert [s["A"].get("calls") for s in seen] == [None, 1, 2]
    assert [s["B"].get("calls") for s in seen] == [None, 1, 2]


def test_a_deployment_left_out_keeps_its_target() -> None:
    a, b = scaler("A", target=2), scaler("B", target=3)

    def only_a(contexts: dict[DeploymentID, AutoscalingContext]) -> tuple[dict[Any, int], dict[Any, Any]]:
        return {next(d for d in contexts if d.name == "A"): 4}, {}

    assert AppPolicy("app", AutoscalingPolicy(policy_function=only_a)).decide(0.0, inputs(a, b)) == {"A": 4, "B": 3}


@pytest.mark.parametrize(("answer", "words"), [
    (5, "expected a (decisions, policy_state)"),
    (({"Nope": 2}, {}), "'Nope', which is not an autoscaling deployment"),
    (({"A": "two"}, {}), "num_replicas 'two'"),
    (([1], {}), "decisions of type list"),
    (({3: 1}, {}), "key of type int"),
])
def test_unusable_answers_keep_every_target_and_say_why(answer: object, words: str) -> None:
    a, b = scaler("A", target=2), scaler("B", target=2)
    policy = AppPolicy("app", AutoscalingPolicy(policy_function=lambda contexts: answer))
    out = policy.decide(0.0, inputs(a, b))
    assert out["B"] == 2
    assert out["A"] == 2
    message = a.last_error if policy.last_error is None else policy.last_error
    assert message is not None and words in message, message


def test_a_policy_that_raises_is_shown_on_every_deployment() -> None:
    a, b = scaler("A", target=2), scaler("B", target=1)

    def broken(contexts: dict[DeploymentID, AutoscalingContext]) -> Any:
        raise KeyError("metrics")

    policy = AppPolicy("app", AutoscalingPolicy(policy_function=broken))
    assert policy.decide(0.0, inputs(a, b)) == {"A": 2, "B": 1}
    for s in (a, b):
        assert s.last_error is not None and "raised KeyError" in s.last_error and "application 'app'" in s.last_error
    assert policy.error_count == 1


def test_a_policy_that_cannot_be_loaded_names_itself() -> None:
    with pytest.raises(PolicyLoadError, match="no_such_module_xyz"):
        AppPolicy("app", AutoscalingPolicy(policy_function="no_such_module_xyz:policy"))


@serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 4})
class Leaf:
    def __call__(self) -> str:
        return "leaf"


leaf_app = Leaf.bind()


def test_the_config_field_reaches_the_app_spec_and_leaves_the_imported_graph_alone() -> None:
    config = ServeDeploySchema.from_dict({"applications": [{
        "name": "coord", "import_path": f"{__name__}:leaf_app",
        "autoscaling_policy": {"policy_function": f"{__name__}:coordinated"},
    }]}, source="test")
    entry = config.applications[0]
    assert entry.autoscaling_policy == AutoscalingPolicy(policy_function=f"{__name__}:coordinated")
    spec = build_app_spec(build_application(entry, source="test"), entry.name, entry.route_prefix)
    assert spec.autoscaling_policy == entry.autoscaling_policy
    assert leaf_app._autoscaling_policy is None
    assert build_app_spec(leaf_app, "plain").autoscaling_policy is None
    # The bare string form, as for a deployment's policy.
    short = ServeApplicationSchema.model_validate({"import_path": "m:app", "autoscaling_policy": "m:policy"})
    assert short.autoscaling_policy == AutoscalingPolicy(policy_function="m:policy")
