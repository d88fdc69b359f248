"""Membership and routing tables, and their publication to the routers and fronts that
subscribed. The tables are built by pure functions; :class:`Publisher` sends them."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from typing import Any

from shoal.runtime.controller.canary import AppKey, CanaryTable
from shoal.runtime.controller.records import AppRecord, DeploymentRecord, ReplicaRecord
from shoal.runtime.custom_routing import request_router_blob
from shoal.runtime.wire import FramedProtocol, Membership, ReplicaEndpoint, Routes
from shoal.status import ReplicaState


def running_endpoints(dep: DeploymentRecord, replicas: Iterable[ReplicaRecord]) -> tuple[ReplicaEndpoint, ...]:
    """The deployment's RUNNING replicas as routers see them, sorted by replica id."""
    cfg = dep.spec.config
    return tuple(sorted(
        (ReplicaEndpoint(r.replica_id, r.socket_path, cfg.max_ongoing_requests, r.model_ids)
         for r in replicas if r.state == ReplicaState.RUNNING),
        key=lambda a: a.replica_id,
    ))


def metrics_interval(dep: DeploymentRecord) -> float:
    """How often callers report their load (0: the deployment does not autoscale)."""
    auto = dep.spec.config.resolved_autoscaling()
    return auto.metrics_interval_s if auto else 0.0


MembershipKey = tuple[tuple[ReplicaEndpoint, ...], int, float, str]


def membership_key(dep: DeploymentRecord, running: tuple[ReplicaEndpoint, ...], unavailable: str) -> MembershipKey:
    """What a membership is compared by, to send it only when it changed: its replicas, its queue
    bound, its load-report interval and its refusal (cheaper than a whole :class:`Membership`)."""
    return running, dep.spec.config.max_queued_requests, metrics_interval(dep), unavailable


def build_membership(app: str, name: str, dep: DeploymentRecord, replicas: Iterable[ReplicaRecord],
                     epoch: int, unavailable: str = "",
                     running: tuple[ReplicaEndpoint, ...] | None = None) -> Membership:
    """The deployment's RUNNING replicas (sorted by replica id; ``running`` when already made
    by :func:`running_endpoints`) and its queueing limits; ``unavailable`` (why it cannot
    serve, e.g. it failed to deploy) makes routers refuse at once."""
    cfg = dep.spec.config
    return Membership(app, name, epoch, running_endpoints(dep, replicas) if running is None else running,
                      cfg.max_queued_requests, gone=unavailable, metrics_interval_s=metrics_interval(dep),
                      max_queue_wait_s=cfg.resolved_max_queue_wait_s(),
                      request_router=router_blob(dep))


def router_blob(dep: DeploymentRecord) -> bytes:
    """The deployment's custom request router config as routers receive it (b"": none)."""
    return request_router_blob(dep.spec.config, dep.spec.name)


def build_routes(apps: dict[str, AppRecord], replicas: Iterable[ReplicaRecord], canaries: CanaryTable) -> Routes:
    """The route table of every live app with a prefix, the canary splits, and whether the
    proxy must accept connections too."""
    routed = [a for a in apps.values() if a.spec.route_prefix is not None and not a.deleting]
    table = {a.spec.route_prefix: (a.spec.name, a.spec.ingress) for a in routed if a.spec.route_prefix}
    # The proxy steps aside only while every routed app has an ingress replica serving
    # HTTP itself; otherwise it accepts too (to hold requests for a cold app, answer 404s).
    served = {(r.app, r.deployment) for r in replicas if r.serves_http and r.state == ReplicaState.RUNNING}
    direct = bool(routed) and all((a.spec.name, a.spec.ingress) in served for a in routed)
    split = {}
    for name, weight in canaries.items():
        stable, canary = apps.get(name), apps.get(AppKey.canary(name).key)
        if stable is not None and canary is not None and stable.spec.route_prefix and not canary.deleting:
            split[stable.spec.route_prefix] = (canary.spec.name, canary.spec.ingress, weight)
    return Routes(table, proxy_accepts=not direct, split=split)


class Publisher:
    """Subscribers of memberships (per deployment) and of routes, and the epoch counter.

    Versions only grow, across controller restarts too (routers ignore older ones): they
    start at the wall clock in microseconds.
    """

    def __init__(self, first_epoch: int) -> None:
        self.subscribers: dict[tuple[str, str], set[FramedProtocol]] = {}
        self.route_subscribers: set[FramedProtocol] = set()
        self._epochs = itertools.count(first_epoch)
        # (app, deployment) -> replica id -> what its record_routing_stats() last returned
        # (deployments with a custom request router only); added to every membership sent.
        self.routing_stats: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}

    def record_routing_stats(self, app: str, deployment: str, replica_id: str, stats: dict[str, Any],
                             live: Iterable[str]) -> bool:
        """Keep a replica's routing stats (those of replicas no longer in ``live`` are dropped);
        True when they changed."""
        table = self.routing_stats.setdefault((app, deployment), {})
        keep = set(live)
        for gone in [r for r in table if r not in keep]:
            del table[gone]
        if table.get(replica_id) == stats:
            return False
        table[replica_id] = stats
        return True

    def with_routing_stats(self, m: Membership) -> Membership:
        """``m`` with the routing stats of the replicas it lists (unchanged when there are none)."""
        table = self.routing_stats.get((m.app, m.deployment))
        if not table or not m.request_router:
            if m.gone:
                self.routing_stats.pop((m.app, m.deployment), None)
            return m
        listed = {r.replica_id for r in m.replicas}
        return dataclasses.replace(m, routing_stats={r: s for r, s in table.items() if r in listed})

    def next_epoch(self) -> int:
        return next(self._epochs)

    def subscribe(self, app: str, deployment: str, conn: FramedProtocol) -> None:
        self.subscribers.setdefault((app, deployment), set()).add(conn)

    def forget(self, conn: FramedProtocol) -> None:
        self.route_subscribers.discard(conn)
        for subs in self.subscribers.values():
            subs.discard(conn)

    def gone(self, app: str, name: str, why: str) -> Membership:
        return Membership(app, name, self.next_epoch(), (), -1, gone=why)

    def send_membership(self, m: Membership) -> None:
        m = self.with_routing_stats(m)
        for conn in list(self.subscribers.get((m.app, m.deployment), ())):
            try:
                conn.send(m)
            except ConnectionError:
                pass

    def send_routes(self, routes: Routes) -> None:
        for conn in list(self.route_subscribers):
            try:
                conn.send(routes)
            except ConnectionError:
                pass

    def connections(self) -> list[FramedProtocol]:
        return list(self.route_subscribers) + [c for s in self.subscribers.values() for c in s]
