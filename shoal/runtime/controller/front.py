"""The instance's HTTP front: the listening socket (bound here, inherited by the proxy and by
ingress replicas) and the proxy process, restarted when it dies."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from shoal.observability.controller_metrics import ControllerMetrics
from shoal.runtime.controller.backoff import next_delay, streak
from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.records import MAX_PROXY_RESTARTS, ProxyRecord, Settings
from shoal.runtime.controller.standin import StandIn
from shoal.runtime.controller.supervisor import Supervisor
from shoal.runtime.grpc_methods import GRPCFrontOptions
from shoal.runtime.rundir import RunDir
from shoal.runtime.state import ProcessRow, Store

if TYPE_CHECKING:
    from shoal.runtime.http.options import FrontOptions

logger = logging.getLogger("shoal.controller")


class Front:
    """The listening socket and the proxy. ``fd_path`` (a detached instance only) is where a
    running proxy hands its socket to a restarted controller; "" = never."""

    def __init__(self, settings: Settings, secret: bytes, fd_path: str, supervisor: Supervisor, store: Store,
                 metrics: ControllerMetrics, clock: Clock) -> None:
        self.settings = settings
        self.secret = secret
        self.fd_path = fd_path
        self.supervisor = supervisor
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.proxy: ProxyRecord | None = None
        self.listen_sock: socket.socket | None = None
        self.http_port = 0
        # The gRPC port, held (bound with SO_REUSEPORT, not listening) while the instance
        # runs, so that a restarted proxy gets it back; the proxy's server listens on it.
        self.grpc_sock: socket.socket | None = None
        self.grpc_port = 0
        # Whether something else (an ingress replica serving HTTP) accepts on the socket.
        self.others_accept: Callable[[], bool] = lambda: False
        self.standin = StandIn(self._down_message)

    def take_over(self) -> bool:
        """A detached instance's restarted controller whose proxy is gone: take the listening
        socket from an ingress replica that still serves it (else the port is held by a
        process we cannot bind past). False when nobody hands it over."""
        if not self.fd_path or self.listen_sock is not None:
            return False
        from shoal.runtime.proxy import take_listening_fd

        for path in RunDir(self.settings.run_dir).fd_holders():
            sock = take_listening_fd(path, timeout=1.0)
            if sock is not None:
                sock.set_inheritable(True)
                self.listen_sock = sock
                self.http_port = sock.getsockname()[1]
                self.store.set_meta("http_port", str(self.http_port))
                logger.info("took the HTTP listening socket (port %d) over from %s", self.http_port, path)
                return True
        return False

    def bind(self) -> None:
        """Listen on the configured host and port (the port is kept in the store)."""
        opts = self.settings.http
        family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((opts.host, opts.port))
        except OSError as e:
            sock.close()
            raise RuntimeError(
                f"cannot listen on http://{opts.host}:{opts.port}: {e.strerror}. "
                "Is another server using it? Choose another port with http_options.port."
            ) from None
        sock.listen(2048)
        sock.set_inheritable(True)
        self.listen_sock = sock
        self.http_port = sock.getsockname()[1]
        self.store.set_meta("http_port", str(self.http_port))

    def reserve_grpc(self) -> None:
        """Hold the gRPC port (``grpc_options.port``; 0 picks a free one), once."""
        grpc = self.settings.grpc
        if grpc is None or not grpc.enabled or self.grpc_sock is not None:
            return
        host = self.settings.http.host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, grpc.port))
        except OSError as e:
            sock.close()
            raise RuntimeError(f"cannot listen for gRPC on {host}:{grpc.port}: {e.strerror}. Is another server "
                               "using it? Choose another port with grpc_options.port.") from None
        self.grpc_sock = sock
        self.grpc_port = sock.getsockname()[1]

    def grpc_options(self) -> GRPCFrontOptions | None:
        grpc = self.settings.grpc
        if grpc is None or not grpc.enabled:
            return None
        self.reserve_grpc()
        return GRPCFrontOptions(self.settings.http.host, self.grpc_port, tuple(grpc.grpc_servicer_functions),
                                grpc.request_timeout_s)

    def replica_grpc(self) -> tuple[GRPCFrontOptions, FrontOptions] | None:
        """What an ingress replica needs to serve gRPC on the shared port itself
        (``grpc_options.ingress_serves_grpc``): the port and servicers, and the HTTP port's API
        keys, limits and TLS; None when it does not."""
        grpc = self.settings.grpc
        options = self.grpc_options() if grpc is not None and grpc.ingress_serves_grpc else None
        if options is None:
            return None
        from shoal.runtime.http.options import FrontOptions

        return options, FrontOptions.of(self.settings.http)

    def spawn_proxy(self) -> None:
        """Start a proxy process on the listening socket (a restart keeps the crash streak)."""
        assert self.listen_sock is not None
        from shoal.runtime.http.options import FrontOptions

        self.standin.stop()  # the new proxy accepts from here on
        from shoal.runtime.proxy import ProxyBootstrap

        run_dir = RunDir(self.settings.run_dir)
        process_id = f"proxy-{uuid.uuid4().hex[:6]}"
        boot = ProxyBootstrap(run_dir.controller_socket, self.secret, process_id, self.listen_sock.fileno(),
                              FrontOptions.of(self.settings.http),
                              os.getpid(), self.settings.die_with_parent, self.settings.log_level, list(sys.path),
                              fd_path=self.fd_path, log_dir=run_dir.logs_dir, grpc=self.grpc_options())
        proc = self.supervisor.spawn("shoal.runtime.proxy", boot, pass_fds=(self.listen_sock.fileno(),))
        restarts = self.proxy.restarts if self.proxy else 0
        if self.proxy is not None:
            self.store.delete_process(self.proxy.process_id)
        self.proxy = ProxyRecord(process_id, proc, restarts=restarts, started_at=self.clock.monotonic())
        self.store.save_process(process_id, "proxy", proc.pid)

    def adopt(self, row: ProcessRow) -> bool:
        """Take over a running proxy and its listening socket (it hands the socket over on request)."""
        if not (self.settings.start_proxy and self.proxy is None and self.fd_path):
            return False
        from shoal.runtime.proxy import take_listening_fd

        sock = take_listening_fd(self.fd_path)
        if sock is None:
            return False
        sock.set_inheritable(True)
        self.listen_sock = sock
        self.http_port = sock.getsockname()[1]
        self.proxy = ProxyRecord(row.process_id, self.supervisor.adopt(row.pid), ready=True,
                                 started_at=self.clock.monotonic())
        logger.info("adopted the HTTP proxy (pid %d) on port %d", row.pid, self.http_port)
        try:
            self.reserve_grpc()  # the adopted proxy serves it already (both sockets share the port)
        except RuntimeError as e:
            logger.warning("%s", e)
        return True

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the proxy serves; raise if it cannot start."""
        deadline = self.clock.monotonic() + timeout
        while self.proxy is not None and not self.proxy.ready:
            if self.clock.monotonic() > deadline or self.proxy.restarts >= MAX_PROXY_RESTARTS:
                raise RuntimeError("the HTTP proxy failed to start; see its log above")
            await asyncio.sleep(0.01)

    def watch(self) -> None:
        """Restart a proxy that exited, after its CrashLoopBackOff delay (never giving up)."""
        proxy = self.proxy
        if proxy is None or proxy.proc.poll() is None:
            self.standin.stop()
            return
        now = self.clock.monotonic()
        if proxy.restart_at is None:
            self._schedule_restart(proxy, now)
        if proxy.restart_at is not None and now >= proxy.restart_at:
            self.spawn_proxy()
            return
        # Down until restart_at: answer its connections, unless someone else accepts them.
        if self.listen_sock is None or self.others_accept() or self.settings.http.ssl_certfile:
            self.standin.stop()
        else:
            self.standin.start(self.listen_sock)

    def _down_message(self) -> tuple[float, str]:
        proxy = self.proxy
        wait = max(0.0, proxy.restart_at - self.clock.monotonic()) if proxy and proxy.restart_at else 1.0
        return wait, f"the HTTP proxy crashed and restarts in {wait:.0f} s; retry then"

    def _schedule_restart(self, proxy: ProxyRecord, now: float) -> None:
        """A proxy just found dead: count the crash and set when the next one starts."""
        delay = next_delay(proxy.restarts, proxy.started_at, now)
        proxy.restarts = streak(proxy.restarts, proxy.started_at, now) + 1
        proxy.restart_at = now + delay
        proxy.ready = False
        self.metrics.process_exited(proxy.proc.pid)
        logger.error("the HTTP proxy exited with code %s (crashed %d times in a row); restarting it in %.0f s",
                     proxy.proc.returncode, proxy.restarts, delay)

    def restart_message(self) -> str:
        """'restarting in N s (crashed K times)' while the proxy is down; "" while it runs."""
        proxy = self.proxy
        if proxy is None or proxy.restart_at is None:
            return ""
        wait = max(0.0, proxy.restart_at - self.clock.monotonic())
        return f"restarting in {wait:.0f} s (crashed {proxy.restarts} times)"

    async def stop(self) -> None:
        """Stop the proxy (gracefully, then by force)."""
        self.standin.stop()
        if self.proxy is not None:
            proxy = self.proxy
            self.proxy = None
            self.supervisor.stop(proxy.proc, proxy.conn)
            await self.supervisor.wait_exit(proxy.proc, 5.0)

    def close(self) -> None:
        self.standin.stop()
        if self.listen_sock is not None:
            self.listen_sock.close()
        if self.grpc_sock is not None:
            self.grpc_sock.close()
            self.grpc_sock = None
