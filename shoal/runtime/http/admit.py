"""The admit-and-account step: where a routed request goes, and its bookkeeping.

A request goes to the front's own in-process ingress (an ingress replica serving HTTP itself)
when the route is that replica's, unless it asks for a multiplexed model that another replica
holds and this one does not; otherwise to a replica through the deployment's router.
:class:`Ledger` counts the requests in flight (the ``ongoing`` gauge) and records each one
when it ends (metrics, trace span).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing
from shoal.runtime.router import Reservation, Router
from shoal.runtime.wire import RequestMeta

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
# Runs a request, sending the application's ASGI messages to the given send.
Runner = Callable[[Send], Awaitable[None]]


class LocalIngress(Protocol):
    """An app served in this very process (an ingress replica that serves HTTP itself)."""

    key: tuple[str, str]  # (app, ingress deployment)
    model_ids: tuple[str, ...]  # multiplexed models loaded here

    async def serve(self, scope: Scope, body: bytes, meta: RequestMeta, send: Send) -> None: ...

    async def serve_websocket(self, scope: Scope, receive: Receive, send: Send, meta: RequestMeta) -> None: ...


class RouterSource(Protocol):
    """Where a ProxyApp gets its routers: the controller client, or a pod's DNS-based backend."""

    def router(self, app: str, deployment: str) -> Router: ...


def serves_here(local: LocalIngress | None, source: RouterSource, app: str, dep: str, model_id: str) -> bool:
    """Whether the in-process ingress ``local`` serves a request for (``app``, ``dep``)."""
    if local is None or local.key != (app, dep):
        return False
    # A multiplexed model held by another replica and not by this one: send it there.
    return not (model_id and model_id not in local.model_ids and source.router(app, dep).holds_model(model_id))


def runner(local: LocalIngress | None, source: RouterSource, app: str, dep: str,
           scope: Scope, body: bytes | bytearray, meta: RequestMeta, reserved: Reservation | None = None) -> Runner:
    """The call that runs the request where it goes (see :func:`serves_here`); ``reserved``:
    a replica slot its router reserved for it (:meth:`Router.reserve`)."""
    if local is not None and serves_here(local, source, app, dep, meta.multiplexed_model_id):
        data = body if isinstance(body, bytes) else bytes(body)

        async def run_here(out: Send) -> None:
            await local.serve(scope, data, meta, out)

        return run_here
    router = source.router(app, dep)

    async def run_there(out: Send) -> None:
        # The replica sends the response at most about a window ahead of ``out``: a client
        # that reads slowly holds back its own replica only (shoal.runtime.flow).
        stream = router.stream("__call__", (scope, body), {}, meta) if reserved is None else \
            router.stream("__call__", (scope, body), {}, meta, reserved)
        async for messages in stream:
            for m in messages:
                await out(m)

    return run_there


# record(app, deployment, route, method, status, started)
Record = Callable[[str, str, str, str, int, float], None]


def _record(app: str, dep: str, route: str, method: str, status: int, started: float) -> None:
    _metrics.PROCESS.http_done(app, dep, route, method, status, started)


def _end_span(span: Any, status: int) -> None:
    _tracing.end_http(span, status)


class Ledger:
    """The requests a front is serving: how many (``ongoing``), and a record of each that ends.

    ``record`` and ``end_span`` default to shoal's metrics and tracing; ``clock`` is the
    monotonic clock that ``started`` times come from.
    """

    __slots__ = ("clock", "end_span", "ongoing", "record")

    def __init__(self, record: Record = _record, end_span: Callable[[Any, int], None] = _end_span,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.record = record
        self.end_span = end_span
        self.clock = clock
        self.ongoing = 0

    def begin(self) -> None:
        """A routed request starts its way to the application."""
        self.ongoing += 1

    def end(self, route: tuple[str, str, str], method: str, status: int, started: float, span: Any = None) -> None:
        """A request begun with :meth:`begin` ended with ``status``; ``route`` is
        (route prefix, app, ingress deployment)."""
        self.ongoing -= 1
        prefix, app, dep = route
        self.record(app, dep, prefix, method, status, started)
        if span is not None:
            self.end_span(span, status)

    def refused(self, route: tuple[str, str, str], method: str, status: int, started: float) -> None:
        """Record a request answered without reaching an application (e.g. a 404)."""
        prefix, app, dep = route
        self.record(app, dep, prefix, method, status, started)
