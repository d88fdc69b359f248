"""What the controller does with each message on its socket: a table from message type to
handler (hello, subscriptions, stats, replica reports, admin calls, replies)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.lifecycle import Lifecycle
from shoal.runtime.controller.membership import Publisher
from shoal.runtime.controller.placement import Launcher
from shoal.runtime.controller.records import AppRecord, DeploymentRecord, ProxyRecord, ReplicaRecord, SpareRecord
from shoal.runtime.controller.registry import Registry
from shoal.runtime.gang import RankRecord
from shoal.runtime.wire import (
    Call,
    FramedProtocol,
    HandleStats,
    Hello,
    Membership,
    ProxyReady,
    ReplicaFailed,
    ReplicaInit,
    ReplicaModels,
    ReplicaReady,
    ReplicaRoutingStats,
    ReplicaStats,
    Reply,
    Role,
    Routes,
    Stop,
    Subscribe,
    SubscribeRoutes,
)
from shoal.status import ReplicaState


class Hub(Protocol):
    """What the connection handlers need of the controller."""

    registry: Registry
    publisher: Publisher
    lifecycle: Lifecycle
    launcher: Launcher
    clock: Clock
    handle_stats: dict[tuple[str, str], dict[int, tuple[float, int, int]]]

    @property
    def proxy(self) -> ProxyRecord | None: ...

    @property
    def apps(self) -> dict[str, AppRecord]: ...

    @property
    def replicas(self) -> dict[str, ReplicaRecord]: ...

    @property
    def ranks(self) -> dict[str, RankRecord]: ...

    @property
    def spares(self) -> dict[str, SpareRecord]: ...

    def kick(self) -> None: ...

    def on_reply(self, msg: Reply) -> None: ...

    def on_admin_call(self, proto: FramedProtocol, call: Call) -> None: ...

    def settled(self, app: str, name: str) -> bool: ...

    def membership(self, app: str, name: str, dep: DeploymentRecord) -> Membership: ...

    def publish_membership(self, app: str, name: str, dep: DeploymentRecord) -> None: ...

    def routes(self) -> Routes: ...

    def grpc_for(self, app: str, dep: DeploymentRecord) -> Any: ...


class Connections:
    """The controller's side of every connection: replicas, spares, ranks, the proxy,
    routers (subscriptions and stats) and admin clients."""

    def __init__(self, ctl: Hub) -> None:
        self.ctl = ctl
        self.handlers: dict[type, Callable[[FramedProtocol, Any], None]] = {
            Hello: self.on_hello,
            Subscribe: self._on_subscribe,
            SubscribeRoutes: self._on_subscribe_routes,
            ReplicaStats: self._on_replica_stats,
            ReplicaRoutingStats: self._on_routing_stats,
            HandleStats: self._on_handle_stats,
            ReplicaReady: lambda _p, m: ctl.lifecycle.ready(m),
            ReplicaFailed: lambda _p, m: ctl.lifecycle.failed(m),
            ReplicaModels: self._on_models,
            ProxyReady: self._on_proxy_ready,
            Reply: lambda _p, m: ctl.on_reply(m),
            Call: ctl.on_admin_call,
        }

    def on_connect(self, proto: FramedProtocol) -> None:
        proto.on_message = self.on_message
        proto.on_close = self.on_close

    def on_close(self, proto: FramedProtocol, exc: BaseException | None) -> None:
        ctl = self.ctl
        ctl.publisher.forget(proto)
        for stats in ctl.handle_stats.values():
            stats.pop(id(proto), None)
        peer = proto.peer
        if isinstance(peer, Hello) and peer.role == Role.REPLICA:
            rec = ctl.replicas.get(peer.process_id)
            if rec is not None and rec.conn is proto:
                # The process may still be exiting; reaping notices the exit code.
                rec.conn = None
                ctl.kick()

    def on_message(self, proto: FramedProtocol, msg: Any) -> None:
        handler = self.handlers.get(type(msg))
        if handler is not None:
            handler(proto, msg)

    def _on_subscribe(self, proto: FramedProtocol, msg: Subscribe) -> None:
        ctl = self.ctl
        ctl.publisher.subscribe(msg.app, msg.deployment, proto)
        dep = ctl.registry.deployment(msg.app, msg.deployment)
        if dep is None:
            proto.send(ctl.publisher.gone(
                msg.app, msg.deployment, f"deployment {msg.deployment!r} of application {msg.app!r} does not exist"))
        elif ctl.settled(msg.app, msg.deployment):
            proto.send(ctl.publisher.with_routing_stats(ctl.membership(msg.app, msg.deployment, dep)))

    def _on_subscribe_routes(self, proto: FramedProtocol, msg: SubscribeRoutes) -> None:
        self.ctl.publisher.route_subscribers.add(proto)
        proto.send(self.ctl.routes())

    def _on_replica_stats(self, proto: FramedProtocol, msg: ReplicaStats) -> None:
        rec = self.ctl.replicas.get(msg.replica_id)
        if rec is not None:
            rec.ongoing, rec.stats_at = msg.ongoing, self.ctl.clock.monotonic()
            if msg.custom:
                app = self.ctl.apps.get(rec.app)
                dep = app.deployments.get(rec.deployment) if app is not None else None
                if dep is not None and dep.autoscaler is not None and dep.version == rec.version:
                    dep.autoscaler.record_custom(rec.stats_at, rec.replica_id, msg.custom)
            if msg.latency_hist:
                rec.requests, rec.errors = msg.requests, msg.errors
                rec.latency_hist = msg.latency_hist

    def _on_routing_stats(self, proto: FramedProtocol, msg: ReplicaRoutingStats) -> None:
        """A replica's record_routing_stats() changed: pass it on to the deployment's routers
        (memberships otherwise go out only when replicas change)."""
        ctl = self.ctl
        rec = ctl.replicas.get(msg.replica_id)
        dep = ctl.registry.deployment(rec.app, rec.deployment) if rec is not None else None
        if rec is None or dep is None or not isinstance(msg.stats, dict):
            return
        live = (r.replica_id for r in ctl.registry.of(rec.app, rec.deployment))
        changed = ctl.publisher.record_routing_stats(rec.app, rec.deployment, rec.replica_id, msg.stats, live)
        if changed and rec.state == ReplicaState.RUNNING and ctl.settled(rec.app, rec.deployment):
            ctl.publisher.send_membership(ctl.membership(rec.app, rec.deployment, dep))

    def _on_handle_stats(self, proto: FramedProtocol, msg: HandleStats) -> None:
        key = (msg.app, msg.deployment)
        self.ctl.handle_stats.setdefault(key, {})[id(proto)] = (self.ctl.clock.monotonic(), msg.queued,
                                                                 msg.in_flight)
        if msg.queued:
            self.ctl.kick()  # maybe a scale from zero

    def _on_models(self, proto: FramedProtocol, msg: ReplicaModels) -> None:
        rec = self.ctl.replicas.get(msg.replica_id)
        dep = self.ctl.registry.deployment(rec.app, rec.deployment) if rec is not None else None
        if rec is not None and dep is not None:
            rec.model_ids = msg.model_ids
            self.ctl.publish_membership(rec.app, rec.deployment, dep)

    def _on_proxy_ready(self, proto: FramedProtocol, msg: ProxyReady) -> None:
        proxy = self.ctl.proxy
        if proxy is not None and proxy.process_id == msg.process_id:
            proxy.ready = True

    # -- hello
    def on_hello_as(self, proto: FramedProtocol, replica_id: str) -> None:
        """A spare that was already connected became replica ``replica_id``."""
        self.on_hello(proto, Hello(Role.REPLICA, replica_id))

    def on_hello(self, proto: FramedProtocol, hello: Hello) -> None:
        launcher = self.ctl.launcher
        if hello.role == Role.REPLICA and hello.process_id in launcher.spare_alias:
            hello = Hello(Role.REPLICA, launcher.spare_alias.pop(hello.process_id))
        proto.peer = hello
        if hello.role == Role.REPLICA:
            self._replica_hello(proto, hello)
        elif hello.role == Role.PROXY:
            self._proxy_hello(proto, hello)

    def _replica_hello(self, proto: FramedProtocol, hello: Hello) -> None:
        ctl = self.ctl
        if hello.process_id in ctl.spares:
            ctl.spares[hello.process_id].conn = proto  # booted; waits for a deployment
            return
        if hello.process_id in ctl.ranks:
            self._init_rank(proto, ctl.ranks[hello.process_id])
            return
        rec = ctl.replicas.get(hello.process_id)
        dep = ctl.registry.deployment(rec.app, rec.deployment) if rec is not None else None
        if rec is None or dep is None or rec.state == ReplicaState.STOPPING:
            proto.send(Stop("not wanted"))
            return
        rec.conn = proto
        if hello.resumed:
            return  # an adopted replica, already serving: its ReplicaReady follows
        spec = dep.spec
        sys_path, cwd = self._app_paths(rec.app)
        proto.send(ReplicaInit(rec.app, rec.deployment, rec.replica_id, spec.serialized(), spec.config,
                               spec.is_function, rec.socket_path, rec.serves_http, sys_path, cwd,
                               rank=0, world_size=spec.config.world_size,
                               peers=tuple(m.socket_path for m in rec.ranks),
                               replica_rank=rec.replica_rank, num_replicas=dep.target,
                               grpc=ctl.grpc_for(rec.app, dep)))
        rec.told_world_size = dep.target

    def _proxy_hello(self, proto: FramedProtocol, hello: Hello) -> None:
        ctl = self.ctl
        if ctl.proxy is not None and ctl.proxy.process_id == hello.process_id:
            ctl.proxy.conn = proto
        elif hello.resumed:
            proto.send(Stop("not wanted"))
            return
        ctl.publisher.route_subscribers.add(proto)
        proto.send(ctl.routes())

    def _app_paths(self, app: str) -> tuple[Any, str]:
        app_rec = self.ctl.apps.get(app)
        return (app_rec.spec.sys_path, app_rec.spec.cwd) if app_rec is not None else ((), "")

    def _init_rank(self, proto: FramedProtocol, member: RankRecord) -> None:
        ctl = self.ctl
        parent = ctl.replicas.get(member.parent)
        dep = ctl.registry.deployment(parent.app, parent.deployment) if parent is not None else None
        if parent is None or dep is None or parent.state == ReplicaState.STOPPING:
            proto.send(Stop("not wanted"))
            return
        member.conn = proto
        spec = dep.spec
        sys_path, cwd = self._app_paths(parent.app)
        proto.send(ReplicaInit(parent.app, parent.deployment, member.replica_id, spec.serialized(), spec.config,
                               spec.is_function, member.socket_path, False, sys_path, cwd,
                               rank=member.rank, world_size=spec.config.world_size))
