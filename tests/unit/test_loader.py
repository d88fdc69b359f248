"""Importing applications named in config files, applying overrides, and `shoal build` output."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from shoal.config import AggregationFunction
from shoal.deployment import Application, Deployment
from shoal.loader import (
    apply_deployment_overrides,
    build_application,
    build_applications,
    build_config_dict,
    graph_deployments,
    import_attr,
)
from shoal.schema import ConfigError, DeploymentSchema, ServeApplicationSchema, ServeDeploySchema, load_config_file

REPO = Path(__file__).resolve().parents[2]
APPS = "tests.unit.fixtures.apps"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # import_attr puts the working directory on sys.path, as `serve run` does; undo it afterwards.
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def apps() -> ModuleType:
    import_attr(f"{APPS}:app")
    return sys.modules[APPS]


def app_entry(import_path: str, **fields: Any) -> ServeApplicationSchema:
    return ServeApplicationSchema.model_validate({"import_path": import_path, **fields})


def nodes_by_name(app: Application) -> dict[str, Application]:
    found: dict[str, Application] = {}

    def visit(value: Any) -> None:
        if isinstance(value, Application):
            found.setdefault(value.deployment.name, value)
            for v in (*value._args, *value._kwargs.values()):
                visit(v)
        elif isinstance(value, list | tuple):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    visit(app)
    return found


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


# --------------------------------------------------------------------------------------------
# import_attr
# --------------------------------------------------------------------------------------------


def test_import_attr_colon_form(apps: ModuleType) -> None:
    assert import_attr(f"{APPS}:app") is apps.app


def test_import_attr_dotted_form(apps: ModuleType) -> None:
    assert import_attr(f"{APPS}.app") is apps.app


def test_import_attr_nested_attribute(apps: ModuleType) -> None:
    assert import_attr(f"{APPS}:holder.app") is apps.app
    # Without ':' a shorter module is tried when the longer one does not exist.
    assert import_attr(f"{APPS}.holder.app") is apps.app


def test_import_attr_stdlib() -> None:
    assert import_attr("os.path:join") is os.path.join


def test_import_attr_missing_module_says_what_was_tried() -> None:
    with pytest.raises(ImportError) as info:
        import_attr("no_such_pkg_xyz.models.app")
    message = str(info.value)
    assert "cannot import 'no_such_pkg_xyz.models.app'" in message
    assert "no module named 'no_such_pkg_xyz'" in message
    assert "tried modules 'no_such_pkg_xyz.models', 'no_such_pkg_xyz'" in message
    assert str(REPO) in message


def test_import_attr_missing_submodule() -> None:
    with pytest.raises(ImportError, match=r"no module named 'tests\.unit\.fixtures\.nope' \(tried module 'tests"):
        import_attr("tests.unit.fixtures.nope:app")


def test_import_attr_missing_attribute_suggests(apps: ModuleType) -> None:
    with pytest.raises(AttributeError) as info:
        import_attr(f"{APPS}:ap")
    assert str(info.value) == (
        f"cannot import '{APPS}:ap': module '{APPS}' has no attribute 'ap' (did you mean 'app'?)"
    )


def test_import_attr_missing_nested_attribute(apps: ModuleType) -> None:
    with pytest.raises(AttributeError, match=rf"object '{APPS}\.holder' has no attribute 'nope'"):
        import_attr(f"{APPS}:holder.nope")


@pytest.mark.parametrize("bad", ["", "nocolon", "a:b:c", "a:", ":b", "a..b", "a b:c"])
def test_import_attr_malformed(bad: str) -> None:
    with pytest.raises(ImportError, match=r"expected 'module:attribute' or 'module\.attribute'"):
        import_attr(bad)


def test_import_attr_module_with_missing_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "shoal_test_needs_dep", "import shoal_test_missing_dependency_xyz\napp = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as info:
        import_attr("shoal_test_needs_dep:app")
    message = str(info.value)
    assert "importing module 'shoal_test_needs_dep' failed" in message
    assert "shoal_test_missing_dependency_xyz" in message
    assert "tried" not in message


def test_import_attr_module_that_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "shoal_test_raises", "raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="raised RuntimeError: boom at import") as info:
        import_attr("shoal_test_raises:app")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_import_attr_for_a_config_field_raises_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        import_attr("no_such_pkg_xyz:app", field="applications[1].import_path", source="serve.yaml")
    assert str(info.value).startswith(
        "serve.yaml: applications[1].import_path: cannot import 'no_such_pkg_xyz:app': no module named"
    )
    with pytest.raises(ConfigError, match=r"serve\.yaml: applications\[0\]\.import_path: .*has no attribute"):
        import_attr(f"{APPS}:nope", field="applications[0].import_path", source="serve.yaml")


def test_import_attr_adds_working_directory_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "shoal_test_cwd_mod", "value = 'from cwd'\n")
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", cwd)])
    assert import_attr("shoal_test_cwd_mod:value") == "from cwd"
    assert sys.path.count(cwd) == 1
    assert import_attr("shoal_test_cwd_mod.value") == "from cwd"
    assert sys.path.count(cwd) == 1


def test_import_attr_keeps_empty_entry_as_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", *[p for p in sys.path if p not in ("", os.getcwd())]])
    import_attr("os.path:join")
    assert os.getcwd() not in sys.path


# --------------------------------------------------------------------------------------------
# build_application
# --------------------------------------------------------------------------------------------


def test_bound_application_without_overrides(apps: ModuleType) -> None:
    built = build_application(app_entry(f"{APPS}:app"))
    # A copy (the imported object is never changed) that remembers where it came from.
    assert built is not apps.app and built.deployment is apps.app.deployment
    assert built._source == {"import_path": f"{APPS}:app", "args": {}} and apps.app._source is None


def test_bound_application_with_args_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        build_application(app_entry(f"{APPS}:app", args={"x": 1}), "serve.yaml", index=2)
    assert str(info.value).startswith("serve.yaml: applications[2].args: ")
    assert "application builder" in str(info.value)


def test_builder_with_plain_dict_args() -> None:
    app = build_application(app_entry(f"{APPS}:build_plain", args={"language": "german"}))
    assert app.deployment.name == "Summarizer"
    (translator,) = app._args
    assert isinstance(translator, Application)
    assert translator._args == ("german",)


def test_builder_with_pydantic_args() -> None:
    app = build_application(app_entry(f"{APPS}:build_typed", args={"language": "italian", "replicas": "3"}))
    translator = app._args[0]
    assert translator._args == ("italian",)
    assert translator.deployment.config.num_replicas == 3


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({}, "serve.yaml: applications[1].args.language: Field required"),
        ({"language": "it", "replicas": "x"}, "serve.yaml: applications[1].args.replicas: Input should be a valid"),
        ({"language": ["it"]}, "serve.yaml: applications[1].args.language: Input should be a valid string"),
    ],
)
def test_builder_args_validation_error_names_field(args: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_application(app_entry(f"{APPS}:build_typed", args=args), "serve.yaml", index=1)
    assert expected in str(info.value)


def test_builder_without_parameters() -> None:
    assert build_application(app_entry(f"{APPS}:build_no_params")).deployment.name == "Leaf"
    with pytest.raises(ConfigError, match=r"applications\[0\]\.args: .*takes no arguments"):
        build_application(app_entry(f"{APPS}:build_no_params", args={"a": 1}))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("build_returns_none", "returned NoneType, expected an Application"),
        ("build_returns_deployment", "returned Deployment, expected an Application (call Translator.bind(...)"),
        ("Translator", "is the deployment 'Translator', not an application; bind it"),
        ("not_an_app", "is a int; expected a bound application"),
        ("NotADeployment", "is a type; expected a bound application"),
    ],
)
def test_import_path_must_give_an_application(target: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_application(app_entry(f"{APPS}:{target}"), "serve.yaml")
    assert str(info.value).startswith("serve.yaml: applications[0].import_path: ")
    assert expected in str(info.value)


def test_unimportable_import_path_names_field() -> None:
    with pytest.raises(ConfigError, match=r"^serve\.yaml: applications\[3\]\.import_path: cannot import"):
        build_application(app_entry("no_such_pkg_xyz:app"), "serve.yaml", index=3)


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def test_overrides_applied_and_original_untouched(apps: ModuleType) -> None:
    entry = app_entry(
        f"{APPS}:app",
        deployments=[
            {"name": "Translator", "num_replicas": 5, "user_config": {"greeting": "hallo"}},
            {"name": "Summarizer", "max_ongoing_requests": 3, "ray_actor_options": {"num_gpus": 1}},
        ],
    )
    original_translator_config = apps.translator.deployment.config
    app = build_application(entry)

    assert app is not apps.app
    translator = app._args[0]
    assert translator is not apps.translator
    t_cfg = translator.deployment.config
    assert (t_cfg.num_replicas, t_cfg.user_config) == (5, {"greeting": "hallo"})
    # Options not named in the file keep the values from code.
    assert t_cfg.ray_actor_options.num_cpus == 0.5
    s_cfg = app.deployment.config
    assert (s_cfg.max_ongoing_requests, s_cfg.ray_actor_options.num_gpus) == (3, 1)
    # Constructor arguments and classes carry over.
    assert translator._args == apps.translator._args
    assert translator.deployment.func_or_class is apps.Translator.func_or_class

    # The imported objects are unchanged.
    assert apps.app._args[0] is apps.translator
    assert apps.translator.deployment.config is original_translator_config
    assert apps.translator.deployment.config.num_replicas == 2
    assert apps.app.deployment.config.max_ongoing_requests == 10
    assert apps.Translator.config.num_replicas == 2


def test_override_replaces_whole_nested_option() -> None:
    entry = app_entry(f"{APPS}:app", deployments=[{"name": "Translator", "ray_actor_options": {"num_gpus": 1}}])
    options = build_application(entry)._args[0].deployment.config.ray_actor_options
    assert (options.num_gpus, options.num_cpus) == (1, None)


def test_override_num_replicas_of_autoscaled_deployment() -> None:
    entry = app_entry(f"{APPS}:scaled_app", deployments=[{"name": "Scaled", "num_replicas": 4}])
    cfg = build_application(entry).deployment.config
    assert (cfg.num_replicas, cfg.autoscaling_config) == (4, None)


def test_override_autoscaling_of_fixed_deployment() -> None:
    entry = app_entry(
        f"{APPS}:app",
        deployments=[{"name": "Translator", "autoscaling_config": {"min_replicas": 0, "max_replicas": 6}}],
    )
    cfg = build_application(entry)._args[0].deployment.config
    assert cfg.num_replicas is None
    assert cfg.autoscaling_config is not None and cfg.autoscaling_config.max_replicas == 6


def test_overrides_after_builder() -> None:
    entry = app_entry(
        f"{APPS}:build_typed",
        args={"language": "fr", "replicas": 2},
        deployments=[{"name": "Translator", "num_replicas": 7}],
    )
    assert build_application(entry)._args[0].deployment.config.num_replicas == 7


def test_override_of_function_deployment(apps: ModuleType) -> None:
    entry = app_entry(f"{APPS}:function_app", deployments=[{"name": "preprocess", "num_replicas": 2}])
    app = build_application(entry)
    assert app.deployment.config.num_replicas == 2
    assert app.deployment.is_function
    assert apps.function_app.deployment.config.num_replicas is None


def test_unknown_override_lists_existing_deployments() -> None:
    entry = app_entry(
        f"{APPS}:app", name="text", deployments=[{"name": "Translator"}, {"name": "Sumarizer", "num_replicas": 2}]
    )
    with pytest.raises(ConfigError) as info:
        build_application(entry, "serve.yaml", index=1)
    assert str(info.value) == (
        "serve.yaml: applications[1].deployments[1].name: application 'text' has no deployment named 'Sumarizer' "
        "(did you mean 'Summarizer'?); its deployments are: 'Translator', 'Summarizer'"
    )


def test_override_rejected_by_deployment_names_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Deployment, **options: Any) -> Deployment:
        raise ValueError(f"invalid options for deployment {self.name!r}:\n  num_replicas: nope")

    monkeypatch.setattr(Deployment, "options", refuse)
    entry = app_entry(f"{APPS}:app", deployments=[{"name": "Summarizer"}, {"name": "Translator", "num_replicas": 2}])
    with pytest.raises(ConfigError) as info:
        build_application(entry, "serve.yaml")
    assert info.value.problems == [
        ("applications[0].deployments[0]", "invalid options for deployment 'Summarizer':\n  num_replicas: nope")
    ]


def test_shared_node_stays_shared(apps: ModuleType) -> None:
    entry = app_entry(
        f"{APPS}:shared_app",
        deployments=[{"name": "Leaf", "num_replicas": 3}, {"name": "preprocess", "max_ongoing_requests": 2}],
    )
    router = build_application(entry)
    routes = router._args[0]
    extra = router._kwargs["extra"]
    pair = router._kwargs["pair"]
    assert type(routes) is list and type(extra) is dict and type(pair) is tuple
    middle, leaf = routes
    assert middle._args[0] is leaf
    assert extra["leaf"] is leaf
    assert leaf.deployment.config.num_replicas == 3
    assert pair[0].deployment.config.max_ongoing_requests == 2
    assert pair[1] == 3
    # New nodes and containers; the originals still point at the original shared node.
    assert leaf is not apps.shared_leaf
    assert routes is not apps.shared_app._args[0]
    assert apps.shared_app._args[0][1] is apps.shared_leaf
    assert apps.middle._args[0] is apps.shared_leaf
    assert apps.shared_leaf.deployment.config.num_replicas is None


def test_same_deployment_bound_twice_gets_one_new_deployment(apps: ModuleType) -> None:
    leaf_a = apps.Leaf.bind()
    leaf_b = apps.Leaf.bind()
    root = apps.Router.bind([leaf_a, leaf_b], extra={})
    new = apply_deployment_overrides(root, [DeploymentSchema(name="Leaf", num_replicas=2)])
    a, b = new._args[0]
    assert a is not b
    assert a.deployment is b.deployment
    assert a.deployment.config.num_replicas == 2


def test_graph_deployments_order(apps: ModuleType) -> None:
    names = [d.name for d in graph_deployments(apps.shared_app)]
    assert names == ["Leaf", "Middle", "preprocess", "Router"]
    assert all(isinstance(d, Deployment) for d in graph_deployments(apps.app))


def test_build_applications_from_config_file(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            applications:
            - name: text
              route_prefix: /text
              import_path: {APPS}:app
              deployments:
              - name: Translator
                num_replicas: 4
            - name: typed
              route_prefix: /typed
              import_path: {APPS}.build_typed
              args: {{language: dutch, replicas: 2}}
            """
        )
    )
    text, typed = build_applications(load_config_file(path), str(path))
    assert text._args[0].deployment.config.num_replicas == 4
    assert typed._args[0]._args == ("dutch",)


