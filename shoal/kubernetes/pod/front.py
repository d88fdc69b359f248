"""``shoal front``: the holding front of an application whose HTTP ingress scales to zero.

``shoal k8s build`` runs it (Deployment ``<app>-shoal-front``, one pod) when the app's ingress
deployment autoscales with ``min_replicas: 0`` under KEDA (``--ingress-at-zero front``, the
default). The app's HTTP Service, and so its HTTPRoute or Ingress, sends every request here; the
front serves the app's route with the HTTP front every shoal process shares
(:class:`~shoal.runtime.http.app.ProxyApp`: credentials, body limits, the request timeout,
streaming, WebSockets) and forwards each request over the internal RPC to the ingress pods,
through the same router a pod uses for a callee (:class:`~shoal.kubernetes.pod.discovery.PodBackend`).
So a request that finds no ingress pod is held as a handle call is: demand is posted to the
app's scaler (``$SHOAL_SCALER_URL``) so KEDA wakes the ingress, the request waits at most the
wake deadline (``$SHOAL_WAKE_TIMEOUT_S``) and then gets 503 with ``Retry-After``.
With ``grpc_options`` in the config file the front serves gRPC as well
(:mod:`~shoal.kubernetes.pod.grpc_ingress`), held and forwarded the same way (``UNAVAILABLE`` at the
deadline).

The front never imports the application (unless an ``http_options.auth`` hook does): it reads
the serve config file for the route prefix and ``http_options``, and the ingress deployment's
name and limits from its command line (the compiler writes them). Its admin port answers the
probes (``/-/healthz``: the process and its loop; ``/-/ready``: HTTP is served and the front is
not draining) and ``/metrics`` (requests held for the ingress, which the scaler also reads, and
the HTTP request metrics). SIGTERM drains: unready, no new connections, requests in flight
(held ones included) finish within ``--drain-timeout``, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from shoal.config import DEFAULT_MAX_QUEUE_WAIT_S
from shoal.exceptions import PodConfigError
from shoal.kubernetes import names
from shoal.kubernetes.pod.admin import (
    HEAD_TIMEOUT_S,
    LOOP_STALL_S,
    MAX_CONNECTIONS,
    AdminAnswer,
    AdminLimits,
    AdminServer,
    needs_loopback,
)
from shoal.kubernetes.pod.config import PodSettings, http_options_for, pick_app
from shoal.kubernetes.pod.discovery import CalleeConfig, DNSResolver, FileResolver, PodBackend

if TYPE_CHECKING:
    from shoal.config import HTTPOptions

__all__ = ["DRAIN_TIMEOUT_S", "FrontPod", "IngressTarget", "front", "load_front", "run_front", "serve_front"]

logger = logging.getLogger("shoal.pod")

# How long a stopping front lets its requests (held ones included) finish.
DRAIN_TIMEOUT_S = 30.0
# The front's name in its log lines (it serves no deployment of its own).
FRONT = "(front)"


@dataclass(frozen=True)
class IngressTarget:
    """The application's ingress deployment as the front calls it: its name and the limits its
    router enforces (``max_ongoing_requests`` per pod, ``max_queued_requests``, ``max_queue_wait_s``)."""

    deployment: str
    max_ongoing: int = 5
    max_queued: int = -1
    max_queue_wait_s: float = DEFAULT_MAX_QUEUE_WAIT_S

    def __post_init__(self) -> None:
        if not self.deployment:
            raise ValueError("--ingress: the name of the application's ingress deployment is required")
        if self.max_ongoing < 1:
            raise ValueError(f"--max-ongoing-requests must be at least 1, got {self.max_ongoing}")
        if self.max_queued < -1:
            raise ValueError(f"--max-queued-requests must be -1 (no limit) or more, got {self.max_queued}")
        if not 0 < self.max_queue_wait_s <= 86400:
            raise ValueError(f"--max-queue-wait must be in (0, 86400] seconds, got {self.max_queue_wait_s!r}")


def load_front(settings: PodSettings) -> tuple[str, str, HTTPOptions]:
    """(application name, route prefix, http_options) from the serve config file, without
    building the application; PodConfigError naming what is wrong."""
    from shoal.schema import ConfigError, load_config_file

    try:
        config = load_config_file(settings.config_path)
    except ConfigError as e:
        raise PodConfigError(str(e)) from None
    _, schema = pick_app(settings, config.applications)
    if schema.route_prefix is None:
        raise PodConfigError(f"application {schema.name!r} has no route_prefix in {settings.config_path}: "
                             "there is no HTTP route for a front to serve")
    return schema.name, schema.route_prefix, http_options_for(settings, config.http_options)


class _FrontCollector:
    """The front's own metrics: per callee (the ingress) the requests held, in flight and failed
    at the wake deadline, under the names a pod uses (the scaler reads the held ones)."""

    def __init__(self, backend: PodBackend) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Any]:
        from shoal.kubernetes.pod.metrics import callee_metrics

        return callee_metrics(self.backend)


class FrontPod:
    """Serves one application's HTTP route and forwards it to the ingress pods (see the module docstring)."""

    def __init__(self, settings: PodSettings, app: str, prefix: str, http: HTTPOptions, ingress: IngressTarget,
                 admin: AdminServer, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        from shoal.runtime.http.app import ProxyApp
        from shoal.runtime.http.options import FrontOptions
        from shoal.runtime.wire import Routes

        s = self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.app = app
        self.prefix = prefix
        self.http = http
        self.ingress = ingress
        self.admin = admin
        self.drain_timeout_s = drain_timeout_s
        self.key = (app, ingress.deployment)
        resolver = FileResolver(s.resolver_file) if s.resolver_file else DNSResolver()
        callee = CalleeConfig(ingress.max_ongoing, ingress.max_queued, ingress.max_queue_wait_s)
        self.backend = PodBackend(self.loop, s.secret, s.namespace, s.cluster_domain, resolver, {self.key: callee},
                                  rpc_port=s.rpc_port)
        self.options = FrontOptions.of(http)
        self.proxy = ProxyApp(self.backend, self.options)
        self.proxy.set_routes(Routes({prefix: self.key}))  # starts finding the ingress pods now
        self.fronts: list[Any] = []  # shoal.runtime.proxy.HTTPFront, one per listening socket
        self.grpc: Any = None  # shoal.runtime.grpc_front.GRPCFront (grpc_options; shoal.kubernetes.pod.grpc_ingress)
        self.socks: list[socket.socket] = []
        self.serving = False  # read by the admin thread
        self.stop_requested = asyncio.Event()
        self.registry: Any = None

    # -- the admin port (answered on the admin server's thread)
    def _admin(self, method: str, path: str) -> AdminAnswer | concurrent.futures.Future[AdminAnswer]:
        stall = self.admin.loop_stall()
        if path == "/-/healthz":
            if stall is not None:
                return 503, "text/plain", (stall + "\n").encode()
            return 200, "text/plain", b"ok\n"
        if path == "/-/ready":
            if self.serving and stall is None and not self.stop_requested.is_set():
                return 200, "text/plain", b"ready\n"
            why = stall or ("draining" if self.stop_requested.is_set() else "starting")
            return 503, "text/plain", (why + "\n").encode()
        if path == "/metrics":
            return asyncio.run_coroutine_threadsafe(self._metrics(), self.loop)
        return 404, "text/plain", b"not found\n"

    async def _metrics(self) -> AdminAnswer:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from shoal.observability.metrics import PROCESS

        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry) + PROCESS.render()

    def _serve_admin(self) -> None:
        from prometheus_client import CollectorRegistry

        from shoal.observability.metrics import PROCESS

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_FrontCollector(self.backend))
        # HTTP request counters and latencies (ray_serve_* names) come from the shared front's ledger.
        PROCESS.setup(self.settings.pod_name, namespace=self.settings.namespace, routers=self.backend.routers,
                      autoscaler_metrics=False)
        self.admin.handler = self._admin

    # -- lifecycle
    def _listen(self) -> None:
        from shoal.kubernetes.pod.replica import listen_tcp

        s = self.settings
        self.socks.append(listen_tcp(s.host, s.http_port))
        if needs_loopback(s.host):  # kubectl port-forward connects to 127.0.0.1
            try:
                self.socks.append(listen_tcp("127.0.0.1", s.http_port))
            except OSError as e:
                logger.warning("cannot also listen on 127.0.0.1:%d: %s", s.http_port, e)

    async def run(self) -> int:
        """Serve until SIGTERM, then drain; the exit code."""
        from shoal.runtime import backend as backend_mod
        from shoal.runtime.proxy import HTTPFront

        s = self.settings
        self._serve_admin()
        backend_mod.set_current(self.backend)
        try:
            self._listen()
        except OSError as e:
            logger.error("cannot listen on the HTTP port %s:%d: %s", s.host, s.http_port, e)
            self._close()
            return 1
        try:
            await self._start_grpc()
        except PodConfigError as e:
            logger.error("cannot serve gRPC: %s", e)
            self._close()
            return 2
        for sock in self.socks:
            front = HTTPFront(self.proxy, sock.fileno(), self.options)
            await front.start()
            self.fronts.append(front)
        # uvicorn installs its own SIGTERM/SIGINT handlers while it serves: take them back.
        self.install_signals()
        self.admin.heartbeat.start(self.loop)
        self.serving = True
        logger.info("front of %s listening on %s:%d, forwarding %s to %s over RPC port %d (wake deadline %gs)",
                    self.app, s.host, s.http_port, next(iter(self.proxy.table.listing()), "/"),
                    self.ingress.deployment, s.rpc_port, self.backend.wake.timeout_s)
        await self.stop_requested.wait()
        self.serving = False
        logger.info("draining (at most %gs)", self.drain_timeout_s)
        stopping = [self.grpc.stop(self.drain_timeout_s)] if self.grpc is not None else []
        await asyncio.gather(*(f.stop(self.drain_timeout_s) for f in self.fronts), *stopping)
        self._close()
        logger.info("drained; exiting")
        return 0

    async def _start_grpc(self) -> None:
        from shoal.kubernetes.pod.grpc_ingress import start_grpc

        self.grpc = await start_grpc(self.backend, self.settings, self.http, self.app, self.ingress.deployment,
                                     self.prefix, lambda: self.serving and not self.stop_requested.is_set())

    def _close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.backend.close()
        self.admin.heartbeat.stop()
        self.admin.close()

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if not self.stop_requested.is_set():
            logger.info("received %s", signal.Signals(sig).name)
        self.stop_requested.set()


