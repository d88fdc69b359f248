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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing
from shoal.observability.logs import EscapingFormatter, Identity, proxy_log_path
from shoal.observability.logs import setup as setup_log_file
from shoal.runtime import backend
from shoal.runtime.client import ControllerClient
from shoal.runtime.grpc_methods import GRPCFrontOptions
from shoal.runtime.http.acceptor import STANDBY_DELAY_S, Acceptor
from shoal.runtime.http.admit import LocalIngress, RouterSource
from shoal.runtime.http.app import ProxyApp
from shoal.runtime.http.connections import ConnLimits, FrontConnections, Pool
from shoal.runtime.http.errors import error_status
from shoal.runtime.http.exchange import WATCH_AFTER_S
from shoal.runtime.http.options import FrontOptions
from shoal.runtime.http.routes import canary_share
from shoal.runtime.httpguard import guarded_protocol, guarded_ws_protocol, ssl_config
from shoal.runtime.lifeline import ORPHAN_TIMEOUT_S, die_with_parent
from shoal.runtime.rundir import recheck_or_exit
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
    # The gRPC ingress (grpc_options with servicer functions); None: no gRPC server.
    grpc: GRPCFrontOptions | None = None


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
    from shoal.context import _mark_worker_process

    _mark_worker_process("proxy")
    boot: ProxyBootstrap = pickle.loads(sys.stdin.buffer.read())
    if boot.die_with_parent:
        die_with_parent(boot.parent_pid)
    sys.path[:] = boot.sys_path
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(EscapingFormatter(f"%(asctime)s %(levelname)s proxy pid={os.getpid()} %(name)s: %(message)s"))
    logging.basicConfig(level=boot.log_level, handlers=[stderr])
    recheck_or_exit(boot.controller_path, f"proxy {boot.process_id}")
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


@dataclass(eq=False)
class _Serving:
    """One uvicorn server of a front, and its connections (draining once it stops accepting)."""

    server: Any
    task: asyncio.Task[None]
    pool: Pool
    acceptor: Acceptor


# After a drain (or a stop's graceful timeout), uvicorn's own shutdown has this long to close
# what is left before it cancels the requests still running.
FORCE_CLOSE_S = 0.5
# How long the proxy process, told to stop, drains its connections (the controller kills it
# 5 s after asking it to stop).
PROXY_STOP_S = 4.0


