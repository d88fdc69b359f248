"""Migration from KubeRay: a RayService's serveConfigV2 compiles like a serve config file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from shoal.kubernetes import names
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.rayservice import load_rayservice, rayservice_config
from shoal.kubernetes.targets import load_apps
from shoal.kubernetes.validate import validate_objects
from shoal.schema import ConfigError

DATA = Path(__file__).parent / "data"
SEED = DATA / "seed_rayservice.yaml"


def test_seed_rayservice_config_reads_without_importing() -> None:
    config, source = load_rayservice(SEED)
    assert source.endswith("seed_rayservice.yaml: spec.serveConfigV2")
    (app,) = config.applications
    assert app.name == "rag" and app.import_path == "rag_app:app"
    assert app.deployment_overrides() == {"Generator": {"num_replicas": 2, "ray_actor_options": {"num_gpus": 1.0}}}


@pytest.fixture
def rag_app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The seed's import path, rag_app:app, as a module re-exporting the example app."""
    pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "rag_app.py").write_text("from examples.rag.app import app  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.rag
def test_seed_rayservice_compiles_with_its_overrides(rag_app_module: Path) -> None:
    apps, _ = load_apps(None, rayservice=str(SEED))
    (app,) = apps
    assert app.spec.name == "rag"
    objs = compile_apps([(a.spec, a.entry) for a in apps],
                        CompileOptions(namespace="rag", image="registry.example.com/rag:1", version="v1",
                                       gateway="web")).objects
    validate_objects(objs)
    deployments = {o["metadata"]["annotations"]["shoal.dev/deployment"]: o for o in objs if o["kind"] == "Deployment"}
    assert set(deployments) == {"RAGApp", "Retriever", "Embedder", "Generator"}
    gen = deployments["Generator"]
    assert gen["spec"]["replicas"] == 2
    assert gen["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for name, dep in deployments.items():
        if name != "Generator":
            assert dep["spec"]["replicas"] == 1
            assert "nvidia.com/gpu" not in dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert "import_path: rag_app:app" in cm["data"][names.CONFIG_FILE_NAME]
    assert "num_gpus: 1.0" in cm["data"][names.CONFIG_FILE_NAME]


def _config(docs: list[Any]) -> Any:
    return rayservice_config(docs, "rs.yaml")


def test_not_a_rayservice_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"rs.yaml: expected a RayService .* got kind 'Deployment'"):
        _config([{"apiVersion": "apps/v1", "kind": "Deployment"}])
    with pytest.raises(ConfigError, match=r"rs.yaml: the file is empty"):
        _config([None])
    with pytest.raises(ConfigError, match=r"got a list"):
        _config([[1, 2]])
    with pytest.raises(ConfigError, match=r"apiVersion: expected ray.io/v1"):
        _config([{"apiVersion": "v1", "kind": "RayService", "spec": {}}])


def test_rayservice_field_errors() -> None:
    base = {"apiVersion": "ray.io/v1", "kind": "RayService"}
    with pytest.raises(ConfigError, match=r"spec.serveConfigV2: missing"):
        _config([{**base, "spec": {}}])
    with pytest.raises(ConfigError, match=r"spec.serveConfig \(the v1 format\)"):
        _config([{**base, "spec": {"serveConfig": {}}}])
    with pytest.raises(ConfigError, match=r"rs.yaml: spec.serveConfigV2: line 2, column 1: invalid YAML"):
        _config([{**base, "spec": {"serveConfigV2": "applications: [\n"}}])
    with pytest.raises(ConfigError, match=r"rs.yaml: spec.serveConfigV2: applications\[0\].deployments\[0\]."
                                          "num_replicas"):
        _config([{**base, "spec": {"serveConfigV2": "applications:\n- import_path: a:b\n  deployments:\n"
                                                    "  - {name: X, num_replicas: -1}\n"}}])


def test_rayservice_among_other_documents(tmp_path: Path) -> None:
    path = tmp_path / "all.yaml"
    path.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n" + SEED.read_text())
    config, _ = load_rayservice(path)
    assert config.applications[0].name == "rag"
    with pytest.raises(ConfigError, match=r"no such file"):
        load_rayservice(tmp_path / "missing.yaml")


def test_rayservice_file_path_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "dep.yaml"
    path.write_text("apiVersion: apps/v1\nkind: Deployment\n")
    with pytest.raises(ConfigError) as e:
        load_rayservice(path)
    assert str(e.value).startswith(os.fspath(path))
