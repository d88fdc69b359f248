"""The HTTP proxy process: uvicorn in front of every application's ingress deployment.

It matches the longest ``route_prefix``, forwards the ASGI request (scope and body) to an
ingress replica through its router, and streams the ASGI messages that come back. Client
disconnects cancel the request upstream; ``request_timeout_s`` bounds it. Errors become
short JSON bodies with the right status code; tracebacks stay in the logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import pickle
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from shoal.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayTaskError,
    ReplicaDiedError,
    RequestCancelledError,
)
from shoal.observability import dashboard
from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing
from shoal.observability.logs import Identity, log_access, proxy_log_path
from shoal.observability.logs import setup as setup_log_file
from shoal.runtime import backend
from shoal.runtime.client import ControllerClient
from shoal.runtime.httpguard import Authenticator, head_limited_protocol, ssl_config
from shoal.runtime.router import Router
from shoal.runtime.wire import ProxyReady, RequestMeta, Routes, Stop

logger = logging.getLogger("shoal.proxy")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class LocalIngress(Protocol):
    """An app served in this very process (an ingress replica that serves HTTP itself)."""

    key: tuple[str, str]  # (app, ingress deployment)
    model_ids: tuple[str, ...]  # multiplexed models loaded here

    async def serve(self, scope: Scope, body: bytes, meta: RequestMeta, send: Send) -> None: ...


class RouterSource(Protocol):
    """Where a ProxyApp gets its routers: the controller client, or a pod's DNS-based backend."""

    def router(self, app: str, deployment: str) -> Router: ...


# Requests still running after this long get a task that watches for the client going away.
WATCH_AFTER_S = 0.2


@dataclass(frozen=True)
class FrontOptions:
    """What an HTTP front needs of ``HTTPOptions``: plain data, so that proxy processes
    start without importing pydantic."""

    root_path: str = ""
    request_timeout_s: float | None = None
    keep_alive_timeout_s: float = 5.0
    # Limits, API keys, auth hook and TLS: see HTTPOptions and shoal.runtime.httpguard.
    max_request_body_bytes: int = 100 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    auth: str = ""
    ssl_keyfile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile_password: str = field(default="", repr=False)
    ssl_ca_certs: str = ""
    # /-/dashboard and /-/status.json (shoal.observability.dashboard); off: 404.
    dashboard: bool = True

    @classmethod
    def of(cls, http: Any) -> FrontOptions:
        """The front's options; API keys from the environment or a file are read now.
        Files are made absolute: replicas change to their app's directory."""
        def path(p: str | None) -> str:
            return os.path.abspath(p) if p else ""

        return cls(http.root_path, http.request_timeout_s, http.keep_alive_timeout_s,
                   http.max_request_body_bytes, http.max_header_bytes, http.resolved_api_keys(), http.auth or "",
                   path(http.ssl_keyfile), path(http.ssl_certfile), http.ssl_keyfile_password or "",
                   path(http.ssl_ca_certs), dashboard=bool(getattr(http, "dashboard", True)))


@dataclass
class ProxyBootstrap:
    controller_path: str
    secret: bytes
    ident: str
    fd: int
    http: FrontOptions
    parent_pid: int
    die_with_parent: bool
    log_level: str
    sys_path: list[str]
    # Detached instance: a Unix socket path where this proxy hands its listening socket to a
    # restarted controller (SCM_RIGHTS), so the port survives a controller crash.
    fd_path: str = ""
    # The instance's log folder: the proxy logs into proxy.log there (stdout and stderr too).
    log_dir: str = ""


def error_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and short message for an exception (the only such mapping in shoal)."""
    if isinstance(exc, BackPressureError):
        return 503, "service overloaded: too many queued requests"
    if isinstance(exc, DeploymentUnavailableError):
        return 503, "service unavailable"
    if isinstance(exc, ReplicaDiedError):
        return 500, "the replica handling the request died"
    if isinstance(exc, RequestCancelledError):
        return 499, "request cancelled"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) and not isinstance(exc, RayTaskError):
        return 408, "request timed out"
    return 500, "internal server error"


async def _send_json(send: Any, status: int, body: dict[str, Any], request_id: str = "",
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    headers.extend(extra or ())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


_REFUSALS = {401: "unauthorized", 403: "forbidden", 413: "request body too large"}


async def _refuse(send: Any, status: int, request_id: str) -> None:
    """Answer a request refused before it reached an application, and close the connection
    (the client may still be sending a body nobody will read)."""
    extra = [(b"connection", b"close")]
    if status == 401:
        extra.append((b"www-authenticate", b"Bearer"))
    text = _REFUSALS.get(status, "internal server error" if status >= 500 else "request refused")
    await _send_json(send, status, {"error": text, "request_id": request_id}, request_id, extra)


def canary_share(session: bytes) -> float:
    """A number in [0, 100): a request goes to the canary when it is below the canary's weight.

    With an ``x-session-id`` it is a hash of the id, so a session sticks to one version (and
    raising the weight only moves sessions from the old version to the new); without one it is
    random per request.
    """
    if session:
        return int.from_bytes(hashlib.blake2b(session, digest_size=8).digest(), "big") % 10_000 / 100.0
    return random.random() * 100.0


class ProxyApp:
    """The proxy's ASGI application."""

    def __init__(self, client: RouterSource, options: FrontOptions, local: LocalIngress | None = None) -> None:
        self.client = client
        self.options = options
        self.routes: list[tuple[str, str, str]] = []  # (prefix, app, ingress), longest first
        # Canary releases: prefix -> (canary app key, its ingress, percent of requests).
        self.split: dict[str, tuple[str, str, float]] = {}
        # In an ingress replica that serves HTTP itself: its own app is called in-process.
        self.local = local
        self.auth = Authenticator.of(options.api_keys, options.auth)  # None: requests need no credentials
        self.ongoing = 0  # HTTP requests being served (a gauge of shoal.observability.metrics)
        _metrics.PROCESS.fronts.add(self)

    def _access(self, method: str, path: str, status: int, started: float, request_id: str, route: str = "") -> None:
        """An access-log line for a request this front answered itself (a 404, a timeout...):
        always logged, also by a front inside an ingress replica whose deployment turned its
        own access log off -- the request was not that deployment's."""
        log_access(method, path, status, started, request_id, route)

    def set_routes(self, routes: Routes) -> None:
        self.routes = sorted(((p, a, d) for p, (a, d) in routes.table.items()), key=lambda r: -len(r[0]))
        self.split = dict(routes.split)
        for _, app, dep in self.routes:
            self.client.router(app, dep)  # subscribe early so the first request finds replicas
        for app, dep, _ in self.split.values():
            self.client.router(app, dep)

    def match(self, path: str) -> tuple[str, str, str] | None:
        for prefix, app, dep in self.routes:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return prefix, app, dep
        return None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        path: str = scope["path"]
        root = self.options.root_path
        if root:
            if not (path == root or path.startswith(root + "/")):
                await _send_json(send, 404, {"error": "not found", "path": path})
                return
            path = path[len(root):] or "/"
        request_id = ""
        model_id = ""
        session = b""
        length = b""
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v.decode("latin-1")
            elif k == b"serve_multiplexed_model_id":
                model_id = v.decode("latin-1")
            elif k == b"x-session-id":
                session = v
            elif k == b"content-length":
                length = v
        if not request_id:
            request_id = os.urandom(8).hex()
        if path == "/-/healthz":
            await _send_json(send, 200, {"status": "success"}, request_id)
            return
        if self.auth is not None:
            denied = await self.auth.check(scope)
            if denied:
                await _refuse(send, denied, request_id)
                return
        if path == "/-/routes":
            await _send_json(send, 200, {p: a for p, a, _ in self.routes}, request_id)
            return
        if path in dashboard.PATHS:
            await dashboard.respond(self, path, scope, send, request_id)
            return
        if path == "/metrics" and _metrics.PROCESS.page_source is not None:
            await _metrics.serve_page(send, request_id)  # the whole local instance's metrics
            return
        started = time.monotonic()
        route = self.match(path)
        if route is None:
            await _send_json(send, 404, {"error": "not found", "path": path,
                                         "hint": "GET /-/routes lists the route prefixes"}, request_id)
            self._access(scope["method"], scope["path"], 404, time.monotonic(), request_id)
            _metrics.PROCESS.http_done("", "", "", scope["method"], 404, started)
            return
        prefix, app, dep = route
        if self.split:
            canary = self.split.get(prefix)
            if canary is not None and canary_share(session) < canary[2]:
                app, dep = canary[0], canary[1]
        limit = self.options.max_request_body_bytes
        if length and (not length.isdigit() or int(length) > limit):
            await _refuse(send, 413, request_id)
            return
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > limit:
                await _refuse(send, 413, request_id)
                return
            if not msg.get("more_body", False):
                break
        headers = list(scope["headers"])
        if not any(k == b"x-request-id" for k, _ in headers):
            headers.append((b"x-request-id", request_id.encode()))
        sub_root = root + (prefix if prefix != "/" else "")
        inner: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": scope.get("asgi", {}).get("spec_version", "2.3")},
            "http_version": scope.get("http_version", "1.1"),
            "method": scope["method"],
            "scheme": scope.get("scheme", "http"),
            "path": scope["path"],
            "raw_path": scope.get("raw_path"),
            "query_string": scope.get("query_string", b""),
            "root_path": sub_root,
            "headers": headers,
            "client": scope.get("client"),
            "server": scope.get("server"),
        }
        meta = RequestMeta(request_id, False, True, model_id, prefix)
        span = None
        if _tracing.enabled:
            span, meta = _tracing.start_http(scope, meta, app, dep)
        data = bytes(body)
        local = self.local
        if local is not None and local.key == (app, dep) and not (
            # A multiplexed model held by another replica and not by this one: send it there.
            model_id and model_id not in local.model_ids and self.client.router(app, dep).holds_model(model_id)
        ):
            async def run(out: Send) -> None:
                await local.serve(inner, data, meta, out)
        else:
            router = self.client.router(app, dep)

            async def run(out: Send) -> None:
                async for messages in router.stream("__call__", (inner, data), {}, meta):
                    for m in messages:
                        await out(m)

        self.ongoing += 1
        code = 500
        try:
            code = await self._forward(run, meta, receive, send, inner)
        finally:
            self.ongoing -= 1
            _metrics.PROCESS.http_done(app, dep, prefix, scope["method"], code, started)
            if span is not None:
                _tracing.end_http(span, code)

    async def _forward(self, run: Callable[[Send], Awaitable[None]], meta: RequestMeta,
                       receive: Any, send: Any, scope: Scope | None = None) -> int:
        """Stream the replica's ASGI messages to the client; map errors; honour timeouts.
        Returns the response's status code (499: the client went away).

        Timeouts and client disconnects cancel this task (and with it the request upstream).
        The disconnect watcher starts only for requests that take a while, so that fast
        requests cost no extra task.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        started_at = time.monotonic()
        scope = scope or {"method": "", "path": ""}
        started = False
        complete = False  # the response's last body message went out
        gone = False  # sending to the client failed: it went away mid-response
        code = 500
        finished = False
        why = ""
        watcher: asyncio.Task[None] | None = None

        def expire() -> None:
            nonlocal why
            if not finished:
                why = "timeout"
                task.cancel()

        async def watch() -> None:
            nonlocal why
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    if not finished:
                        why = "disconnect"
                        task.cancel()
                    return

        def start_watch() -> None:
            nonlocal watcher
            if not finished:
                watcher = loop.create_task(watch())

        timeout = self.options.request_timeout_s
        timer = loop.call_later(timeout, expire) if timeout else None
        watch_timer = loop.call_later(WATCH_AFTER_S, start_watch)
        rid_header = (b"x-request-id", meta.request_id.encode())

        async def out(m: dict[str, Any]) -> None:
            nonlocal started, code, complete, gone
            if m["type"] == "http.response.start":
                code = m["status"]
                headers = m.get("headers", ())
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    m = {**m, "headers": [*headers, rid_header]}
                started = True
            elif not m.get("more_body", False):
                complete = True
            try:
                await send(m)
            except Exception:
                gone = True
                raise

        try:
            await run(out)
        except asyncio.CancelledError:
            if not why:
                raise  # the server itself is shutting down
            task.uncancel()
            code = 408 if why == "timeout" else 499
            if why == "timeout":
                logger.warning("request %s timed out after %ss", meta.request_id, timeout)
                if not started:
                    await _send_json(send, 408, {"error": "request timed out", "request_id": meta.request_id},
                                     meta.request_id)
                    self._access(scope["method"], scope["path"], 408, started_at, meta.request_id, meta.route)
        except Exception as exc:
            if gone:  # most often the client hung up mid-response (e.g. a pipelining client)
                logger.warning("request %s: sending the response failed; did the client go away? %r",
                               meta.request_id, exc)
                return 499
            if complete:
                # E.g. FastAPI's error middleware: it answers 500, then raises. The client has its
                # whole answer; keep the connection (re-raising would make uvicorn drop it).
                logger.error("request %s raised after its response was sent", meta.request_id,
                             exc_info=None if isinstance(exc, RayTaskError) else exc)
                return code
            if started:
                logger.error("request %s failed after its response started: %r", meta.request_id, exc)
                raise
            status, text = error_status(exc)
            code = status
            if status == 500:
                # A replica process logged its exception's traceback; one raised here (an app
                # served in this process, or shoal's own) gets it logged now.
                logger.error("request %s to %s failed: %s", meta.request_id, meta.route,
                             str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                             exc_info=None if isinstance(exc, (RayTaskError, ReplicaDiedError)) else exc)
            extra = [(b"retry-after", b"1")] if status == 503 else []
            await _send_json(send, status, {"error": text, "request_id": meta.request_id}, meta.request_id, extra)
            if status != 500 or isinstance(exc, ReplicaDiedError):  # answered here: no replica logged it
                self._access(scope["method"], scope["path"], status, started_at, meta.request_id, meta.route)
        finally:
            finished = True
            if timer is not None:
                timer.cancel()
            watch_timer.cancel()
            if watcher is not None and not watcher.done():
                watcher.cancel()
        return code


def _orphan_timeout() -> float:
    from shoal.runtime.replica import ORPHAN_TIMEOUT_S

    return ORPHAN_TIMEOUT_S


def serve_listening_fd(path: str, fd: int) -> None:
    """Hand ``fd`` (the HTTP listening socket) to whoever connects to ``path``.

    A restarted controller of a detached instance takes the socket back this way, so that the
    port stays bound and served without a gap. The socket file is 0600 inside the instance's
    0700 directory: only the instance's user can connect.
    """
    try:
        os.unlink(path)
    except OSError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(path)
    finally:
        os.umask(old)
    server.listen(4)

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                try:
                    socket.send_fds(conn, [b"http-socket"], [fd])
                except OSError as e:
                    logger.warning("could not hand over the listening socket: %s", e)

    threading.Thread(target=loop, name="shoal-fd-handover", daemon=True).start()


def take_listening_fd(path: str, timeout: float = 2.0) -> socket.socket | None:
    """The listening socket a running proxy holds (see :func:`serve_listening_fd`), or None."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
        _, fds, _, _ = socket.recv_fds(conn, 64, 1)
    except OSError:
        return None
    finally:
        conn.close()
    if not fds:
        return None
    return socket.socket(fileno=fds[0])


def main() -> None:
    boot: ProxyBootstrap = pickle.loads(sys.stdin.buffer.read())
    from shoal.runtime.replica import die_with_parent

    if boot.die_with_parent:
        die_with_parent(boot.parent_pid)
    sys.path[:] = boot.sys_path
    logging.basicConfig(level=boot.log_level,
                        format=f"%(asctime)s %(levelname)s proxy pid={os.getpid()} %(name)s: %(message)s")
    if boot.log_dir:  # its own file from now on; WARNING and above also to the terminal
        try:
            setup_log_file(Identity("proxy", boot.ident), path=proxy_log_path(boot.log_dir), level=boot.log_level)
        except OSError as e:
            logger.warning("cannot write %s (%s); logging to stderr", proxy_log_path(boot.log_dir), e)
    _tracing.setup_from_env("shoal-proxy")
    loop = backend.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_serve(boot))
    _metrics.process_exit()
    os._exit(0)


class HTTPFront:
    """uvicorn serving an ASGI app on (a duplicate of) an inherited listening socket.

    ``pause()`` stops accepting new connections but lets the open ones (keep-alive clients)
    go on being served until they close; ``start()`` accepts again; ``stop()`` shuts down,
    finishing requests in flight and closing idle connections.
    """

    def __init__(self, app: Any, fd: int, options: FrontOptions) -> None:
        self.app = app
        self.fd = fd
        self.options = options
        self.server: Any = None  # the accepting uvicorn.Server
        self.task: asyncio.Task[None] | None = None
        self.paused: list[tuple[Any, asyncio.Task[None]]] = []  # servers that only finish connections

    async def start(self) -> None:
        import uvicorn

        if self.server is not None:
            return
        # socket(fileno=) detects the address family; uvicorn's fd= option assumes a Unix
        # socket, which would leave TCP_NODELAY off (~40 ms per response to delayed ACKs).
        sock = socket.socket(fileno=os.dup(self.fd))
        config = uvicorn.Config(self.app, loop="none", http=head_limited_protocol(self.options.max_header_bytes),
                                lifespan="off", access_log=False,
                                proxy_headers=False, log_level="warning", server_header=False, date_header=False,
                                timeout_keep_alive=int(self.options.keep_alive_timeout_s), **ssl_config(self.options))
        server = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.005)
        self.server, self.task = server, task

    def pause(self) -> None:
        if self.server is None or self.task is None:
            return
        for listener in self.server.servers:
            listener.close()  # no new connections; open ones are left alone
        self.paused.append((self.server, self.task))
        self.server = self.task = None
        # Forget servers whose connections are all gone.
        self.paused = [(s, t) for s, t in self.paused if s.server_state.connections and not t.done()]

    async def stop(self, timeout: float = 10.0) -> None:
        running = self.paused + ([(self.server, self.task)] if self.server is not None and self.task else [])
        self.server = self.task = None
        self.paused = []
        for server, _ in running:
            server.should_exit = True
        for _, task in running:
            try:
                await asyncio.wait_for(task, timeout)
            except (TimeoutError, Exception):
                pass


