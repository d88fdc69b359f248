"""Test deployments in-process: no replica processes, no HTTP server, no sleeps.

Three tools, usable from any test framework:

* :class:`LocalRuntime` runs bound applications in this process (the same request path as
  ``serve.run(app, _local_testing_mode=True)``: constructor, handles between deployments,
  streaming, errors wrapped as across processes), returns ingress handles, and answers
  HTTP-style calls (:meth:`LocalRuntime.http`) with the routing and error mapping of the
  HTTP proxy, without a socket.
* :class:`FakeClock` is time that moves only when told. Given to a ``LocalRuntime``, it
  drives ``@serve.batch``'s ``batch_wait_timeout_s``: a partial batch waits until the test
  advances the clock. It also drives :class:`AutoscalingSimulator`.
* :class:`AutoscalingSimulator` runs the real autoscaling policy of a deployment the way
  the controller does, tick by tick on a ``FakeClock``, against a load the test sets.

Example::

    from shoal import serve, testing

    @serve.deployment
    class Doubler:
        def __call__(self, x: int) -> int:
            return 2 * x

    def test_doubler() -> None:
        with testing.run(Doubler.bind()) as rt:
            assert rt.handle.remote(21).result() == 42

:func:`make_request` builds a Starlette ``Request`` for calling a method directly.
"""

from __future__ import annotations

import asyncio
import json as _json
import logging
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from shoal._fakeclock import FakeClock, FakeTimer
from shoal.config import AutoscalingConfig
from shoal.deployment import Application, Deployment, build_app_spec
from shoal.exceptions import RayServeException, wrap_remote_exception
from shoal.handle import DeploymentHandle
from shoal.runtime.backend import LoopThread
from shoal.runtime.http.errors import HEALTHY, error_answer, not_found
from shoal.runtime.http.guard import read_head, with_request_id
from shoal.runtime.http.routes import RouteTable
from shoal.runtime.local import LocalBackend
from shoal.runtime.wire import RequestMeta
from shoal.serving.autoscaling import Autoscaler

__all__ = [
    "AutoscalingSimulator",
    "FakeClock",
    "FakeTimer",
    "HTTPResponse",
    "LocalRuntime",
    "make_request",
    "run",
]

logger = logging.getLogger("shoal.testing")

_NO_JSON: Any = object()


# --------------------------------------------------------------------------------------------
# HTTP without a server


