"""The config-file schema: valid files, and readable errors naming the file and field path."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal.config import AggregationFunction, DeploymentConfig
from shoal.schema import (
    ConfigError,
    DeploymentSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
    format_error_path,
    load_config_file,
)

# The shape of Ray Serve's documented example config.
RAY_DOC_EXAMPLE = """\
proxy_location: EveryNode

http_options:
  host: 0.0.0.0
  port: 8000

applications:
- name: default
  route_prefix: /
  import_path: text_ml:app
  runtime_env:
    pip:
      - torch
      - transformers
  deployments:
  - name: Translator
    num_replicas: 1
    user_config:
      language: french
  - name: Summarizer
    num_replicas: 1
"""

FULL = """\
proxy_location: HeadOnly
http_options:
  host: 0.0.0.0
  port: 8123
  request_timeout_s: 30
  keep_alive_timeout_s: 10
grpc_options:
  port: 9000
  grpc_servicer_functions: []
logging_config:
  encoding: JSON
  log_level: debug
  logs_dir: null
  enable_access_log: false
target_capacity: 50
applications:
- name: app1
  route_prefix: /app1
  import_path: pkg.models:build
  args:
    model: small
    threshold: 0.5
  external_scaler_enabled: true
  logging_config:
    log_level: WARNING
  deployments:
  - name: Model
    num_replicas: auto
    autoscaling_config:
      min_replicas: 0
      max_replicas: 8
      target_ongoing_requests: 4
      aggregation_function: max
    max_ongoing_requests: 16
    max_queued_requests: 100
    user_config: {threshold: 0.9}
    health_check_period_s: 5
    health_check_timeout_s: 15
    graceful_shutdown_wait_loop_s: 1
    graceful_shutdown_timeout_s: 0
    ray_actor_options:
      num_cpus: 2
      num_gpus: 0.5
      resources: {accelerator: 1}
    logging_config:
      encoding: TEXT
  - name: Preprocess
- name: app2
  route_prefix: null
  import_path: pkg.other.app
"""


def base() -> dict[str, Any]:
    return {
        "applications": [
            {
                "name": "app1",
                "route_prefix": "/app1",
                "import_path": "pkg.mod:app",
                "deployments": [{"name": "A", "num_replicas": 1}, {"name": "B"}],
            },
            {"name": "app2", "route_prefix": "/app2", "import_path": "pkg.mod.other"},
        ]
    }


def errors_of(data: Any, source: str = "serve.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        ServeDeploySchema.from_dict(data, source=source)
    return str(info.value)


def write(tmp_path: Path, text: str, name: str = "serve.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Valid files
# --------------------------------------------------------------------------------------------


def test_ray_documented_example_loads(tmp_path: Path) -> None:
    cfg = load_config_file(write(tmp_path, RAY_DOC_EXAMPLE))
    assert cfg.proxy_location == "EveryNode"
    assert (cfg.http_options.host, cfg.http_options.port) == ("0.0.0.0", 8000)
    (app,) = cfg.applications
    assert (app.name, app.route_prefix, app.import_path) == ("default", "/", "text_ml:app")
    assert app.runtime_env == {"pip": ["torch", "transformers"]}
    assert [d.name for d in app.deployments] == ["Translator", "Summarizer"]
    assert app.deployment_overrides() == {
        "Translator": {"num_replicas": 1, "user_config": {"language": "french"}},
        "Summarizer": {"num_replicas": 1},
    }


def test_full_config_loads(tmp_path: Path) -> None:
    cfg = load_config_file(write(tmp_path, FULL))
    assert cfg.proxy_location == "HeadOnly"
    assert cfg.http_options.port == 8123
    assert cfg.http_options.request_timeout_s == 30
    assert cfg.grpc_options.port == 9000 and cfg.grpc_options.grpc_servicer_functions == []
    assert cfg.logging_config is not None and cfg.logging_config.log_level == "DEBUG"
    assert cfg.target_capacity == 50
    app1, app2 = cfg.applications
    assert app1.args == {"model": "small", "threshold": 0.5}
    assert app1.external_scaler_enabled is True
    assert app1.logging_config is not None and app1.logging_config.log_level == "WARNING"
    model, pre = app1.deployments
    assert model.num_replicas == "auto"
    assert model.autoscaling_config is not None
    assert model.autoscaling_config.aggregation_function is AggregationFunction.MAX
    assert model.ray_actor_options is not None and model.ray_actor_options.num_gpus == 0.5
    assert model.options()["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5, "resources": {"accelerator": 1}}
    assert model.options()["graceful_shutdown_timeout_s"] == 0
    # Only what is written counts as an override; nested models keep only their given keys.
    assert set(model.options()) == set(model.model_fields_set) - {"name"}
    assert model.options()["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 8,
        "target_ongoing_requests": 4,
        "aggregation_function": AggregationFunction.MAX,
    }
    assert pre.options() == {}
    assert app2.route_prefix is None
    assert app2.import_path == "pkg.other.app"
    # Overrides are valid DeploymentConfig input.
    DeploymentConfig(**model.options())


def test_defaults() -> None:
    cfg = ServeDeploySchema.from_dict({"applications": [{"import_path": "m:app"}]})
    assert cfg.proxy_location == "EveryNode"
    assert (cfg.http_options.host, cfg.http_options.port) == ("127.0.0.1", 8000)
    assert not cfg.grpc_options.enabled and cfg.logging_config is None
    (app,) = cfg.applications
    assert (app.name, app.route_prefix, app.args, app.deployments) == ("default", "/", {}, [])
    assert app.runtime_env == {} and app.external_scaler_enabled is False and app.logging_config is None


def test_explicit_null_for_nullable_options_is_an_override() -> None:
    dep = DeploymentSchema(name="A", user_config=None, num_replicas=None)
    assert dep.options() == {"user_config": None, "num_replicas": None}


@pytest.mark.parametrize("location", ["Disabled", "HeadOnly", "EveryNode"])
def test_proxy_locations(location: str) -> None:
    data = base() | {"proxy_location": location}
    assert ServeDeploySchema.from_dict(data).proxy_location == location


def test_several_apps_without_route_prefix() -> None:
    data = base()
    for app in data["applications"]:
        app["route_prefix"] = None
    assert [a.route_prefix for a in ServeDeploySchema.from_dict(data).applications] == [None, None]


def test_json_file(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(base()), "serve.json")
    assert [a.name for a in load_config_file(path).applications] == ["app1", "app2"]


def test_yaml_anchors_and_merge_keys_allowed(tmp_path: Path) -> None:
    text = """\
