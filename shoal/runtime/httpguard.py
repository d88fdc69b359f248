"""What an HTTP front checks before a request reaches an application.

Every front (the proxy process, ingress replicas serving HTTP themselves, a pod's front)
runs a :class:`~shoal.runtime.http.app.ProxyApp` under :class:`~shoal.runtime.proxy.HTTPFront`;
this module holds the parts of them that are about trust (the request path's guard step,
:mod:`shoal.runtime.http.guard`, applies them to each request):

* :func:`head_limited_protocol` — uvicorn's httptools protocol with a bound on the request
  head (request line and headers): httptools itself buffers headers without limit, so a
  client could grow a server's memory by sending one endless header. Past the bound the
  client gets 431 and the connection closes. A complete head with unsound framing (no or two
  ``Host`` headers, ``Transfer-Encoding`` other than ``chunked``: :mod:`shoal.runtime.http.strict`)
  gets 400 or 501; every refusal and parser error is a short JSON answer with ``Connection: close``.
* :func:`guarded_protocol` — the same, plus connection hygiene (request head, body and write
  timeouts, the connection cap, Envoy-style draining): see :mod:`shoal.runtime.http.connections`.
* :class:`Authenticator` — API keys (compared in constant time) and the optional auth hook.
* :func:`ssl_config` — uvicorn's TLS settings from the front's options.
* :func:`exposure_warning` — the warning for a public address without authentication.

Nothing here imports pydantic: proxy processes start without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import inspect
import ipaddress
import json
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from shoal.runtime.http.connections import (
    MAX_LINGERING,
    REFUSED_LINGER_S,
    ConnLimits,
    FrontConnections,
    Pool,
    StallTimer,
)
from shoal.runtime.http.strict import Fault, head_fault

if TYPE_CHECKING:  # at run time the mixin's base is object; head_limited_protocol adds uvicorn's class
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _ProtocolBase
else:
    _ProtocolBase = object

logger = logging.getLogger("shoal.proxy")

Headers = Sequence[tuple[bytes, bytes]]


# ---- request head limit --------------------------------------------------------------------


def error_bytes(status: int, reason: str, text: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 error response with a short JSON body and a new request id; the
    connection closes after it. ``extra``: more header lines, each ending in CRLF."""
    request_id = os.urandom(8).hex()
    body = json.dumps({"error": text, "request_id": request_id}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"x-request-id: {request_id}\r\n{extra}connection: close\r\n\r\n"
    ).encode() + body


# How long a connection refused for its head lingers, dropping input, before it closes.
LINGER_S = 2.0


class _HeadTooLarge(Exception):
    pass


class _HeadRefused(Exception):
    """A complete head whose framing is refused (:func:`~shoal.runtime.http.strict.head_fault`)."""


class _HeadLimit(_ProtocolBase):
    """The head limit, mixed in before uvicorn's ``HttpToolsProtocol`` by
    :func:`head_limited_protocol` (which sets ``max_header_bytes``).

    The bytes received while a request's head is incomplete are counted (O(1) per read, nothing
    per header). A head still incomplete past the limit is refused at once, so memory per
    connection stays within the limit plus one socket read; a head that completed within a
    read that took the count past the limit is measured exactly (only then).

    A complete head is also checked for sound framing (:mod:`shoal.runtime.http.strict`: one
    ``Host``, only ``chunked`` as ``Transfer-Encoding``, ...) before uvicorn makes a request of
    it; a refused one gets 400 (or 501) and the connection closes. Every parser error is
    answered in the same JSON shape.
    """

    max_header_bytes = 0
    _head_open = True  # the bytes arriving now belong to a request head
    _head_bytes = 0
    _too_large = False  # the head that just completed is over the limit
    _fault: Fault | None = None  # the head that just completed is refused for its framing
    _refused = False  # refused (431, 400, 501, ...); the connection is closing

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # refused: what still comes is read and dropped until the connection closes
        counting = self._head_open
        if counting:
            self._head_bytes += len(data)
        super().data_received(data)
        if counting and self._head_open and self._head_bytes > self.max_header_bytes:
            self._refuse_head()

    def _refuse_head(self, status: int = 431, reason: str = "Request Header Fields Too Large",
                     text: str = "request header fields too large") -> None:
        self._head_open = False
        self._refused = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if status == 431:
            logger.warning("request head over %d bytes from %s: answered 431", self.max_header_bytes,
                           self.client[0] if self.client else "?")
        cycle = self.cycle
        # Mid-response to an earlier pipelined request there is no clean way to answer.
        if cycle is not None and not cycle.response_complete:
            transport.close()
            return
        self._answer_and_close(status, reason, text)

    def _answer_and_close(self, status: int, reason: str, text: str, linger_s: float = LINGER_S,
                          extra: str = "") -> None:
        """Write a complete error answer and close the connection, dropping what still comes."""
        self._refused = True
        self._head_open = False
        transport = self.transport
        transport.write(error_bytes(status, reason, text, extra))
        # Closing while the client still sends would reset the connection and lose the answer
        # on its way: end our side, drop what the client still sends, close a moment later.
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(linger_s, transport.close)
        else:
            transport.close()

    def on_headers_complete(self) -> None:
        if self._head_bytes > self.max_header_bytes:
            size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
            if size > self.max_header_bytes:
                self._too_large = True
                raise _HeadTooLarge  # stops the parser; uvicorn then calls send_400_response
        fault = head_fault(self.headers, self.parser.get_http_version())
        if fault is not None:
            self._fault = fault
            raise _HeadRefused  # as above
        self._head_open = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_open = True  # what follows is the next request's head

    def send_400_response(self, msg: str) -> None:
        """The parser stopped: answer in JSON (uvicorn's own answer is plain text), then close."""
        if self._too_large:
            self._refuse_head()
        elif self._fault is not None:
            self._refuse_head(*self._fault)
        else:
            self._refuse_head(400, "Bad Request", "invalid HTTP request")