@dataclass
class HTTPResponse:
    """What :meth:`LocalRuntime.http` got back."""

    status_code: int
    headers: dict[str, str]
    chunks: list[bytes] = field(default_factory=list)
    #: The exception behind a 4xx/5xx the runtime produced (not for responses the app returned).
    error: BaseException | None = None

    @property
    def content(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def text(self) -> str:
        return self.content.decode(_charset(self.headers.get("content-type", "")))

    def json(self) -> Any:
        return _json.loads(self.content)

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 400


def _charset(content_type: str) -> str:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            return value.strip('"')
    return "utf-8"


def _request_parts(
    method: str,
    path: str,
    *,
    params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None,
    headers: Mapping[str, str] | None,
    json: Any,
    content: bytes | str | None,
    data: Mapping[str, Any] | None,
    root_path: str = "",
) -> tuple[dict[str, Any], bytes]:
    """An ASGI HTTP scope and body, as a server would build them."""
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")
    path, _, query = path.partition("?")
    if params:
        extra = urlencode(list(params.items()) if isinstance(params, Mapping) else list(params), doseq=True)
        query = f"{query}&{extra}" if query else extra
    given = sum(x is not None for x in (content, data)) + (json is not _NO_JSON)
    if given > 1:
        raise ValueError("pass at most one of json=, content= and data=")
    hdrs: dict[str, str] = {"host": "testserver", "user-agent": "shoal-testing"}
    body = b""
    if json is not _NO_JSON:
        body = _json.dumps(json).encode()
        hdrs["content-type"] = "application/json"
    elif data is not None:
        body = urlencode(list(data.items()), doseq=True).encode()
        hdrs["content-type"] = "application/x-www-form-urlencoded"
    elif content is not None:
        body = content.encode() if isinstance(content, str) else bytes(content)
    if body:
        hdrs["content-length"] = str(len(body))
    for k, v in (headers or {}).items():
        hdrs[k.lower()] = v
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": root_path,
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in hdrs.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    return scope, body


def make_request(
    method: str = "GET",
    path: str = "/",
    *,
    params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
    json: Any = _NO_JSON,
    content: bytes | str | None = None,
    data: Mapping[str, Any] | None = None,
) -> Any:
    """A Starlette ``Request``, for calling a deployment's ``__call__`` without any runtime.

    Example::

        request = make_request("GET", "/", params={"q": "hello"})
        assert request.query_params["q"] == "hello"
    """
    from starlette.requests import Request

    scope, body = _request_parts(method, path, params=params, headers=headers, json=json, content=content,
                                 data=data)
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return Request(scope, receive)


# --------------------------------------------------------------------------------------------
# LocalRuntime


class LocalRuntime:
    """Applications running in this process, for tests. Use it as a context manager.

    Each runtime has its own event loop thread and its own deployments, so tests do not share
    state (and ``serve.run``/``serve.shutdown`` elsewhere do not touch it). Inside its
    deployments, handles passed to constructors and ``serve.get_replica_context()`` work as
    in replicas; ``serve.get_app_handle()``/``get_deployment_handle()`` do not know this
    runtime's apps (use :meth:`get_app_handle`/:meth:`get_deployment_handle` from the test).

    Example::

        clock = FakeClock()
        with LocalRuntime(clock=clock) as rt:
            handle = rt.run(app)                 # the ingress handle, as serve.run returns
            assert handle.remote(1).result() == 2
            assert rt.http("GET", "/", params={"x": "1"}).json() == {"y": 2}
    """

    def __init__(self, *, clock: FakeClock | None = None) -> None:
        self.clock = clock
        self._loop_thread = LoopThread("shoal-testing").start()
        self._backend = LocalBackend(self._loop_thread.loop, clock=clock)
        self._last_app: str | None = None
        self._closed = False

    # -- lifecycle
    def __enter__(self) -> LocalRuntime:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Delete every application (running ``__del__`` of their objects) and stop the loop."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop_thread.run(self._backend.shutdown(), timeout=60)
        finally:
            self._loop_thread.stop()

    def _check_open(self) -> None:
        if self._closed:
            raise RayServeException("this LocalRuntime has been shut down")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the deployments run on."""
        return self._loop_thread.loop

    def run(self, app: Application, *, name: str = "default", route_prefix: str | None = "/") -> DeploymentHandle:
        """Deploy ``app`` as application ``name`` (replacing one of that name); return its ingress handle."""
        self._check_open()
        backend = self._backend
        spec = build_app_spec(app, name, route_prefix,
                              make_handle=lambda dep, app_name: DeploymentHandle(dep, app_name, _backend=backend))
        self._loop_thread.run(backend.deploy(spec))
        self._last_app = name
        return DeploymentHandle(spec.ingress, name, _backend=backend)

    def delete(self, name: str) -> None:
        """Delete application ``name``."""
        self._check_open()
        self._loop_thread.run(self._backend.delete(name))
        if self._last_app == name:
            self._last_app = None

    # -- handles and objects
    @property
    def handle(self) -> DeploymentHandle:
        """The ingress handle of the application run last."""
        if self._last_app is None:
            raise RayServeException("no application is running in this LocalRuntime; call run(app) first")
        return self.get_app_handle(self._last_app)

    def get_app_handle(self, name: str = "default") -> DeploymentHandle:
        spec = self._backend.apps.get(name)
        if spec is None:
            raise RayServeException(f"Application {name!r} does not exist.")
        return DeploymentHandle(spec.ingress, name, _backend=self._backend)

    def get_deployment_handle(self, deployment_name: str, app_name: str = "default") -> DeploymentHandle:
        spec = self._backend.apps.get(app_name)
        if spec is None or deployment_name not in spec.deployments:
            raise RayServeException(f"Deployment {deployment_name!r} does not exist in application {app_name!r}.")
        return DeploymentHandle(deployment_name, app_name, _backend=self._backend)

    def instance(self, deployment_name: str, app_name: str = "default") -> Any:
        """The deployment's object (its class instance, or its function) for white-box checks."""
        inst = self._backend.instances.get((app_name, deployment_name))
        if inst is None:
            raise RayServeException(f"Deployment {deployment_name!r} does not exist in application {app_name!r}.")
        return inst.instance

    # -- time
    def settle(self, rounds: int = 100) -> None:
        """Let the runtime's event loop run what is ready, without moving any clock.

        Afterwards every request sent so far has gone as far as it can in async code, e.g.
        into a ``@serve.batch`` queue waiting for the fake clock. (Sync methods run on a
        worker thread and may still be running; wait for their responses instead.)
        """
        self._check_open()

        async def spin() -> None:
            for _ in range(rounds):
                await asyncio.sleep(0)

        self._loop_thread.run(spin())

    def advance(self, seconds: float) -> None:
        """``settle()``, move the fake clock forward by ``seconds``, ``settle()`` again."""
        if self.clock is None:
            raise RayServeException("this LocalRuntime has no clock; create it with LocalRuntime(clock=FakeClock())")
        self.settle()
        self.clock.advance(seconds)
        self.settle()

    # -- HTTP
    def http(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = _NO_JSON,
        content: bytes | str | None = None,
        data: Mapping[str, Any] | None = None,
        timeout_s: float = 30.0,
    ) -> HTTPResponse:
        """Send one HTTP request to the applications, as the proxy would, and collect the response.

        The longest matching ``route_prefix`` picks the application; ``/-/healthz`` and
        ``/-/routes`` answer as in the proxy; ``x-request-id`` and the
        ``serve_multiplexed_model_id`` header are honoured. Errors become the proxy's short
        JSON bodies (404, 500, 503, ...), with the exception kept in ``response.error``.
        A streamed response is collected chunk by chunk (``response.chunks``) until it ends;
        a response not finished within ``timeout_s`` raises TimeoutError.
        """
        self._check_open()
        scope, body = _request_parts(method, path, params=params, headers=headers, json=json,
                                     content=content, data=data)
        return self._loop_thread.run(asyncio.wait_for(self._serve_http(scope, body), timeout_s), timeout=None)

    def _route_table(self) -> RouteTable:
        """The proxy's route table for the applications running now."""
        apps = self._backend.apps.values()
        return RouteTable.of_routes((s.route_prefix, s.name, s.ingress) for s in apps if s.route_prefix is not None)

    async def _serve_http(self, scope: dict[str, Any], body: bytes) -> HTTPResponse:
        head = read_head(scope["headers"])
        request_id = head.request_id
        scope["headers"] = with_request_id(scope["headers"], head)

        def reply(status: int, payload: Any, error: BaseException | None = None) -> HTTPResponse:
            headers = {"content-type": "application/json", "x-request-id": request_id}
            return HTTPResponse(status, headers, [_json.dumps(payload).encode()], error)

        path: str = scope["path"]
        if path == "/-/healthz":
            return reply(200, HEALTHY)
        table = self._route_table()
        if path == "/-/routes":
            return reply(200, table.listing())
        route = table.match(path)
        if route is None:
            return reply(404, not_found(path))
        prefix, app, dep = route
        scope["root_path"] = prefix if prefix != "/" else ""
        meta = RequestMeta(request_id=request_id, http=True, multiplexed_model_id=head.model_id, route=prefix)
        collected = _Collected()
        try:
            await self._backend.instances[(app, dep)].http(scope, body, collected.send, meta)
        except Exception as e:
            if collected.start is not None:
                raise  # the response had begun: there is no status left to change
            wrapped = e if isinstance(e, RayServeException) else wrap_remote_exception(
                e, "".join(traceback.format_exception(e)))
            status, payload, extra = error_answer(wrapped, request_id)
            if status == 500:
                logger.error("request %s to %s failed:\n%s", request_id, prefix, "".join(traceback.format_exception(e)))
            response = reply(status, payload, wrapped)
            response.headers.update((k.decode("latin-1"), v.decode("latin-1")) for k, v in extra)
            return response
        if collected.start is None:
            raise RuntimeError(f"the application at {prefix!r} sent no response")
        return collected.response(request_id)


class _Collected:
    """An application's ASGI response, collected for :class:`HTTPResponse`."""

    def __init__(self) -> None:
        self.start: dict[str, Any] | None = None
        self.chunks: list[bytes] = []

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body" and message.get("body"):
            self.chunks.append(bytes(message["body"]))

    def response(self, request_id: str) -> HTTPResponse:
        assert self.start is not None
        headers: dict[str, str] = {}
        for k, v in self.start.get("headers", ()):
            key, value = bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1")
            # A header sent several times reads as one comma-separated value, as in HTTP.
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        headers.setdefault("x-request-id", request_id)
        return HTTPResponse(int(self.start["status"]), headers, self.chunks)


def run(app: Application, *, name: str = "default", route_prefix: str | None = "/",
        clock: FakeClock | None = None) -> LocalRuntime:
    """A :class:`LocalRuntime` with ``app`` already running; use it with ``with``.

    Example::

        with testing.run(app) as rt:
            assert rt.handle.remote(2).result() == 4
    """
    rt = LocalRuntime(clock=clock)
    try:
        rt.run(app, name=name, route_prefix=route_prefix)
    except BaseException:
        rt.shutdown()
        raise
    return rt


# --------------------------------------------------------------------------------------------
# Autoscaling


class AutoscalingSimulator:
    """A deployment's autoscaling loop as the controller runs it, on a :class:`FakeClock`.

    Every ``tick_s`` of fake time it feeds the load (``ongoing``: requests in replicas plus
    those waiting in callers; ``queued``: the part waiting in callers) to the real
    :class:`~shoal.serving.autoscaling.Autoscaler` (the deployment's policy, default or custom) and
    applies the decision: new replicas count as starting for ``startup_s``, then running;
    removed replicas go at once. ``decisions`` records every change of target.

    Example::

        clock = FakeClock()
        sim = AutoscalingSimulator(Model, clock=clock)   # Model has an autoscaling_config
        sim.ongoing = 10
        clock.advance(31)
        assert sim.target == 5
    """

    def __init__(
        self,
        deployment: Deployment | AutoscalingConfig | Mapping[str, Any],
        *,
        clock: FakeClock,
        tick_s: float = 0.1,
        startup_s: float = 0.0,
        app_name: str = "default",
    ) -> None:
        if isinstance(deployment, Deployment):
            config = deployment.config.resolved_autoscaling()
            if config is None:
                raise ValueError(f"deployment {deployment.name!r} has no autoscaling_config (or num_replicas='auto')")
            name, initial = deployment.name, deployment.config.initial_target()
        else:
            config = deployment if isinstance(deployment, AutoscalingConfig) else AutoscalingConfig(**deployment)
            name = "deployment"
            initial = config.initial_replicas if config.initial_replicas is not None else config.min_replicas
        self.clock = clock
        self.startup_s = startup_s
        self.autoscaler = Autoscaler(config, name, app_name, initial)
        self.ongoing = 0.0
        self.queued = 0.0
        # When each replica is (or was) ready, oldest first.
        self._replicas: list[float] = [clock.time()] * initial
        self.decisions: list[tuple[float, int, int]] = []
        self._timer = clock.call_every(tick_s, self.tick)

    @property
    def target(self) -> int:
        """The autoscaler's current target replica count."""
        return self.autoscaler.target

    @property
    def replicas(self) -> int:
        """Replicas running or starting."""
        return len(self._replicas)

    @property
    def running(self) -> int:
        """Replicas that finished starting."""
        now = self.clock.time()
        return sum(1 for ready in self._replicas if ready <= now)

    def tick(self) -> None:
        """One controller tick at the clock's current time (called by the clock)."""
        now = self.clock.time()
        running = self.running
        self.autoscaler.record(now, self.ongoing, self.queued)
        before = self.autoscaler.target
        new = self.autoscaler.decide(now, len(self._replicas), running)
        if new != before:
            self.decisions.append((now, before, new))
        while len(self._replicas) < new:
            self._replicas.append(now + self.startup_s)
        del self._replicas[new:]

    def stop(self) -> None:
        """Stop ticking."""
        self._timer.cancel()