class HTTPFront:
    """uvicorn serving an ASGI app on (a duplicate of) an inherited listening socket, with
    connection hygiene (:mod:`shoal.runtime.http.connections`).

    ``pause()`` stops accepting new connections and drains the open ones as Envoy drains
    HTTP/1.1: every response from then on carries ``Connection: close``, idle keep-alive
    connections are closed after the drain grace, and a connection is never closed under a
    request; ``start()`` accepts again (on a new server; the paused one finishes draining);
    ``stop()`` drains everything and shuts down once the connections are gone, or after
    ``timeout`` (then what still runs is cancelled).
    """

    def __init__(self, app: Any, fd: int, options: FrontOptions, accept_limit: Callable[[], int] | None = None,
                 spread: Callable[[], bool] | None = None) -> None:
        self.app = app
        self.fd = fd
        self.options = options
        self.limits = ConnLimits.of(options)
        self.connections = FrontConnections()  # every connection of this front: the cap counts them
        # An ingress replica's front accepts only while it holds fewer connections than this
        # (its max_ongoing_requests): see shoal.runtime.http.acceptor.
        self.accept_limit = accept_limit
        # An ingress replica with sibling replicas spreads connections over the fronts sharing
        # the port: it waits longer to accept the more it holds (shoal.runtime.http.acceptor).
        self.spread = spread
        self.connections.on_release = self._room
        self.serving: _Serving | None = None  # the accepting server
        self.paused: list[_Serving] = []  # servers that only finish (drain) their connections
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def server(self) -> Any:
        """The accepting uvicorn.Server (None while paused or stopped)."""
        return self.serving.server if self.serving is not None else None

    @property
    def draining(self) -> bool:
        """Whether the front is not accepting (paused or stopped) and drains what is open."""
        return self.serving is None

    def _admits(self) -> bool:
        limit = self.accept_limit
        return limit is None or len(self.connections.live) < limit()

    def _spread_load(self) -> int | None:
        spread = self.spread
        return len(self.connections.live) if spread is not None and spread() else None

    def _room(self) -> None:
        """A connection closed: an acceptor held back by the accept limit may accept again."""
        if self.serving is not None:
            self.serving.acceptor.start()

    async def start(self, standby: bool = False) -> None:
        """Accept connections; ``standby``: only those nobody else took within
        :data:`~shoal.runtime.http.acceptor.STANDBY_DELAY_S` (the proxy, while ingress replicas
        serve the port)."""
        import uvicorn

        if self.serving is not None:
            self.serving.acceptor.delay_s = STANDBY_DELAY_S if standby else 0.0
            return
        # socket(fileno=) detects the address family; uvicorn's fd= option assumes a Unix
        # socket, which would leave TCP_NODELAY off (~40 ms per response to delayed ACKs).
        sock = socket.socket(fileno=os.dup(self.fd))
        pool = Pool()
        protocol = guarded_protocol(self.options.max_header_bytes, self.limits, self.connections, pool)
        # WebSockets: uvicorn's protocol for the installed library, with the front's write timeout.
        ws = guarded_ws_protocol(self.limits)
        config = uvicorn.Config(self.app, loop="none", http=protocol, ws=ws or "none", lifespan="off", access_log=False,
                                proxy_headers=False, log_level="warning", server_header=False, date_header=False,
                                timeout_keep_alive=self.options.keep_alive_timeout_s,  # type: ignore[arg-type]
                                **ssl_config(self.options))
        server = uvicorn.Server(config)
        loop = asyncio.get_running_loop()
        # uvicorn listens on nothing itself: the acceptor decides which connections this front
        # takes and hands them to uvicorn's protocol.
        task = loop.create_task(server.serve(sockets=[]))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.005)

        def connection() -> Any:
            return config.http_protocol_class(config=config, server_state=server.server_state,  # type: ignore[call-arg]
                                              app_state=server.lifespan.state)

        acceptor = Acceptor(loop, sock, connection, ssl=config.ssl, admit=self._admits,
                            delay_s=STANDBY_DELAY_S if standby else 0.0, load=self._spread_load)
        self.serving = _Serving(server, task, pool, acceptor)
        acceptor.start()

    def pause(self, grace: float | None = None) -> None:
        """Stop accepting; drain the open connections (see the class docstring), closing idle
        ones after ``grace`` seconds (default: the configured drain grace)."""
        serving = self.serving
        if serving is None:
            return
        self.serving = None
        serving.acceptor.close()  # no new connections; the kernel hands them to other processes
        serving.pool.drain(asyncio.get_running_loop(), self.limits.drain_grace_s if grace is None else grace)
        self.paused.append(serving)
        retire = asyncio.get_running_loop().create_task(self._retire(serving))
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)

    async def _retire(self, serving: _Serving) -> None:
        """Shut a paused server down once its connections are gone."""
        await serving.pool.empty.wait()
        if serving in self.paused:
            self.paused.remove(serving)
        await self._shut(serving)

    @staticmethod
    async def _shut(serving: _Serving, timeout: float = FORCE_CLOSE_S + 2.0) -> None:
        serving.server.config.timeout_graceful_shutdown = FORCE_CLOSE_S
        serving.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(serving.task), timeout)
        except (TimeoutError, Exception):
            pass

    async def stop(self, timeout: float = 10.0, grace: float | None = None) -> None:
        """Drain every connection, then shut down; after ``timeout`` what is left is closed
        (requests still running are cancelled). ``grace``: how long idle connections may still
        send a request (default: the configured drain grace); 0 when nobody else would serve it."""
        self.pause(grace)
        running, self.paused = self.paused, []
        if grace == 0:
            for serving in running:
                serving.pool.end_grace()  # those paused earlier too: idle connections close now
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        if running:
            try:
                await asyncio.wait_for(asyncio.gather(*(s.pool.empty.wait() for s in running)), timeout)
            except TimeoutError:
                logger.warning("HTTP connections still open after %ss of draining: closing them", timeout)
        await asyncio.gather(*(self._shut(s) for s in running))


