"""``--create-namespace``: the Namespace comes first in the build, labelled so that Pod Security
admission enforces the restricted profile (which every generated pod meets: test_k8s_compiler
checks each pod template), apply creates it before anything that lives in it and never prunes
it, and ``shoal k8s doctor`` does not report it missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from shoal.kubernetes import cli as k8s_cli
from shoal.kubernetes.cli import k8s
from shoal.kubernetes.compiler.common import PSA_LABELS
from shoal.kubernetes.validate import validate_objects
from tests.kubernetes.k8s_fake_api import FakeCluster

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["tests.kubernetes.k8s_demo_app:app", "--gpu-resource", "nvidia.com/mig-1g.10gb",
        "-n", "ml", "--image", "r.example.com/app:1", "--version", "v1"]


def built(*extra: str) -> list[dict[str, Any]]:
    res = CliRunner().invoke(k8s, ["build", *ARGS, *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(autouse=True)
def at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def test_the_namespace_comes_first_and_enforces_restricted() -> None:
    objs = built("--create-namespace")
    ns = objs[0]
    assert ns["kind"] == "Namespace" and ns["metadata"]["name"] == "ml"
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert PSA_LABELS.items() <= labels.items() and len(PSA_LABELS) == 6
    assert [o["kind"] for o in objs].count("Namespace") == 1
    validate_objects(objs)  # the Namespace's schema, and every pod template against "restricted"
    assert "Namespace" not in [o["kind"] for o in built()]


def test_apply_creates_it_first_and_never_prunes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = FakeCluster()
    monkeypatch.setattr(k8s_cli, "make_api", lambda context, kubeconfig: cluster)
    runner = CliRunner()
    res = runner.invoke(k8s, ["apply", *ARGS, "--create-namespace"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert cluster.get("v1", "Namespace", "", "ml") is not None  # cluster-scoped
    applied = [c[1] for c in cluster.calls if c[0] == "apply"]
    assert applied[0] == ("v1", "Namespace", "", "ml")  # before anything that lives in it
    res = runner.invoke(k8s, ["apply", *ARGS], catch_exceptions=False)
    assert res.exit_code == 0 and "namespace/ml pruned" not in res.output
    assert cluster.get("v1", "Namespace", "", "ml") is not None


def test_doctor_does_not_report_a_namespace_apply_will_create(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.kubernetes.k8s_fake_api import platform

    cluster = FakeCluster()
    platform(cluster, without=("namespace",))
    monkeypatch.setattr(k8s_cli, "make_api", lambda context, kubeconfig: cluster)
    runner = CliRunner()
    missing = runner.invoke(k8s, ["doctor", *ARGS])
    assert "namespace 'ml'" in missing.output and "or build with --create-namespace" in missing.output
    assert missing.exit_code == 1
    created = runner.invoke(k8s, ["doctor", *ARGS, "--create-namespace"])
    assert "apply creates it (--create-namespace)" in created.output
    assert created.exit_code == 0, created.output
