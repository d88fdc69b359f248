"""The benchmark suite's ``cores`` workload (benchmarks/cores.py) runs end to end under shoal.

A smoke test with one-second wrk runs: 1 then 2 replicas answer, each process group's CPU is
read, and the report gets its row. It asserts nothing about speed."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from benchmarks import run
from benchmarks.common import Settings
from benchmarks.report import build_rows

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


def test_cores_workload_runs_under_shoal(tmp_path: Path) -> None:
    cfg = dataclasses.replace(Settings.make(quick=True), duration_s=1.0, warmup_s=0.5)
    run.STARTED.clear()
    res = run.w_cores("shoal", cfg, str(tmp_path))

    for n in (1, 2):
        one = res[f"r{n}"]
        assert one["rps"] > 0 and one["errors"] == 0 and one["non_2xx"] == 0
        replica_cores = [c for label, c in one["cores"].items() if "replica" in label]
        assert replica_cores and one["cores"]["wrk"] > 0 and one["cores_total"] >= sum(replica_cores)
        assert one["machine_busy_cores"] is not None
    assert res["ratio"] == pytest.approx(res["r2"]["rps"] / res["r1"]["rps"], rel=1e-2)
    assert [s.leftovers for s in run.STARTED] == [0, 0]
    row = {r.key: r for r in build_rows({"cores": {"shoal": res}})}["cores"]
    assert "req/s" in row.cells["shoal"] and row.cells["ray"] == "—" and row.target == "2 replicas ≥ 1.8x one"
