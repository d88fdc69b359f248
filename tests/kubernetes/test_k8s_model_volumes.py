"""``--model-volume``: read-only PersistentVolumeClaims and image volumes in a deployment's pods (and
every rank of a gang), what is refused, how they validate, and what ``doctor`` says of image volumes."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from click.testing import CliRunner

from shoal.exceptions import CompileError
from shoal.kubernetes import cli as k8s_cli
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.compiler.volumes import parse_model_volumes
from shoal.kubernetes.doctor import diagnose
from shoal.kubernetes.targets import LoadedApp, load_apps
from shoal.kubernetes.validate import has_image_volume, restricted_violations, validate_object, validate_objects
from tests.kubernetes.k8s_fake_api import FakeCluster, platform

Obj = dict[str, Any]
OPTS = CompileOptions(namespace="ml", image="registry.example.com/demo:1", version="v1",
                      gpu_resource="nvidia.com/gpu.shared")
IMAGE = "registry.example.com:5000/models/llama:v1"


@pytest.fixture(scope="module")
def demo() -> LoadedApp:
    return load_apps("tests.kubernetes.k8s_demo_app:app")[0][0]


@pytest.fixture(scope="module")
def gang() -> LoadedApp:
    return load_apps("tests.kubernetes.k8s_gang_app:pipeline")[0][0]


def build(app: LoadedApp, *volumes: str, **changes: Any) -> list[Obj]:
    return compile_apps([(app.spec, app.entry)], dataclasses.replace(OPTS, model_volumes=volumes, **changes)).objects


def pod_spec(objs: list[Obj], name: str) -> Obj:
    (dep,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == name]
    return dep["spec"]["template"]["spec"]


def test_pvc_and_image_volumes_mount_read_only(demo: LoadedApp) -> None:
    objs = build(demo, "Model=pvc:llama-weights", f"Model=image:{IMAGE}:/opt/tokenizer")
    spec = pod_spec(objs, "default-model")
    assert spec["volumes"][-2:] == [
        {"name": "models", "persistentVolumeClaim": {"claimName": "llama-weights", "readOnly": True}},
        {"name": "models-2", "image": {"reference": IMAGE, "pullPolicy": "IfNotPresent"}},
    ]
    assert spec["containers"][0]["volumeMounts"][-2:] == [
        {"name": "models", "mountPath": "/models", "readOnly": True},
        {"name": "models-2", "mountPath": "/opt/tokenizer", "readOnly": True},
    ]
    assert restricted_violations(spec) == []  # PVCs and (since 1.33) image volumes are "restricted"
    # Only that deployment; its environment (HF_HOME's parents, the caches) is unchanged.
    plain = build(demo)
    assert "models" not in str(pod_spec(objs, "default-api")["volumes"])
    assert spec["containers"][0]["env"] == pod_spec(plain, "default-model")["containers"][0]["env"]
    validate_objects(objs)  # an image volume: validated against Kubernetes 1.33, where it is beta
    assert has_image_volume(objs) and not has_image_volume(plain)
    for version in ("1.30.0", "1.33.0", "1.37.0"):
        assert all(validate_object(o, version) for o in objs)
    # A PVC alone validates against 1.30 as it is.
    assert validate_object(next(o for o in build(demo, "Model=pvc:w") if o["kind"] == "Deployment"),
                           "1.30.0") == "kubernetes 1.30"


def test_every_rank_of_a_gang_gets_the_volume(gang: LoadedApp) -> None:
    objs = build(gang, "TPLinear=pvc:weights:/weights")
    (lws,) = [o for o in objs if o["kind"] == "LeaderWorkerSet"]
    template = lws["spec"]["leaderWorkerTemplate"]
    for which in ("leaderTemplate", "workerTemplate"):
        spec = template[which]["spec"]
        volume = {"name": "models", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
        assert volume in spec["volumes"]
        assert {"name": "models", "mountPath": "/weights", "readOnly": True} in spec["containers"][0]["volumeMounts"]
    validate_objects(objs)


def test_references_and_paths() -> None:
    (v,) = parse_model_volumes([f"Model=image:{IMAGE}"])
    assert (v.kind, v.source, v.mount) == ("image", IMAGE, "/models")
    digest = "ghcr.io/acme/weights@sha256:" + "a" * 64
    (v,) = parse_model_volumes([f"Model=image:{digest}:/w/llama-3"])
    assert (v.source, v.mount) == (digest, "/w/llama-3")
    (v,) = parse_model_volumes(["My Model=pvc:weights.v2"])
    assert (v.deployment, v.source) == ("My Model", "weights.v2")


@pytest.mark.parametrize("value, message", [
    ("Model", "expected DEPLOYMENT=pvc:CLAIM[:/mount/path]"),
    ("Model=nfs:server", "expected DEPLOYMENT=pvc:CLAIM"),
    ("=pvc:weights", "expected DEPLOYMENT=pvc:CLAIM"),
    ("Model=pvc:", "expected DEPLOYMENT=pvc:CLAIM"),
    ("Model=pvc:Weights_1", "'Weights_1' is not a PersistentVolumeClaim name"),
    ("Model=image:bad ref", "is not an image reference"),
    ("Model=pvc:w:/models/", "mount path '/models/' must be absolute"),
    ("Model=pvc:w:/a/../etc", "must be absolute, without '..'"),
    ("Model=pvc:w:/tmp", "meets shoal's own mount '/tmp'"),
    ("Model=pvc:w:/etc/shoal/models", "meets shoal's own mount '/etc/shoal'"),
    ("Model=pvc:w:/var/cache", "meets shoal's own mount '/var/cache/shoal'"),
])
def test_bad_values_name_the_option(demo: LoadedApp, value: str, message: str) -> None:
    with pytest.raises(CompileError, match="--model-volume .*" + re.escape(message)):
        build(demo, value)


def test_unknown_deployment_and_two_volumes_at_one_path(demo: LoadedApp) -> None:
    with pytest.raises(CompileError, match=re.escape("--model-volume 'Generator=pvc:w': no deployment named "
                                                     "'Generator' (deployments: Api, Model, Tokenizer)")):
        build(demo, "Generator=pvc:w")
    with pytest.raises(CompileError, match="mount two volumes at '/models' in deployment 'Model'"):
        build(demo, "Model=pvc:a", "Model=pvc:b")
    objs = build(demo, "Model=pvc:a", "Tokenizer=pvc:a")  # one claim, two deployments: fine
    assert "models" in str(pod_spec(objs, "default-tokenizer")["volumes"])


@pytest.mark.parametrize("version, status, said", [
    ("v1.31.4", "missing", "no beta image volumes"),
    ("v1.33.2", "unknown", "ImageVolume feature gate"),
    ("v1.35.0", "ok", "on by default from 1.35"),
])
def test_doctor_on_image_volumes(demo: LoadedApp, version: str, status: str, said: str) -> None:
    objs = build(demo, f"Model=image:{IMAGE}")
    findings = [f for f in diagnose(platform(FakeCluster(version=version)), objs, OPTS)
                if f.what.startswith("image volumes")]
    assert len(findings) == 1 and findings[0].status == status and said in findings[0].detail, findings
    assert not [f for f in diagnose(platform(FakeCluster(version=version)), build(demo, "Model=pvc:w"), OPTS)
                if f.what.startswith("image volumes")]


def test_cli_flag() -> None:
    res = CliRunner().invoke(k8s_cli.k8s, ["build", "tests.kubernetes.k8s_demo_app:app", "--image", "x:1",
                                           "--gpu-resource", "nvidia.com/gpu.shared", "--validate",
                                           "--model-volume", "Model=pvc:weights"])
    assert res.exit_code == 0, res.output
    assert "claimName: weights" in res.stdout
    res = CliRunner().invoke(k8s_cli.k8s, ["build", "tests.kubernetes.k8s_demo_app:app", "--image", "x:1",
                                           "--model-volume", "Nope=pvc:weights"])
    assert res.exit_code == 2 and "no deployment named 'Nope' (deployments: Api, Model, Tokenizer)" in res.output
