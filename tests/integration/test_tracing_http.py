"""Traces across processes: one HTTP request carrying a W3C traceparent, through an ingress replica
and a handle call to a downstream replica, gives spans of one trace, each the child of the last.

SHOAL_TRACING=file:PATH makes every process of the instance append its spans to PATH.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Instance, child_pids, wait_until
from starlette.requests import Request

from shoal import serve
from shoal.observability import tracing

pytest.importorskip("opentelemetry.sdk")

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


@serve.deployment
class Leaf:
    def work(self, x: int) -> int:
        return x + 1


@serve.deployment
class Front:
    def __init__(self, leaf: serve.DeploymentHandle) -> None:
        self.leaf = leaf

    async def __call__(self, request: Request) -> dict[str, int]:
        return {"y": await self.leaf.work.remote(int(request.query_params["x"]))}


@pytest.fixture
def traced(run_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Instance, Path]]:
    spans = tmp_path / "spans.jsonl"
    monkeypatch.setenv(tracing.ENV, f"file:{spans}")  # inherited by the replicas and the proxy
    before = child_pids()
    serve.start(http_options={"port": 0}, _run_dir=run_dir)
    try:
        yield Instance(serve.http_address(), run_dir), spans
    finally:
        serve.shutdown()
        tracing.uninstall()  # this (driver) process traced too; stop before other tests run
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_one_trace_from_http_to_the_downstream_replica(traced: tuple[Instance, Path]) -> None:
    instance, path = traced
    serve.run(Front.bind(Leaf.bind()), route_prefix="/front")
    r = httpx.get(instance.url + "/front", params={"x": 41},
                  headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}, timeout=30)
    assert r.json() == {"y": 42}

    def ours() -> list[dict[str, Any]]:
        return [s for s in read_spans(path) if s["context"]["trace_id"] == "0x" + TRACE_ID]

    assert wait_until(lambda: len(ours()) >= 4, 20, 0.1), read_spans(path)
    spans = ours()
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    (http,) = by_name["GET /front"]
    (front,) = by_name["Front.__call__"]
    leaf_client, leaf_server = sorted(by_name["Leaf.work"], key=lambda s: s["kind"])
    assert http["kind"] == "SpanKind.SERVER" and http["parent_id"] == "0x" + PARENT_ID
    assert http["attributes"]["http.response.status_code"] == 200
    assert front["parent_id"] == http["context"]["span_id"]
    assert leaf_client["kind"] == "SpanKind.CLIENT" and leaf_client["parent_id"] == front["context"]["span_id"]
    assert leaf_server["kind"] == "SpanKind.SERVER" and leaf_server["parent_id"] == leaf_client["context"]["span_id"]
    # Written by the Leaf replica process (the others by the process that served HTTP).
    assert leaf_server["attributes"]["shoal.deployment"] == "Leaf"
    assert leaf_server["resource"]["attributes"]["service.name"] == "shoal-replica"
