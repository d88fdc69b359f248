"""Finding a callee's pods: a pod's routers, fed by cluster DNS (or the simulation's file).

Handles in a pod's deployment route through a :class:`PodBackend`: one router per callee,
its membership kept equal to the ready pods behind the callee's headless Service, resolved
every second (or read from the JSON file named by ``$SHOAL_RESOLVER_FILE``, the pod
simulation's stand-in for cluster DNS). A pod the router dropped is left out for a back-off
that doubles on repeated failures. With no pod to call, requests wait in the caller.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from shoal.config import DEFAULT_MAX_QUEUE_WAIT_S
from shoal.kubernetes import names
from shoal.runtime.router import Router
from shoal.runtime.wire import Membership, ReplicaEndpoint, join_host_port

__all__ = ["CalleeConfig", "DNSResolver", "FileResolver", "PodBackend", "Resolver"]

logger = logging.getLogger("shoal.pod")

# How often callers look up their callees' pods in cluster DNS, and in the simulation's file.
DNS_INTERVAL_S = 1.0
FILE_INTERVAL_S = 0.25
# A pod the router dropped (unreachable, or its connection died) is left out this long before
# it is tried again while DNS still lists it; the delay doubles on repeated failures.
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 10.0


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

    def start(self) -> None:
        self.task = self.backend.loop.create_task(self._run())

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
        self.router.update(Membership(self.router.app, self.router.deployment, self.epoch, replicas,
                                      max_queued_requests=self.config.max_queued,
                                      max_queue_wait_s=self.config.max_queue_wait_s,
                                      request_router=self.config.request_router))


@dataclass(frozen=True)
class CalleeConfig:
    max_ongoing: int = 5
    max_queued: int = -1
    max_queue_wait_s: float = DEFAULT_MAX_QUEUE_WAIT_S
    # A custom request router's config, as Membership carries it (b"": shoal's own routing).
    request_router: bytes = b""


class PodBackend:
    """The :class:`~shoal.runtime.backend.Backend` of a pod: routers fed by service discovery."""

    def __init__(self, loop: asyncio.AbstractEventLoop, secret: bytes, namespace: str, cluster_domain: str,
                 resolver: Resolver,
                 callees: Mapping[tuple[str, str], CalleeConfig] | None = None,
                 rpc_port: int = names.RPC_PORT, backoff_s: tuple[float, float] | None = None) -> None:
        """``backoff_s``: (first, longest) time a dropped pod is left out; by default
        (BACKOFF_INITIAL_S, BACKOFF_MAX_S)."""
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
                watcher = _Watcher(self, router, name, self._callees.get(key, CalleeConfig()))
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
