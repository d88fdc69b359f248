"""The user's deployment object and how requests reach it, independent of any transport.

Both the replica process and the in-process local testing mode run requests through
:class:`UserCallable`, so the two modes share one set of semantics. Async methods run on the
replica's event loop; sync methods and sync generators run on one dedicated user thread, so
that they never block the loop (health checks, cancellation, other requests) and are never
run concurrently with each other — the behaviour Ray Serve users rely on.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime
import decimal
import difflib
import enum
import functools
import inspect
import json
import logging
import pathlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shoal.context import ReplicaContext, RequestContext, _replica_ctx, _request_ctx
from shoal.runtime import grpc_call
from shoal.runtime.wire import RequestMeta

logger = logging.getLogger("shoal.replica")
# A cancelled streamed response's generator gets this long to run its cleanup (``finally``).
CLOSE_BODY_TIMEOUT_S = 5.0

_SYNC, _ASYNC, _GEN, _AGEN = range(4)
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


def _kind(fn: Callable[..., Any]) -> int:
    target: Any = fn
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        target = getattr(fn, "__call__", fn)  # noqa: B004 - a callable object's method decides
    if inspect.isasyncgenfunction(target):
        return _AGEN
    if inspect.iscoroutinefunction(target):
        return _ASYNC
    if inspect.isgeneratorfunction(target):
        return _GEN
    return _SYNC


def _takes_rank(fn: Callable[..., Any]) -> bool:
    """Whether a ``reconfigure`` method takes a ``rank`` after ``user_config``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class UserCallable:
    """Owns one instance of a deployment's class (or its function) and runs requests on it."""

    def __init__(self, func_or_class: Any, init_args: tuple[Any, ...], init_kwargs: dict[str, Any],
                 *, is_function: bool, context: ReplicaContext) -> None:
        self._target = func_or_class
        self._args = init_args
        self._kwargs = init_kwargs
        self._is_function = is_function
        self._ctx = context
        self._obj: Any = None
        self._methods: dict[str, tuple[Callable[..., Any], int]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shoal-user-{context.deployment}")
        self._asgi: Any = None
        self._call_takes_request: bool | None = None  # whether __call__ gets the HTTP request

    @property
    def instance(self) -> Any:
        return self._obj

    # -- lifecycle
    def _in_context(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        token = _replica_ctx.set(self._ctx)
        try:
            return fn(*args, **kwargs)
        finally:
            _replica_ctx.reset(token)

    async def initialize(self, user_config: Any = None) -> None:
        """Construct the object (on the loop thread, so constructors may use asyncio)."""
        if self._is_function:
            self._obj = self._target
        else:
            self._obj = self._in_context(self._target, *self._args, **self._kwargs)
            ctx = self._ctx
            self._ctx = dataclasses.replace(ctx, servable_object=self._obj)
        asgi = getattr(self._target, "__shoal_asgi_app__", None)
        if asgi is not None and is_app_factory(asgi):
            # @serve.ingress(factory): each replica builds its own app (nothing to pickle).
            asgi = self._in_context(asgi)
        if asgi is not None:
            self._asgi = bind_asgi_app(asgi, self._target, self._obj) if not self._is_function else asgi
        if user_config is not None:
            await self.reconfigure(user_config)

    async def _call_plain(self, fn: Callable[..., Any], kind: int, *args: Any) -> Any:
        if kind == _ASYNC:
            return await self._in_context(fn, *args)
        result = await self.run_sync(fn, *args)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def reconfigure(self, user_config: Any) -> None:
        """Call ``reconfigure(user_config)``, or ``reconfigure(user_config, rank)`` when it takes
        a second parameter (Ray's replica ranks: a :class:`~shoal.context.ReplicaRank`)."""
        fn = getattr(self._obj, "reconfigure", None) if not self._is_function else None
        if fn is None:
            if user_config is not None:
                raise ValueError(f"deployment {self._ctx.deployment!r} has a user_config but no reconfigure() method")
            return
        if _takes_rank(fn):
            await self._call_plain(fn, _kind(fn), user_config, self._ctx.rank)
        else:
            await self._call_plain(fn, _kind(fn), user_config)

    @property
    def context(self) -> ReplicaContext:
        """The replica context user code sees (rank, world size, tags)."""
        return self._ctx

    def update_context(self, **changes: Any) -> None:
        """Change fields of the replica context user code sees (e.g. ``world_size`` after a scale)."""
        from shoal import context

        self._ctx = dataclasses.replace(self._ctx, **changes)
        process_ctx = context._process_replica_ctx
        if process_ctx is not None and process_ctx.replica_tag == self._ctx.replica_tag:
            context.set_process_replica_context(self._ctx)

    @property
    def records_autoscaling_stats(self) -> bool:
        """Whether the deployment reports custom autoscaling metrics (``record_autoscaling_stats``)."""
        return not self._is_function and callable(getattr(self._obj, "record_autoscaling_stats", None))

    async def autoscaling_stats(self) -> tuple[tuple[str, float], ...]:
        """Call ``record_autoscaling_stats()`` (sync on the user thread, or async) and check its
        answer: a dict of metric names to numbers. Raises ``TypeError`` naming what is wrong."""
        fn = self._obj.record_autoscaling_stats
        result = await self._call_plain(fn, _kind(fn))
        if not isinstance(result, dict):
            raise TypeError(f"record_autoscaling_stats() returned {type(result).__name__}; expected a dict of "
                            "metric names to numbers")
        out = []
        for name, value in result.items():
            if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"record_autoscaling_stats() returned {name!r}: {value!r}; expected str keys and "
                                "int or float values")
            out.append((name, float(value)))
        return tuple(out)

    async def check_health(self) -> None:
        fn = getattr(self._obj, "check_health", None) if not self._is_function else None
        if fn is not None:
            await self._call_plain(fn, _kind(fn))

    async def shutdown(self) -> None:
        fn = getattr(type(self._obj), "__del__", None) if not self._is_function and self._obj is not None else None
        try:
            if fn is not None:
                await self._call_plain(functools.partial(fn, self._obj), _SYNC)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def run_sync(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Run sync user code on the user thread, with the caller's context variables."""
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, self._in_context, fn, *args, **kwargs)
        return asyncio.get_running_loop().run_in_executor(self._executor, call)

    # -- requests
    def _resolve(self, method: str) -> tuple[Callable[..., Any], int]:
        try:
            return self._methods[method]
        except KeyError:
            pass
        if self._is_function:
            if method != "__call__":
                raise AttributeError(f"function deployment {self._ctx.deployment!r} has no method {method!r}: "
                                     "call the handle itself (handle.remote(...))")
            fn = self._obj
        else:
            fn = getattr(self._obj, method, None)
            if fn is None or (method.startswith("_") and method != "__call__"):
                raise AttributeError(missing_method(self._ctx.deployment, method, self._obj))
        entry = (fn, _kind(fn))
        self._methods[method] = entry
        return entry

    def _enter(self, meta: RequestMeta) -> contextvars.Token[RequestContext]:
        return _request_ctx.set(RequestContext(meta.request_id, meta.multiplexed_model_id, meta.route,
                                               self._ctx.app_name))

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta) -> Any:
        fn, kind = self._resolve(method)
        kwargs, grpc_context = grpc_call.prepare(fn, kwargs)  # a request of the gRPC ingress
        token = self._enter(meta)
        try:
            if kind == _ASYNC:
                result = await self._in_context(fn, *args, **kwargs)
            elif kind in (_GEN, _AGEN):
                raise TypeError(
                    f"method {method!r} of {self._ctx.deployment!r} is a generator; "
                    "call it with handle.options(stream=True)"
                )
            else:
                result = await self.run_sync(fn, *args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as e:  # a gRPC request's code set on grpc_context goes with the error
            if grpc_context is None or (out := grpc_call.failure(e, grpc_context)) is e:
                raise
            raise out from None
        finally:
            _request_ctx.reset(token)
        return grpc_call.reply(result, grpc_context)

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[Any]:
        fn, kind = self._resolve(method)
        kwargs, grpc_context = grpc_call.prepare(fn, kwargs)  # a request of the gRPC ingress
        # A generator may be resumed from different tasks (and so contexts): set the request
        # context again on every resumption instead of resetting a token.
        self._enter(meta)
        try:
            if kind == _AGEN:
                agen = self._in_context(fn, *args, **kwargs)
                try:
                    async for item in agen:
                        yield item
                        self._enter(meta)
                finally:
                    await agen.aclose()
            elif kind == _GEN:
                gen = await self.run_sync(fn, *args, **kwargs)
                done = object()
                try:
                    while True:
                        item = await self.run_sync(next, gen, done)
                        if item is done:
                            break
                        yield item
                        self._enter(meta)
                finally:
                    await self.run_sync(gen.close)
            else:
                raise TypeError(
                    f"stream=True was set but method {method!r} of {self._ctx.deployment!r} is not a generator"
                )
        except Exception as e:  # a gRPC request's code set on grpc_context goes with the error
            if grpc_context is None or (out := grpc_call.failure(e, grpc_context)) is e:
                raise
            raise out from None
        if grpc_context is not None:  # the context the method set, after its last item
            yield grpc_call.reply(None, grpc_context)

    async def websocket(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                        send: ASGISend, meta: RequestMeta) -> None:
        """Run one WebSocket (an ASGI ``websocket`` scope) through the app given to
        @serve.ingress. A deployment without one (``__call__(request)``) refuses it at the
        handshake, as Starlette refuses a path without a websocket route: 403."""
        if self._asgi is None:
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1000,
                        "reason": f"deployment {self._ctx.deployment!r} serves no WebSockets (no ASGI app)"})
            return
        token = self._enter(meta)
        try:
            await self._in_context(self._asgi, scope, receive, send)
        finally:
            _request_ctx.reset(token)

    async def http(self, scope: dict[str, Any], body: bytes, send: ASGISend, meta: RequestMeta) -> None:
        """Serve one HTTP request: an ASGI app given to @serve.ingress, or ``__call__(request)``."""
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            # Nothing more will come; wait until the request is cancelled (client disconnect).
            await asyncio.get_running_loop().create_future()
            return {"type": "http.disconnect"}  # pragma: no cover

        if self._asgi is not None:
            token = self._enter(meta)
            try:
                await self._in_context(self._asgi, scope, receive, send)
            finally:
                _request_ctx.reset(token)
            return
        from starlette.requests import Request

        request = Request(scope, receive)
        fn, kind = self._resolve("__call__")
        # As Ray does: a handler that takes no argument is called without the request
        # (its signature is read once, not per request).
        if self._call_takes_request is None:
            self._call_takes_request = takes_an_argument(fn)
        args: tuple[Any, ...] = (request,) if self._call_takes_request else ()
        if kind in (_GEN, _AGEN):
            from starlette.responses import StreamingResponse

            response: Any = StreamingResponse(self.stream("__call__", args, {}, meta))
        else:
            response = to_response(await self.call("__call__", args, {}, meta), self._ctx.deployment)
        try:
            await response(scope, receive, send)
        finally:
            # A streamed body whose request was cancelled (client gone, timeout): close its
            # generator now, so that the user's ``finally`` runs at once, not at garbage collection.
            await _close_body(response)


