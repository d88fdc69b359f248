"""The pod replica: a :class:`~shoal.runtime.replica.core.ReplicaCore` composed for a pod.

Its transport is the pod's TCP RPC port, its membership the callees' pods found in cluster
DNS (:class:`~shoal.kubernetes.pod.discovery.PodBackend`), and it has no control channel:
there is no controller, the pod's probes and metrics (:mod:`~shoal.kubernetes.pod.admin`,
:mod:`~shoal.kubernetes.pod.metrics`) tell Kubernetes what it needs to know.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shoal.context import ReplicaContext, set_process_replica_context
from shoal.kubernetes import names
from shoal.kubernetes.gang_pod import GangLeader, linger
from shoal.kubernetes.pod.admin import AdminAnswer, AdminServer, needs_loopback
from shoal.kubernetes.pod.config import PodSettings
from shoal.kubernetes.pod.discovery import CalleeConfig, DNSResolver, FileResolver, PodBackend
from shoal.kubernetes.pod.metrics import PodCollector
from shoal.kubernetes.pod.ranks import RankTracker, own_address
from shoal.kubernetes.pod.routing_stats import keeper
from shoal.kubernetes.pod.status import pod_status
from shoal.observability.metrics import PROCESS
from shoal.runtime import backend as backend_mod
from shoal.runtime.callable import UserCallable
from shoal.runtime.handshake_gate import HandshakeCollector
from shoal.runtime.replica.autoscaling_stats import StatsCaller
from shoal.runtime.replica.core import ReplicaCore
from shoal.runtime.replica.logconfig import apply_logging_config
from shoal.runtime.replica.ports import NoControl, TcpTransport
from shoal.runtime.replica.routing_stats import RoutingStatsReporter, routing_stats_method
from shoal.runtime.wire import Routes
from shoal.serving import multiplex

if TYPE_CHECKING:
    from shoal.config import DeploymentConfig, HTTPOptions
    from shoal.deployment import AppSpec, DeploymentSpec

__all__ = ["DRAIN_QUIET_S", "HEALTH_FAILURE_THRESHOLD", "HealthTracker", "PodReplica"]

logger = logging.getLogger("shoal.pod")

# While draining, once nothing is in flight, keep connections open (refusing requests) until
# callers have stopped sending for this long, so that a request in transit is refused (and
# retried elsewhere by its caller) instead of being lost with a closed connection.
DRAIN_QUIET_S = 1.0
# Ray Serve replaces a replica whose check_health fails this many times in a row
# (REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD): the pod's liveness endpoint then fails for good,
# and the kubelet restarts the container (a wedged GPU replica gives its GPU back).
HEALTH_FAILURE_THRESHOLD = 3


class HealthTracker:
    """The results of the deployment's ``check_health``, one call every health_check_period_s.

    ``healthy`` (readiness) follows the latest result. ``dead`` (liveness) is set once ``threshold``
    checks in a row have failed, and stays set: like Ray, which stops such a replica and starts
    another, a replica declared dead is not trusted again because a later check passes.
    """

    def __init__(self, threshold: int = HEALTH_FAILURE_THRESHOLD) -> None:
        if threshold < 1:
            raise ValueError(f"health check failure threshold must be at least 1, got {threshold}")
        self.threshold = threshold
        self.healthy = False
        self.error = ""
        self.consecutive_failures = 0
        self.dead: str | None = None  # why the replica must be replaced

    def passed(self) -> None:
        self.healthy = True
        self.error = ""
        self.consecutive_failures = 0

    def failed(self, why: str) -> None:
        self.healthy = False
        self.error = why
        self.consecutive_failures += 1
        if self.dead is None and self.consecutive_failures >= self.threshold:
            self.dead = f"check_health failed {self.consecutive_failures} times in a row (last: {why})"


class PodReplica:
    """Builds and runs the replica of one pod (see :mod:`shoal.kubernetes.pod`)."""

    def __init__(self, settings: PodSettings, spec: AppSpec, dspec: DeploymentSpec, http: HTTPOptions,
                 callees: Mapping[tuple[str, str], CalleeConfig], admin: AdminServer) -> None:
        self.settings = s = settings
        self.spec = spec
        self.dspec = dspec
        self.http = http
        self.loop = asyncio.get_running_loop()
        self.constructed = False
        self.health = HealthTracker()
        self.admin = admin
        self.resolver = FileResolver(s.resolver_file) if s.resolver_file else DNSResolver()
        self.backend = PodBackend(self.loop, s.secret, s.namespace, s.cluster_domain, self.resolver, callees,
                                  rpc_port=s.rpc_port)
        self.backend.status_source = lambda: pod_status(spec, self.resolver, s.namespace, s.cluster_domain,
                                                        dspec.name, self.constructed)
        self.core = ReplicaCore(channel=NoControl(), routers=self.backend, replica_id=s.pod_name, quiet_s=DRAIN_QUIET_S)
        self.core.configure(dspec.config, (spec.name, dspec.name))
        self.http_socks: list[socket.socket] = []
        self.grpc: Any = None  # shoal.runtime.grpc_front.GRPCFront (grpc_options; shoal.kubernetes.pod.grpc_ingress)
        self.registry: Any = None
        self.stop_requested = asyncio.Event()
        self.gang_leader: GangLeader | None = None  # on rank 0 of a gang
        # What record_autoscaling_stats() last returned (autoscaling deployments that define it),
        # exported on /metrics for the application's scaler.
        self.custom_stats: tuple[tuple[str, float], ...] = ()
        # Ray's replica ranks in a plain Deployment (not a gang): from its ready pods (ranks.py).
        # Where DNS lists this pod: status.podIP (the pod simulation says where it holds it).
        own = own_address(os.environ.get(names.ENV_POD_ADDRESS) or s.host)
        self.ranks: RankTracker | None = None
        if s.world_size == 1 and own is not None:
            self.ranks = RankTracker(self.resolver, names.service_dns(spec.name, dspec.name, s.namespace,
                                                                      s.cluster_domain), own, self._rank_changed)

    # -- readiness (PodView for the metrics)
    @property
    def key(self) -> tuple[str, str]:
        return self.core.key

    @property
    def rank(self) -> int:
        return self.settings.rank

    @property
    def replica_rank(self) -> tuple[int, int]:
        """``(rank, world_size)`` user code sees: the rank in the gang, or among the deployment's pods."""
        if self.settings.world_size > 1 or self.ranks is None:
            return self.settings.rank, self.settings.world_size
        return self.ranks.current

    def _rank_changed(self, rank: int, world_size: int) -> None:
        if self.core.user is not None:
            self.core.user.update_context(rank=rank, world_size=world_size)

    @property
    def draining(self) -> bool:
        return self.core.draining

    @property
    def ready(self) -> bool:
        return (self.constructed and self.health.healthy and self.health.dead is None and not self.draining
                and not self.stop_requested.is_set()
                and (self.gang_leader is None or self.gang_leader.ready))

    def _admin(self, method: str, path: str) -> AdminAnswer | concurrent.futures.Future[AdminAnswer]:
        """The admin port's answers, on the admin server's thread: the probes read plain
        fields only (never user code); /metrics is computed on the replica's loop."""
        if path == "/-/healthz":
            # Liveness: the event loop turns. Not before the constructor finished (which may
            # block the loop for minutes loading a model): the startupProbe covers that time.
            if not self.constructed:
                return 503, "text/plain", b"starting\n"
            if (stall := self.admin.loop_stall()) is not None:
                return 503, "text/plain", (stall + "\n").encode()
            if self.health.dead is not None:
                return 503, "text/plain", (self.health.dead + "\n").encode()
            return 200, "text/plain", b"ok\n"
        if path == "/-/ready":
            if self.ready and self.admin.loop_stall() is None:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", (self._unready_why() + "\n").encode()
        if path == "/metrics":
            return asyncio.run_coroutine_threadsafe(self._metrics(), self.loop)
        return 404, "text/plain", b"not found\n"

    async def _metrics(self) -> AdminAnswer:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from shoal import metrics as user_metrics

        # shoal's own, then the metrics the deployment defined (shoal.metrics).
        return 200, CONTENT_TYPE_LATEST, (generate_latest(self.registry) + PROCESS.render()
                                          + generate_latest(user_metrics.registry()))

    def _unready_why(self) -> str:
        if (stall := self.admin.loop_stall()) is not None:
            return stall
        if self.draining or self.stop_requested.is_set():
            return "draining"
        if not self.constructed:
            return "starting"
        if self.health.dead is not None:
            return f"unhealthy: {self.health.dead}"
        if not self.health.healthy:
            return f"unhealthy: {self.health.error}"
        return f"gang: {self.gang_leader.why}" if self.gang_leader is not None else "not ready"

    # -- lifecycle
    def _serve_admin(self) -> None:
        """Take over the admin port: probes from the replica's state, and /metrics."""
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PodCollector(self))
        self.registry.register(HandshakeCollector())
        self.admin.handler = self._admin

    def _set_up(self) -> ReplicaContext:
        """Everything before the deployment's constructor: admin port, routers, metrics, logging."""
        s = self.settings
        cfg: DeploymentConfig = self.dspec.config
        self._serve_admin()
        backend_mod.set_current(self.backend)
        # The autoscaler metrics (names.METRIC_*) come from PodCollector; shoal.observability.metrics adds the rest.
        PROCESS.setup(s.pod_name, namespace=s.namespace, app=self.spec.name, deployment=self.dspec.name,
                      server=self.core, routers=self.backend.routers, autoscaler_metrics=False)
        rank, world_size = self.replica_rank
        ctx = ReplicaContext(self.spec.name, self.dspec.name, s.pod_name, rank=rank, world_size=world_size)
        set_process_replica_context(ctx)
        apply_logging_config(cfg.logging_config, ctx)
        multiplex.models_changed_hook = self.core.models_changed
        for callee in self.dspec.calls:
            self.backend.router(self.spec.name, callee)  # start finding the callee's pods now
        return ctx

    async def _construct(self, ctx: ReplicaContext) -> bool:
        """Construct the deployment and start serving; False if that failed."""
        s = self.settings
        cfg: DeploymentConfig = self.dspec.config
        try:
            user = UserCallable(self.dspec.func_or_class, self.dspec.init_args, self.dspec.init_kwargs,
                                is_function=self.dspec.is_function, context=ctx)
            self.core.user = user
            await user.initialize(cfg.user_config)
            rank, world_size = self.replica_rank  # it may have changed while the constructor ran
            user.update_context(rank=rank, world_size=world_size)
            set_process_replica_context(ReplicaContext(self.spec.name, self.dspec.name, s.pod_name, user.instance,
                                                       rank=rank, world_size=world_size))
            if s.rank == 0 and s.world_size > 1:
                self.gang_leader = GangLeader(self.core, pod_name=s.pod_name, gang=s.gang, namespace=s.namespace,
                                              cluster_domain=s.cluster_domain, world_size=s.world_size,
                                              resolver=self.resolver, secret=s.secret,
                                              max_ongoing=cfg.max_ongoing_requests, rpc_port=s.rpc_port,
                                              admin_port=s.admin_port)
            await self.core.listen(TcpTransport(s.host, s.rpc_port, s.secret))
            # A gang's callers reach it through rank 0 only.
            if self.spec.ingress == self.dspec.name and self.spec.route_prefix is not None and s.rank == 0:
                await self._start_http()
                from shoal.kubernetes.pod.grpc_ingress import start_grpc

                self.grpc = await start_grpc(self.backend, s, self.http, self.spec.name, self.dspec.name,
                                             self.spec.route_prefix, lambda: self.ready)
        except BaseException:
            logger.error("replica %s of %s/%s failed to start:\n%s", s.pod_name, self.spec.name, self.dspec.name,
                         traceback.format_exc())
            return False
        return True

    async def run(self) -> int:
        """Serve until SIGTERM, then drain; the exit code."""
        s = self.settings
        cfg: DeploymentConfig = self.dspec.config
        if self.ranks is not None:
            await self.ranks.first()
        if not await self._construct(self._set_up()):
            self.admin.close()
            return 1
        self.constructed = True
        self.admin.heartbeat.start(self.loop)
        if self.gang_leader is not None:
            self.gang_leader.start()
        health = self.loop.create_task(self._health_loop(cfg))
        stats = self.loop.create_task(self._custom_stats_loop(cfg))
        background = [self.loop.create_task(self.ranks.run())] if self.ranks is not None else []
        background += self._start_routing_stats(cfg)
        logger.info("replica %s of %s/%s constructed; RPC on %s:%d%s%s", s.pod_name, self.spec.name, self.dspec.name,
                    s.host, s.rpc_port, f", HTTP on :{s.http_port}" if self.core.fronts else "",
                    f", gRPC on :{self.grpc.port}" if self.grpc is not None else "")
        await self.stop_requested.wait()
        if s.rank > 0:  # serve what rank 0 still sends until it is gone (it drains first)
            await linger(self.core, cfg.graceful_shutdown_timeout_s)
        logger.info("draining (graceful_shutdown_timeout_s=%s)", cfg.graceful_shutdown_timeout_s)
        stopping = [self.grpc.stop(cfg.graceful_shutdown_timeout_s)] if self.grpc is not None else []
        await asyncio.gather(self.core.drain(), *stopping)
        for sock in self.http_socks:
            sock.close()
        if self.gang_leader is not None:
            self.gang_leader.close()
        health.cancel()
        stats.cancel()
        for task in background:
            task.cancel()
        self.backend.close()
        self.admin.heartbeat.stop()
        self.admin.close()
        logger.info("drained; exiting")
        return 0

    async def _custom_stats_loop(self, cfg: DeploymentConfig) -> None:
        """Every ``metrics_interval_s``: the deployment's record_autoscaling_stats(), kept for
        /metrics (autoscaling deployments that define it; a gang's rank 0 only)."""
        auto = cfg.resolved_autoscaling()
        user = self.core.user
        if auto is None or user is None or not user.records_autoscaling_stats or self.settings.rank != 0:
            return
        caller = StatsCaller(user, self.loop.time)
        while not self.core.draining:
            self.custom_stats = await caller.call()
            await asyncio.sleep(max(0.05, auto.metrics_interval_s))

    def _start_routing_stats(self, cfg: DeploymentConfig) -> list[asyncio.Task[None]]:
        """A custom request router's record_routing_stats(), kept for callers that ask
        (:mod:`~shoal.kubernetes.pod.routing_stats`; a gang's rank 0 only)."""
        rc = cfg.custom_router()
        user = self.core.user
        fn = routing_stats_method(user) if rc is not None and user is not None else None
        if rc is None or user is None or fn is None or self.settings.rank != 0:
            return []
        reporter = RoutingStatsReporter(self.settings.pod_name, user, fn, rc, keeper(self.core))
        return [self.loop.create_task(reporter.run(lambda: self.core.draining))]

    async def _start_http(self) -> None:
        from shoal.runtime.proxy import FrontOptions

        s = self.settings
        assert self.spec.route_prefix is not None
        self.http_socks.append(listen_tcp(s.host, s.http_port))
        if needs_loopback(s.host):
            try:
                self.http_socks.append(listen_tcp("127.0.0.1", s.http_port))
            except OSError as e:
                logger.warning("cannot also listen on 127.0.0.1:%d: %s", s.http_port, e)
        routes = Routes({self.spec.route_prefix: (self.spec.name, self.dspec.name)})
        await self.core.serve_http(FrontOptions.of(self.http), [sock.fileno() for sock in self.http_socks], routes)
        # uvicorn installs its own SIGTERM/SIGINT handlers while it serves: take them back, so
        # that a signal drains the whole replica (HTTP and RPC) in order.
        self.install_signals()

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if not self.stop_requested.is_set():
            logger.info("received %s", signal.Signals(sig).name)
        self.stop_requested.set()

    async def _health_loop(self, cfg: DeploymentConfig) -> None:
        """check_health every health_check_period_s, each within health_check_timeout_s (Ray's
        semantics); readiness follows the latest result, liveness fails after
        HEALTH_FAILURE_THRESHOLD failures in a row (:class:`HealthTracker`)."""
        first = True
        health = self.health
        while not self.draining and health.dead is None:
            try:
                await asyncio.wait_for(self.core.check_health(), cfg.health_check_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                why = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
                if health.healthy or first:
                    logger.warning("check_health failed: %s", why)
                health.failed(why)
                if health.dead is not None:
                    logger.error("%s: the liveness probe fails from now on, so the pod's container is restarted",
                                 health.dead)
            else:
                if not health.healthy and not first:
                    logger.info("check_health passes again")
                health.passed()
            first = False
            await asyncio.sleep(cfg.health_check_period_s)


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (for the HTTP front)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock
