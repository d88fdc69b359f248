"""A front's WebSockets: routed like HTTP requests, then bridged for as long as they stay open.

A ``websocket`` scope goes through the steps of an HTTP request (root path, credentials, the
longest route prefix, the canary split), then to the route's ingress as one long-lived
request: to the app served in this very process (an ingress replica serving HTTP itself), or
to a replica through its router, the client's messages following on the same connection
(:mod:`shoal.runtime.wschannel`) and the application's coming back as a stream's items.

Refusals happen at the handshake, before any WebSocket exists: an HTTP answer (401, 403, 404,
503, ...) with the same short JSON body as an HTTP request's, through ASGI's
``websocket.http.response`` extension (a plain 403 where the server lacks it).

Bounds:

* the handshake: the application must accept (or refuse) within the front's
  ``request_timeout_s``, or :data:`HANDSHAKE_TIMEOUT_S` when none is set; else 504. An accepted
  WebSocket is not a request that can time out: it stays open while idle (the server's pings
  keep checking that the client is there);
* the client going away: the application's ``receive()`` gets ``websocket.disconnect``; one
  that does not end within :data:`CLIENT_GONE_GRACE_S` is cancelled;
* the replica failing (or dying) after the accept: the client gets close code 1011.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.observability.logs import log_access
from shoal.runtime.http.admit import serves_here
from shoal.runtime.http.errors import error_answer, not_found, refusal_text
from shoal.runtime.http.guard import RequestHead, read_head, strip_root, with_request_id
from shoal.runtime.wire import RequestMeta
from shoal.runtime.wschannel import ClientMessages

__all__ = ["CLIENT_GONE_GRACE_S", "HANDSHAKE_TIMEOUT_S", "serve_websocket"]

logger = logging.getLogger("shoal.proxy")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

# The application must accept or refuse a WebSocket within this long (no request_timeout_s set).
HANDSHAKE_TIMEOUT_S = 30.0
# After the client went away, the application has this long to end before it is cancelled.
CLIENT_GONE_GRACE_S = 5.0
# The close code a client gets when its application failed, or its replica died.
INTERNAL_ERROR = 1011
_EXTENSION = "websocket.http.response"
# Why the front cancelled a WebSocket.
_HANDSHAKE, _GONE = "handshake", "gone"


async def refuse_handshake(scope: Scope, send: Send, status: int, body: dict[str, Any], request_id: str,
                           extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """Refuse a WebSocket before it is accepted: an HTTP answer with ``status`` and a JSON
    body when the server can send one, else a close (which the server answers with 403)."""
    if _EXTENSION not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008, "reason": str(body.get("error", ""))[:120]})
        return
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"x-request-id", request_id.encode()), *(extra or ())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": data, "more_body": False})


def forward_ws_scope(scope: Scope, headers: list[tuple[bytes, bytes]], root_path: str) -> Scope:
    """The ASGI websocket scope the application gets (plain data: it may travel to a replica)."""
    extensions = scope.get("extensions") or {}
    return {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": scope.get("asgi", {}).get("spec_version", "2.4")},
        "http_version": scope.get("http_version", "1.1"),
        "scheme": scope.get("scheme", "ws"),
        "path": scope["path"],
        "raw_path": scope.get("raw_path"),
        "query_string": scope.get("query_string", b""),
        "root_path": root_path,
        "headers": headers,
        "client": scope.get("client"),
        "server": scope.get("server"),
        "subprotocols": list(scope.get("subprotocols") or ()),
        "state": {},
        "extensions": {_EXTENSION: {}} if _EXTENSION in extensions else {},
    }


async def serve_websocket(front: Any, scope: Scope, receive: Receive, send: Send) -> None:
    # ``front`` is the ProxyApp (shoal.runtime.http.app imports this module: not named here).
    """Route one WebSocket and bridge it to its application until either side closes."""
    first = await receive()
    if first["type"] != "websocket.connect":
        return  # the client went away before the handshake completed
    head = read_head(scope["headers"])
    rid = head.request_id
    started = front.ledger.clock()
    path = strip_root(scope["path"], front.guard.root)
    if path is None:
        await refuse_handshake(scope, send, 404, not_found(scope["path"], hint=False), rid)
        return
    if front.guard.auth is not None:
        denied = await front.guard.denied(scope)
        if denied:
            await refuse_handshake(scope, send, denied, {"error": refusal_text(denied), "request_id": rid}, rid)
            log_access("WEBSOCKET", scope["path"], denied, started, rid)
            return
    route = None if path.startswith("/-/") else front.table.match(path)
    if route is None:
        await refuse_handshake(scope, send, 404, not_found(path), rid)
        log_access("WEBSOCKET", scope["path"], 404, started, rid)
        front.ledger.refused(("", "", ""), "WEBSOCKET", 404, started)
        return
    prefix = route[0]
    app, dep = front.table.target(route, head.session)
    inner = forward_ws_scope(scope, with_request_id(scope["headers"], head),
                             front.guard.root + (prefix if prefix != "/" else ""))
    meta = RequestMeta(request_id=rid, http=True, multiplexed_model_id=head.model_id, route=prefix)
    bridge = Bridge(scope, receive, send, head, front.options.request_timeout_s or HANDSHAKE_TIMEOUT_S, started)
    front.ledger.begin()
    code = 500
    try:
        if serves_here(front.local, front.client, app, dep, head.model_id):
            assert front.local is not None
            local = front.local
            code = await bridge.run(lambda out: local.serve_websocket(inner, bridge.local_receive(first), out, meta))
        else:
            router = front.client.router(app, dep)
            code = await bridge.run(lambda out: bridge.through(router, inner, meta, out))
    finally:
        # Recorded with the handshake's duration, not the WebSocket's life: an open WebSocket
        # is no slow request in the front's latency metrics.
        open_s = time.monotonic() - bridge.accepted_at if bridge.accepted_at else 0.0
        front.ledger.end((prefix, app, dep), "WEBSOCKET", code, started + open_s)


class Bridge:
    """One WebSocket between its client and its application (see the module docstring);
    :meth:`run` returns the status it is recorded with (101: accepted)."""

    __slots__ = ("accepted", "accepted_at", "closed", "gone", "handshake_s", "head", "receive", "scope", "send",
                 "started", "status", "task", "timer", "why")

    def __init__(self, scope: Scope, receive: Receive, send: Send, head: RequestHead, handshake_s: float,
                 started: float) -> None:
        self.scope = scope
        self.started = started
        self.receive = receive
        self.send = send
        self.head = head
        self.handshake_s = handshake_s
        self.accepted = False  # the application accepted: the WebSocket is open
        self.accepted_at = 0.0  # when (time.monotonic())
        self.closed = False  # the application closed it, or refused the handshake
        self.gone = False  # the client went away (or sending to it failed)
        self.status = 500
        self.why = ""
        self.task: asyncio.Task[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None

    async def out(self, message: dict[str, Any]) -> None:
        """Send the application's ``message`` to the client, noting the WebSocket's state."""
        kind = message["type"]
        if kind == "websocket.accept":
            self.accepted = True
            self.accepted_at = time.monotonic()
            self.status = 101
            self._cancel_timer()  # open: no more bound on it
        elif kind == "websocket.close":
            self.closed = True
            if not self.accepted:
                self.status = 403
        elif kind == "websocket.http.response.start":
            self.closed = True
            self.status = int(message.get("status", 403))
        try:
            await self.send(message)
        except Exception:
            self.gone = True
            raise

    def local_receive(self, first: dict[str, Any]) -> Receive:
        """The client's messages for an application served in this process: the handshake
        (already read by the front), then the client's own."""
        pending: list[dict[str, Any]] = [first]

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                self._client_gone()
            return message

        return receive

    async def through(self, router: Any, scope: Scope, meta: RequestMeta, out: Send) -> None:
        """Run the WebSocket on a replica through ``router``: the client's messages follow the
        request (:mod:`shoal.runtime.wschannel`), the application's come back as its items."""
        inbox = ClientMessages()
        reader = asyncio.get_running_loop().create_task(self._read(inbox))
        try:
            async with contextlib.aclosing(router.stream("__call__", (scope, inbox), {}, meta)) as stream:
                async for messages in stream:
                    for message in messages:
                        await out(message)
        finally:
            reader.cancel()

    async def _read(self, inbox: ClientMessages) -> None:
        """Read the client while there is room toward the replica (back-pressure)."""
        while True:
            try:
                message = await self.receive()
            except Exception as exc:  # the server's connection failed under us: the client is gone
                message = {"type": "websocket.disconnect", "code": 1006, "reason": type(exc).__name__}
            await inbox.put(message)
            if message["type"] == "websocket.disconnect":
                self._client_gone()
                return

    async def run(self, runner: Callable[[Send], Awaitable[None]]) -> int:
        loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.timer = loop.call_later(self.handshake_s, self._stop, _HANDSHAKE)
        try:
            await runner(self.out)
        except asyncio.CancelledError:
            if not self.why:
                raise  # the server itself is shutting down
            assert self.task is not None
            self.task.uncancel()
            await self._cancelled()
        except Exception as exc:
            await self._failed(exc)
        finally:
            self._cancel_timer()
            self.why = self.why or "done"
        return self.status

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _stop(self, why: str) -> None:
        self.timer = None
        if self.why or self.task is None:
            return
        if why == _HANDSHAKE and (self.accepted or self.closed):
            return
        self.why = why
        self.task.cancel()

    def _client_gone(self) -> None:
        """The client went away: its application got ``websocket.disconnect``; it has
        :data:`CLIENT_GONE_GRACE_S` to end."""
        self.gone = True
        self._cancel_timer()
        self.timer = asyncio.get_running_loop().call_later(CLIENT_GONE_GRACE_S, self._stop, _GONE)

    async def _cancelled(self) -> None:
        rid = self.head.request_id
        if self.why == _GONE:
            self.status = 499 if not self.accepted else self.status
            return
        logger.warning("websocket %s: the application neither accepted nor refused it within %ss", rid,
                       self.handshake_s)
        self.status = 504
        if not self.gone:
            with contextlib.suppress(Exception):
                await refuse_handshake(self.scope, self.send, 504,
                                       {"error": "websocket handshake timed out", "request_id": rid}, rid)
        log_access("WEBSOCKET", self.scope["path"], 504, self.started, rid)

    async def _failed(self, exc: Exception) -> None:
        """The WebSocket's request failed (the application raised, its replica died, no
        replica could take it): close it with 1011, or refuse the handshake."""
        rid = self.head.request_id
        if self.gone:
            return  # most often sending to a client that went away
        if self.closed:
            logger.warning("websocket %s failed after it closed: %r", rid, exc)
            return
        if self.accepted:
            logger.warning("websocket %s failed: %s", rid, str(exc).splitlines()[0] if str(exc) else repr(exc))
            with contextlib.suppress(Exception):
                await self.send({"type": "websocket.close", "code": INTERNAL_ERROR, "reason": "internal error"})
            return
        status, body, extra = error_answer(exc, rid)
        self.status = status
        with contextlib.suppress(Exception):
            await refuse_handshake(self.scope, self.send, status, body, rid, list(extra))
        log_access("WEBSOCKET", self.scope["path"], status, self.started, rid)