async def _serve(boot: ProxyBootstrap) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    app: ProxyApp | None = None
    front: HTTPFront | None = None
    toggles: asyncio.Queue[bool] = asyncio.Queue()

    def on_control(msg: Any) -> None:
        if isinstance(msg, Routes) and app is not None:
            app.set_routes(msg)
            toggles.put_nowait(msg.proxy_accepts)
        elif isinstance(msg, Stop):
            stop.set()

    def on_reconnect() -> None:
        client.send(ProxyReady(boot.ident, 0))

    client = ControllerClient(boot.controller_path, boot.secret, "proxy", boot.ident, loop, on_control=on_control,
                              reconnect_s=0.0 if boot.die_with_parent else _orphan_timeout(),
                              on_reconnect=on_reconnect)
    app = ProxyApp(client, boot.http)
    _metrics.PROCESS.setup(boot.ident, routers=client.routers, page_source=client)
    _metrics.PROCESS.start_flusher(loop)
    await client.connect()
    client.resumed = True
    if boot.fd_path:
        serve_listening_fd(boot.fd_path, boot.fd)
    backend.set_current(client)
    front = HTTPFront(app, boot.fd, boot.http)
    await front.start()
    client.send(ProxyReady(boot.ident, 0))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def follow_toggles() -> None:
        # While every routed app has an ingress replica serving HTTP itself, this process
        # stops accepting so that connections land on those replicas; it takes over again
        # whenever an app has none (e.g. scaled to zero) to hold requests and answer 404s.
        while True:
            want = await toggles.get()
            while not toggles.empty():
                want = toggles.get_nowait()
            if want:
                await front.start()
            else:
                front.pause()

    follower = loop.create_task(follow_toggles())
    closed = loop.create_task(client.closed.wait())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    follower.cancel()
    await front.stop()
    client.close()


if __name__ == "__main__":
    main()