async def serve_front(settings: PodSettings, ingress: IngressTarget, limits: AdminLimits | None = None,
                      drain_timeout_s: float = DRAIN_TIMEOUT_S) -> int:
    """Open the admin port, read the config, then run the :class:`FrontPod`; the exit code."""
    from shoal.kubernetes.pod.command import _tcp_security, open_admin, run_started

    opened = await open_admin(settings, limits)
    if opened is None:
        return 1
    admin, stopping = opened
    try:
        tls = _tcp_security(settings)
        app, prefix, http = load_front(settings)
        pod = FrontPod(settings, app, prefix, http, ingress, admin, drain_timeout_s)
    except (PodConfigError, ValueError) as e:
        logger.error("%s", e)
        admin.close()
        return 2
    if stopping.is_set():
        admin.close()
        return 0
    return await run_started(pod, tls)


@click.command("front", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--ingress", "ingress", envvar="SHOAL_INGRESS", required=True, show_envvar=True,
              help="The application's ingress deployment (its name in the application).")
@click.option("--max-ongoing-requests", type=int, default=5, show_default=True,
              help="The ingress deployment's max_ongoing_requests: requests sent to one of its pods at once.")
@click.option("--max-queued-requests", type=int, default=-1, show_default=True,
              help="The ingress deployment's max_queued_requests: requests held here at once (-1: no limit; "
                   "the wake deadline still bounds each one's wait).")
