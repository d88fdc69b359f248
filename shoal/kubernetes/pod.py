"""One replica of one deployment in a Kubernetes pod: ``shoal replica --deployment NAME``.

This is the container command the Kubernetes compiler writes. There is no controller in a
cluster: the pod reads the serve config file (mounted from the app's ConfigMap), builds the
application, constructs its own deployment and serves it, and Kubernetes does the rest
(scheduling, restarts, rolling updates, autoscaling from the metrics served here).

* **RPC** on ``$SHOAL_POD_IP:9000``: the framed protocol of :mod:`shoal.runtime.wire` over
  TCP, with the HMAC handshake on ``$SHOAL_RPC_SECRET`` (nothing is unpickled before it
  succeeds). ``max_ongoing_requests`` is enforced: a request beyond it is refused and the
  caller's router tries another pod.
* **HTTP** on ``:8000`` when the deployment is its app's ingress (the same in-process path a
  local ingress replica uses; ``route_prefix`` and ``http_options`` from the config file).
* **Admin** on ``:8001``: ``/-/healthz`` (the startup and liveness probes: 503 until the
  constructor finished, which may block the process for minutes loading a model; then 200
  while the process answers, draining included), ``/-/ready`` (the readiness probe: 200 once
  the constructor finished and the latest ``check_health`` passed; 503 before, after a failed
  check, and while draining) and ``/metrics`` (Prometheus text: ongoing requests in this
  replica, requests this pod holds for each callee, request counters and latencies).
  In a cluster the HTTP and admin ports also listen on 127.0.0.1, for ``kubectl port-forward``.
* **Handles** in the deployment's constructor arguments route through a :class:`PodBackend`:
  one router per callee, fed by resolving the callee's headless Service every second (or
  the JSON file named by ``$SHOAL_RESOLVER_FILE``, the pod simulation's stand-in for cluster
  DNS). With no pod to call, requests wait in the caller (and are counted in
  ``shoal_handle_queued_requests``, which lets KEDA wake a deployment from zero).
* **Gang ranks** (``--rank-from-env``, a LeaderWorkerSet pod): rank 0 runs every request on
  ranks 1..N-1 too and is ready only while they are; see :mod:`shoal.kubernetes.gang_pod`.
* **SIGTERM** drains: ``/-/ready`` turns 503, new requests are refused, in-flight ones finish
  within ``graceful_shutdown_timeout_s``, then the process exits 0.

Logs are written to stderr, one line per record, for ``kubectl logs``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import click

from shoal.kubernetes import names
from shoal.runtime.callable import UserCallable
from shoal.runtime.replica import Bootstrap, ReplicaServer
from shoal.runtime.router import Router
from shoal.runtime.wire import (
    LATENCY_BUCKETS_MS,
    REQUEST,
    FramedProtocol,
    Membership,
    ReplicaAddress,
    join_host_port,
)

if TYPE_CHECKING:
    from shoal.config import DeploymentConfig, HTTPOptions
    from shoal.deployment import AppSpec, DeploymentSpec

logger = logging.getLogger("shoal.pod")

# How often callers look up their callees' pods in cluster DNS, and in the simulation's file.
DNS_INTERVAL_S = 1.0
FILE_INTERVAL_S = 0.25
# A pod the router dropped (unreachable, or its connection died) is left out this long before
# it is tried again while DNS still lists it; the delay doubles on repeated failures.
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 10.0
# While draining, once nothing is in flight, keep connections open (refusing requests) until
# callers have stopped sending for this long, so that a request in transit is refused (and
# retried elsewhere by its caller) instead of being lost with a closed connection.
DRAIN_QUIET_S = 1.0

# Metrics beyond the two in the contract (names.METRIC_*); counters get a _total suffix.
METRIC_IN_FLIGHT = "shoal_handle_in_flight_requests"
METRIC_REQUESTS = "shoal_replica_requests"
METRIC_ERRORS = "shoal_replica_request_errors"
METRIC_REJECTED = "shoal_replica_rejected_requests"
METRIC_LATENCY = "shoal_replica_request_latency_seconds"
METRIC_READY = "shoal_replica_ready"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodSettings:
    """Everything a pod replica is told by its command line and environment."""

    deployment: str
    app: str | None  # None: the config file's only application
    config_path: str
    secret: bytes
    host: str = "0.0.0.0"
    rpc_port: int = names.RPC_PORT
    http_port: int = names.HTTP_PORT
    admin_port: int = names.ADMIN_PORT
    namespace: str = "default"
    pod_name: str = ""
    cluster_domain: str = "cluster.local"
    resolver_file: str | None = None
    log_level: str = "INFO"
    # Gang replicas (--rank-from-env): this pod's rank, the gang's size, the LeaderWorkerSet's name.
    rank: int = 0
    world_size: int = 1
    gang: str = ""


# --------------------------------------------------------------------------------------------
# Finding a callee's pods
# --------------------------------------------------------------------------------------------


class DNSResolver:
    """A headless Service's ready pod IPs from cluster DNS (its A/AAAA records)."""

    interval = DNS_INTERVAL_S

    async def resolve(self, name: str) -> list[str] | None:
        """The IPs behind ``name``: [] when it has none, None when DNS could not say."""
        loop = asyncio.get_running_loop()
        # A trailing dot makes the name absolute: no search-domain queries (ndots:5) first.
        fqdn = name if name.endswith(".") else name + "."
        try:
            infos = await loop.getaddrinfo(fqdn, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                return []  # no such name, or no ready pods behind it
            logger.warning("cannot resolve %s: %s", name, e)
            return None
        except OSError as e:
            logger.warning("cannot resolve %s: %s", name, e)
            return None
        return sorted({str(info[4][0]) for info in infos})


class FileResolver:
    """The pod simulation's DNS: a JSON file ``{"dns name": ["ip", ...]}`` (``$SHOAL_RESOLVER_FILE``)."""

    interval = FILE_INTERVAL_S

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._data: dict[str, Any] | None = None

    async def resolve(self, name: str) -> list[str] | None:
        data = self._load()
        if data is None:
            return None
        ips = data.get(name.rstrip("."), [])
        return [str(ip) for ip in ips] if isinstance(ips, list) else []

    def _load(self) -> dict[str, Any] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return self._data
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                with open(self.path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):
                return self._data  # being replaced; try again next time
            if isinstance(data, dict):
                self._data = data
                self._stamp = stamp
        return self._data


class Resolver(Protocol):
    interval: float

    async def resolve(self, name: str) -> list[str] | None: ...


class _Watcher:
    """Keeps one router's membership equal to the callee's ready pods, minus pods in back-off."""

    def __init__(self, backend: PodBackend, router: Router, dns_name: str, config: _CalleeConfig) -> None:
        self.backend = backend
        self.router = router
        self.dns_name = dns_name
        self.config = config
        self.version = 0
        self.listed: list[str] = []
        self.pushed: tuple[str, ...] | None = None
        # ip -> (left out until, current delay)
        self.backoff: dict[str, tuple[float, float]] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = self.backend.loop.create_task(self._run())

    def kick(self) -> None:
        self.wake.set()

    def dropped(self, address: ReplicaAddress) -> None:
        now = self.backend.loop.time()
        prev = self.backoff.get(address.tag)
        delay = BACKOFF_INITIAL_S if prev is None else min(prev[1] * 2, BACKOFF_MAX_S)
        self.backoff[address.tag] = (now + delay, delay)
        self.pushed = None  # the router's view changed: push again once the back-off ends
        logger.info("pod %s of %s unreachable or gone; retrying it in %.1fs if DNS still lists it",
                    address.tag, self.router.deployment, delay)
        self.wake.set()

    async def _run(self) -> None:
        loop = self.backend.loop
        resolver = self.backend.resolver
        while True:
            try:
                ips = await resolver.resolve(self.dns_name)
            except Exception:
                logger.exception("resolving %s failed", self.dns_name)
                ips = None
            if ips is not None:
                self.listed = ips
                for ip in [ip for ip in self.backoff if ip not in ips]:
                    del self.backoff[ip]  # gone from DNS: a pod that comes back gets a fresh start
            self._push(loop.time())
            nap = resolver.interval
            pending = [until for until, _ in self.backoff.values() if until > loop.time()]
            if pending:
                nap = max(0.01, min(nap, min(pending) - loop.time()))
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), nap)
            except TimeoutError:
                pass

    def _push(self, now: float) -> None:
        tags = tuple(ip for ip in self.listed if self.backoff.get(ip, (0.0, 0.0))[0] <= now)
        if tags == self.pushed:
            return
        self.pushed = tags
        self.version += 1
        port = self.backend.rpc_port
        replicas = tuple(ReplicaAddress(ip, join_host_port(ip, port), self.config.max_ongoing) for ip in tags)
        self.router.update(Membership(self.router.app, self.router.deployment, self.version, replicas,
                                      max_queued_requests=self.config.max_queued))


