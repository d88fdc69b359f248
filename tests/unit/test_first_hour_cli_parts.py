"""Unit parts of issue 19's CLI extras: `shoal run mod:build KEY=VALUE`, the `/docs` hint and
`shoal config`'s running configuration."""

from __future__ import annotations

import pytest
import yaml
from fastapi import FastAPI

from shoal import serve
from shoal.cli.config_cmd import render_config
from shoal.cli.main import api_docs_path, parse_builder_args
from shoal.config import HTTPOptions
from shoal.deployment import build_app_spec
from shoal.runtime.controller.running_config import running_config
from shoal.schema import ServeDeploySchema

api = FastAPI()
api_no_docs = FastAPI(docs_url=None)


@serve.deployment(num_replicas=2, max_ongoing_requests=7,
                  ray_actor_options={"runtime_env": {"env_vars": {"TOKEN": "s3cret"}}})
@serve.ingress(api)
class WithDocs:
    @api.get("/")
    def root(self) -> str:
        return "ok"


@serve.deployment
@serve.ingress(api_no_docs)
class NoDocs:
    pass


@serve.deployment
class Plain:
    def __call__(self) -> str:
        return "plain"


def test_builder_args_parse_key_value_pairs() -> None:
    assert parse_builder_args("m:build", ()) is None
    assert parse_builder_args("m:build", ("model=small", "prompt=a=b", "empty=")) == {
        "model": "small", "prompt": "a=b", "empty": ""}


@pytest.mark.parametrize(("pairs", "message"), [
    (("model",), r"'model' is not KEY=VALUE \(e.g. `shoal run m:build model=small`\)"),
    (("=x",), "is not KEY=VALUE"),
    (("a=1", "a=2"), "'a' is given twice"),
])
def test_bad_builder_args_are_named(pairs: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_builder_args("m:build", pairs)


def test_builder_args_with_a_config_file_point_at_args() -> None:
    with pytest.raises(ValueError, match=r"set them under the application's `args:` in serve.yaml"):
        parse_builder_args("serve.yaml", ("a=1",))


def test_api_docs_path_only_for_fastapi_ingress_with_docs() -> None:
    assert api_docs_path(WithDocs.bind()) == "/docs"
    assert api_docs_path(NoDocs.bind()) is None
    assert api_docs_path(Plain.bind()) is None


def test_running_config_is_a_deployable_config_without_secrets() -> None:
    from_file = WithDocs.bind()
    from_file._source = {"import_path": "pkg.mod:build", "args": {"model": "small"}}
    specs = [build_app_spec(from_file, "main", "/api"), build_app_spec(Plain.bind(), "scratch", "/scratch")]
    http = HTTPOptions(port=0, api_keys=["key-0123456789abcdef"], request_timeout_s=30)
    data = running_config(specs, http, 18001)
    assert data["http_options"] == {"request_timeout_s": 30.0, "host": "127.0.0.1", "port": 18001}
    assert data["notes"] == ["http_options.api_keys is set but not shown (a secret)"]
    assert data["from_python"] == ["scratch"]
    main, scratch = data["applications"]
    assert main["import_path"] == "pkg.mod:build" and main["args"] == {"model": "small"}
    assert main["route_prefix"] == "/api"
    (dep,) = main["deployments"]
    assert dep["name"] == "WithDocs" and dep["num_replicas"] == 2 and dep["max_ongoing_requests"] == 7
    assert dep["ray_actor_options"]["runtime_env"]["env_vars"] == {"TOKEN": "<set>"}
    assert "import_path" not in scratch
    text = render_config(data, "/run/x")
    assert "s3cret" not in text and "key-0123456789abcdef" not in text
    assert "# note: http_options.api_keys is set but not shown" in text
    assert "deployed from Python (serve.run), so without an import_path: scratch" in text
    doc = yaml.safe_load(text)
    # The file deploys as it is once the Python-only app is left out (it has no import path).
    doc["applications"] = [a for a in doc["applications"] if "import_path" in a]
    parsed = ServeDeploySchema.from_dict(doc, source="shoal config")
    assert parsed.applications[0].args == {"model": "small"}
    assert parsed.applications[0].deployments[0].num_replicas == 2


def test_render_config_with_nothing_deployed() -> None:
    text = render_config({"http_options": {"host": "127.0.0.1", "port": 8000}, "applications": [],
                          "from_python": [], "notes": []}, "/run/x")
    assert "# no applications are deployed" in text and yaml.safe_load(text)["applications"] == []
