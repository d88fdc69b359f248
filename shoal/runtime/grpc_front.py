"""The gRPC ingress: a ``grpc.aio`` server in the proxy process, in front of every application.

Each RPC method that the user's servicer functions register (:mod:`shoal.runtime.grpc_methods`)
is answered by the method of the same name of an application's ingress deployment, called
through the deployment's router like a handle call: the request message goes in, the returned
message (or, for a server-streaming method, each yielded message) comes back. The application
is the one named by the ``application`` metadata key, or the only one running. The built-in
``ray.serve.RayServeAPIService`` answers ``ListApplications`` and ``Healthz``, the standard
``grpc.health.v1.Health`` ``Check`` and ``Watch`` (:mod:`shoal.runtime.grpc_health`).

Status codes: a user exception is ``INTERNAL`` with its message; an unknown application
``NOT_FOUND``; a full queue ``RESOURCE_EXHAUSTED``; an unavailable deployment ``UNAVAILABLE``;
``request_timeout_s`` or the client's deadline ``DEADLINE_EXCEEDED``; missing or wrong API keys
(``http_options.api_keys``, sent as ``authorization: Bearer KEY`` or ``x-api-key`` metadata)
``UNAUTHENTICATED``; a :class:`~shoal.exceptions.gRPCStatusError` (raised by the method, or by
its replica for a method that set a code on ``grpc_context`` and raised) its own code. A client
that cancels cancels the call in the replica.

Each answered call writes an access-log line (``GRPC /pkg.Service/Method CODE 1.2ms``) and is
counted under Ray's gRPC metric names; while tracing is on (:mod:`shoal.observability.tracing`)
each routed call gets a ``SERVER`` span, child of the call's ``traceparent`` metadata.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from shoal.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayTaskError,
    ReplicaDiedError,
    RequestCancelledError,
    gRPCStatusError,
)
from shoal.grpc_util import RayServegRPCContext
from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing
from shoal.observability.logs import log_access
from shoal.runtime.grpc_call import GRPC_KWARG, GRPCReply
from shoal.runtime.grpc_methods import GRPCFrontOptions, MethodSpec
from shoal.runtime.http.admit import RouterSource
from shoal.runtime.http.routes import Route, RouteTable
from shoal.runtime.httpguard import Authenticator
from shoal.runtime.ids import new_request_id
from shoal.runtime.wire import RequestMeta, Routes

__all__ = ["GRPCFront", "grpc_status"]

logger = logging.getLogger("shoal.grpc")

API_SERVICE = "ray.serve.RayServeAPIService"
_PUBLIC = frozenset({f"/{API_SERVICE}/Healthz"})  # answered without credentials, as /-/healthz
_MAX_ID = 128
_AUTH_CODES = {401: grpc.StatusCode.UNAUTHENTICATED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
               500: grpc.StatusCode.INTERNAL}
Metadata = Sequence[tuple[str, Any]]


class _Answered(Exception):
    """The call was answered with an error status (``context.abort`` was awaited)."""


class BadAnswer(Exception):
    """The deployment's answer cannot be sent as the method's response message."""


def grpc_status(exc: BaseException, timeout_s: float | None = None) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details for an exception (the gRPC twin of
    :func:`shoal.runtime.http.errors.error_status`)."""
    if isinstance(exc, gRPCStatusError):
        code = _status_code(exc.grpc_code)
        if code is None or code is grpc.StatusCode.OK:  # no code, or OK with an error: the error wins
            code = grpc.StatusCode.INTERNAL
        return code, exc.grpc_details if exc.grpc_details is not None else _describe(exc.original_exception)
    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "service overloaded: too many queued requests"
    if isinstance(exc, DeploymentUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "service unavailable"
    if isinstance(exc, ReplicaDiedError):
        return grpc.StatusCode.INTERNAL, "the replica handling the request died"
    if isinstance(exc, RequestCancelledError):
        return grpc.StatusCode.CANCELLED, "request cancelled"
    if isinstance(exc, TimeoutError) and not isinstance(exc, RayTaskError):
        after = f" after {timeout_s:g} s" if timeout_s is not None else ""
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"request timed out{after}"
    if isinstance(exc, BadAnswer):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, _describe(exc)


def _describe(exc: BaseException) -> str:
    """``Type: message`` of a user's exception (of its cause for one re-raised from a replica)."""
    cause = exc.cause if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None else exc
    text = str(cause)
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def _status_code(code: Any) -> grpc.StatusCode | None:
    """A code given to ``grpc_context.set_code``: a ``grpc.StatusCode``, its number or name."""
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    for c in grpc.StatusCode:
        if code == c.value[0] or (isinstance(code, str) and code.upper() == c.name):
            return c
    return grpc.StatusCode.UNKNOWN


def _metadata_out(pairs: Metadata) -> tuple[tuple[str, Any], ...]:
    """Metadata as gRPC sends it: lower-case keys, str values (bytes for ``-bin`` keys)."""
    out = []
    for k, v in pairs:
        key = str(k).lower()
        out.append((key, v if key.endswith("-bin") and isinstance(v, bytes) else str(v)))
    return tuple(out)


@dataclass(slots=True)
class _Call:
    """One admitted request: where it goes and what goes with it."""

    spec: MethodSpec
    route: Route
    request: Any
    context: RayServegRPCContext
    meta: RequestMeta
    timeout_s: float | None
    started: float
    span: Any = None  # the call's trace span while tracing is on

    @property
    def trailer(self) -> tuple[tuple[str, str], ...]:
        return (("request_id", self.meta.request_id),)


class GRPCFront:
    """The gRPC server of a proxy process: routes calls to ingress deployments by router."""

    def __init__(self, source: RouterSource, options: GRPCFrontOptions, methods: dict[str, MethodSpec],
                 api_keys: Sequence[str] = (), auth: str = "", max_message_bytes: int = 100 * 1024 * 1024,
                 credentials: Any = None) -> None:
        self.source = source
        self.credentials = credentials  # grpc.ServerCredentials: TLS as the HTTP port has it; None: plaintext
        self.options = options
        self.methods = methods
        self.table = RouteTable()
        self.auth = Authenticator.of(api_keys, auth)
        self.max_message_bytes = max_message_bytes
        self.draining = False
        self.server: Any = None
        self.port = 0
        # grpc.health.v1.Health (shoal.runtime.grpc_health) says SERVING while this is true and the
        # server is not draining; a pod sets it to its readiness. More addresses to listen on, too.
        self.ready: Callable[[], bool] = lambda: True
        self.also_listen: tuple[str, ...] = ()
        self._handlers = self._build_handlers()

    # -- lifecycle
    async def start(self) -> int:
        """Listen on the configured address; the port bound."""
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 1),  # the controller holds the port (bound, not listening) for restarts
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", -1),
        ])
        server.add_generic_rpc_handlers((_Dispatch(self._handlers),))
        try:
            port = (server.add_secure_port(self.options.address, self.credentials) if self.credentials is not None
                    else server.add_insecure_port(self.options.address))
        except RuntimeError as e:
            raise RuntimeError(f"cannot serve gRPC on {self.options.address}: {e}") from None
        if not port:
            raise RuntimeError(f"cannot serve gRPC on {self.options.address}")
        for address in self.also_listen:
            try:
                server.add_secure_port(address, self.credentials) if self.credentials is not None \
                    else server.add_insecure_port(address)
            except RuntimeError as e:
                logger.warning("cannot also serve gRPC on %s: %s", address, e)
        await server.start()
        self.server, self.port = server, port
        logger.info("serving gRPC%s on %s (%d methods)", " over TLS" if self.credentials is not None else "",
                    self.options.address, len(self.methods))
        return int(port)

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls (``Healthz`` answers UNAVAILABLE) and end running ones after ``grace`` s."""
        self.draining = True
        if self.server is not None:
            await self.server.stop(grace)

    def set_routes(self, routes: Routes) -> None:
        self.table = RouteTable(routes.table, routes.split)

    @property
    def applications(self) -> list[str]:
        """The applications a call can name (those with a route prefix, as over HTTP)."""
        return sorted({app for _, app, _ in self.table.entries})

    # -- handlers
    def _build_handlers(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for path, spec in self.methods.items():
            out[path] = self._handler(spec)
        out[f"/{API_SERVICE}/ListApplications"] = grpc.unary_unary_rpc_method_handler(self._list_applications)
        out[f"/{API_SERVICE}/Healthz"] = grpc.unary_unary_rpc_method_handler(self._healthz)
        from shoal.runtime.grpc_health import HealthService

        health = HealthService(lambda: not self.draining and self.ready(), {s.service for s in self.methods.values()},
                               closing=lambda: self.draining)
        out.update(health.handlers())
        return out

    def _handler(self, spec: MethodSpec) -> Any:
        if not spec.supported:
            async def refuse(_requests: Any, context: Any) -> None:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                    f"{spec.path} streams requests; the gRPC ingress serves unary and "
                                    "server-streaming methods only")
            if spec.response_streaming:
                return grpc.stream_stream_rpc_method_handler(refuse)
            return grpc.stream_unary_rpc_method_handler(refuse)
        if spec.response_streaming:
            async def stream(raw: bytes, context: Any) -> None:
                await self._stream(spec, raw, context)
            return grpc.unary_stream_rpc_method_handler(stream)

        async def unary(raw: bytes, context: Any) -> bytes:
            return await self._unary(spec, raw, context)
        return grpc.unary_unary_rpc_method_handler(unary)

    async def _unary(self, spec: MethodSpec, raw: bytes, context: Any) -> bytes:
        call = await self._admit(spec, raw, context)
        router = self.source.router(call.route[1], call.route[2])
        try:
            async with asyncio.timeout(call.timeout_s):
                out = await router.call(spec.name, (call.request,), {GRPC_KWARG: call.context}, call.meta)
            result, final = (out.result, out.context) if isinstance(out, GRPCReply) else (out, None)
            payload = self._serialize(spec, result)
        except asyncio.CancelledError:  # the client cancelled (or went away)
            self._done(call, grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:
            await self._fail(context, call, e)
        await self._finish(context, call, final)
        return payload

    async def _stream(self, spec: MethodSpec, raw: bytes, context: Any) -> None:
        call = await self._admit(spec, raw, context)
        router = self.source.router(call.route[1], call.route[2])
        final: RayServegRPCContext | None = None
        try:
            async with asyncio.timeout(call.timeout_s):
                async for item in router.stream(spec.name, (call.request,), {GRPC_KWARG: call.context}, call.meta):
                    if isinstance(item, GRPCReply):  # the last item: the context the method set
                        final = item.context
                        continue
                    await context.write(self._serialize(spec, item))
        except asyncio.CancelledError:  # the client cancelled (or went away)
            self._done(call, grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:
            await self._fail(context, call, e)
        await self._finish(context, call, final)

    # -- the steps of a call
    async def _admit(self, spec: MethodSpec, raw: bytes, context: Any) -> _Call:
        """Check credentials, pick the application, read the request; abort (raising) when
        the call cannot go on."""
        started = time.monotonic()
        md = tuple((m[0], m[1]) for m in (context.invocation_metadata() or ()))
        values = {k: v for k, v in md if isinstance(v, str)}
        rid = values.get("request_id", "")
        if not (0 < len(rid) <= _MAX_ID and rid.isascii() and rid.isprintable() and " " not in rid):
            rid = new_request_id()

        route_of: Route | None = None

        async def refuse(code: grpc.StatusCode, details: str) -> NoReturn:
            self._record(spec.path, code.name, started, rid, route_of)
            await context.abort(code, details, trailing_metadata=(("request_id", rid),))
            raise _Answered()  # not reached: abort raises

        denied = await self._denied(spec.path, md)
        if denied is not None:
            await refuse(*denied)
        route, problem = self._route(values.get("application", ""), values.get("x-session-id", ""))
        if route is None:
            await refuse(grpc.StatusCode.NOT_FOUND, problem)
        route_of = route
        try:
            request = spec.deserialize(raw) if spec.deserialize is not None else raw
        except Exception as e:
            await refuse(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message for {spec.path}: {e}")
        ctx = RayServegRPCContext(md, context.peer() or "", spec.path)
        meta = RequestMeta(rid, stream=spec.response_streaming,
                           multiplexed_model_id=values.get("multiplexed_model_id", ""), route=route[0])
        span = None
        if _tracing.enabled:
            span, meta = _tracing.start_grpc(values.get("traceparent", ""), values.get("tracestate", ""), meta,
                                             spec.path, route[1], route[2])
        return _Call(spec, route, request, ctx, meta, self._timeout(context), started, span)

    def _timeout(self, context: Any) -> float | None:
        """``request_timeout_s``, or the client's deadline when it comes first."""
        limit = self.options.request_timeout_s
        remaining = context.time_remaining()
        if remaining is not None and (limit is None or remaining < limit):
            return max(0.0, float(remaining))
        return limit

    def _route(self, app: str, session: str) -> tuple[Route | None, str]:
        """The (prefix, app, ingress) a call goes to, or None and why not."""
        entries = {a: (p, a, d) for p, a, d in self.table.entries}
        names = ", ".join(sorted(entries)) or "none"
        if app:
            route = entries.get(app)
            if route is None:
                return None, f"application {app!r} not found; applications: {names}"
        elif len(entries) == 1:
            (route,) = entries.values()
        elif not entries:
            return None, "no application is running"
        else:
            return None, (f"set the 'application' metadata key: {len(entries)} applications are running "
                          f"({names}); /{API_SERVICE}/ListApplications lists them")
        target = self.table.target(route, session.encode())
        return (route[0], *target), ""

    async def _denied(self, path: str, md: Metadata) -> tuple[grpc.StatusCode, str] | None:
        """Why the credentials do not let the call in (None: they do, or none are needed)."""
        if self.auth is None or path in _PUBLIC:
            return None
        headers = [(k.encode("latin-1"), v if isinstance(v, bytes) else str(v).encode("latin-1")) for k, v in md]
        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": b"", "headers": headers, "scheme": "http", "http_version": "2",
                 "server": None, "client": None}
        status = await self.auth.check(scope)
        if not status:
            return None
        code = _AUTH_CODES.get(status, grpc.StatusCode.PERMISSION_DENIED)
        return code, "unauthorized" if status == 401 else f"request refused ({status})"

    def _serialize(self, spec: MethodSpec, message: Any) -> bytes:
        if isinstance(message, bytes | bytearray) and spec.response_type is None:
            return bytes(message)
        if spec.response_type is not None and not isinstance(message, spec.response_type):
            raise BadAnswer(f"{spec.name} of the ingress deployment returned {type(message).__name__}; "
                            f"{spec.path} answers with {spec.response_type.__name__} messages")
        try:
            return spec.serialize(message) if spec.serialize is not None else bytes(message)
        except Exception as e:
            raise BadAnswer(f"{spec.name} of the ingress deployment returned {type(message).__name__}, "
                            f"which cannot be sent as {spec.path}'s response: {e}") from None

    async def _fail(self, context: Any, call: _Call, exc: BaseException) -> NoReturn:
        """Answer with the status of ``exc`` (raises, as ``context.abort`` does)."""
        code, details = grpc_status(exc, call.timeout_s)
        if code is grpc.StatusCode.INTERNAL and not isinstance(exc, BadAnswer | RayTaskError | gRPCStatusError):
            logger.error("gRPC request %s to %s failed: %s", call.meta.request_id, call.spec.path, details)
        trailing = call.trailer
        if isinstance(exc, gRPCStatusError) and exc._trailing_metadata:
            trailing = (*_metadata_out(exc._trailing_metadata), *call.trailer)
        self._done(call, code)
        await context.abort(code, details, trailing_metadata=trailing)
        raise _Answered()  # not reached: abort raises

    async def _finish(self, context: Any, call: _Call, final: RayServegRPCContext | None) -> None:
        """Apply what the method set on its ``grpc_context`` (code, details, trailing metadata)."""
        trailing = (*(_metadata_out(final.trailing_metadata()) if final is not None else ()), *call.trailer)
        code = _status_code(final.code()) if final is not None else None
        details = final.details() if final is not None else ""
        self._done(call, code or grpc.StatusCode.OK)
        if code is not None and code is not grpc.StatusCode.OK:
            await context.abort(code, details, trailing_metadata=trailing)
        context.set_trailing_metadata(trailing)
        if details:
            context.set_details(details)

    @classmethod
    def _done(cls, call: _Call, code: grpc.StatusCode) -> None:
        """An admitted call ended with ``code``: its access-log line, metrics and trace span."""
        cls._record(call.spec.path, code.name, call.started, call.meta.request_id, call.route)
        if call.span is not None:
            span, call.span = call.span, None
            _tracing.end_grpc(span, code)

    @staticmethod
    def _record(path: str, code: str, started: float, request_id: str, route: Route | None) -> None:
        """The access-log line and the gRPC metrics of an answered call."""
        log_access("GRPC", path, code, started, request_id, route[0] if route is not None else "")
        app, deployment = (route[1], route[2]) if route is not None else ("", "")
        _metrics.PROCESS.grpc_done(app, deployment, route[0] if route is not None else "", path, code, started)

    # -- ray.serve.RayServeAPIService
    async def _list_applications(self, raw: bytes, context: Any) -> bytes:
        from shoal.generated.serve_pb2 import ListApplicationsResponse

        md = tuple((m[0], m[1]) for m in (context.invocation_metadata() or ()))
        denied = await self._denied(f"/{API_SERVICE}/ListApplications", md)
        if denied is not None:
            await context.abort(*denied)
        return ListApplicationsResponse(application_names=self.applications).SerializeToString()  # type: ignore[no-any-return]

    async def _healthz(self, raw: bytes, context: Any) -> bytes:
        from shoal.generated.serve_pb2 import HealthzResponse

        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this proxy is draining")
        return HealthzResponse(message="success").SerializeToString()  # type: ignore[no-any-return]