@dataclass(frozen=True)
class _CalleeConfig:
    max_ongoing: int = 5
    max_queued: int = -1


class PodBackend:
    """The :class:`~shoal.runtime.backend.Backend` of a pod: routers fed by service discovery."""

    def __init__(self, loop: asyncio.AbstractEventLoop, secret: bytes, namespace: str, cluster_domain: str,
                 resolver: Resolver,
                 callees: Mapping[tuple[str, str], _CalleeConfig] | None = None,
                 rpc_port: int = names.RPC_PORT) -> None:
        self.loop = loop
        self.secret = secret
        self.namespace = namespace
        self.cluster_domain = cluster_domain
        self.resolver = resolver
        self.rpc_port = rpc_port
        self._callees = dict(callees or {})
        self._routers: dict[tuple[str, str], Router] = {}
        self._watchers: dict[tuple[str, str], _Watcher] = {}
        self._lock = threading.Lock()

    def router(self, app: str, deployment: str) -> Router:
        key = (app, deployment)
        router = self._routers.get(key)
        if router is not None:
            return router
        with self._lock:
            router = self._routers.get(key)
            if router is None:
                router = Router(app, deployment, self.secret)
                name = names.service_dns(app, deployment, self.namespace, self.cluster_domain)
                watcher = _Watcher(self, router, name, self._callees.get(key, _CalleeConfig()))
                router.on_drop = watcher.dropped
                router.on_cold_wait = lambda _r: watcher.kick()
                self._watchers[key] = watcher
                self._routers[key] = router
                self._in_loop(watcher.start)
        return router

    def routers(self) -> list[tuple[tuple[str, str], Router]]:
        return list(self._routers.items())

    def _in_loop(self, fn: Callable[[], None]) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            fn()
        else:
            self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        for watcher in self._watchers.values():
            if watcher.task is not None:
                watcher.task.cancel()
        for router in self._routers.values():
            router.close()


