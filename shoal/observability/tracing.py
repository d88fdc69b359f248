"""OpenTelemetry traces across the HTTP front, replicas and handle calls (optional).

Off by default, and then free: each hop tests one flag (``enabled`` or ``RequestMeta.trace``).
Turn it on for an instance with ``SHOAL_TRACING`` in the environment of the process that starts
it (replicas and the proxy inherit it); it needs the ``otel`` extra
(``pip install 'shoal[otel]'``):

``SHOAL_TRACING=console``
    spans printed to standard error as they end.
``SHOAL_TRACING=otlp``
    spans batched to an OpenTelemetry collector over OTLP/HTTP; the endpoint, headers and so on
    come from the standard ``OTEL_EXPORTER_OTLP_*`` variables (default ``http://localhost:4318``).
``SHOAL_TRACING=file:PATH``
    one JSON object per span and line, appended to ``PATH`` (every process of the instance
    appends to the same file).

``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the service as usual. A process
whose OpenTelemetry tracer provider was already configured (a driver script that set up its
own) keeps it: shoal's spans go there.

What is traced: the HTTP front (a ``SERVER`` span per request, child of the request's W3C
``traceparent`` header when it has one), the gRPC front (a ``SERVER`` span per call, child of
its ``traceparent`` metadata when it has one), each request a replica serves (a ``SERVER`` span, child
of its caller's span), and each handle call (a ``CLIENT`` span, child of whatever span is current
where ``.remote()`` was called: in a replica, the request it is serving). The caller's span
context crosses processes as a W3C ``traceparent`` in ``RequestMeta.trace``; user code in a
replica can start its own spans under the request's with the OpenTelemetry API as usual.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from shoal.runtime.wire import RequestMeta

__all__ = ["ENV", "enabled", "install", "setup", "setup_from_env", "shutdown", "traced", "traceparent", "uninstall"]

logger = logging.getLogger("shoal.observability.tracing")

ENV = "SHOAL_TRACING"

# Read on every hop: keep these module globals plain.
enabled = False
_tracer: Any = None
_provider: Any = None  # the provider shoal created (and shuts down), if it created one


def setup_from_env(service: str = "shoal") -> bool:
    """Turn tracing on as ``$SHOAL_TRACING`` says (called once when a runtime process starts)."""
    mode = os.environ.get(ENV, "").strip()
    return setup(mode, service) if mode else False


def setup(mode: str, service: str = "shoal") -> bool:
    """Turn tracing on with an exporter chosen by ``mode`` (see the module docstring).

    Returns whether tracing is on; without OpenTelemetry installed it logs why and stays off.
    """
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError:
        logger.warning("%s=%s, but OpenTelemetry is not installed (pip install 'shoal[otel]'): tracing stays off",
                       ENV, mode)
        return False
    global _provider
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):  # configured already (by the user): use it as it is
        install(current)
        return True
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)
    if mode == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif mode.startswith("file:"):
        out = open(mode[len("file:"):], "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives with the process

        def one_line(span: Any) -> str:
            return str(span.to_json(indent=None)) + "\n"

        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=one_line)))
    elif mode == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            logger.warning("%s=otlp needs opentelemetry-exporter-otlp-proto-http (pip install 'shoal[otel]'): "
                           "tracing stays off", ENV)
            return False
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        logger.warning("%s=%r is not one of console, otlp, file:PATH: tracing stays off", ENV, mode)
        return False
    trace.set_tracer_provider(provider)
    _provider = provider
    install(provider)
    return True


def install(provider: Any) -> None:
    """Trace with ``provider`` (an OpenTelemetry ``TracerProvider``) in this process."""
    global enabled, _tracer
    _tracer = provider.get_tracer("shoal")
    enabled = True


def uninstall() -> None:
    """Stop tracing in this process (spans already started still end)."""
    global enabled, _tracer
    enabled = False
    _tracer = None


def shutdown() -> None:
    """Export what is pending (before the process exits)."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:
            logger.exception("shutting down the tracer provider failed")


# ---- spans ------------------------------------------------------------------------------------


def traceparent(span: Any) -> str:
    """The W3C ``traceparent`` naming ``span`` as the parent."""
    sc = span.get_span_context()
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def _parent(traceparent_value: str, tracestate: str = "") -> Any:
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not traceparent_value:
        return Context()  # a new trace
    carrier = {"traceparent": traceparent_value}
    if tracestate:
        carrier["tracestate"] = tracestate
    return TraceContextTextMapPropagator().extract(carrier)


def _error(span: Any, exc: BaseException | None = None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if exc is not None:
        span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__ if exc is not None else None))


