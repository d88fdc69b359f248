"""Traces and access-log lines of gRPC calls: a call carrying a W3C ``traceparent`` metadata key,
through the ingress replica and a handle call to a downstream replica, gives spans of one trace,
each the child of the last (as an HTTP request does); the proxy's log has one access line per
call, with its RPC method and status code, cancelled calls included.

SHOAL_TRACING=file:PATH makes every process of the instance append its spans to PATH.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")
protoc = pytest.importorskip("grpc_tools.protoc")
pytest.importorskip("opentelemetry.sdk")

from conftest import child_pids, wait_until  # noqa: E402

from shoal import api, serve  # noqa: E402
from shoal.config import gRPCOptions  # noqa: E402
from shoal.observability import tracing  # noqa: E402

MODULE = "shoal_grpc_trace_test"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
PROTO = """
syntax = "proto3";
package tracetest;
message Question { string text = 1; int32 count = 2; }
message Answer { string text = 1; }
service Asker {
  rpc Ask(Question) returns (Answer);
  rpc Fail(Question) returns (Answer);
  rpc Sleep(Question) returns (Answer);
}
"""


def pb() -> Any:
    return importlib.import_module(f"{MODULE}_pb2")


@serve.deployment
class Leaf:
    def work(self, text: str) -> str:
        return text.upper()


@serve.deployment
class Front:
    def __init__(self, leaf: serve.DeploymentHandle) -> None:
        self.leaf = leaf
        self.sleeps = 0

    async def Ask(self, request: Any) -> Any:
        return pb().Answer(text=await self.leaf.work.remote(request.text))

    def Fail(self, request: Any) -> Any:
        raise ValueError("no")

    async def Sleep(self, request: Any) -> Any:
        self.sleeps += 1
        await asyncio.sleep(request.count)
        return pb().Answer(text="slept")

    def sleeps_begun(self) -> int:
        return self.sleeps


@pytest.fixture
def traced(run_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Path]]:
    (tmp_path / f"{MODULE}.proto").write_text(PROTO)
    assert protoc.main(["grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                        f"--grpc_python_out={tmp_path}", str(tmp_path / f"{MODULE}.proto")]) == 0
    sys.path.insert(0, str(tmp_path))  # before serve.start: the proxy and replicas inherit it
    spans = tmp_path / "spans.jsonl"
    monkeypatch.setenv(tracing.ENV, f"file:{spans}")  # inherited by the replicas and the proxy
    before = child_pids()
    servicers = [f"{MODULE}_pb2_grpc.add_AskerServicer_to_server"]
    serve.start(http_options={"port": 0}, grpc_options=gRPCOptions(port=0, grpc_servicer_functions=servicers),
                _run_dir=run_dir)
    try:
        serve.run(Front.bind(Leaf.bind()), name="front", route_prefix="/front")
        with grpc.insecure_channel(api.grpc_address()) as channel:
            yield importlib.import_module(f"{MODULE}_pb2_grpc").AskerStub(channel), spans
    finally:
        serve.shutdown()
        tracing.uninstall()  # this (driver) process traced too; stop before other tests run
        sys.path.remove(str(tmp_path))
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def access_lines(run_dir: str, request_id: str) -> list[str]:
    """The gRPC access lines of ``request_id``: in the proxy's log, or in the log of the ingress
    replica whose own gRPC server took the channel (grpc_options.ingress_serves_grpc)."""
    logs = Path(run_dir) / "logs"
    return [line for log in sorted(logs.rglob("*.log")) for line in log.read_text(errors="replace").splitlines()
            if f"shoal.access request_id={request_id}: GRPC " in line]


def test_one_trace_from_a_grpc_call_to_the_downstream_replica(traced: tuple[Any, Path], run_dir: str) -> None:
    stub, path = traced
    reply = stub.Ask(pb().Question(text="hi"), timeout=30,
                     metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("request_id", "rid-trace")))
    assert reply.text == "HI"

    def ours() -> list[dict[str, Any]]:
        return [s for s in read_spans(path) if s["context"]["trace_id"] == "0x" + TRACE_ID]

    assert wait_until(lambda: len(ours()) >= 4, 20, 0.1), read_spans(path)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in ours():
        by_name.setdefault(s["name"], []).append(s)
    (call,) = by_name["tracetest.Asker/Ask"]
    (front,) = by_name["Front.Ask"]
    leaf_client, leaf_server = sorted(by_name["Leaf.work"], key=lambda s: s["kind"])
    assert call["kind"] == "SpanKind.SERVER" and call["parent_id"] == "0x" + PARENT_ID
    attrs = call["attributes"]
    assert (attrs["rpc.system"], attrs["rpc.service"], attrs["rpc.method"]) == ("grpc", "tracetest.Asker", "Ask")
    assert attrs["rpc.grpc.status_code"] == 0 and attrs["shoal.request_id"] == "rid-trace"
    assert front["parent_id"] == call["context"]["span_id"]
    assert front["attributes"]["shoal.request_id"] == "rid-trace"
    assert leaf_client["kind"] == "SpanKind.CLIENT" and leaf_client["parent_id"] == front["context"]["span_id"]
    assert leaf_server["kind"] == "SpanKind.SERVER" and leaf_server["parent_id"] == leaf_client["context"]["span_id"]
    # The access line, as HTTP's: method, status, latency, with the request id.
    assert wait_until(lambda: access_lines(run_dir, "rid-trace"), 10)
    (line,) = access_lines(run_dir, "rid-trace")
    assert ": GRPC /tracetest.Asker/Ask OK " in line and line.endswith("ms")


def test_failed_and_cancelled_calls_are_traced_and_logged(traced: tuple[Any, Path], run_dir: str) -> None:
    stub, path = traced
    with pytest.raises(grpc.RpcError) as err:
        stub.Fail(pb().Question(), metadata=(("request_id", "rid-fail"),), timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL

    def span_of(request_id: str) -> dict[str, Any] | None:
        for s in read_spans(path):
            if s["kind"] == "SpanKind.SERVER" and s["attributes"].get("shoal.request_id") == request_id \
                    and s["attributes"].get("rpc.system") == "grpc":
                return s
        return None

    # No traceparent: the call starts a trace of its own.
    assert wait_until(lambda: span_of("rid-fail") is not None, 20, 0.1), read_spans(path)
    failed = span_of("rid-fail")
    assert failed is not None and failed["parent_id"] is None
    assert failed["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert failed["status"]["status_code"] == "ERROR"
    assert wait_until(lambda: access_lines(run_dir, "rid-fail"), 10)
    assert ": GRPC /tracetest.Asker/Fail INTERNAL " in access_lines(run_dir, "rid-fail")[0]

    handle = serve.get_app_handle("front")
    begun = handle.sleeps_begun.remote().result(timeout_s=30)
    future = stub.Sleep.future(pb().Question(count=60), metadata=(("request_id", "rid-cancel"),), timeout=60)
    assert wait_until(lambda: handle.sleeps_begun.remote().result(timeout_s=30) > begun, 15)
    assert future.cancel()
    assert wait_until(lambda: access_lines(run_dir, "rid-cancel"), 15)
    assert ": GRPC /tracetest.Asker/Sleep CANCELLED " in access_lines(run_dir, "rid-cancel")[0]
    assert wait_until(lambda: span_of("rid-cancel") is not None, 20, 0.1)
    cancelled = span_of("rid-cancel")
    assert cancelled is not None
    assert cancelled["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