# --------------------------------------------------------------------------------------------
# The admin port: probes and metrics
# --------------------------------------------------------------------------------------------


class AdminServer:
    """A small HTTP/1.1 server for probes and metrics (one request per connection).

    Deliberately separate from the app's HTTP server: it starts before the app is imported,
    keeps answering while the replica drains, and never touches user code.
    """

    def __init__(self, handler: Callable[[str, str], tuple[int, str, bytes]]) -> None:
        self.handler = handler
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, host: str, port: int) -> None:
        self.servers.append(await asyncio.start_server(self._client, host, port, reuse_address=True))
        if needs_loopback(host):
            try:
                self.servers.append(await asyncio.start_server(self._client, "127.0.0.1", port, reuse_address=True))
            except OSError as e:
                logger.warning("cannot also listen on 127.0.0.1:%d: %s", port, e)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            parts = line.decode("latin-1").split()
            for _ in range(100):  # headers: read and ignore
                header = await asyncio.wait_for(reader.readline(), 10)
                if header in (b"\r\n", b"\n", b""):
                    break
            if len(parts) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
                method = "GET"
            else:
                method, target = parts[0], parts[1]
                if method not in ("GET", "HEAD"):
                    status, ctype, body = 405, "text/plain", b"method not allowed\n"
                else:
                    status, ctype, body = self.handler(method, target.split("?", 1)[0])
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                      500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "")
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode("latin-1")
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            logger.exception("admin request failed")
        finally:
            writer.close()

    def close(self) -> None:
        for server in self.servers:
            server.close()


