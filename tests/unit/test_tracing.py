"""shoal.observability.tracing in one process, with the OpenTelemetry SDK's in-memory exporter: the HTTP front's
span honours an incoming traceparent, a replica's span is its child and current while the request
runs, and a handle call made there gets a client span whose context travels in RequestMeta."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shoal.observability import tracing
from shoal.runtime.wire import RequestMeta

INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracing.install(provider)
    try:
        yield exp
    finally:
        tracing.uninstall()


class Downstream:
    """Stands in for a router: records the metadata each call carried."""

    def __init__(self) -> None:
        self.metas: list[RequestMeta] = []

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta) -> Any:
        self.metas.append(meta)
        # The downstream replica: its span is a child of the caller's client span.
        handle = tracing.start_request(meta, method, "app", "Down", "Down-1")
        tracing.end_request(handle, failed=False)
        return "ok"

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[Any]:
        self.metas.append(meta)
        for i in range(3):
            yield i


def test_off_by_default_and_free() -> None:
    assert tracing.enabled is False
    assert RequestMeta("r").trace == ""


async def test_one_trace_from_the_http_front_to_a_downstream_replica(exporter: InMemorySpanExporter) -> None:
    scope = {"type": "http", "method": "GET", "path": "/api/x",
             "headers": [(b"traceparent", f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01".encode())]}
    front, meta = tracing.start_http(scope, RequestMeta("rid-1", http=True, route="/api"), "app", "Up")
    assert meta.trace.startswith(f"00-{INCOMING_TRACE}-")
    down = Downstream()

    # The ingress replica serves the request: its span is current while user code runs, so the
    # handle call it makes (through a traced router, as DeploymentHandle.remote does) is its child.
    replica = tracing.start_request(meta, "__call__", "app", "Up", "Up-1")
    assert await tracing.traced(down, "app", "Down").call("predict", (1,), {}, RequestMeta("rid-1")) == "ok"
    items = [i async for i in tracing.traced(down, "app", "Down").stream("gen", (), {}, RequestMeta("rid-1"))]
    assert items == [0, 1, 2]
    tracing.end_request(replica, failed=False)
    tracing.end_http(front, 200)

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"GET /api", "Up.__call__", "Down.predict", "Down.gen"}
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {INCOMING_TRACE}
    http, up, call, down_span = spans["GET /api"], spans["Up.__call__"], spans["Down.predict"], spans["Down.gen"]
    assert http.kind == SpanKind.SERVER and format(http.parent.span_id, "016x") == INCOMING_SPAN
    assert up.parent.span_id == http.context.span_id
    assert call.kind == SpanKind.CLIENT and call.parent.span_id == up.context.span_id
    assert down_span.kind == SpanKind.CLIENT and down_span.parent.span_id == up.context.span_id
    assert http.attributes["http.response.status_code"] == 200
    # The downstream replica's span (named like the caller's, as both are Down.predict) is the
    # client span's child: the context travelled in RequestMeta.trace.
    assert down.metas[0].trace == tracing.traceparent(call)
    servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER and s.name == "Down.predict"]
    assert len(servers) == 1 and servers[0].parent.span_id == call.context.span_id


async def test_failures_mark_spans(exporter: InMemorySpanExporter) -> None:
    class Failing:
        async def call(self, *args: Any) -> Any:
            raise ValueError("boom")

    with pytest.raises(ValueError):
        await tracing.traced(Failing(), "app", "Down").call("m", (), {}, RequestMeta("r"))
    front, _ = tracing.start_http({"method": "POST", "path": "/", "headers": []}, RequestMeta("r", route="/"),
                                  "app", "Up")
    tracing.end_http(front, 503)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert not spans["Down.m"].status.is_ok and spans["Down.m"].events[0].name == "exception"
    assert not spans["POST /"].status.is_ok and spans["POST /"].parent is None  # no traceparent: a new trace
    await asyncio.sleep(0)
