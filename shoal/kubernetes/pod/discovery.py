"""Finding a callee's pods: a pod's routers, fed by cluster DNS (or the simulation's file).

Handles in a pod's deployment route through a :class:`PodBackend`: one router per callee,
its membership kept equal to the ready pods behind the callee's headless Service, resolved
every second (or read from the JSON file named by ``$SHOAL_RESOLVER_FILE``, the pod
simulation's stand-in for cluster DNS). A pod the router dropped is left out for a back-off
that doubles on repeated failures.

With no pod to call (a deployment scaled to zero, or not started yet), requests wait in the
caller, each at most the wake deadline (``$SHOAL_WAKE_TIMEOUT_S``, default 120 s, counted from
the later of its arrival and the moment the callee lost its last pod), then fail with
:class:`~shoal.exceptions.DeploymentUnavailableError` (HTTP 503 with ``Retry-After`` at the
ingress). Meanwhile the caller posts demand to the application's scaler (``$SHOAL_SCALER_URL``,
:mod:`shoal.kubernetes.scaler`) at most once a second per callee, so that it wakes the callee at
its next decision instead of after a scrape.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from shoal.config import DEFAULT_MAX_QUEUE_WAIT_S
from shoal.exceptions import DeploymentUnavailableError
from shoal.kubernetes import names
from shoal.kubernetes.pod.routing_stats import StatsFetcher
from shoal.runtime.router import Router
from shoal.runtime.wire import Membership, ReplicaEndpoint, join_host_port

__all__ = ["CalleeConfig", "DNSResolver", "FileResolver", "PodBackend", "Resolver", "WakeConfig"]

logger = logging.getLogger("shoal.pod")

# How often callers look up their callees' pods in cluster DNS, and in the simulation's file.
DNS_INTERVAL_S = 1.0
FILE_INTERVAL_S = 0.25
# A pod the router dropped (unreachable, or its connection died) is left out this long before
# it is tried again while DNS still lists it; the delay doubles on repeated failures.
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 10.0
# Demand for one callee is posted to the scaler at most this often, each post bounded by DEMAND_TIMEOUT_S.
DEMAND_INTERVAL_S = 1.0
DEMAND_TIMEOUT_S = 1.0


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

    def __init__(self, backend: PodBackend, router: Router, dns_name: str, config: CalleeConfig) -> None:
        self.backend = backend
        self.router = router
        self.dns_name = dns_name
        self.config = config
        self.epoch = 0
        self.listed: list[str] = []
        self.pushed: tuple[str, ...] | None = None
        # ip -> (left out until, current delay)
        self.backoff: dict[str, tuple[float, float]] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        # A custom request router's routing stats, asked of the callee's pods (routing_stats.py).
        self.stats: StatsFetcher | None = None
        self.stats_task: asyncio.Task[None] | None = None
        self._stats_push: asyncio.Handle | None = None

    def start(self) -> None:
        self.task = self.backend.loop.create_task(self._run())
        if self.config.request_router:
            self.stats = StatsFetcher(self.router, lambda: self.listed, self._stats_changed)
            self.stats_task = self.backend.loop.create_task(self.stats.run())

    def _stats_changed(self) -> None:
        """New routing stats: one membership push for every answer that came meanwhile."""
        if self._stats_push is None:
            self._stats_push = self.backend.loop.call_soon(self._push_stats)

    def _push_stats(self) -> None:
        self._stats_push = None
        self.pushed = None
        self._push(self.backend.loop.time())

    def kick(self) -> None:
        self.wake.set()

    def dropped(self, replica: ReplicaEndpoint) -> None:
        now = self.backend.loop.time()
        prev = self.backoff.get(replica.replica_id)
        initial, most = self.backend.backoff_s
        delay = initial if prev is None else min(prev[1] * 2, most)
        self.backoff[replica.replica_id] = (now + delay, delay)
        self.pushed = None  # the router's view changed: push again once the back-off ends
        logger.info("pod %s of %s unreachable or gone; retrying it in %.1fs if DNS still lists it",
                    replica.replica_id, self.router.deployment, delay)
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
            if not self.router.num_replicas and self.router.num_queued:
                self.backend.demand.signal(self.router.app, self.router.deployment)  # still waiting: remind
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
        replica_ids = tuple(ip for ip in self.listed if self.backoff.get(ip, (0.0, 0.0))[0] <= now)
        if replica_ids == self.pushed:
            return
        self.pushed = replica_ids
        self.epoch += 1
        port = self.backend.rpc_port
        replicas = tuple(ReplicaEndpoint(ip, join_host_port(ip, port), self.config.max_ongoing) for ip in replica_ids)
        stats = self.stats.stats if self.stats is not None else {}
        self.router.update(Membership(self.router.app, self.router.deployment, self.epoch, replicas,
                                      max_queued_requests=self.config.max_queued,
                                      max_queue_wait_s=self.config.max_queue_wait_s,
                                      request_router=self.config.request_router,
                                      routing_stats={ip: stats[ip] for ip in replica_ids if ip in stats}))
        if self.stats is not None:
            self.stats.pods_changed()


@dataclass(frozen=True)
class CalleeConfig:
    max_ongoing: int = 5
    max_queued: int = -1
    max_queue_wait_s: float = DEFAULT_MAX_QUEUE_WAIT_S
    # A custom request router's config, as Membership carries it (b"": shoal's own routing).
    request_router: bytes = b""


@dataclass(frozen=True)
class WakeConfig:
    """How callers wait for a deployment with no pod: the deadline, and the scaler to tell.

    ``app``: this pod's application (demand is posted for its own deployments only: the
    scaler is per application); ``scaler_url``: ``http://host:port`` of its scaler (None: none,
    e.g. ``--autoscaler hpa``); ``timeout_s``: the wake deadline (positive: the wait is always
    bounded).
    """

    app: str = ""
    scaler_url: str | None = None
    timeout_s: float = names.DEFAULT_WAKE_TIMEOUT_S
    demand_interval_s: float = DEMAND_INTERVAL_S
    scaler_token: str | None = None  # sent as Authorization: Bearer (``$SHOAL_SCALER_TOKEN``)

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"the wake deadline must be positive, got {self.timeout_s!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WakeConfig:
        """From the pod's environment (``$SHOAL_APP``, ``$SHOAL_SCALER_URL``, ``$SHOAL_WAKE_TIMEOUT_S``);
        a bad deadline is logged and the default used."""
        env = os.environ if environ is None else environ
        raw = env.get(names.ENV_WAKE_TIMEOUT, "")
        timeout = names.DEFAULT_WAKE_TIMEOUT_S
        if raw:
            try:
                timeout = float(raw)
                if not 0 < timeout <= 86400:
                    raise ValueError
            except ValueError:
                logger.warning("%s=%r is not a number of seconds in (0, 86400]; using %gs",
                               names.ENV_WAKE_TIMEOUT, raw, names.DEFAULT_WAKE_TIMEOUT_S)
                timeout = names.DEFAULT_WAKE_TIMEOUT_S
        return cls(app=env.get(names.ENV_APP, ""), scaler_url=env.get(names.ENV_SCALER_URL) or None,
                   timeout_s=timeout, scaler_token=(env.get(names.ENV_SCALER_TOKEN) or "").strip() or None)


class _PodRouter(Router):
    """A router whose requests wait for a callee with no pod at most ``wake_timeout_s``.

    The deadline of each waiting request is the later of its arrival and the moment the callee
    lost its last pod, plus ``wake_timeout_s``; a pod appearing lifts it (then the router's own
    ``max_queue_wait_s`` bounds the wait for a free one). On expiry the request fails with
    :class:`DeploymentUnavailableError`, which the ingress answers with 503 and ``Retry-After``.
    """

    def __init__(self, app: str, deployment: str, secret: bytes, wake_timeout_s: float) -> None:
        super().__init__(app, deployment, secret)
        self.wake_timeout_s = wake_timeout_s
        self.wake_timeouts = 0  # requests failed at the deadline
        self._empty_since: float | None = None
        self._waits: dict[asyncio.Timeout, float] = {}

    def update(self, m: Any) -> None:
        super().update(m)
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # not on a loop (tests): no request can be waiting
            now = time.monotonic()
        self._rearm(now)

    def _rearm(self, now: float) -> None:
        if self.num_replicas:
            self._empty_since = None
        elif self._empty_since is None:
            self._empty_since = now
        for cm, began in list(self._waits.items()):
            when = None if self._empty_since is None else max(began, self._empty_since) + self.wake_timeout_s
            try:
                cm.reschedule(when)
            except RuntimeError:  # expiring already
                pass

    async def _acquire(self, model_id: str = "", began: float | None = None, pending: Any = None) -> Any:
        now = asyncio.get_running_loop().time()
        if not self.num_replicas and self._empty_since is None:
            self._empty_since = now
        cm = asyncio.timeout(None)
        try:
            async with cm:
                # Retries after a refusal share the request's deadline: it counts from its arrival.
                self._waits[cm] = began if began is not None else now
                self._rearm(now)
                return await super()._acquire(model_id, began, pending)
        except TimeoutError:
            if not cm.expired():
                raise
            self.wake_timeouts += 1
            raise DeploymentUnavailableError(
                f"no pod of {self.app}/{self.deployment} became ready within {self.wake_timeout_s:g} s "
                f"(the wake deadline, ${names.ENV_WAKE_TIMEOUT}); it may be scaled to zero and still starting, "
                "or unable to start: retry later") from None
        finally:
            self._waits.pop(cm, None)


class _Demand:
    """Posts demand for callees with no pod to the application's scaler: fire and forget, at most
    once per ``demand_interval_s`` per callee, one post in flight per callee, each bounded."""

    def __init__(self, backend: PodBackend, config: WakeConfig) -> None:
        from shoal.kubernetes.scaler.client import split_url

        self.backend = backend
        self.config = config
        self.host, self.port = "", 0
        if config.scaler_url:
            try:
                self.host, self.port, _ = split_url(config.scaler_url)
            except ValueError as e:
                logger.warning("%s: %s; callers will not signal demand", names.ENV_SCALER_URL, e)
        self.last: dict[str, float] = {}
        self.in_flight: set[str] = set()
        self.posted = 0
        self.failed = 0

    def signal(self, app: str, deployment: str) -> None:
        """Called on the backend's loop when requests wait for ``app/deployment`` and it has no pod."""
        if not self.host or app != self.config.app or deployment in self.in_flight:
            return
        now = self.backend.loop.time()
        if now - self.last.get(deployment, -1e9) < self.config.demand_interval_s:
            return
        self.last[deployment] = now
        self.in_flight.add(deployment)
        self.backend.loop.create_task(self._post(deployment))

    async def _post(self, deployment: str) -> None:
        import urllib.parse

        from shoal.kubernetes.scaler.client import HttpCallError, http_call

        try:
            host = self.host
            if not _is_ip(host):
                ips = await asyncio.wait_for(self.backend.resolver.resolve(host), DEMAND_TIMEOUT_S)
                if not ips:
                    raise HttpCallError(f"cannot resolve the scaler {host!r}")
                host = ips[0]
            path = "/demand/" + urllib.parse.quote(deployment, safe="")
            status, _ = await http_call(host, self.port, "POST", path, timeout=DEMAND_TIMEOUT_S,
                                        bearer=self.config.scaler_token)
            if status >= 300:
                raise HttpCallError(f"the scaler answered HTTP {status}")
            self.posted += 1
        except (HttpCallError, OSError, TimeoutError) as e:
            self.failed += 1
            logger.info("demand for %s not posted to the scaler: %s", deployment, e)
        finally:
            self.in_flight.discard(deployment)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


