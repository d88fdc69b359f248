"""The benchmark suite's ``grpc`` workload (benchmarks/grpc_echo.py) runs end to end under shoal.

A smoke test with sub-second load runs: it checks that the proto compiles, the launcher starts
the app with ``grpc_options``, every unary call and every stream succeeds through grpcio's
asyncio client, and the report gets its rows. It asserts nothing about speed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("grpc")
pytest.importorskip("grpc_tools.protoc")

from benchmarks import run
from benchmarks.common import Settings
from benchmarks.report import build_rows


def test_grpc_workload_runs_under_shoal(tmp_path: Path) -> None:
    cfg = dataclasses.replace(Settings.make(quick=True), duration_s=0.5, warmup_s=0.2, grpc_callers=(1, 4),
                              grpc_stream_messages=10, startup_timeout_s=60.0)
    run.STARTED.clear()
    res = run.w_grpc("shoal", cfg, str(tmp_path))

    assert res["messages_per_stream"] == 10
    for c in (1, 4):
        unary = res["unary"][f"c{c}"]
        assert unary["callers"] == c
        assert unary["errors"] == 0, unary["first_error"]
        assert unary["calls"] > 0
        assert unary["calls_per_s"] > 0 and unary["p50_ms"] <= unary["p99_ms"]
        stream = res["stream"][f"c{c}"]
        assert stream["errors"] == 0, stream["first_error"]
        assert stream["streams"] > 0
        assert stream["messages"] == stream["streams"] * 10  # every stream read to its end
        assert stream["ttfm_p50_ms"] <= stream["stream_p50_ms"]
    # The server's processes were stopped (by pid, in Server.stop) and logged where shoal came from.
    assert [s.leftovers for s in run.STARTED] == [0]
    log = next(tmp_path.glob("shoal-grpc_echo-*.log")).read_text()
    assert "BENCH shoal imported from" in log and "STOPPED" in log

    rows = {r.key: r for r in build_rows({"grpc": {"shoal": res}})}
    assert set(rows) == {"grpc_unary_c1", "grpc_unary_c4", "grpc_stream_c1", "grpc_stream_c4"}
    assert "calls/s" in rows["grpc_unary_c4"].cells["shoal"] and rows["grpc_unary_c4"].cells["ray"] == "—"
    assert "messages/s" in rows["grpc_stream_c1"].cells["shoal"]