defaults: &d {num_replicas: 2, max_ongoing_requests: 7}
applications:
- import_path: m:app
  deployments:
  - <<: *d
    name: A
    num_replicas: 3
"""
    with pytest.raises(ConfigError, match="defaults: unknown field"):
        load_config_file(write(tmp_path, text))
    cfg = load_config_file(write(tmp_path, text.split("\n", 1)[1].replace("<<: *d", "<<: {max_ongoing_requests: 7}")))
    assert cfg.applications[0].deployments[0].options() == {"num_replicas": 3, "max_ongoing_requests": 7}


def test_application_lookup() -> None:
    cfg = ServeDeploySchema.from_dict(base())
    assert cfg.application("app2").import_path == "pkg.mod.other"
    with pytest.raises(KeyError):
        cfg.application("nope")


def test_deployment_schema_covers_every_deployment_option() -> None:
    assert set(DeploymentSchema.model_fields) == {"name"} | set(DeploymentConfig.model_fields)


def test_json_schema_is_generated() -> None:
    schema = ServeDeploySchema.model_json_schema()
    assert "applications" in schema["properties"]
    assert schema["required"] == ["applications"]


def test_models_can_be_used_directly() -> None:
    app = ServeApplicationSchema(import_path="m:app", deployments=[DeploymentSchema(name="A", num_replicas=3)])
    assert app.deployment_overrides() == {"A": {"num_replicas": 3}}


# --------------------------------------------------------------------------------------------
# Errors name the file and the field path
# --------------------------------------------------------------------------------------------


def mutate(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(base())
    target: Any = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(base() | {"bogus": 1}, "serve.yaml: bogus: unknown field", id="unknown-top-level"),
        pytest.param(
            base() | {"http_option": {}},
            "serve.yaml: http_option: unknown field (did you mean 'http_options'?)",
            id="top-level-typo",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 1, "num_replica"), 2),
            "serve.yaml: applications[0].deployments[1].num_replica: unknown field (did you mean 'num_replicas'?)",
            id="unknown-deployment-field",
        ),
        pytest.param(
            mutate(("applications", 1, "improt_path"), "x:y"),
            "serve.yaml: applications[1].improt_path: unknown field (did you mean 'import_path'?)",
            id="unknown-app-field",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 1, "num_replicas"), -1),
            "serve.yaml: applications[0].deployments[1].num_replicas: Input should be greater than 0 (got -1)",
            id="negative-num-replicas",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 0, "num_replicas"), 0),
            "serve.yaml: applications[0].deployments[0].num_replicas: Input should be greater than 0 (got 0)",
            id="zero-num-replicas",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 0, "num_replicas"), "many"),
            "applications[0].deployments[0].num_replicas: Input should be a valid integer or 'auto' (got 'many')",
            id="num-replicas-bad-string",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 0, "max_ongoing_requests"), "lots"),
            "serve.yaml: applications[0].deployments[0].max_ongoing_requests: Input should be a valid integer",
            id="bad-type",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 0, "max_ongoing_requests"), None),
            "applications[0].deployments[0].max_ongoing_requests: Input should be a valid integer (got None)",
            id="null-for-non-nullable",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 0, "max_queued_requests"), 0),
            "applications[0].deployments[0].max_queued_requests: max_queued_requests must be -1",
            id="config-field-validator",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 0, "ray_actor_options"), {"num_gpu": 1}),
            "serve.yaml: applications[0].deployments[0].ray_actor_options.num_gpu: unknown field "
            "(did you mean 'num_gpus'?)",
            id="unknown-ray-actor-option",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 0, "ray_actor_options"), {"resources": {"GPU-x": -1}}),
            "applications[0].deployments[0].ray_actor_options.resources.GPU-x: Input should be greater than or equal",
            id="dict-key-in-path",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 0, "autoscaling_config"), {"max_replicas": 3}),
            "applications[0].deployments[0]: num_replicas and autoscaling_config cannot both be set",
            id="replicas-and-autoscaling",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 1, "autoscaling_config"), {"min_replicas": 5, "max_replicas": 2}),
            "applications[0].deployments[1].autoscaling_config: min_replicas must be less than or equal to max_",
            id="autoscaling-bounds",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 1, "logging_config"), {"log_level": "LOUD"}),
            "applications[0].deployments[1].logging_config.log_level: unknown log level 'LOUD'",
            id="log-level",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 1, "name"), "A"),
            "serve.yaml: applications[0].deployments[1].name: deployment 'A' is listed twice (also at deployments[0])",
            id="duplicate-deployment",
        ),
        pytest.param(
            mutate(("applications", 1, "name"), "app1"),
            "serve.yaml: applications[1].name: application name 'app1' is used twice (also by applications[0])",
            id="duplicate-app-name",
        ),
        pytest.param(
            mutate(("applications", 1, "route_prefix"), "/app1"),
            "serve.yaml: applications[1].route_prefix: route_prefix '/app1' is used twice (also by applications[0])",
            id="duplicate-route-prefix",
        ),
        pytest.param(
            mutate(("applications", 1, "route_prefix"), "app2"),
            "serve.yaml: applications[1].route_prefix: route_prefix must start with '/', got 'app2'",
            id="route-prefix-no-slash",
        ),
        pytest.param(
            mutate(("applications", 1, "route_prefix"), "/app2/"),
            "serve.yaml: applications[1].route_prefix: route_prefix must not end with '/'",
            id="route-prefix-trailing-slash",
        ),
        pytest.param(
            mutate(("applications", 0, "import_path"), "nocolon"),
            "serve.yaml: applications[0].import_path: import_path names no attribute",
            id="import-path-no-attr",
        ),
        pytest.param(
            mutate(("applications", 0, "import_path"), "a:b:c"),
            "applications[0].import_path: import_path may contain at most one ':'",
            id="import-path-two-colons",
        ),
        pytest.param(
            mutate(("applications", 0, "import_path"), "a: b"),
            "applications[0].import_path: import_path must not be empty or contain whitespace",
            id="import-path-space",
        ),
        pytest.param(
            mutate(("applications", 0, "import_path"), "a..b"),
            "applications[0].import_path: import_path has an empty or invalid name segment",
            id="import-path-empty-segment",
        ),
        pytest.param(
            mutate(("applications", 0, "import_path"), 5),
            "applications[0].import_path: Input should be a valid string (got 5)",
            id="import-path-type",
        ),
        pytest.param(
            {"applications": [{"name": "x"}]},
            "serve.yaml: applications[0].import_path: Field required",
            id="missing-import-path",
        ),
        pytest.param(
            mutate(("applications", 0, "args"), [1, 2]),
            "applications[0].args: Input should be a valid dictionary",
            id="args-not-a-dict",
        ),
        pytest.param(
            mutate(("applications", 0, "deployments", 0, "name"), ""),
            "applications[0].deployments[0].name: deployment name must not be empty",
            id="empty-deployment-name",
        ),
        pytest.param(
            base() | {"proxy_location": "Everywhere"},
            "serve.yaml: proxy_location: Input should be 'Disabled', 'HeadOnly' or 'EveryNode' (got 'Everywhere')",
            id="proxy-location",
        ),
        pytest.param(
            base() | {"http_options": {"port": 70000}},
            "serve.yaml: http_options.port: Input should be less than or equal to 65535 (got 70000)",
            id="http-port",
        ),
        pytest.param(
            base() | {"http_options": {"hots": "0.0.0.0"}},
            "serve.yaml: http_options.hots: unknown field (did you mean 'host'?)",
            id="http-typo",
        ),
        pytest.param(
            base() | {"target_capacity": 150},
            "serve.yaml: target_capacity: Input should be less than or equal to 100",
            id="target-capacity",
        ),
        pytest.param({"applications": []}, "serve.yaml: applications: List should have at least 1 item", id="no-apps"),
        pytest.param({"proxy_location": "HeadOnly"}, "serve.yaml: applications: Field required", id="apps-missing"),
        pytest.param(
            [1, 2], "serve.yaml: the config must be a mapping with an 'applications' list, got list", id="list"
        ),
        pytest.param(None, "serve.yaml: the config is empty", id="empty"),
        pytest.param(
            {"import_path": "m:app", "route_prefix": "/"},
            "serve.yaml: this looks like a single-application config",
            id="single-app-format",
        ),
    ],
)
def test_errors_name_file_and_field(data: Any, expected: str) -> None:
    message = errors_of(data)
    assert expected in message
    assert all(line.startswith("serve.yaml: ") for line in message.splitlines())


def test_all_problems_reported_at_once() -> None:
    data = mutate(("applications", 0, "deployments", 0, "num_replicas"), -3)
    data["applications"][0]["deployments"][1]["max_ongoing_requests"] = "x"
    data["applications"][1]["route_prefix"] = "bad"
    data["unknown"] = True
    with pytest.raises(ConfigError) as info:
        ServeDeploySchema.from_dict(data, source="cfg.yaml")
    paths = [path for path, _ in info.value.problems]
    assert paths == [
        "applications[0].deployments[0].num_replicas",
        "applications[0].deployments[1].max_ongoing_requests",
        "applications[1].route_prefix",
        "unknown",
    ]
    assert info.value.source == "cfg.yaml"
    assert len(str(info.value).splitlines()) == 4


def test_config_error_is_value_error_and_pickles() -> None:
    err = ConfigError("serve.yaml", [("applications[0].name", "bad"), ("", "whole file")])
    assert isinstance(err, ValueError)
    assert str(err) == "serve.yaml: applications[0].name: bad\nserve.yaml: whole file"
    again = pickle.loads(pickle.dumps(err))
    assert (again.source, again.problems, str(again)) == (err.source, err.problems, str(err))
    assert str(ConfigError("f", "just text")) == "f: just text"


def test_format_error_path() -> None:
    assert format_error_path(["applications", 0, "deployments", 1, "num_replicas"]) == (
        "applications[0].deployments[1].num_replicas"
    )
    assert format_error_path(["args", "my key"]) == "args['my key']"
    assert format_error_path([]) == ""


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def test_schema_error_from_file_names_the_file(tmp_path: Path) -> None:
    text = RAY_DOC_EXAMPLE.replace(
        "  - name: Summarizer\n    num_replicas: 1", "  - name: Summarizer\n    num_replicas: -1"
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == (
        f"{path}: applications[0].deployments[1].num_replicas: Input should be greater than 0 (got -1)"
    )
    assert info.value.source == str(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "applications:\n- name: a\n  import_path: m:app\n   route_prefix: /x\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 4, column ")
    assert "invalid YAML" in message


def test_yaml_unclosed_bracket(tmp_path: Path) -> None:
    path = write(tmp_path, "applications: [\n  {import_path: m:app}\n")
    with pytest.raises(ConfigError, match=r"serve\.yaml: line \d+, column \d+: invalid YAML"):
        load_config_file(path)


def test_yaml_duplicate_key_is_an_error(tmp_path: Path) -> None:
    text = (
        "applications:\n- import_path: m:app\n  deployments:\n  - name: A\n    num_replicas: 1\n    num_replicas: 2\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert f"{path}: line 6, column 5: invalid YAML" in str(info.value)
    assert "duplicate key 'num_replicas'" in str(info.value)


def test_json_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '{"applications": [\n  {"import_path": "m:app",}\n]}', "serve.json")
    with pytest.raises(ConfigError, match=r"serve\.json: line 2, column \d+: invalid JSON"):
        load_config_file(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == f"{path}: no such file"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config_file(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"serve\.yaml: the config is empty"):
        load_config_file(write(tmp_path, "# nothing yet\n"))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_bytes(b"applications: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config_file(path)


def test_yaml_round_trip_of_a_dump(tmp_path: Path) -> None:
    cfg = load_config_file(write(tmp_path, FULL))
    dumped = cfg.model_dump(mode="json", exclude_unset=True)
    again = load_config_file(write(tmp_path, yaml.safe_dump(dumped), "again.yaml"))
    assert again == cfg
