"""The HTTP proxy process: uvicorn in front of every application's ingress deployment.

It matches the longest ``route_prefix``, forwards the ASGI request (scope and body) to an
ingress replica through its router, and streams the ASGI messages that come back. Client
disconnects cancel the request upstream; ``request_timeout_s`` bounds it. Errors become
short JSON bodies with the right status code; tracebacks stay in the logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

from shoal.config import HTTPOptions
from shoal.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayTaskError,
    ReplicaDiedError,
    RequestCancelledError,
)
from shoal.runtime import backend
from shoal.runtime.client import ControllerClient
from shoal.runtime.wire import ProxyReady, RequestMeta, Routes, Stop

logger = logging.getLogger("shoal.proxy")

Scope = dict[str, Any]
# Requests still running after this long get a task that watches for the client going away.
WATCH_AFTER_S = 0.05


@dataclass
class ProxyBootstrap:
    controller_path: str
    secret: bytes
    ident: str
    fd: int
    http: HTTPOptions
    parent_pid: int
    die_with_parent: bool
    log_level: str
    sys_path: list[str]


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


class ProxyApp:
    """The proxy's ASGI application."""

    def __init__(self, client: ControllerClient, options: HTTPOptions) -> None:
        self.client = client
        self.options = options
        self.routes: list[tuple[str, str, str]] = []  # (prefix, app, ingress), longest first

    def set_routes(self, routes: Routes) -> None:
        self.routes = sorted(((p, a, d) for p, (a, d) in routes.table.items()), key=lambda r: -len(r[0]))
        for _, app, dep in self.routes:
            self.client.router(app, dep)  # subscribe early so the first request finds replicas

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
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v.decode("latin-1")
            elif k == b"serve_multiplexed_model_id":
                model_id = v.decode("latin-1")
        if not request_id:
            request_id = os.urandom(8).hex()
        if path == "/-/healthz":
            await _send_json(send, 200, {"status": "success"}, request_id)
            return
        if path == "/-/routes":
            await _send_json(send, 200, {p: a for p, a, _ in self.routes}, request_id)
            return
        route = self.match(path)
        if route is None:
            await _send_json(send, 404, {"error": "not found", "path": path,
                                         "hint": "GET /-/routes lists the route prefixes"}, request_id)
            return
        prefix, app, dep = route
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
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
        router = self.client.router(app, dep)
        await self._forward(router, inner, bytes(body), meta, receive, send)

    async def _forward(self, router: Any, scope: Scope, body: bytes, meta: RequestMeta,
                       receive: Any, send: Any) -> None:
        """Stream the replica's ASGI messages to the client; map errors; honour timeouts.

        Timeouts and client disconnects cancel this task (and with it the request upstream).
        The disconnect watcher starts only for requests that take a while, so that fast
        requests cost no extra task.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        started = False
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
        try:
            async for messages in router.stream("__call__", (scope, body), {}, meta):
                for m in messages:
                    if m["type"] == "http.response.start":
                        headers = m.get("headers", ())
                        if not any(k.lower() == b"x-request-id" for k, _ in headers):
                            m = {**m, "headers": [*headers, rid_header]}
                        started = True
                    await send(m)
        except asyncio.CancelledError:
            if not why:
                raise  # the server itself is shutting down
            task.uncancel()
            if why == "timeout":
                logger.warning("request %s timed out after %ss", meta.request_id, timeout)
                if not started:
                    await _send_json(send, 408, {"error": "request timed out", "request_id": meta.request_id},
                                     meta.request_id)
        except Exception as exc:
            if started:
                logger.error("request %s failed after its response started: %r", meta.request_id, exc)
                raise
            status, text = error_status(exc)
            if status == 500:
                logger.error("request %s to %s failed: %s", meta.request_id, meta.route,
                             str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            extra = [(b"retry-after", b"1")] if status == 503 else []
            await _send_json(send, status, {"error": text, "request_id": meta.request_id}, meta.request_id, extra)
        finally:
            finished = True
            if timer is not None:
                timer.cancel()
            watch_timer.cancel()
            if watcher is not None and not watcher.done():
                watcher.cancel()


def main() -> None:
    boot: ProxyBootstrap = pickle.loads(sys.stdin.buffer.read())
    from shoal.runtime.replica import die_with_parent

    if boot.die_with_parent:
        die_with_parent(boot.parent_pid)
    sys.path[:] = boot.sys_path
    logging.basicConfig(level=boot.log_level,
                        format=f"%(asctime)s %(levelname)s proxy pid={os.getpid()} %(name)s: %(message)s")
    loop = backend.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_serve(boot))
    os._exit(0)


async def _serve(boot: ProxyBootstrap) -> None:
    import uvicorn

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    app: ProxyApp | None = None

    def on_control(msg: Any) -> None:
        if isinstance(msg, Routes) and app is not None:
            app.set_routes(msg)
        elif isinstance(msg, Stop):
            stop.set()

    client = ControllerClient(boot.controller_path, boot.secret, "proxy", boot.ident, loop, on_control=on_control)
    app = ProxyApp(client, boot.http)
    await client.connect()
    backend.set_current(client)
    # socket(fileno=) detects the address family; uvicorn's fd= option assumes a Unix socket,
    # which would leave TCP_NODELAY off (and cost ~40 ms per response to delayed ACKs).
    sock = socket.socket(fileno=boot.fd)
    config = uvicorn.Config(app, loop="none", http="httptools", lifespan="off", access_log=False, proxy_headers=False,
                            log_level="warning", timeout_keep_alive=int(boot.http.keep_alive_timeout_s),
                            server_header=False, date_header=False)
    server = uvicorn.Server(config)
    serving = loop.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()
            return
        await asyncio.sleep(0.005)
    client.send(ProxyReady(boot.ident, 0))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    closed = loop.create_task(client.closed.wait())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({closed, stopping, serving}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    try:
        await asyncio.wait_for(serving, 10)
    except (TimeoutError, Exception):
        pass
    client.close()


if __name__ == "__main__":
    main()
