"""Every HTTP and handle workload of the benchmark suite (benchmarks/run.py) runs end to end under shoal.

The smoke check of issue 22: each workload is run with tiny settings (fractions of a second of
load, a few calls), its numbers are read, the report gets its rows, and the processes it started
are gone afterwards. It asserts nothing about speed. (cores, grpc and control have their own
smoke tests: test_bench_cores.py, test_bench_grpc.py, test_bench_control_plane.py.)"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run
from benchmarks.common import Settings
from benchmarks.report import build_rows

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")

TINY = dataclasses.replace(
    Settings.make(quick=True), duration_s=0.3, warmup_s=0.1, echo_conns=(1, 8), pipeline_conns=(1,),
    payload_conns=(1, 8), seq_requests=20, handle_calls=30, handle_callers=8, handle_seconds=0.3,
    batch_callers=8, batch_seconds=0.3, stream_clients=2, stream_tokens=20, coldstart_runs=1, idle_s=1.5,
    settle_s=2.5)

# The report rows each workload fills (the shoal cell must hold a number, not "—").
ROWS = {
    "echo": ["echo_c1", "echo_c8", "seq"],
    "pipeline3": ["pipe_c1"],
    "handle": ["handle_c1", "handle_c64", "handle_ingress_c1", "handle_ingress_c64"],
    "payload": ["payload_c1", "payload_c8"],
    "stream": ["stream"],
    "batch": ["batch", "batch_http"],
    "coldstart": ["coldstart", "coldstart_cli"],
    "memory": ["memory", "memory_settled", "idle_cpu"],
}


def _numbers(res: dict[str, Any], workload: str) -> list[float]:
    """The headline numbers of one workload's result (each must be a positive measurement)."""
    if workload == "echo":
        return [res["c1"]["rps"], res["c8"]["rps"], res["seq"]["p50_ms"]]
    if workload == "pipeline3":
        return [res["c1"]["rps"], res["c1"]["p50_ms"]]
    if workload == "handle":
        return [res["c1_p50_ms"], res["cN_calls_per_s"], res["ingress"]["c1_p50_ms"],
                res["ingress"]["cN_calls_per_s"]]
    if workload == "payload":
        return [res["c1"]["rps"], res["c8"]["rps"]]
    if workload == "stream":
        return [res["tokens_per_s"], res["ttft_p50_ms"]]
    if workload == "batch":
        return [res["items_per_s"], res["http"]["rps"], res["mean_batch"]]
    if workload == "coldstart":
        return [res["median_s"]]
    return [res["pss_mb"], res["processes"]]


@pytest.mark.parametrize("workload", list(ROWS))
def test_workload_runs_under_shoal(workload: str, tmp_path: Path) -> None:
    run.STARTED.clear()
    res = run.RUNNERS[workload]("shoal", TINY, str(tmp_path))

    assert all(n > 0 for n in _numbers(res, workload)), res
    for r in (v for k, v in res.items() if isinstance(v, dict) and "non_2xx" in v):
        assert r["errors"] == 0 and r["non_2xx"] == 0, r
    assert run.STARTED and all(s.leftovers == 0 for s in run.STARTED)
    rows = {r.key: r for r in build_rows({workload: {"shoal": res}})}
    for key in ROWS[workload]:
        assert rows[key].cells["shoal"] not in ("", "—"), (key, rows[key].cells)