class _Dispatch(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Method path -> handler (None: UNIMPLEMENTED)."""

    def __init__(self, handlers: dict[str, Any]) -> None:
        self._handlers = handlers

    def service(self, handler_call_details: Any) -> Any:
        return self._handlers.get(handler_call_details.method)


def server_credentials(http: Any) -> Any:
    """gRPC server credentials from the HTTP options' TLS settings (``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_keyfile_password``; ``ssl_ca_certs`` requires client certificates, mutual TLS), so the
    gRPC port is as protected as the HTTP one; None without TLS."""
    if not getattr(http, "ssl_certfile", None):
        return None
    with open(http.ssl_certfile, "rb") as f:
        cert = f.read()
    with open(http.ssl_keyfile, "rb") as f:
        key = f.read()
    if http.ssl_keyfile_password:
        try:
            from cryptography.hazmat.primitives import serialization
        except ImportError:
            raise RuntimeError("gRPC over TLS with an encrypted ssl_keyfile needs the `cryptography` package "
                               "(pip install 'shoal[grpc]')") from None
        private = serialization.load_pem_private_key(key, password=http.ssl_keyfile_password.encode())
        key = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    ca = None
    if http.ssl_ca_certs:
        with open(http.ssl_ca_certs, "rb") as f:
            ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def load_front(source: RouterSource, options: GRPCFrontOptions, api_keys: Sequence[str] = (), auth: str = "",
               max_message_bytes: int = 100 * 1024 * 1024,
               importer: Callable[[str, str], Callable[..., Any]] | None = None, credentials: Any = None) -> GRPCFront:
    """A :class:`GRPCFront` for ``options``: its servicer functions imported and read."""
    from shoal._grpc_options import import_servicer_function
    from shoal.runtime.grpc_methods import load_methods

    get = importer or import_servicer_function
    field = "grpc_options.grpc_servicer_functions"
    functions = [(path, get(path, f"{field}[{i}]")) for i, path in enumerate(options.servicer_functions)]
    return GRPCFront(source, options, load_methods(functions, field), api_keys, auth, max_message_bytes, credentials)