def missing_method(deployment: str, method: str, obj: Any) -> str:
    """The error for a handle call to a method the deployment lacks: the methods it has (and
    the closest one, for a typo)."""
    names = sorted(n for n in dir(type(obj)) if not n.startswith("_") and callable(getattr(obj, n, None)))
    if callable(getattr(type(obj), "__call__", None)) and "__call__" in vars(type(obj)):  # noqa: B004
        names.insert(0, "__call__")
    text = f"deployment {deployment!r} has no method {method!r}"
    close = difflib.get_close_matches(method, names, n=1)
    text += f"; did you mean {close[0]!r}?" if close else "."
    return text + (f" Its methods: {', '.join(names)}." if names else " It has no public methods.")


def is_app_factory(app: Any) -> bool:
    """Whether ``@serve.ingress`` was given a function that builds the ASGI app (it takes no
    required argument) rather than the app itself (called with scope, receive, send)."""
    if not inspect.isfunction(app):
        return False
    try:
        params = inspect.signature(app).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                   for p in params)


def takes_an_argument(fn: Callable[..., Any]) -> bool:
    """Whether an HTTP handler accepts a positional argument (the request). Bound methods are
    read without ``self``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True  # a callable inspect cannot read: give it the request
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


async def _close_body(response: Any) -> None:
    """Close a streaming response's body iterator (an async generator), bounded in time."""
    aclose = getattr(getattr(response, "body_iterator", None), "aclose", None)
    if aclose is None:
        return
    try:
        await asyncio.wait_for(aclose(), CLOSE_BODY_TIMEOUT_S)
    except (TimeoutError, RuntimeError):
        logger.warning("a streamed response's generator did not close within %s s", CLOSE_BODY_TIMEOUT_S)