class PodBackend:
    """The :class:`~shoal.runtime.backend.Backend` of a pod: routers fed by service discovery."""

    def __init__(self, loop: asyncio.AbstractEventLoop, secret: bytes, namespace: str, cluster_domain: str,
                 resolver: Resolver,
                 callees: Mapping[tuple[str, str], CalleeConfig] | None = None,
                 rpc_port: int = names.RPC_PORT, backoff_s: tuple[float, float] | None = None,
                 wake: WakeConfig | None = None) -> None:
        """``backoff_s``: (first, longest) time a dropped pod is left out; by default
        (BACKOFF_INITIAL_S, BACKOFF_MAX_S). ``wake``: the wake deadline and the scaler (default:
        from the environment, :meth:`WakeConfig.from_env`)."""
        self.loop = loop
        self.secret = secret
        self.namespace = namespace
        self.cluster_domain = cluster_domain
        self.resolver = resolver
        self.rpc_port = rpc_port
        self.backoff_s = backoff_s or (BACKOFF_INITIAL_S, BACKOFF_MAX_S)
        self._callees = dict(callees or {})
        self._routers: dict[tuple[str, str], Router] = {}
        self._watchers: dict[tuple[str, str], _Watcher] = {}
        self._lock = threading.Lock()
        self.wake = wake if wake is not None else WakeConfig.from_env()
        self.demand = _Demand(self, self.wake)
        # What serve.status() answers in this pod (set by the pod's replica; see pod/status.py).
        self.status_source: Callable[[], Awaitable[Any]] | None = None

    def router(self, app: str, deployment: str) -> Router:
        key = (app, deployment)
        router = self._routers.get(key)
        if router is not None:
            return router
        with self._lock:
            router = self._routers.get(key)
            if router is None:
                router = _PodRouter(app, deployment, self.secret, self.wake.timeout_s)
                name = names.service_dns(app, deployment, self.namespace, self.cluster_domain)
                watcher = _Watcher(self, router, name, self._callees.get(key, CalleeConfig()))
                router.on_drop = watcher.dropped
                router.on_cold_wait = functools.partial(self._cold_wait, watcher)
                self._watchers[key] = watcher
                self._routers[key] = router
                self._in_loop(watcher.start)
        return router

    def _cold_wait(self, watcher: _Watcher, router: Router) -> None:
        """A request started waiting for a callee with no pod: look it up now, and tell the scaler."""
        watcher.kick()
        self.demand.signal(router.app, router.deployment)

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
            for task in (watcher.task, watcher.stats_task):
                if task is not None:
                    task.cancel()
        for router in self._routers.values():
            router.close()
