"""The ASGI application of every HTTP front: the steps of the request path, composed.

It matches the longest ``route_prefix``, forwards the ASGI request (scope and body) to an
ingress replica through its router (or to the app served in this very process), and streams
the ASGI messages that come back (WebSockets: :mod:`shoal.runtime.http.websocket`). Client
disconnects cancel the request upstream;
``request_timeout_s`` bounds it. Errors become short JSON bodies with the right status code;
tracebacks stay in the logs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shoal.observability import dashboard
from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing
from shoal.observability.logs import log_access
from shoal.runtime.http.admit import Ledger, LocalIngress, RouterSource, runner, serves_here
from shoal.runtime.http.budget import BodyBudget
from shoal.runtime.http.errors import HEALTHY, error_answer, not_found, refuse, send_json
from shoal.runtime.http.exchange import Exchange
from shoal.runtime.http.guard import (
    BUSY,
    TOO_LARGE,
    Guard,
    RequestHead,
    forward_scope,
    read_head,
    strip_root,
    with_request_id,
)
from shoal.runtime.http.options import FrontOptions
from shoal.runtime.http.routes import Route, RouteTable
from shoal.runtime.http.websocket import serve_websocket
from shoal.runtime.httpguard import Authenticator
from shoal.runtime.router import Reservation
from shoal.runtime.wire import RequestMeta, Routes

Scope = dict[str, Any]

# Requests with a body this large (or of unknown length) going through a router wait for a
# replica slot before their body is read (ProxyApp._admits_first).
ADMIT_FIRST_BYTES = 1024 * 1024


async def lifespan(receive: Any, send: Any) -> None:
    """Answer the ASGI lifespan protocol (a front has nothing to start or stop)."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class ProxyApp:
    """A front's ASGI application (the proxy process's, an ingress replica's, a pod's)."""

    def __init__(self, client: RouterSource, options: FrontOptions, local: LocalIngress | None = None) -> None:
        self.client = client
        self.options = options
        self.table = RouteTable()
        # In an ingress replica that serves HTTP itself: its own app is called in-process.
        self.local = local
        self.auth = Authenticator.of(options.api_keys, options.auth)  # None: requests need no credentials
        self.guard = Guard(options, self.auth)
        self.budget = BodyBudget(options.request_body_budget_bytes, options.request_body_budget_wait_s)
        self.ledger = Ledger()
        _metrics.PROCESS.fronts.add(self)

    @property
    def ongoing(self) -> int:
        """HTTP requests being served (a gauge of shoal.observability.metrics)."""
        return self.ledger.ongoing

    @property
    def routes(self) -> list[Route]:
        """(prefix, app, ingress), longest prefix first."""
        return self.table.entries

    def set_routes(self, routes: Routes) -> None:
        self.table = RouteTable(routes.table, routes.split)
        for app, dep in self.table.targets():
            self.client.router(app, dep)  # subscribe early so the first request finds replicas

    def match(self, path: str) -> Route | None:
        return self.table.match(path)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await lifespan(receive, send)
        elif kind == "websocket":
            await serve_websocket(self, scope, receive, send)

    async def _http(self, scope: Scope, receive: Any, send: Any) -> None:
        path = strip_root(scope["path"], self.guard.root)
        if path is None:
            await send_json(send, 404, not_found(scope["path"], hint=False))
            return
        head = read_head(scope["headers"])
        if path == "/-/healthz":
            await send_json(send, 200, HEALTHY, head.request_id)
            return
        if self.guard.auth is not None:
            denied = await self.guard.denied(scope)
            if denied:
                await refuse(send, denied, head.request_id)
                return
        if (path.startswith("/-/") or path == "/metrics") and await self._answer_front(path, scope, send,
                                                                                          head.request_id):
            return
        started = self.ledger.clock()
        route = self.table.match(path)
        if route is None:
            await send_json(send, 404, not_found(path), head.request_id)
            # Always logged, also by a front inside an ingress replica whose deployment turned
            # its own access log off: the request was not that deployment's.
            log_access(scope["method"], scope["path"], 404, time.monotonic(), head.request_id)
            self.ledger.refused(("", "", ""), scope["method"], 404, started)
            return
        target = self.table.target(route, head.session)
        if self.guard.length_refused(head):
            await refuse(send, 413, head.request_id, target[1])
            return
        full = (route[0], *target)
        reserved = None
        if self._admits_first(head, *target):
            reserved = await self._reserve(full, scope, send, head, started)
            if reserved is None:
                return  # answered (503, 408, ...)
        lease = self.budget.lease()
        try:
            body = await self.guard.read_body(receive, head.declared, lease)
            if isinstance(body, int):
                if body == TOO_LARGE:
                    await refuse(send, 413, head.request_id, target[1])
                elif body == BUSY:
                    await self._busy(full, scope, send, head, started)
                return  # else the client went away while sending
            await self._forward(scope, receive, send, head, full, body, started, reserved)
        finally:
            lease.release()
            if reserved is not None:
                reserved.release()  # unless the request took it

    def _admits_first(self, head: RequestHead, app: str, dep: str) -> bool:
        """Whether a replica slot is taken before the body is read: a large body (or one of
        unknown length) going to a replica through a router, so that no body is buffered
        here for a request that would only wait for a replica, or be refused."""
        if not (head.chunked or head.declared >= ADMIT_FIRST_BYTES):
            return False
        if serves_here(self.local, self.client, app, dep, head.model_id):
            return False
        # A router that cannot reserve (a stand-in of a test) gets the body read first.
        return callable(getattr(self.client.router(app, dep), "reserve", None))

    async def _reserve(self, route: Route, scope: Scope, send: Any, head: RequestHead,
                       started: float) -> Reservation | None:
        """A slot of the route's router (queueing like any request, bounded by the request
        timeout), or None once the request was answered with the error."""
        router = self.client.router(route[1], route[2])
        try:
            async with asyncio.timeout(self.options.request_timeout_s):
                return await router.reserve(head.model_id)
        except Exception as exc:
            status, body, extra = error_answer(exc, head.request_id)
            # The body was not read: the connection cannot carry another request.
            await send_json(send, status, body, head.request_id, [*extra, (b"connection", b"close")])
            log_access(scope["method"], scope["path"], status, started, head.request_id, route[0])
            self.ledger.refused(route, scope["method"], status, started)
            return None

    async def _busy(self, route: Route, scope: Scope, send: Any, head: RequestHead, started: float) -> None:
        """The body found no room in the front's budget in time: 503, retry later."""
        rid = head.request_id
        await send_json(send, 503, {"error": "service overloaded: too many request bodies in flight",
                                    "request_id": rid}, rid, [(b"retry-after", b"1"), (b"connection", b"close")])
        log_access(scope["method"], scope["path"], 503, started, rid, route[0])
        self.ledger.refused(route, scope["method"], 503, started)

    async def _answer_front(self, path: str, scope: Scope, send: Any, request_id: str) -> bool:
        """Answer what the front itself serves after the credentials check (routes, the
        dashboard, metrics); False when the request is for an application."""
        if path == "/-/routes":
            await send_json(send, 200, self.table.listing(), request_id)
            return True
        if path in dashboard.PATHS:
            await dashboard.respond(self, path, scope, send, request_id)
            return True
        if path == "/metrics" and _metrics.PROCESS.page_source is not None:
            await _metrics.serve_page(send, request_id)  # the whole local instance's metrics
            return True
        return False

    async def _forward(self, scope: Scope, receive: Any, send: Any, head: RequestHead, route: Route,
                       body: bytes | bytearray, started: float, reserved: Reservation | None = None) -> None:
        """Send the request to its application and stream the answer back, accounted."""
        prefix, app, dep = route
        inner = forward_scope(scope, with_request_id(scope["headers"], head),
                              self.guard.root + (prefix if prefix != "/" else ""))
        meta = RequestMeta(request_id=head.request_id, http=True, multiplexed_model_id=head.model_id, route=prefix)
        span = None
        if _tracing.enabled:
            span, meta = _tracing.start_http(scope, meta, app, dep)
        run = runner(self.local, self.client, app, dep, inner, body, meta, reserved)
        ledger = self.ledger
        ledger.begin()
        code = 500
        try:
            code = await Exchange(meta, inner, receive, send, self.options.request_timeout_s, log_access).run(run)
        finally:
            ledger.end(route, scope["method"], code, started, span)
