"""`shoal k8s build --grafana`: the dashboard as a ConfigMap for Grafana's dashboard sidecar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from shoal.kubernetes.cli import k8s
from shoal.kubernetes.validate import validate_objects
from shoal.observability import grafana

ROOT = Path(__file__).resolve().parents[2]
DEMO = "tests.kubernetes.k8s_demo_app:app"
ARGS = ["-n", "ml", "--image", "registry.example.com/demo:1", "--version", "v1",
        "--gpu-resource", "nvidia.com/mig-1g.10gb", "--gateway", "web"]


@pytest.fixture(autouse=True)
def at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def build(*extra: str) -> list[dict[str, Any]]:
    res = CliRunner().invoke(k8s, ["build", DEMO, *ARGS, *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return [d for d in yaml.safe_load_all(res.stdout) if d is not None]


def test_grafana_flag_emits_a_sidecar_config_map() -> None:
    without = build()
    objs = build("--grafana")
    boards = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert not [o for o in without if o["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert len(boards) == 1 and len(objs) == len(without) + 1
    cm = boards[0]
    assert cm["metadata"]["namespace"] == "ml"
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "shoal"  # pruned with the app
    ((key, text),) = cm["data"].items()
    assert key.endswith(".json")
    board = json.loads(text)
    app = cm["metadata"]["annotations"]["shoal.dev/app"]
    assert board["title"] == f"shoal: {app}" and len(board["uid"]) <= 40
    preset = {v["name"]: v["current"] for v in board["templating"]["list"]}["application"]
    assert preset["value"] == [app]
    assert grafana.queries(board) == grafana.queries(grafana.dashboard())
    validate_objects([cm])