@click.option("--max-queue-wait", "max_queue_wait_s", type=float, default=DEFAULT_MAX_QUEUE_WAIT_S,
              show_default=True, help="Seconds a request waits for a free ingress pod once there are pods.")
@click.option("--app", "app", envvar=names.ENV_APP, default=None, show_envvar=True,
              help="The application (default: the config file's only one).")
@click.option("--config", "config_path", envvar=names.ENV_CONFIG, show_envvar=True, show_default=True,
              default=f"{names.CONFIG_MOUNT_DIR}/{names.CONFIG_FILE_NAME}",
              help="The serve config file (mounted from the application's ConfigMap).")
@click.option("--host", envvar=names.ENV_POD_IP, default="0.0.0.0", show_envvar=True, show_default=True,
              help="Address to listen on: the pod's IP (from the downward API).")
@click.option("--http-port", type=int, default=names.HTTP_PORT, show_default=True, help="The HTTP port.")
@click.option("--admin-port", type=int, default=names.ADMIN_PORT, show_default=True,
              help="Port of /-/healthz, /-/ready and /metrics.")
@click.option("--rpc-port", type=int, default=names.RPC_PORT, show_default=True,
              help="The ingress pods' RPC port (where requests are forwarded).")
@click.option("--drain-timeout", "drain_timeout_s", type=float, default=DRAIN_TIMEOUT_S, show_default=True,
              help="Seconds a stopping front lets its requests (held ones included) finish.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Level of shoal's own log lines.")
@click.option("--tls-dir", envvar=names.ENV_TLS_DIR, default=names.TLS_MOUNT_DIR, show_envvar=True,
              show_default=True, help="Directory of tls.crt, tls.key and ca.crt (the app's kubernetes.io/tls Secret).")