def needs_loopback(host: str) -> bool:
    """Whether to listen on 127.0.0.1 too: in a pod that listens on its IP, so that
    ``kubectl port-forward`` (which connects to the pod's loopback) reaches the HTTP and admin
    ports. Not when the pod IP is itself a loopback address (the pod simulation)."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not addr.is_loopback and not addr.is_unspecified


# --------------------------------------------------------------------------------------------
# The replica
# --------------------------------------------------------------------------------------------

class PodReplica:
    """Builds and runs the replica server of one pod (see the module docstring)."""

    def __init__(self, settings: PodSettings, spec: AppSpec, dspec: DeploymentSpec, http: HTTPOptions,
                 callees: Mapping[tuple[str, str], _CalleeConfig], admin: AdminServer) -> None:
        self.settings = settings
        self.spec = spec
        self.dspec = dspec
        self.http = http
        self.callees = callees
        self.loop = asyncio.get_running_loop()
        self.rejected = 0
        self.constructed = False
        self.healthy = False
        self.health_error = ""
        self.admin = admin
        self.backend: PodBackend | None = None
        self.server: PodReplicaServer | None = None
        self.http_socks: list[socket.socket] = []
        self.registry: Any = None
        self.stop_requested = asyncio.Event()
        self.gang_leader: Any = None  # gang_pod.GangLeader on rank 0 of a gang

    # -- readiness and metrics
    @property
    def draining(self) -> bool:
        return self.server is not None and bool(self.server.draining)

    @property
    def ready(self) -> bool:
        return (self.constructed and self.healthy and not self.draining and not self.stop_requested.is_set()
                and (self.gang_leader is None or self.gang_leader.ready))

    def _admin(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path == "/-/healthz":
            # Liveness: the event loop answers. Not before the constructor finished (which may
            # block the loop for minutes loading a model): the startupProbe covers that time.
            if not self.constructed:
                return 503, "text/plain", b"starting\n"
            return 200, "text/plain", b"ok\n"
        if path == "/-/ready":
            if self.ready:
                return 200, "text/plain", b"ready\n"
            if self.draining or self.stop_requested.is_set():
                why = "draining"
            elif not self.constructed:
                why = "starting"
            elif not self.healthy:
                why = f"unhealthy: {self.health_error}"
            else:
                why = f"gang: {self.gang_leader.why}" if self.gang_leader is not None else "not ready"
            return 503, "text/plain", (why + "\n").encode()
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            from shoal.observability.metrics import PROCESS  # Ray Serve's metric names (shoal.observability.metrics)

            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry) + PROCESS.render()
        return 404, "text/plain", b"not found\n"

    def _collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        app, dep = self.spec.name, self.dspec.name
        srv = self.server
        ongoing = GaugeMetricFamily(names.METRIC_ONGOING, "Requests running or waiting in this replica.",
                                    labels=["app", "deployment"])
        # A gang's requests are counted once, at rank 0 (the other ranks run the same ones).
        ongoing.add_metric([app, dep], (srv.ongoing + len(srv.local_waiters))
                           if srv is not None and self.settings.rank == 0 else 0)
        yield ongoing
        queued = GaugeMetricFamily(names.METRIC_CALLER_QUEUED,
                                   "Requests this pod holds for a deployment it cannot send them to yet.",
                                   labels=["app", "deployment"])
        in_flight = GaugeMetricFamily(METRIC_IN_FLIGHT, "Requests this pod has in flight to a deployment.",
                                      labels=["app", "deployment"])
        if self.backend is not None:
            for (a, d), router in self.backend.routers():
                queued.add_metric([a, d], router.num_queued)
                in_flight.add_metric([a, d], router.num_in_flight)
        yield queued
        yield in_flight
        labels = [app, dep]
        counters = srv.counters if srv is not None else None
        requests = CounterMetricFamily(METRIC_REQUESTS, "Requests this replica finished.", labels=["app", "deployment"])
        requests.add_metric(labels, counters.requests if counters is not None else 0)
        yield requests
        errors = CounterMetricFamily(METRIC_ERRORS, "Requests this replica finished with an error (HTTP: 5xx).",
                                     labels=["app", "deployment"])
        errors.add_metric(labels, counters.errors if counters is not None else 0)
        yield errors
        rejected = CounterMetricFamily(METRIC_REJECTED, "Requests refused at max_ongoing_requests or while draining "
                                       "(their callers sent them to another pod).", labels=["app", "deployment"])
        rejected.add_metric(labels, self.rejected)
        yield rejected
        if counters is not None:
            latency = HistogramMetricFamily(METRIC_LATENCY, "Time to finish a request in this replica.",
                                            labels=["app", "deployment"])
            buckets: list[tuple[str, float]] = []
            total = 0
            for bound, n in zip(LATENCY_BUCKETS_MS, counters.hist, strict=False):
                total += n
                buckets.append((repr(bound / 1000.0), total))
            buckets.append(("+Inf", sum(counters.hist)))
            latency.add_metric(labels, buckets, None)
            yield latency
        ready = GaugeMetricFamily(METRIC_READY, "1 when this replica is ready to serve.", labels=["app", "deployment"])
        ready.add_metric([app, dep], 1 if self.ready else 0)
        yield ready

    # -- lifecycle
    def _serve_admin(self) -> None:
        """Take over the admin port: probes from the replica's state, and /metrics."""
        from prometheus_client import CollectorRegistry

        class _Collector:
            def __init__(self, owner: PodReplica) -> None:
                self.owner = owner

            def collect(self) -> Iterator[Any]:
                return self.owner._collect()

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.admin.handler = self._admin

    async def run(self) -> int:
        from shoal.context import ReplicaContext, set_process_replica_context
        from shoal.runtime import backend as backend_mod
        from shoal.runtime.replica import apply_logging_config
        from shoal.runtime.wire import serve_tcp
        from shoal.serving import multiplex

        s = self.settings
        cfg: DeploymentConfig = self.dspec.config
        resolver: DNSResolver | FileResolver = FileResolver(s.resolver_file) if s.resolver_file else DNSResolver()
        self.backend = PodBackend(self.loop, s.secret, s.namespace, s.cluster_domain, resolver, self.callees,
                                  rpc_port=s.rpc_port)
        self._serve_admin()
        backend_mod.set_current(self.backend)
        server = PodReplicaServer(self, cfg)
        self.server = server
        from shoal.observability.metrics import PROCESS

        # The autoscaler metrics (names.METRIC_*) come from _collect; shoal.observability.metrics adds the rest.
        PROCESS.setup(s.pod_name, namespace=s.namespace, app=self.spec.name, deployment=self.dspec.name,
                      server=server, routers=self.backend.routers, autoscaler_metrics=False)
        ctx = ReplicaContext(self.spec.name, self.dspec.name, s.pod_name, rank=s.rank, world_size=s.world_size)
        set_process_replica_context(ctx)
        apply_logging_config(cfg.logging_config, ctx)
        multiplex.models_changed_hook = lambda ids: setattr(server, "model_ids", ids)
        for callee in self.dspec.calls:
            self.backend.router(self.spec.name, callee)  # start finding the callee's pods now
        try:
            user = UserCallable(self.dspec.func_or_class, self.dspec.init_args, self.dspec.init_kwargs,
                                is_function=self.dspec.is_function, context=ctx)
            server.user = user
            await user.initialize(cfg.user_config)
            set_process_replica_context(ReplicaContext(self.spec.name, self.dspec.name, s.pod_name, user.instance,
                                                       rank=s.rank, world_size=s.world_size))
            if s.rank == 0 and s.world_size > 1:
                from shoal.kubernetes.gang_pod import GangLeader

                self.gang_leader = GangLeader(server, pod_name=s.pod_name, gang=s.gang, namespace=s.namespace,
                                              cluster_domain=s.cluster_domain, world_size=s.world_size,
                                              resolver=resolver, secret=s.secret,
                                              max_ongoing=cfg.max_ongoing_requests, rpc_port=s.rpc_port,
                                              admin_port=s.admin_port)
            server.server = await serve_tcp(s.host, s.rpc_port, s.secret, server._on_connect)
            # A gang's callers reach it through rank 0 only.
            if self.spec.ingress == self.dspec.name and self.spec.route_prefix is not None and s.rank == 0:
                await self._start_http()
        except BaseException:
            logger.error("replica %s of %s/%s failed to start:\n%s", s.pod_name, self.spec.name, self.dspec.name,
                         traceback.format_exc())
            self.admin.close()
            return 1
        self.constructed = True
        if self.gang_leader is not None:
            self.gang_leader.start()
        health = self.loop.create_task(self._health_loop(cfg))
        logger.info("replica %s of %s/%s constructed; RPC on %s:%d%s", s.pod_name, self.spec.name, self.dspec.name,
                    s.host, s.rpc_port, f", HTTP on :{s.http_port}" if server.front is not None else "")
        await self.stop_requested.wait()
        if s.rank > 0:  # serve what rank 0 still sends until it is gone (it drains first)
            from shoal.kubernetes.gang_pod import linger

            await linger(server, cfg.graceful_shutdown_timeout_s)
        logger.info("draining (graceful_shutdown_timeout_s=%s)", cfg.graceful_shutdown_timeout_s)
        await server.drain()
        if self.gang_leader is not None:
            self.gang_leader.close()
        health.cancel()
        self.backend.close()
        self.admin.close()
        logger.info("drained; exiting")
        return 0

    async def _start_http(self) -> None:
        from shoal.runtime.proxy import FrontOptions, HTTPFront, ProxyApp
        from shoal.runtime.wire import Routes

        s = self.settings
        server = self.server
        assert self.backend is not None and server is not None and self.spec.route_prefix is not None
        self.http_socks.append(_listen(s.host, s.http_port))
        if needs_loopback(s.host):
            try:
                self.http_socks.append(_listen("127.0.0.1", s.http_port))
            except OSError as e:
                logger.warning("cannot also listen on 127.0.0.1:%d: %s", s.http_port, e)
        options = FrontOptions.of(self.http)
        proxy_app = ProxyApp(self.backend, options, local=server)
        proxy_app.set_routes(Routes({self.spec.route_prefix: (self.spec.name, self.dspec.name)}))
        server.proxy_app = proxy_app
        fronts = [HTTPFront(proxy_app, sock.fileno(), options) for sock in self.http_socks]
        for front in fronts:
            await front.start()
        server.front = fronts[0]
        server.extra_fronts = fronts[1:]
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
        first = True
        assert self.server is not None and self.server.user is not None
        user = self.server.user
        while not self.draining:
            try:
                await asyncio.wait_for(user.check_health(), cfg.health_check_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                why = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
                if self.healthy or first:
                    logger.warning("check_health failed: %s", why)
                self.healthy = False
                self.health_error = why
            else:
                if not self.healthy and not first:
                    logger.info("check_health passes again")
                self.healthy = True
                self.health_error = ""
            first = False
            await asyncio.sleep(cfg.health_check_period_s)


class PodReplicaServer(ReplicaServer):
    """The data plane of a pod: the local replica's server, with no controller behind it."""

    def __init__(self, pod: PodReplica, cfg: DeploymentConfig) -> None:
        from shoal.runtime.proxy import FrontOptions

        s = pod.settings
        # No controller: the client ReplicaServer makes is never connected (die_with_parent: it
        # would not wait for one either), and what it would send has no receiver in a cluster.
        boot = Bootstrap(controller_path="", secret=s.secret, tag=s.pod_name, sys_path=list(sys.path),
                         cwd=os.getcwd(), parent_pid=os.getppid(), die_with_parent=True,
                         log_level=s.log_level, http_fd=-1, http=FrontOptions.of(pod.http))
        super().__init__(boot)
        self.pod = pod
        self.max_ongoing = cfg.max_ongoing_requests
        self.max_queued = cfg.max_queued_requests
        self.graceful_timeout = cfg.graceful_shutdown_timeout_s
        self.key = (pod.spec.name, pod.dspec.name)
        self.last_request = self.loop.time()
        self.extra_fronts: list[Any] = []  # HTTPFronts on more addresses (127.0.0.1 in a cluster)

    def _on_message(self, proto: FramedProtocol, msg: Any) -> None:
        if msg[0] == REQUEST:
            self.last_request = self.loop.time()
            if self.draining or self.ongoing >= self.max_ongoing or self.local_waiters:
                self.pod.rejected += 1
        super()._on_message(proto, msg)

    def _send(self, msg: Any) -> None:
        pass  # nobody to tell

    async def drain(self) -> None:
        self.draining = True
        loop = self.loop
        deadline = loop.time() + self.graceful_timeout
        if self.server is not None:
            self.server.close()  # no new connections; open ones get their requests refused
        http_stop: asyncio.Future[Any] | None = None
        if self.front is not None:
            http_stop = asyncio.gather(*(f.stop(self.graceful_timeout) for f in [self.front, *self.extra_fronts]))
        try:
            await asyncio.wait_for(self.idle.wait(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            pass
        # Nothing in flight: wait for callers to notice we are gone (they are refused meanwhile).
        while self.conns and loop.time() < deadline and loop.time() - self.last_request < DRAIN_QUIET_S:
            await asyncio.sleep(0.05)
        if http_stop is not None:
            try:
                await asyncio.wait_for(http_stop, max(0.1, deadline - loop.time()))
            except TimeoutError:
                pass
        await self.finish_drain()
        for sock in self.pod.http_socks:
            sock.close()


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


class OneLineFormatter(logging.Formatter):
    """Text log lines with multi-line parts (tracebacks) folded into the same line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def setup_logging(settings: PodSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    who = f"pod={settings.pod_name} deployment={settings.deployment}"
    handler.setFormatter(OneLineFormatter(f"%(asctime)s %(levelname)s {who} %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # third-party libraries at WARNING, shoal at the chosen level
    logging.getLogger("shoal").setLevel(settings.log_level.upper())
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass


class PodConfigError(Exception):
    """The pod cannot serve: a bad config file, or no such application or deployment."""


def load_deployment(settings: PodSettings) -> tuple[AppSpec, DeploymentSpec, HTTPOptions,
                                                    dict[tuple[str, str], _CalleeConfig]]:
    """Read the config file, build the application and pick this pod's deployment."""
    from shoal.deployment import build_app_spec
    from shoal.loader import build_application
    from shoal.schema import ConfigError, load_config_file

    try:
        config = load_config_file(settings.config_path)
    except ConfigError as e:
        raise PodConfigError(str(e)) from None
    apps = {a.name: (i, a) for i, a in enumerate(config.applications)}
    if settings.app is None:
        if len(apps) != 1:
            raise PodConfigError(f"{settings.config_path} has {len(apps)} applications "
                                 f"({', '.join(apps)}); say which with {names.ENV_APP} or --app")
        app_name = next(iter(apps))
    else:
        app_name = settings.app
    if app_name not in apps:
        raise PodConfigError(f"{settings.config_path} has no application {app_name!r} "
                             f"(it has: {', '.join(apps)})")
    index, app_schema = apps[app_name]
    try:
        application = build_application(app_schema, source=settings.config_path, index=index)
        spec = build_app_spec(application, name=app_name, route_prefix=app_schema.route_prefix)
    except (ConfigError, ImportError, AttributeError, ValueError, TypeError) as e:
        raise PodConfigError(str(e)) from None
    if settings.deployment not in spec.deployments:
        raise PodConfigError(f"application {app_name!r} has no deployment {settings.deployment!r} "
                             f"(it has: {', '.join(spec.deployments)})")
    callees: dict[tuple[str, str], _CalleeConfig] = {}
    for d in spec.deployments.values():
        callees[(app_name, d.name)] = _CalleeConfig(d.config.max_ongoing_requests, d.config.max_queued_requests)
    for other in config.applications:  # handles to other apps: what their config entries say
        if other.name == app_name:
            continue
        for entry in other.deployments:
            opts = entry.options()
            callees[(other.name, entry.name)] = _CalleeConfig(int(opts.get("max_ongoing_requests", 5)),
                                                              int(opts.get("max_queued_requests", -1)))
    world_size = spec.deployments[settings.deployment].config.world_size
    if world_size != settings.world_size:
        raise PodConfigError(
            f"deployment {settings.deployment!r} has {world_size} rank(s) per replica but this pod was started "
            f"as one of {settings.world_size}" + (" (a gang runs in a LeaderWorkerSet, with --rank-from-env)"
                                                  if world_size > 1 and settings.world_size == 1 else "")
        )
    return spec, spec.deployments[settings.deployment], config.http_options, callees


def run_pod(settings: PodSettings) -> int:
    """Serve until SIGTERM; the process's exit code (0 after a drain, 1 if the replica failed)."""
    from shoal.observability import tracing
    from shoal.runtime.backend import new_event_loop

    logger.info("starting replica of %s/%s (config %s, namespace %s)", settings.app or "(the only app)",
                settings.deployment, settings.config_path, settings.namespace)
    tracing.setup_from_env("shoal-replica")
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> int:
        t0 = time.monotonic()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        # The admin port answers from the start: 503 on both probes until the replica is constructed.
        admin = AdminServer(_starting)
        try:
            await admin.start(settings.host, settings.admin_port)
        except OSError as e:
            logger.error("cannot listen on the admin port %s:%d: %s", settings.host, settings.admin_port, e)
            return 1
        try:
            # In the main thread, on purpose: importing user code elsewhere breaks modules that
            # install signal handlers; the loop is blocked meanwhile (the startupProbe allows for it).
            spec, dspec, http, callees = load_deployment(settings)
        except PodConfigError as e:
            logger.error("%s", e)
            admin.close()
            return 2
        logger.info("application loaded in %.2fs", time.monotonic() - t0)
        if stopping.is_set():
            admin.close()
            return 0
        pod = PodReplica(settings, spec, dspec, http, callees, admin)
        pod.install_signals()
        return await pod.run()

    try:
        code = loop.run_until_complete(main())
    except OSError as e:
        logger.error("replica failed: %s", e)
        code = 1
    tracing.shutdown()  # export the spans still pending
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def _starting(method: str, path: str) -> tuple[int, str, bytes]:
    if path in ("/-/healthz", "/-/ready"):
        return 503, "text/plain", b"starting\n"
    return 404, "text/plain", b"not found\n"


def _secret_from_env() -> bytes:
    raw = os.environb.get(names.ENV_SECRET.encode()) if hasattr(os, "environb") else None
    if raw is None:
        value = os.environ.get(names.ENV_SECRET)
        raw = value.encode() if value is not None else None
    return raw or b""


@click.command("replica", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--deployment", envvar=names.ENV_DEPLOYMENT, required=True, show_envvar=True,
              help="The deployment this pod serves (its name in the application).")
@click.option("--app", "app", envvar=names.ENV_APP, default=None, show_envvar=True,
              help="The application (default: the config file's only one).")
@click.option("--config", "config_path", envvar=names.ENV_CONFIG, show_envvar=True, show_default=True,
              default=f"{names.CONFIG_MOUNT_DIR}/{names.CONFIG_FILE_NAME}",
              help="The serve config file (mounted from the application's ConfigMap).")
@click.option("--host", envvar=names.ENV_POD_IP, default="0.0.0.0", show_envvar=True, show_default=True,
              help="Address to listen on: the pod's IP (from the downward API).")
@click.option("--rpc-port", type=int, default=names.RPC_PORT, show_default=True,
              help="Port of the internal RPC (calls from other deployments' pods).")
@click.option("--http-port", type=int, default=names.HTTP_PORT, show_default=True,
              help="HTTP port, used only by the application's ingress deployment.")
@click.option("--admin-port", type=int, default=names.ADMIN_PORT, show_default=True,
              help="Port of /-/healthz, /-/ready and /metrics.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Level of shoal's own log lines (third-party libraries log at WARNING).")
@click.option("--rank-from-env", is_flag=True,
              help="This pod is one rank of a gang replica (a LeaderWorkerSet pod): the rank and the gang's "
                   "size come from RANK and WORLD_SIZE, the LeaderWorkerSet's name from SHOAL_GANG.")
def replica(deployment: str, app: str | None, config_path: str, host: str, rpc_port: int, http_port: int,
            admin_port: int, log_level: str, rank_from_env: bool = False) -> None:
    """Serve one replica of one deployment in a Kubernetes pod (the container's command).

    There is no controller: the pod builds the application from the serve config file, serves
    its deployment on the internal RPC port (and HTTP when it is the ingress), and finds the
    pods of the deployments it calls through their headless Services in cluster DNS.

    \b
    Environment (set by `shoal k8s build`):
      SHOAL_RPC_SECRET      the internal RPC secret (required; from the app's Secret)
      SHOAL_NAMESPACE       the pod's namespace, used in callee DNS names (default: default)
      SHOAL_POD_NAME        the pod's name, the replica's tag in logs (default: the hostname)
      SHOAL_CLUSTER_DOMAIN  the cluster's DNS domain (default: cluster.local)
      SHOAL_RESOLVER_FILE   test hook: a JSON file {"dns name": [ip, ...]} used instead of DNS
      RANK, WORLD_SIZE      with --rank-from-env: this rank of a gang replica, and the gang's size
      SHOAL_GANG            with --rank-from-env: the LeaderWorkerSet's name (rank 0 finds its ranks by it)

    \b
    Admin port endpoints:
      /-/healthz   200 once constructed, while the process answers (startup, liveness probes)
      /-/ready     200 once constructed and check_health passes; 503 otherwise and while draining
      /metrics     Prometheus metrics: shoal_replica_ongoing_requests,
                   shoal_handle_queued_requests (per callee), request counters

    SIGTERM drains: the pod turns unready, refuses new requests, finishes the ones in flight
    within graceful_shutdown_timeout_s and exits 0. Exit codes: 1 when the replica failed
    (e.g. its constructor raised), 2 for a bad config, application or deployment name.
    """
    secret = _secret_from_env()
    if not secret:
        raise click.UsageError(f"{names.ENV_SECRET} is not set: the internal RPC needs the application's secret")
    rank, world_size, gang = 0, 1, ""
    if rank_from_env:
        from shoal.kubernetes.gang_pod import ranks_from_env

        try:
            rank, world_size, gang = ranks_from_env(os.environ)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    settings = PodSettings(
        deployment=deployment,
        app=app or None,
        config_path=config_path,
        secret=secret,
        host=host,
        rpc_port=rpc_port,
        http_port=http_port,
        admin_port=admin_port,
        namespace=os.environ.get(names.ENV_NAMESPACE) or "default",
        pod_name=os.environ.get(names.ENV_POD_NAME) or socket.gethostname(),
        cluster_domain=os.environ.get(names.ENV_CLUSTER_DOMAIN) or "cluster.local",
        resolver_file=os.environ.get(names.ENV_RESOLVER_FILE) or None,
        log_level=log_level.upper(),
        rank=rank,
        world_size=world_size,
        gang=gang,
    )
    setup_logging(settings)
    code = run_pod(settings)
    # User code may have left non-daemon threads behind: do not wait for them.
    os._exit(code)