def test_build_applications_error_names_index_and_file(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        f"applications:\n- {{name: a, route_prefix: /a, import_path: {APPS}:app}}\n"
        f"- {{name: b, route_prefix: /b, import_path: {APPS}:build_typed, args: {{replicas: 1}}}}\n"
    )
    with pytest.raises(ConfigError) as info:
        build_applications(load_config_file(path), str(path))
    assert str(info.value) == f"{path}: applications[1].args.language: Field required"


# --------------------------------------------------------------------------------------------
# build_config_dict (shoal build)
# --------------------------------------------------------------------------------------------


def test_build_config_dict_lists_every_deployment(apps: ModuleType) -> None:
    result = build_config_dict(apps.app, "text", "/text", f"{APPS}:app")
    assert result["http_options"] == {"host": "127.0.0.1", "port": 8000}
    (app,) = result["applications"]
    assert {k: app[k] for k in ("name", "route_prefix", "import_path", "args")} == {
        "name": "text",
        "route_prefix": "/text",
        "import_path": f"{APPS}:app",
        "args": {},
    }
    assert app["deployments"] == [
        {
            "name": "Translator",
            "num_replicas": 2,
            "ray_actor_options": {"num_cpus": 0.5},
            "user_config": {"greeting": "bonjour"},
        },
        {"name": "Summarizer", "max_ongoing_requests": 10},
    ]


