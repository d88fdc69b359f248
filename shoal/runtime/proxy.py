"""The HTTP proxy process: uvicorn in front of every application's ingress deployment.

The request path itself (routes, guards, forwarding, error answers) lives in
:mod:`shoal.runtime.http`, shared by every front; this module is the proxy *process*: its
bootstrap, :class:`HTTPFront` (uvicorn on an inherited listening socket, pausable), the
hand-over of that socket to a restarted controller, and :func:`main`. The request path's
public names are re-exported here (replicas and pods import them from this module).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing
from shoal.observability.logs import Identity, proxy_log_path
from shoal.observability.logs import setup as setup_log_file
from shoal.runtime import backend
from shoal.runtime.client import ControllerClient
from shoal.runtime.http.admit import LocalIngress, RouterSource
from shoal.runtime.http.app import ProxyApp
from shoal.runtime.http.errors import error_status
from shoal.runtime.http.exchange import WATCH_AFTER_S
from shoal.runtime.http.options import FrontOptions
from shoal.runtime.http.routes import canary_share
from shoal.runtime.httpguard import head_limited_protocol, ssl_config
from shoal.runtime.lifeline import ORPHAN_TIMEOUT_S, die_with_parent
from shoal.runtime.wire import ProxyReady, Role, Routes, Stop

__all__ = [
    "WATCH_AFTER_S",
    "FrontOptions",
    "HTTPFront",
    "LocalIngress",
    "ProxyApp",
    "ProxyBootstrap",
    "RouterSource",
    "canary_share",
    "error_status",
    "main",
    "serve_listening_fd",
    "take_listening_fd",
]

logger = logging.getLogger("shoal.proxy")


@dataclass
class ProxyBootstrap:
    controller_path: str
    secret: bytes
    process_id: str
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
    if boot.die_with_parent:
        die_with_parent(boot.parent_pid)
    sys.path[:] = boot.sys_path
    logging.basicConfig(level=boot.log_level,
                        format=f"%(asctime)s %(levelname)s proxy pid={os.getpid()} %(name)s: %(message)s")
    if boot.log_dir:  # its own file from now on; WARNING and above also to the terminal
        try:
            setup_log_file(Identity("proxy", boot.process_id), path=proxy_log_path(boot.log_dir), level=boot.log_level)
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
        client.send(ProxyReady(boot.process_id, 0))

    client = ControllerClient(boot.controller_path, boot.secret, Role.PROXY, boot.process_id, loop,
                              on_control=on_control, reconnect_s=0.0 if boot.die_with_parent else ORPHAN_TIMEOUT_S,
                              on_reconnect=on_reconnect)
    app = ProxyApp(client, boot.http)
    _metrics.PROCESS.setup(boot.process_id, routers=client.routers, page_source=client)
    _metrics.PROCESS.start_flusher(loop)
    await client.connect()
    client.resumed = True
    if boot.fd_path:
        serve_listening_fd(boot.fd_path, boot.fd)
    backend.set_current(client)
    front = HTTPFront(app, boot.fd, boot.http)
    await front.start()
    client.send(ProxyReady(boot.process_id, 0))
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