@click.option("--insecure-no-tls", is_flag=True, envvar=names.ENV_INSECURE_NO_TLS, show_envvar=True,
              help="Development only: plain TCP to the ingress pods.")
@click.option("--admin-head-timeout", type=float, default=HEAD_TIMEOUT_S, show_default=True,
              help="Seconds a client of the admin port has to send its whole request head (then 408).")
@click.option("--admin-max-connections", type=int, default=MAX_CONNECTIONS, show_default=True,
              help="Admin port connections served at once; more are answered 503 at once.")
@click.option("--loop-stall-timeout", type=float, default=LOOP_STALL_S, show_default=True,
              help="The probes fail once the front's event loop has not turned for this many seconds.")
def front(ingress: str, max_ongoing_requests: int, max_queued_requests: int, max_queue_wait_s: float,
          app: str | None, config_path: str, host: str, http_port: int, admin_port: int, rpc_port: int,
          drain_timeout_s: float, log_level: str, tls_dir: str = names.TLS_MOUNT_DIR, insecure_no_tls: bool = False,
          admin_head_timeout: float = HEAD_TIMEOUT_S, admin_max_connections: int = MAX_CONNECTIONS,
          loop_stall_timeout: float = LOOP_STALL_S) -> None:
    """Hold and forward an application's HTTP traffic while its ingress may be scaled to zero.

    The container command of the <app>-shoal-front pod that `shoal k8s build` writes when the
    ingress deployment has min_replicas 0 (--ingress-at-zero front). It serves the app's route
    and forwards each request to the ingress pods over the internal RPC; with no ingress pod it
    holds the request, tells the app's scaler (so KEDA wakes the ingress) and answers 503 with
    Retry-After once the wake deadline has passed.

    \b
    Environment (set by `shoal k8s build`):
      SHOAL_RPC_SECRET      the internal RPC secret (required; from the app's Secret)
      SHOAL_SCALER_URL      the app's scaler, told of held requests (demand)
      SHOAL_SCALER_TOKEN    its bearer token (--scaler-auth bearer)
      SHOAL_WAKE_TIMEOUT_S  how long a request waits for an ingress pod (default 120)
      SHOAL_API_KEYS_FILE   the HTTP API keys, one per line (from the app's API-keys Secret)
      SHOAL_NAMESPACE, SHOAL_POD_NAME, SHOAL_CLUSTER_DOMAIN, SHOAL_RESOLVER_FILE  as for `shoal replica`

    Exit codes: 0 after a drain, 1 when a port cannot be bound, 2 for a bad config or option.
    """
    from shoal.kubernetes.pod.command import _settings, setup_logging

    try:
        target = IngressTarget(ingress, max_ongoing_requests, max_queued_requests, max_queue_wait_s)
        limits = AdminLimits(head_timeout_s=admin_head_timeout, max_connections=admin_max_connections,
                             loop_stall_s=loop_stall_timeout)
        if not 0 < drain_timeout_s <= 3600:
            raise ValueError(f"--drain-timeout must be in (0, 3600] seconds, got {drain_timeout_s!r}")
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    settings = _settings(deployment=FRONT, app=app or None, config_path=config_path, host=host, rpc_port=rpc_port,
                         http_port=http_port, admin_port=admin_port, log_level=log_level.upper(), rank_from_env=False,
                         tls_dir=None if insecure_no_tls else tls_dir)
    setup_logging(settings)
    code = run_front(settings, target, limits, drain_timeout_s)
    os._exit(code)  # an auth hook may have left non-daemon threads behind: do not wait for them


def run_front(settings: PodSettings, target: IngressTarget, limits: AdminLimits | None = None,
              drain_timeout_s: float = DRAIN_TIMEOUT_S) -> int:
    """Serve until SIGTERM; the process's exit code."""
    from shoal.context import _mark_worker_process
    from shoal.kubernetes.pod.command import raise_fd_limit
    from shoal.observability import tracing
    from shoal.runtime.backend import new_event_loop

    _mark_worker_process("front")  # an auth hook's module must not start an instance
    raise_fd_limit()
    logger.info("starting the front of %s (ingress %s, config %s, namespace %s)", settings.app or "(the only app)",
                target.deployment, settings.config_path, settings.namespace)
    tracing.setup_from_env("shoal-front")
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        code = loop.run_until_complete(serve_front(settings, target, limits, drain_timeout_s))
    except OSError as e:
        logger.error("front failed: %s", e)
        code = 1
    tracing.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return code
