"""The live status view (shoal.observability.watch), rendered without an instance."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from shoal.observability.watch import Rates, run, view


def status(requests: int, *, canary: bool = False) -> dict[str, Any]:
    metrics = {"requests": requests, "errors": 1, "error_rate": round(1 / requests, 4), "p50_ms": 5.0,
               "p95_ms": 20.0, "p99_ms": float("inf")}
    app: dict[str, Any] = {
        "status": "RUNNING", "message": "", "route_prefix": "/", "ingress": "Front", "version": "abc123",
        "metrics": metrics, "canary": None,
        "deployments": {
            "Front": {"status": "HEALTHY", "replica_states": {"RUNNING": 2}, "message": "", "version": "v1",
                      "target_replicas": 2, "metrics": metrics},
            "Model": {"status": "UPSCALING", "replica_states": {"RUNNING": 1, "STARTING": 1}, "message": "",
                      "version": "v2", "target_replicas": 3,
                      "metrics": {"requests": 0, "errors": 0, "error_rate": 0.0, "p50_ms": None, "p95_ms": None,
                                  "p99_ms": None}},
        },
    }
    if canary:
        app["canary"] = {"weight": 10.0, "status": "RUNNING", "message": "", "version": "def456",
                         "metrics": {"requests": 7, "errors": 0, "p50_ms": 2.0, "p99_ms": 10.0},
                         "deployments": {"Front": {"status": "HEALTHY", "replica_states": {"RUNNING": 1},
                                                   "message": ""}}}
    return {"http_address": "http://127.0.0.1:8000", "resources": "CPUs: 2 of 2 allocated",
            "proxies": {"p": "HEALTHY"}, "applications": {"shop": app}}


def text(renderable: Any) -> str:
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_rates_from_counters() -> None:
    r = Rates(window_s=5)
    assert r.update("a", 0.0, 10) is None
    assert r.update("a", 1.0, 30) == 20.0
    assert r.update("a", 2.0, 40) == 15.0  # over the window: (40 - 10) / 2
    for t in range(3, 10):
        r.update("a", float(t), 40 + 10 * (t - 2))
    assert r.update("a", 10.0, 120) == 10.0
    assert r.update("a", 11.0, 5) is None  # a new version counts from zero again
    assert r.update("a", 12.0, 9) == 4.0
    assert r.update("b", 1.0, None) is None


def test_view_shows_deployments_replicas_rates_and_latencies() -> None:
    rates = Rates()
    view(status(100), rates, 0.0)
    out = text(view(status(150), rates, 2.0, address="/tmp/inst"))
    assert "shop" in out and "RUNNING" in out and "route /" in out and "version abc123" in out
    front = next(line for line in out.splitlines() if line.startswith("Front"))
    assert "HEALTHY" in front and "2/2" in front and "25.0" in front and "≤5ms" in front and ">30s" in front
    assert "150" in front and "0.67%" in front
    model = next(line for line in out.splitlines() if line.startswith("Model"))
    assert "1/3 (1 STARTING)" in model and "UPSCALING" in model
    assert "/tmp/inst" in out and "http://127.0.0.1:8000" in out


def test_view_shows_a_canary() -> None:
    out = text(view(status(10, canary=True), Rates(), 0.0))
    assert "canary" in out and "10% of traffic, version def456" in out and "7 requests" in out
    assert "shoal promote shop" in out


def test_run_refreshes_and_survives_a_failed_fetch() -> None:
    answers: list[Any] = [status(10), RuntimeError("connection refused"), status(30)]
    clock = iter([0.0, 1.0, 2.0])
    slept: list[float] = []

    def fetch() -> dict[str, Any]:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a  # type: ignore[no-any-return]

    buf = io.StringIO()
    run(fetch, interval=0.5, iterations=3, console=Console(file=buf, width=200), clock=lambda: next(clock),
        sleep=slept.append)
    out = buf.getvalue()
    assert slept == [0.5, 0.5] and not answers
    assert "Front" in out and "10.0" in out  # (30 - 10) / 2 s


def test_run_shows_the_error() -> None:
    buf = io.StringIO()

    def fetch() -> dict[str, Any]:
        raise RuntimeError("no running shoal instance")

    run(fetch, iterations=1, console=Console(file=buf, width=200), sleep=lambda s: None)
    assert "cannot reach the instance: no running shoal instance" in buf.getvalue()


FAILED_MESSAGE = ("replica constructor failed: RuntimeError: broken weights\nTraceback (most recent call last):\n"
                  '  File "/home/me/app.py", line 14, in __init__\n    raise RuntimeError("broken weights")')


def failing_status() -> dict[str, Any]:
    data = status(150)
    dep = data["applications"]["shop"]["deployments"]["Model"]
    dep.update(status="DEPLOY_FAILED", message=FAILED_MESSAGE)
    data["applications"]["shop"]["deployments"]["AVeryLongDeploymentNameForEmbeddings"] = dict(dep)
    data["applications"]["shop"]["status"] = "DEPLOY_FAILED"
    return data


def rendered(renderable: Any, width: int) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_watch_fits_80_columns_with_messages_under_the_table() -> None:
    out = rendered(view(failing_status(), Rates(), 0.0, address="/tmp/shoal-0/default", width=80), 80)
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    header = next(line for line in lines if line.startswith("deployment"))
    assert header.split() == ["deployment", "status", "replicas", "req/s", "p99", "errors"], out
    model = next(line for line in lines if line.startswith("Model"))
    assert "DEPLOY_FAILED" in model and "1/3 (1 STARTING)" in model and "…" not in model, out
    assert "  Model: replica constructor failed: RuntimeError: broken weights" in out
    assert "Traceback" not in out  # only the first line; `shoal status --json` has the rest
    wide = rendered(view(failing_status(), Rates(), 0.0, width=200), 200)
    assert next(line for line in wide.splitlines() if line.startswith("deployment")).split()[-2:] == ["error",
                                                                                                      "rate"]


def test_status_table_keeps_tracebacks_out_of_its_cells() -> None:
    from shoal.cli.main import print_status

    out = io.StringIO()
    print_status(Console(file=out, width=80), "/tmp/shoal-0/default", failing_status())
    text_out = out.getvalue()
    assert all(len(line) <= 80 for line in text_out.splitlines()), text_out
    assert "shop/Model: replica constructor failed: RuntimeError: broken weights" in text_out
    assert "Traceback" not in text_out