def _json_default(o: Any, deployment: str = "") -> Any:
    """What ``json.dumps`` cannot encode, encoded the way FastAPI's ``jsonable_encoder`` does
    (a handler's return value must mean the same on shoal as on Ray Serve); a value with no
    JSON form is a ``TypeError`` naming its type (and the deployment), never its ``str()``."""
    where = f"deployment {deployment!r}: " if deployment else ""
    if inspect.isawaitable(o):
        if inspect.iscoroutine(o):
            o.close()  # never to be awaited: no "was never awaited" warning on top of the error
        raise TypeError(f"{where}the handler returned an awaitable ({type(o).__name__}) instead of its result: "
                        "did you forget `await`?")
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, (datetime.datetime, datetime.date, datetime.time)):
        return o.isoformat()
    if isinstance(o, datetime.timedelta):
        return o.total_seconds()
    if isinstance(o, decimal.Decimal):
        exponent = o.as_tuple().exponent
        return int(o) if isinstance(exponent, int) and exponent >= 0 else float(o)
    if isinstance(o, (uuid.UUID, pathlib.PurePath)):
        return str(o)
    if isinstance(o, (bytes, bytearray)):
        return bytes(o).decode()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)) or inspect.isgenerator(o):
        return list(o)
    if isinstance(o, Mapping):
        return dict(o)
    try:
        return dict(o)
    except (TypeError, ValueError):
        pass
    try:
        return vars(o)
    except TypeError:
        raise TypeError(f"{where}the handler's return value of type {type(o).__name__} cannot be encoded as JSON; "
                        "return a str, bytes, a JSON-serializable value or a Starlette Response") from None