async def _follow_toggles(front: HTTPFront, toggles: asyncio.Queue[bool]) -> None:
    """While every routed app has an ingress replica serving HTTP itself, the proxy stops
    accepting so that connections land on those replicas; it takes over again whenever an
    app has none (e.g. scaled to zero) to hold requests and answer 404s."""
    while True:
        want = await toggles.get()
        while not toggles.empty():
            want = toggles.get_nowait()
        if want:
            await front.start()
        else:
            # Connections move to the replicas (drained here), and this process stands by
            # for those the replicas leave: all at their limit, or too busy to accept.
            front.pause()
            await front.start(standby=True)


def _grpc_front(boot: ProxyBootstrap, client: ControllerClient) -> Any:
    """The gRPC ingress (shoal.runtime.grpc_front) when gRPC is configured, else None."""
    if boot.grpc is None:
        return None
    from shoal.runtime.grpc_front import load_front, server_credentials

    try:
        return load_front(client, boot.grpc, boot.http.api_keys, boot.http.auth, boot.http.max_request_body_bytes,
                          credentials=server_credentials(boot.http))
    except Exception as e:
        logger.error("cannot start the gRPC ingress: %s", e)
        raise


async def _serve(boot: ProxyBootstrap) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    app: ProxyApp | None = None
    grpc_front: Any = None  # shoal.runtime.grpc_front.GRPCFront
    toggles: asyncio.Queue[bool] = asyncio.Queue()

    def on_control(msg: Any) -> None:
        if isinstance(msg, Routes) and app is not None:
            app.set_routes(msg)
            if grpc_front is not None:
                grpc_front.set_routes(msg)
            toggles.put_nowait(msg.proxy_accepts)
        elif isinstance(msg, Stop):
            stop.set()

    def on_reconnect() -> None:
        client.send(ProxyReady(boot.process_id, 0))

    client = ControllerClient(boot.controller_path, boot.secret, Role.PROXY, boot.process_id, loop,
                              on_control=on_control, reconnect_s=0.0 if boot.die_with_parent else ORPHAN_TIMEOUT_S,
                              on_reconnect=on_reconnect)
    app = ProxyApp(client, boot.http)
    grpc_front = _grpc_front(boot, client)
    _metrics.PROCESS.setup(boot.process_id, routers=client.routers, page_source=client)
    _metrics.PROCESS.start_flusher(loop)
    await client.connect()
    client.resumed = True
    if boot.fd_path:
        serve_listening_fd(boot.fd_path, boot.fd)
    backend.set_current(client)
    front = HTTPFront(app, boot.fd, boot.http)
    await front.start()
    if grpc_front is not None:
        await grpc_front.start()
    client.send(ProxyReady(boot.process_id, 0))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    follower = loop.create_task(_follow_toggles(front, toggles))
    closed = loop.create_task(client.closed.wait())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    follower.cancel()
    # With no route left (the instance shuts down) nobody would serve an idle connection's
    # next request: no drain grace then.
    await asyncio.gather(front.stop(PROXY_STOP_S, None if app.table.entries else 0.0),
                         *([grpc_front.stop(PROXY_STOP_S)] if grpc_front is not None else []))
    client.close()


if __name__ == "__main__":
    main()
