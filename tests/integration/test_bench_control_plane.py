"""The control-plane scale benchmark (benchmarks/control_plane.py) at its smallest point.

It runs the script as ``make bench`` does (the point in a child interpreter, then again under
tracemalloc), and checks that every number was produced and that the report got them. It asserts
nothing about speed; what it asserts of the pushes is what the controller must do at any speed:
nothing goes to routers while nothing changes, and one change reaches each router of the
deployment twice (the replica gone, its replacement running)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "control_plane.py"
CALLERS = 4


def _numbers(obj: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in _numbers(v, f"{path}.{k}")]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [(path, float(obj))]
    return []


def test_smallest_point_produces_every_number(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--points", "100", "--ticks", "30", "--callers", str(CALLERS),
                           "--out-dir", str(tmp_path), "--write-results"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "control_plane.json").read_text())
    (p,) = data["points"]
    assert (p["replicas"], p["apps"], p["deployments"], p["callers"]) == (100, 5, 100, CALLERS)
    assert p["routers"] == 100 * CALLERS
    for name, value in _numbers(p):
        assert math.isfinite(value) and value >= 0, name
    for stats in (p["steady"]["tick_ms"], p["steady"]["loop_ms"], p["churn"]["tick_ms"], p["status"]["ms"]):
        assert stats["p50"] > 0 and stats["p50"] <= stats["p90"] <= stats["max"]
    assert p["steady"]["tick_ms"]["n"] == 30 and p["churn"]["changes"] == 20
    assert p["status"]["bytes"] > 1000 and p["rss_mb"] > 0
    assert p["heap_mb"]["after_bringup"] > 0 and p["heap_mb"]["after_all"] > 0
    # Bring-up: every router got its deployment's membership (on subscribing, then with its replica).
    assert p["bringup"]["messages"]["router"] >= 2 * p["routers"] and p["bringup"]["bytes"]["router"] > 0
    assert p["bringup"]["messages"]["replica"] == 100  # one ReplicaInit each
    # Steady: nothing changes, nothing is pushed.
    assert "router" not in p["steady"]["bytes"] and "proxy" not in p["steady"]["bytes"]
    # One change: the deployment's routers hear of it twice; the proxy only when it was an ingress.
    assert p["churn"]["messages_per_change"]["router"] == 2 * CALLERS
    assert p["churn"]["bytes_per_change"]["router"] > 0
    assert p["push"]["membership_bytes_max"] > 0 and p["push"]["routes_bytes_max"] > 0
    section = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- control-plane:start -->" in section and "<!-- control-plane:end -->" in section
    assert "| 100 | 5 x 20 |" in section