def to_response(result: Any, deployment: str = "") -> Any:
    """Turn a handler's return value into a Starlette response (``deployment`` names it in errors)."""
    from starlette.responses import PlainTextResponse, Response

    if isinstance(result, Response):
        return result
    if isinstance(result, str):
        return PlainTextResponse(result)
    if isinstance(result, (bytes, bytearray, memoryview)):
        return Response(bytes(result), media_type="application/octet-stream")
    default = functools.partial(_json_default, deployment=deployment) if deployment else _json_default
    body = json.dumps(result, default=default, ensure_ascii=False).encode()
    return Response(body, media_type="application/json")


def bind_asgi_app(app: Any, cls: type, instance: Any) -> Any:
    """Make FastAPI routes declared on the class's methods call this instance's bound methods."""
    try:
        from fastapi import FastAPI
        from fastapi.routing import APIRoute, APIWebSocketRoute
    except ImportError:  # a plain ASGI or Starlette app
        return app
    if not isinstance(app, FastAPI):
        return app
    owned = {name: fn for name, fn in vars(cls).items() if inspect.isfunction(fn)}
    new_routes: list[Any] = []
    changed = False
    for route in app.router.routes:
        endpoint = getattr(route, "endpoint", None)
        name = getattr(endpoint, "__name__", None)
        if isinstance(route, APIRoute) and name in owned and owned[name] is endpoint:
            bound = getattr(instance, name)
            new_routes.append(APIRoute(
                route.path, bound, methods=list(route.methods or ()), name=route.name,
                response_model=route.response_model, status_code=route.status_code, tags=route.tags,
                dependencies=route.dependencies, summary=route.summary, description=route.description,
                response_description=route.response_description, responses=route.responses,
                deprecated=route.deprecated, response_class=route.response_class,
                include_in_schema=route.include_in_schema, openapi_extra=route.openapi_extra,
            ))
            changed = True
        elif isinstance(route, APIWebSocketRoute) and name in owned and owned[name] is endpoint:
            new_routes.append(APIWebSocketRoute(route.path, getattr(instance, name), name=route.name))
            changed = True
        else:
            new_routes.append(route)
    if changed:
        app.router.routes[:] = new_routes
        app.openapi_schema = None
    return app