def test_build_config_dict_is_json_and_yaml_friendly(apps: ModuleType) -> None:
    result = build_config_dict(apps.scaled_app, "scaled", None, f"{APPS}:scaled_app")
    (dep,) = result["applications"][0]["deployments"]
    assert dep["autoscaling_config"]["aggregation_function"] == "max"
    assert json.loads(json.dumps(result)) == result
    assert yaml.safe_load(yaml.safe_dump(result)) == result
    assert result["applications"][0]["route_prefix"] is None


@pytest.mark.parametrize("target", ["app", "shared_app", "scaled_app", "function_app"])
def test_build_config_dict_round_trips(apps: ModuleType, target: str, tmp_path: Path) -> None:
    original = getattr(apps, target)
    result = build_config_dict(original, "built", "/built", f"{APPS}:{target}")
    schema = ServeDeploySchema.model_validate(result)
    path = tmp_path / "built.yaml"
    path.write_text(yaml.safe_dump(result, sort_keys=False))
    assert load_config_file(path) == schema

    # Building from the generated file gives the same options as the code.
    (rebuilt,) = build_applications(schema, str(path))
    want = {d.name: d.config for d in graph_deployments(original)}
    got = {d.name: d.config for d in graph_deployments(rebuilt)}
    assert got == want
    assert rebuilt is not original


def test_build_config_dict_rejects_bad_route_prefix(apps: ModuleType) -> None:
    with pytest.raises(ValueError, match="route_prefix must start with '/'"):
        build_config_dict(apps.app, "x", "x", f"{APPS}:app")


def test_build_config_dict_rejects_two_deployments_with_one_name(apps: ModuleType) -> None:
    with pytest.raises(ValueError, match="binds two different deployments named 'Leaf'"):
        build_config_dict(apps.build_same_name_twice({}), "x", "/", f"{APPS}:build_same_name_twice")


def test_build_config_dict_needs_an_application(apps: ModuleType) -> None:
    with pytest.raises(TypeError, match="expected an Application"):
        build_config_dict(apps.Translator, "x", "/", f"{APPS}:Translator")


def test_aggregation_enum_survives_round_trip(apps: ModuleType) -> None:
    result = build_config_dict(apps.scaled_app, "s", "/", f"{APPS}:scaled_app")
    schema = ServeDeploySchema.model_validate(result)
    auto = schema.applications[0].deployments[0].autoscaling_config
    assert auto is not None and auto.aggregation_function is AggregationFunction.MAX