@lru_cache(maxsize=8)
def head_limited_protocol(max_header_bytes: int) -> type[Any]:
    """uvicorn's httptools protocol, answering 431 to a request head over ``max_header_bytes``
    (see :class:`_HeadLimit`). uvicorn is imported only here, when a front starts."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return type("HeadLimitedProtocol", (_HeadLimit, HttpToolsProtocol), {"max_header_bytes": max_header_bytes})


# ---- connection hygiene: timeouts, the connection cap, draining ----------------------------


class _Guarded(_HeadLimit):
    """Connection hygiene (see :mod:`shoal.runtime.http.connections`), mixed in before
    uvicorn's ``HttpToolsProtocol`` by :func:`guarded_protocol`, which sets the class's
    ``limits``, ``front`` (every connection of the front: the cap) and ``pool`` (the
    connections of one listening server: the drain).

    Timers: one for the request head (armed when a connection opens, when bytes arrive on an
    idle kept-alive connection, and at a head's first byte), one for the request body (a
    :class:`~shoal.runtime.http.connections.StallTimer`: progress costs nothing), one for a
    write the client does not read (armed while the transport has paused writing).
    """

    limits = ConnLimits()
    front: FrontConnections
    pool: Pool
    _member = False  # counted in front and pool
    _lingering = False  # refused over the cap, lingering
    _head_started = False  # part of a request head arrived
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: StallTimer | None = None
    _write_timer: asyncio.TimerHandle | None = None
    _upgraded = False  # upgraded to a WebSocket: the connection is no longer this protocol's

    # -- the connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        front = self.front
        if len(front.live) >= self.limits.max_connections:
            self._refuse_connection()
            return
        front.live.add(self)
        self.pool.add(self)
        self._member = True
        self._arm_head()

    def _refuse_connection(self) -> None:
        front = self.front
        front.refused += 1
        self._warn("cap", "%d connection(s) over the front's cap of %d answered 503 (latest from %s)",
                   self.limits.max_connections, self._client())
        linger = 0.0
        if front.lingering < MAX_LINGERING:
            front.lingering += 1
            self._lingering = True
            linger = REFUSED_LINGER_S
        self._answer_and_close(503, "Service Unavailable", "too many connections", linger_s=linger,
                               extra="retry-after: 1\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _forget(self) -> None:
        """The connection is gone: stop its timers, and count it no more."""
        self._stop_timers()
        if self._member:
            self._member = False
            self.front.release(self)
            self.pool.discard(self)
        if self._lingering:
            self._lingering = False
            self.front.lingering -= 1

    # -- a WebSocket upgrade: the connection is the WebSocket protocol's from now on
    def handle_websocket_upgrade(self) -> None:
        """Hand the connection to the WebSocket protocol: none of the HTTP timers applies to
        an open WebSocket (an idle one stays open; the server's pings watch the client), the
        WebSocket protocol has its own write timeout (:class:`_GuardedWebSocket`), and the
        connection stays counted (the cap, the drain) until the WebSocket's connection is lost."""
        self._upgraded = True
        self._stop_timers()
        super().handle_websocket_upgrade()
        transport = self.transport
        ws = transport.get_protocol() if transport is not None else None
        if isinstance(ws, _GuardedWebSocket):
            ws.on_lost = self._forget
        else:
            self._forget()

    def _stop_timers(self) -> None:
        for handle in (self._head_timer, self._write_timer):
            if handle is not None:
                handle.cancel()
        self._head_timer = self._write_timer = None
        if self._body_timer is not None:
            self._body_timer.stop()

    def _in_flight(self) -> bool:
        cycle = self.cycle
        return (cycle is not None and not cycle.response_complete) or bool(self.pipeline)

    def _idle(self) -> bool:
        """No request on the connection, not even part of one (an open WebSocket is never idle)."""
        return not self._upgraded and not self._in_flight() and not self._head_started

    def _client(self) -> str:
        return self.client[0] if self.client else "?"

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """A warning about a cut connection, with how many there were (rate-limited per kind)."""
        count = self.front.note(kind, self.loop.time())
        if count:
            logger.warning(message, count, *args)

    # -- the request head
    def _arm_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Bytes on an idle connection (uvicorn's keep-alive timer stops at any byte): a head
        # must now complete in time, even if the bytes were only blank lines.
        if not self._refused and not self._upgraded and self._head_timer is None and not self._in_flight():
            transport = self.transport
            if transport is not None and not transport.is_closing():
                self._arm_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        self._arm_head()

    def on_headers_complete(self) -> None:
        self._head_started = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        if self.pool.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # draining: answered with Connection: close
        if self._body_timer is None:
            self._body_timer = StallTimer(self.loop, self.limits.body_timeout_s, self._body_timeout)
        self._body_timer.start()  # stopped at once by on_message_complete when there is no body

    def _head_timeout(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or self._refused or self._upgraded:
            return
        if self._in_flight():
            self._arm_head()  # a pipelined head behind a request: judged once that one is answered
            return
        if not self._head_started:
            transport.close()  # nothing arrived: nobody is owed an answer
            return
        self._warn("head", "%d request head(s) incomplete after %ss answered 408 (latest from %s)",
                   self.limits.header_timeout_s, self._client())
        self._answer_and_close(408, "Request Timeout", "request head timed out")

    # -- the request body
    def on_body(self, body: bytes) -> None:
        if self._body_timer is not None:
            self._body_timer.progress()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.stop()
        super().on_message_complete()

    def _body_timeout(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._refused:
            return
        cycle = self.cycle
        # Not the client's stall: this side stopped reading (a full buffer, a pipelined request),
        # or the client waits for "100 Continue", which goes out once the handler reads the body.
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            assert self._body_timer is not None
            self._body_timer.start()
            return
        self._warn("body", "%d request body(ies) without bytes for %ss answered 408 or closed (latest from %s)",
                   self.limits.body_timeout_s, self._client())
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the handler waiting for the body gets http.disconnect
            cycle.message_event.set()
        if cycle is None or cycle.response_started:
            transport.close()  # a response is under way or done: no clean answer is possible
            return
        self._answer_and_close(408, "Request Timeout", "request body timed out")

    # -- the response: a client that does not read
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout_s, self._write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timeout(self) -> None:
        self._write_timer = None
        transport = self.transport
        if transport is None:
            return
        self._warn("write", "%d client(s) read nothing of a response for %ss: connection aborted, request "
                   "cancelled (latest %s)", self.limits.write_timeout_s, self._client())
        # abort(): close() would wait for the unread buffer to be sent. The request sees the
        # client gone (http.disconnect) and is cancelled upstream.
        transport.abort()

    # -- draining (Pool)
    def drain_started(self) -> None:
        # The newest request received says Connection: close (closing after an older one would
        # drop the pipelined ones behind it); a response already under way cannot say it.
        cycle = self.pipeline[0][0] if self.pipeline else self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = False

    def grace_over(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and self._idle():
            transport.close()
        # else: its request's answer closes it (Connection: close), or on_response_complete does

    def on_response_complete(self) -> None:
        super().on_response_complete()
        transport = self.transport
        if self.pool.grace_done and transport is not None and not transport.is_closing() and self._idle():
            transport.close()  # a response begun before the drain (no Connection: close) is over


if TYPE_CHECKING:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol as _WSBase
else:
    _WSBase = object


class _GuardedWebSocket(_WSBase):
    """uvicorn's WebSocket protocol with the front's response write timeout: a client that
    reads nothing for ``limits.write_timeout_s`` while the server has something to send is
    aborted (the application sees it gone). ``on_lost`` runs when the connection is lost (the
    HTTP protocol it was upgraded from counts the connection until then)."""

    limits = ConnLimits()
    on_lost: Callable[[], None] | None = None
    _ws_write_timer: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ws_write_timer is not None:
            self._ws_write_timer.cancel()
            self._ws_write_timer = None
        try:
            super().connection_lost(exc)
        finally:
            hook, self.on_lost = self.on_lost, None
            if hook is not None:
                hook()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._ws_write_timer is None:
            loop = asyncio.get_running_loop()
            self._ws_write_timer = loop.call_later(self.limits.write_timeout_s, self._ws_write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._ws_write_timer is not None:
            self._ws_write_timer.cancel()
            self._ws_write_timer = None

    def _ws_write_timeout(self) -> None:
        self._ws_write_timer = None
        logger.warning("a WebSocket client read nothing for %ss: connection aborted", self.limits.write_timeout_s)
        self.transport.abort()


def guarded_ws_protocol(limits: ConnLimits) -> type[Any] | None:
    """uvicorn's WebSocket protocol for the installed library (``websockets``, else
    ``wsproto``) with the front's write timeout; None when neither is installed."""
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    if not isinstance(AutoWebSocketsProtocol, type):
        return None
    return type("GuardedWebSocket", (_GuardedWebSocket, AutoWebSocketsProtocol), {"limits": limits})


def guarded_protocol(max_header_bytes: int, limits: ConnLimits, front: FrontConnections, pool: Pool) -> type[Any]:
    """uvicorn's httptools protocol with the request head limit (:class:`_HeadLimit`) and
    connection hygiene (:class:`_Guarded`) for one listening server of a front: ``front``
    holds every connection of the front (the cap), ``pool`` this server's (the drain)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return type("GuardedProtocol", (_Guarded, HttpToolsProtocol),
                {"max_header_bytes": max_header_bytes, "limits": limits, "front": front, "pool": pool})


# ---- authentication ------------------------------------------------------------------------


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def presented_key(headers: Headers) -> bytes | None:
    """The key in ``Authorization: Bearer <key>`` or ``x-api-key: <key>``, if any."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.strip()
    return None


def import_hook(path: str) -> Callable[..., Any]:
    """The function at ``"module:function"`` (or ``"module.function"``)."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"auth hook {path!r} is not callable")
    return obj  # type: ignore[no-any-return]


class Authenticator:
    """Decides whether a request may go on: its API key, then the auth hook.

    Keys are compared as SHA-256 digests with :func:`hmac.compare_digest`, against every
    configured key, so that the time taken tells nothing about the keys (not even their
    length). The hook gets a Starlette ``Request`` (headers, URL, client; no body) and returns
    ``True`` to allow, or an HTTP status from 400 to 499 to deny with it; anything else denies
    with 401. It may be ``async``.
    """

    def __init__(self, keys: Sequence[str], hook: Callable[..., Any] | None = None) -> None:
        self._digests = tuple(_digest(k.encode()) for k in keys)
        self._hook = hook

    @classmethod
    def of(cls, api_keys: Sequence[str], auth: str) -> Authenticator | None:
        """The authenticator for a front's options, or None when requests need none."""
        if not api_keys and not auth:
            return None
        return cls(api_keys, import_hook(auth) if auth else None)

    def key_ok(self, headers: Headers) -> bool:
        token = presented_key(headers)
        if token is None:
            return False
        given = _digest(token)
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(given, d)
        return ok

    async def check(self, scope: dict[str, Any]) -> int:
        """0 when the request may go on, else the HTTP status to answer with."""
        if self._digests and not self.key_ok(scope["headers"]):
            return 401
        if self._hook is None:
            return 0
        from starlette.requests import Request

        if scope["type"] == "websocket":  # the hook sees the handshake as the GET request it is
            scope = {**scope, "type": "http", "method": "GET"}
        try:
            verdict = self._hook(Request(scope))
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except Exception:
            logger.exception("the auth hook failed; the request is refused")
            return 500
        if verdict is True:
            return 0
        if type(verdict) is int and 400 <= verdict < 500:
            return verdict
        return 401


# ---- TLS -----------------------------------------------------------------------------------


def ssl_config(options: Any) -> dict[str, Any]:
    """uvicorn's ``Config`` arguments for a front's TLS options (none when TLS is off)."""
    if not options.ssl_certfile:
        return {}
    out: dict[str, Any] = {
        "ssl_certfile": options.ssl_certfile,
        "ssl_keyfile": options.ssl_keyfile,
        "ssl_keyfile_password": options.ssl_keyfile_password or None,
    }
    if options.ssl_ca_certs:
        # Ray documents ssl_ca_certs as the CAs that client certificates are verified against:
        # with it, a client without such a certificate cannot connect.
        out["ssl_ca_certs"] = options.ssl_ca_certs
        out["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return out


# ---- exposure ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(http: Any) -> str:
    """A warning when the HTTP port is reachable from other machines without authentication."""
    if is_loopback(http.host) or http.requires_auth:
        return ""
    return (f"http_options.host is {http.host}: the HTTP port is reachable from other machines and "
            "no authentication is configured; set http_options.api_keys_env (or api_keys, "
            "api_keys_file, auth), see docs/security.md")