def start_http(scope: dict[str, Any], meta: RequestMeta, app: str, deployment: str) -> tuple[Any, RequestMeta]:
    """The HTTP front's span for one request (child of its ``traceparent`` header), and the
    request's metadata carrying it to the replica."""
    from opentelemetry.trace import SpanKind

    tp = ts = ""
    for k, v in scope["headers"]:
        if k == b"traceparent":
            tp = v.decode("latin-1")
        elif k == b"tracestate":
            ts = v.decode("latin-1")
    method = str(scope.get("method", ""))
    span = _tracer.start_span(
        f"{method} {meta.route}", context=_parent(tp, ts), kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "http.route": meta.route, "url.path": str(scope.get("path", "")),
                    "shoal.application": app, "shoal.deployment": deployment, "shoal.request_id": meta.request_id})
    return span, meta._replace(trace=traceparent(span))


def end_http(span: Any, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        _error(span)
    span.end()


def start_grpc(traceparent_value: str, tracestate: str, meta: RequestMeta, path: str, app: str,
               deployment: str) -> tuple[Any, RequestMeta]:
    """The gRPC front's span for one call to ``path`` (``/package.Service/Method``; child of the
    call's ``traceparent`` metadata), and the call's metadata carrying it to the replica."""
    from opentelemetry.trace import SpanKind

    name = path.lstrip("/")
    service, _, method = name.rpartition("/")
    span = _tracer.start_span(
        name, context=_parent(traceparent_value, tracestate), kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                    "shoal.application": app, "shoal.deployment": deployment, "shoal.request_id": meta.request_id})
    return span, meta._replace(trace=traceparent(span))


# The codes that mark a gRPC server span as an error (OpenTelemetry's gRPC conventions); the
# others (NOT_FOUND, INVALID_ARGUMENT, ...) are the client's.
_GRPC_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                                 "DATA_LOSS"})


def end_grpc(span: Any, code: Any) -> None:
    """End a :func:`start_grpc` span with the call's status (a ``grpc.StatusCode``)."""
    span.set_attribute("rpc.grpc.status_code", int(code.value[0]))
    if code.name in _GRPC_SERVER_ERRORS:
        _error(span)
    span.end()


def start_request(meta: RequestMeta, method: str, app: str, deployment: str, replica: str) -> Any:
    """A replica's span for serving one request, made current (so that the handle calls the
    request makes are its children). Pass what it returns to :func:`end_request`."""
    if _tracer is None:
        return None
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind

    parent = _parent(meta.trace)
    span = _tracer.start_span(
        f"{deployment}.{method}", context=parent, kind=SpanKind.SERVER,
        attributes={"shoal.application": app, "shoal.deployment": deployment, "shoal.replica": replica,
                    "shoal.method": method, "shoal.request_id": meta.request_id})
    token = context.attach(trace.set_span_in_context(span, parent))
    return span, token


def end_request(handle: Any, failed: bool) -> None:
    if handle is None:
        return
    from opentelemetry import context

    span, token = handle
    if failed:
        _error(span)
    context.detach(token)
    span.end()


class TracedRouter:
    """A router whose calls each get a ``CLIENT`` span (see :func:`traced`)."""

    __slots__ = ("app", "deployment", "router")

    def __init__(self, router: Any, app: str, deployment: str) -> None:
        self.router = router
        self.app = app
        self.deployment = deployment

    def _start(self, method: str, meta: RequestMeta) -> tuple[Any, RequestMeta]:
        from opentelemetry.trace import SpanKind

        # The parent is the span current here and now, in the caller's thread and context (the
        # call itself may run later, on another thread's loop).
        span = _tracer.start_span(f"{self.deployment}.{method}", kind=SpanKind.CLIENT,
                                  attributes={"shoal.application": self.app, "shoal.deployment": self.deployment,
                                              "shoal.method": method, "shoal.request_id": meta.request_id})
        return span, meta._replace(trace=traceparent(span))

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             meta: RequestMeta) -> Coroutine[Any, Any, Any]:
        span, meta = self._start(method, meta)
        return _finish(self.router.call(method, args, kwargs, meta), span)

    def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
               meta: RequestMeta) -> AsyncIterator[Any]:
        span, meta = self._start(method, meta)
        return _finish_stream(self.router.stream(method, args, kwargs, meta), span)


def traced(router: Any, app: str, deployment: str) -> TracedRouter:
    """``router`` with a client span around each call (handles use it while tracing is on)."""
    return TracedRouter(router, app, deployment)


async def _finish(call: Coroutine[Any, Any, Any], span: Any) -> Any:
    try:
        return await call
    except BaseException as e:
        _error(span, e)
        raise
    finally:
        span.end()


async def _finish_stream(items: AsyncIterator[Any], span: Any) -> AsyncIterator[Any]:
    try:
        async for item in items:
            yield item
    except GeneratorExit:
        raise
    except BaseException as e:
        _error(span, e)
        raise
    finally:
        try:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()  # a caller that stopped early cancels the request now, not at GC
        finally:
            span.end()
