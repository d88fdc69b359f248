"""Golden files: `shoal k8s build` output, byte for byte, for a few representative builds.

The expected YAML lives in tests/kubernetes/golden/. After an intended change to the compiler,
regenerate it and review the diff:

    SHOAL_UPDATE_GOLDEN=1 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/kubernetes/test_k8s_golden.py

Every document of every golden file is also validated (Kubernetes 1.30 schemas, strict, 1.33 for an
object with an image volume; the CRD schemas of shoal.kubernetes.validate for KEDA, Gateway API,
Prometheus Operator and LeaderWorkerSet kinds), and
every pod template in them is checked against the Pod Security "restricted" profile.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from shoal.kubernetes.cli import k8s
from shoal.kubernetes.validate import validate_objects

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("SHOAL_UPDATE_GOLDEN") == "1"

COMMON = ["-n", "ml", "--image", "registry.example.com/demo:1"]
CASES: dict[str, list[str]] = {
    # KEDA, Gateway API route, fractional GPU on MIG, a cost label.
    "demo-keda-gateway": ["tests.kubernetes.k8s_demo_app:app", *COMMON, "--version", "v1",
                          "--gpu-resource", "nvidia.com/mig-1g.10gb", "--gateway", "web",
                          "--gateway-namespace", "infra", "--hostname", "demo.example.com",
                          "--label", "team=search"],
    # A config file with overrides; an HPA, a classic nginx Ingress, a PodMonitor, restricted peers.
    "demo-hpa-ingress": ["tests/kubernetes/data/demo_serve.yaml", *COMMON, "--version", "v1",
                         "--autoscaler", "hpa", "--ingress-class", "nginx", "--pod-monitor",
                         "--gpu-resource", "nvidia.com/gpu.shared",
                         "--http-from-namespace", "ingress-nginx", "--metrics-from-namespace", "monitoring"],
    # A gang deployment (2 GPU ranks, autoscaled by groups) as a LeaderWorkerSet behind an ingress.
    "gang-lws": ["tests.kubernetes.k8s_gang_app:pipeline", *COMMON, "--version", "v1", "--gateway", "web"],
    # Model weights from a PVC and an image volume, kube-prometheus-stack's release label, no scaler token.
    "demo-model-volumes": ["tests.kubernetes.k8s_demo_app:app", *COMMON, "--version", "v1",
                           "--gpu-resource", "nvidia.com/gpu.shared", "--model-volume", "Model=pvc:llama-weights",
                           "--model-volume", "Model=image:registry.example.com/models/tokenizer:v1:/opt/tokenizer",
                           "--monitor-label", "release=kube-prometheus-stack", "--alert-p99-seconds", "30",
                           "--scaler-auth", "none"],
    # An HTTP ingress that scales to zero behind its holding front (shoal front), scaler token on.
    "zero-front": ["tests.kubernetes.k8s_zero_app:app", *COMMON, "--version", "v1", "--gateway", "web",
                   "--gateway-namespace", "infra"],
    # Version v2 as a 10 % canary beside the running v1.
    "demo-canary": ["tests.kubernetes.k8s_demo_app:app", *COMMON, "--version", "v2", "--canary-of", "v1",
                    "--weight", "10", "--gateway", "web", "--gpu-resource", "nvidia.com/mig-1g.10gb"],
}


def run_build(args: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(k8s, ["build", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.yaml"
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing {path}; generate it with SHOAL_UPDATE_GOLDEN=1"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{path} differs from the build; if intended, regenerate with SHOAL_UPDATE_GOLDEN=1"
    docs = [d for d in yaml.safe_load_all(expected) if d is not None]
    assert docs
    validate_objects(docs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check_golden(name, run_build(CASES[name], monkeypatch))


@pytest.mark.rag
def test_golden_seed_rayservice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The seed's RayService (Generator: 2 replicas, 1 GPU each) compiled for a cluster."""
    pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "rag_app.py").write_text("from examples.rag.app import app  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = run_build(["--from-rayservice", "tests/kubernetes/data/seed_rayservice.yaml", "-n", "rag",
                      "--image", "registry.example.com/rag:1", "--version", "v1", "--gateway", "web"], monkeypatch)
    check_golden("seed-rayservice", text)
