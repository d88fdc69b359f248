"""The controller: composes its parts (registry, supervisor, placement, lifecycle, health,
membership, releases, persistence, admin) and runs the control loop.

It runs on its own event loop (a thread of the process that called ``serve.run`` or
``shoal run``) and listens on a Unix socket (mode 0600) for replicas, proxies, handles'
routers and the CLI. The per-deployment plan comes from the pure :func:`reconcile`; the
controller only executes it and watches processes.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

from shoal.deployment import AppSpec
from shoal.exceptions import DeployError
from shoal.observability.controller_metrics import ControllerMetrics
from shoal.runtime import shm
from shoal.runtime.controller import health
from shoal.runtime.controller.admin import Handler, admin_table, serve_call
from shoal.runtime.controller.availability import Supply, progress, status_message, unavailable
from shoal.runtime.controller.canary import AppKey, CanaryTable
from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.connections import Connections
from shoal.runtime.controller.deployments import autoscale_app, plan_app_policy, plan_deployment
from shoal.runtime.controller.front import Front
from shoal.runtime.controller.gcpolicy import GcPolicy
from shoal.runtime.controller.guard import ReplicaGuard
from shoal.runtime.controller.lifecycle import Lifecycle
from shoal.runtime.controller.membership import (
    Publisher,
    build_membership,
    build_routes,
    membership_key,
    running_endpoints,
)
from shoal.runtime.controller.overview import serve_status
from shoal.runtime.controller.placement import Launcher
from shoal.runtime.controller.records import (
    MAX_HEALTH_FAILURES,
    MAX_START_FAILURES,
    TICK_S,
    AppRecord,
    DeploymentRecord,
    ProxyRecord,
    ReplicaRecord,
    Settings,
    SpareRecord,
)
from shoal.runtime.controller.registry import Registry
from shoal.runtime.controller.releases import Releases
from shoal.runtime.controller.restore import restore, restored_apps
from shoal.runtime.controller.supervisor import ProcessFactory, Supervisor
from shoal.runtime.gang import RankRecord
from shoal.runtime.processes import spawn, withhold_env
from shoal.runtime.reconcile import (
    DeploymentFacts,
    ReplicaView,
    StartReplica,
    StopReplica,
    application_status,
    deployment_status,
    make_room,
    reconcile,
)
from shoal.runtime.rundir import RunDir
from shoal.runtime.state import MemoryStore, StateStore, Store
from shoal.runtime.wire import Call, FramedProtocol, Membership, Reply, Routes, serve_unix
from shoal.serving.resources import Ledger, detect
from shoal.status import ApplicationStatus, DeploymentStatus, ReplicaState, ServeStatus

logger = logging.getLogger("shoal.controller")


class Controller:
    """One instance's controller. ``clock``, ``factory`` (process start) and ``store`` are
    seams for tests; by default the real clocks, :func:`spawn` and the store the settings
    call for (SQLite for a detached instance, memory otherwise)."""

    def __init__(self, settings: Settings, secret: bytes, *, clock: Clock | None = None,
                 factory: ProcessFactory = spawn, store: Store | None = None, ledger: Ledger | None = None) -> None:
        self.settings = settings
        self.secret = secret
        self.clock = clock or Clock()
        run_dir = RunDir(settings.run_dir)
        self.path = run_dir.controller_socket
        self.registry = Registry()
        # (app, deployment) -> connection id -> (time, queued, in flight), from callers' routers.
        self.handle_stats: dict[tuple[str, str], dict[int, tuple[float, int, int]]] = {}
        self.ledger = ledger or Ledger(detect(num_gpus=settings.num_gpus), strict_cpus=settings.strict_cpus)
        self._server: asyncio.AbstractServer | None = None
        self.publisher = Publisher(self.clock.wall_ns() // 1000)
        self._call_ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._kick = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.stopping = False
        self.stopped = asyncio.Event()
        self.shutdown_requested = asyncio.Event()
        self.store: Store = store or (StateStore(settings.state_path) if settings.state_path else MemoryStore())
        self.detached = bool(settings.state_path)
        self.fd_path = run_dir.http_fd_socket if self.detached else ""
        self.canaries = CanaryTable(self.store)
        # Prometheus: the replicas' and proxy's multiprocess directory, and this controller's own metrics.
        self.metrics = ControllerMetrics(settings.run_dir)
        self.supervisor = Supervisor(settings.python, lambda: self.metrics.env, factory, monotonic=self.clock.monotonic)
        self.front = Front(settings, secret, self.fd_path, self.supervisor, self.store, self.metrics, self.clock)
        self.launcher = Launcher(settings, secret, self.ledger, self.supervisor, self.registry, self.store,
                                 self.metrics, self.clock, lambda: self.front.listen_sock, self._adopt_spare_conn)
        self.lifecycle = Lifecycle(self.registry, self.supervisor, self.ledger, self.store, self.metrics,
                                   self.clock, self.publish_membership, self._kick.set)
        self.guard = ReplicaGuard(self.registry, self.lifecycle)
        # Set where the controller has its process to itself (shoal start): gcpolicy.py.
        self.gc_policy: GcPolicy | None = None
        self.front.others_accept = self._replicas_serve_http
        self.releases = Releases(self, self.canaries)
        self.connections = Connections(self)
        self.admin: dict[str, Handler] = admin_table(self)

    # ---- views other modules read (the CLI, serve.*, metrics, tests) -------------------------
    @property
    def apps(self) -> dict[str, AppRecord]:
        return self.registry.apps

    @property
    def replicas(self) -> dict[str, ReplicaRecord]:
        return self.registry.replicas

    @property
    def ranks(self) -> dict[str, RankRecord]:
        return self.registry.ranks

    @property
    def retiring(self) -> dict[tuple[str, str], DeploymentRecord]:
        return self.registry.retiring

    @property
    def proxy(self) -> ProxyRecord | None:
        return self.front.proxy

    @property
    def http_port(self) -> int:
        return self.front.http_port

    @property
    def spares(self) -> dict[str, SpareRecord]:
        return self.launcher.spares

    # ---- start / stop -----------------------------------------------------------------------
    async def start(self) -> None:
        os.makedirs(self.settings.run_dir, mode=0o700, exist_ok=True)
        shm.prepare(self.settings.run_dir)  # checks $SHOAL_SHM_THRESHOLD_BYTES; removes dead processes' segments
        self.metrics.prepare()
        # The API keys variable: fronts get the keys over their socket, no child needs it.
        withhold_env(self.settings.http.api_keys_env)
        self._server = await serve_unix(self.path, self.secret, self.connections.on_connect)
        self._restore()
        self._task = asyncio.get_running_loop().create_task(self._run())
        if self.settings.start_proxy and self.proxy is None:
            # The socket listens from here on: connections wait in its backlog until the
            # proxy process (started in parallel with the replicas) accepts them.
            if self.front.listen_sock is None and not self.front.take_over():
                self.front.bind()
            self.front.spawn_proxy()
        for _ in range(self.settings.spare_replicas if self.settings.spare_idle_s > 0 else 0):
            self.launcher.spawn_spare()

    async def wait_proxy(self, timeout: float = 30.0) -> None:
        """Wait until the HTTP proxy serves; raise if it cannot start."""
        await self.front.wait_ready(timeout)

    async def shutdown(self) -> None:
        """Stop every replica (gracefully, then by force) and the proxy; close the socket."""
        if self.stopping:
            await self.stopped.wait()
            return
        self.stopping = self.launcher.stopping = True
        for app in list(self.apps.values()):
            self._start_delete(app)
        self.publish_routes()
        deadline = self.clock.monotonic() + max(
            [d.spec.config.graceful_shutdown_timeout_s for a in self.apps.values() for d in a.deployments.values()]
            + [0.0]
        ) + 5
        for spare in list(self.spares.values()):
            self.supervisor.stop(spare.proc, spare.conn)
        while self.replicas and self.clock.monotonic() < deadline:
            self._kick.set()
            await asyncio.sleep(TICK_S)
        for spare in list(self.spares.values()):
            await self.supervisor.wait_exit(spare.proc, 5.0)
        self.spares.clear()
        for rec in list(self.replicas.values()):
            self.supervisor.kill(rec.proc)
        await self.front.stop()
        self._close()

    def _close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for conn in self.publisher.connections():
            conn.close()
        if self._server is not None:
            self._server.close()
        self.front.close()
        for path in (self.path, self.fd_path):
            try:
                if path:
                    os.unlink(path)
            except OSError:
                pass
        self.store.clear()  # a deliberate shutdown: the next start begins empty
        self.store.close()
        self.metrics.remove()
        shm.remove_dir(self.settings.run_dir)
        self.stopped.set()

    # ---- a detached instance's memory: restore and adopt --------------------------------------
    def _restore(self) -> None:
        got = restore(self.store, self.registry, self.canaries, self.supervisor, self.ledger,
                      lambda app, d: plan_deployment(app, d, None), self.front.adopt, self.clock.monotonic())
        port = self.store.get_meta("http_port")
        if self.front.listen_sock is None and port and self.apps and self.settings.http.port == 0:
            self.settings.http = self.settings.http.model_copy(update={"port": int(port)})
        if self.apps or got.adopted:
            logger.info("restored %d application(s) from %s; adopting %d running replica(s)",
                        restored_apps(self.registry), self.store.path, got.adopted)

    # ---- declarative deploys and canaries (``shoal deploy``) --------------------------------
    async def apply(self, specs: list[AppSpec], canary: float | None = None) -> dict[str, str]:
        """See :meth:`Releases.apply`."""
        return await self.releases.apply(specs, canary)

    async def promote(self, name: str, timeout: float | None = 600.0) -> None:
        """Make the canary the app's version: roll the app to it, then remove the canary."""
        await self.releases.promote(name, timeout)

    async def rollback(self, name: str) -> None:
        """Send all traffic back to the app's version and remove the canary."""
        await self.releases.rollback(name)

    # ---- desired state ----------------------------------------------------------------------
    async def deploy(self, spec: AppSpec) -> None:
        if self.stopping:
            raise DeployError("the instance is shutting down")
        if spec.route_prefix is not None:
            for other in self.apps.values():
                if other.spec.name != spec.name and not other.deleting and other.spec.route_prefix == spec.route_prefix:
                    raise DeployError(
                        f"route_prefix {spec.route_prefix!r} is already used by application {other.spec.name!r}"
                    )
        now = self.clock.wall()
        old = self.apps.get(spec.name)
        live_old = old if old is not None and not old.deleting else None
        deps: dict[str, DeploymentRecord] = {}
        for name, dspec in spec.deployments.items():
            deps[name] = plan_deployment(spec.name, dspec, live_old.deployments.get(name) if live_old else None)
        policy = plan_app_policy(spec.name, spec, live_old)
        # Only now that every deployment validated: apply in-place changes and swap the state.
        for name, rec in deps.items():
            prev = live_old.deployments.get(name) if live_old is not None else None
            if prev is not None and prev.version == rec.version \
                    and prev.spec.config.user_config != rec.spec.config.user_config:
                self._reconfigure(spec.name, name, rec.spec.config.user_config)
        if old is not None:
            for name, prev in old.deployments.items():
                if name not in deps:
                    prev.target = 0
                    self.registry.retiring[(spec.name, name)] = prev
        self.apps[spec.name] = AppRecord(spec, deps, deployed_at=now, policy=policy)
        self.store.save_app(spec.name, spec, now)
        self.publish_routes()
        self._kick.set()
        await self._notify()

    def _reconfigure(self, app: str, deployment: str, user_config: Any) -> None:
        for rec in self.registry.of(app, deployment):
            if rec.state == ReplicaState.RUNNING:
                asyncio.get_running_loop().create_task(
                    self.replica_call(rec, "reconfigure", 30.0, user_config=user_config))

    async def delete(self, name: str, wait: bool = True) -> None:
        key = AppKey.parse(name)
        if not key.is_canary and AppKey.canary(name).key in self.apps:
            self.canaries.drop(name)
            await self.delete(AppKey.canary(name).key, wait=wait)
        app = self.apps.get(name)
        if app is None:
            return
        self._start_delete(app)
        self.publish_routes()
        self._kick.set()
        while wait and name in self.apps:
            await asyncio.sleep(TICK_S)

    @staticmethod
    def _start_delete(app: AppRecord) -> None:
        app.deleting = True
        app.status = ApplicationStatus.DELETING
        for dep in app.deployments.values():
            dep.target = 0

    async def wait_running(self, name: str, timeout: float | None = None) -> None:
        """Wait until the app is RUNNING; raise :class:`DeployError` if it fails to deploy."""
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        async with self._changed:
            while True:
                app = self.apps.get(name)
                if app is None:
                    raise DeployError(f"application {name!r} was deleted while deploying")
                if app.status == ApplicationStatus.RUNNING:
                    return
                if app.status == ApplicationStatus.DEPLOY_FAILED:
                    raise DeployError(f"application {name!r} failed to deploy: {app.message}")
                remaining = None if deadline is None else deadline - self.clock.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"application {name!r} was not running after {timeout}s: {app.message}")
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    continue

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ---- the control loop -------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), TICK_S * 2)
            except TimeoutError:
                pass
            self._kick.clear()
            if self._tick():
                await self._notify()

    def _guarded(self, what: str, step: Callable[[], bool | None]) -> bool:
        """Run one step of the tick; a failure is logged and counts as a change, and the
        other steps (other apps, health checks, the proxy) still run."""
        try:
            return bool(step())
        except Exception:  # the loop must never stop
            logger.exception("controller tick failed: %s", what)
            return True

    def _tick(self) -> bool:
        now = self.clock.monotonic()
        changed = self._guarded("reaping processes", lambda: self.lifecycle.reap(now) | self._reap_spares())
        changed |= self._guarded("watching replicas", lambda: self.guard.tick(now))
        for app in list(self.apps.values()):
            changed |= self._guarded(f"application {app.spec.name!r}", functools.partial(self._tick_app, app, now))
        for (app_name, name), dep in list(self.registry.retiring.items()):
            changed |= self._guarded(f"retiring {app_name}/{name}",
                                     functools.partial(self._tick_retiring, app_name, name, dep, now))
        for app in list(self.apps.values()):
            changed |= self._guarded(f"status of {app.spec.name!r}", functools.partial(self._update_app_status, app))
            self._guarded(f"availability of {app.spec.name!r}", functools.partial(self._publish_app, app))
        self._guarded("health checks", lambda: self._health_checks(now))
        self._guarded("the proxy", self._watch_proxy)
        self._guarded("spares", self.launcher.tend_spares)
        self._guarded("saving state", self.store.retry)  # writes that failed (a full disk), again
        gc_policy = self.gc_policy
        if gc_policy is not None:  # its answer is not a change anyone waits for
            self._guarded("garbage collection", lambda: bool(gc_policy.tick(now)))
        return changed

    def _reap_spares(self) -> bool:
        self.launcher.reap_spares()
        return False

    def _tick_app(self, app: AppRecord, now: float) -> bool:
        changed = False
        name = app.spec.name
        if not app.deleting:
            autoscale_app(app, lambda dep: self.registry.of(name, dep),
                          lambda dep: self.handle_stats.get((name, dep), {}), self.metrics, now)
        for dep in app.deployments.values():
            changed |= self._reconcile_deployment(name, dep, now)
        return changed

    def _tick_retiring(self, app_name: str, name: str, dep: DeploymentRecord, now: float) -> bool:
        self._reconcile_deployment(app_name, dep, now)
        if not self.registry.has_replicas(app_name, name):
            del self.registry.retiring[(app_name, name)]
            self._publish_gone(app_name, name, f"deployment {name!r} was removed from application {app_name!r}")
        return False

    def _reconcile_deployment(self, app: str, dep: DeploymentRecord, now: float) -> bool:
        name = dep.spec.name
        mine = self.registry.of(app, name)
        if not dep.resource_blocked and _at_target(dep, mine):
            self._tell_world_size(dep, mine)
            return False  # what reconcile() would say: nothing to do (the common case, each tick)
        views = [ReplicaView(r.replica_id, r.version, r.state, r.replica_rank) for r in mine]
        can_start = dep.ready_once or dep.failures < MAX_START_FAILURES
        actions = reconcile(dep.target, dep.version, views, can_start=can_start and not self.stopping)
        by_replica_id = {r.replica_id: r for r in mine}
        if dep.resource_blocked:
            dep.resource_blocked = False
            victim = make_room(dep.version, views)
            if victim is not None:
                self.lifecycle.stop(by_replica_id[victim], "making room for the new version", now)
                self.publish_membership(app, name, dep)
        for action in actions:
            if isinstance(action, StartReplica):
                self.launcher.start_replica(app, dep, self._serves_http(app, dep))
            elif isinstance(action, StopReplica):
                self.lifecycle.stop(by_replica_id[action.replica_id], action.reason, now)
        if actions:
            self.publish_membership(app, name, dep)
        self._tell_world_size(dep, mine)
        return bool(actions)

    def _tell_world_size(self, dep: DeploymentRecord, mine: list[ReplicaRecord]) -> None:
        """Ray's replica ranks: running replicas learn the deployment's new replica count."""
        for rec in mine:
            if (rec.replica_rank >= 0 and rec.told_world_size != dep.target and rec.version == dep.version
                    and rec.state == ReplicaState.RUNNING and rec.conn is not None and not rec.conn.closed):
                rec.told_world_size = dep.target
                task = asyncio.get_running_loop().create_task(
                    self.replica_call(rec, "world_size", 10.0, world_size=dep.target))
                task.add_done_callback(_log_failed_world_size)

    def _serves_http(self, app: str, dep: DeploymentRecord) -> bool:
        """Whether a new replica of ``dep`` serves HTTP itself (the ingress of a routed app)."""
        app_rec = self.apps.get(app)
        # A custom request router picks the replica of every request: HTTP goes through the proxy's
        # router then, not to whichever ingress replica the kernel hands a connection.
        return bool(dep.spec.ingress and self.front.listen_sock is not None and self.settings.http.ingress_serves_http
                    and app_rec is not None and app_rec.spec.route_prefix is not None
                    and dep.spec.config.custom_router() is None)

    def grpc_for(self, app: str, dep: DeploymentRecord) -> Any:
        """What a new replica of ``dep`` needs to serve gRPC itself (a routed ingress): Front.replica_grpc."""
        app_rec = self.apps.get(app)
        return self.front.replica_grpc() if (dep.spec.ingress and app_rec is not None and app_rec.spec.route_prefix
                                             is not None and dep.spec.config.custom_router() is None) else None

    def _update_app_status(self, app: AppRecord) -> bool:
        before = (app.status, app.message)
        if app.deleting:
            if self.registry.has_replicas(app.spec.name):
                return False
            del self.apps[app.spec.name]
            self.store.delete_app(app.spec.name)
            for name in app.deployments:
                self._publish_gone(app.spec.name, name, f"application {app.spec.name!r} was deleted")
            return True
        now = self.clock.monotonic()
        for dep in app.deployments.values():
            dep.status = self._deployment_status(app.spec.name, dep, now)
        app.status = application_status(app.status, {d.status for d in app.deployments.values()})
        app.message = "; ".join(f"deployment {d.spec.name!r}: {m}" for d in app.deployments.values()
                                if d.status != DeploymentStatus.HEALTHY
                                and (m := status_message(d.message, d.waiting, "", 0.0)))
        return (app.status, app.message) != before

    def _publish_app(self, app: AppRecord) -> None:
        """Re-send memberships that changed meanwhile (e.g. the deployment failed: routers refuse)."""
        if self.apps.get(app.spec.name) is app and not app.deleting:
            for dep in app.deployments.values():
                self.publish_membership(app.spec.name, dep.spec.name, dep)

    def _deployment_status(self, app: str, dep: DeploymentRecord, now: float) -> DeploymentStatus:
        running = current = others = 0
        starting: list[float] = []  # start times of current replicas still starting
        for r in self.registry.of(app, dep.spec.name):  # one pass: this runs for every deployment, each tick
            if r.version != dep.version:
                others += 1
            elif r.state != ReplicaState.STOPPING:
                current += 1
                if r.state == ReplicaState.RUNNING:
                    running += 1
                elif r.state == ReplicaState.STARTING:
                    starting.append(r.started_at)
        facts = DeploymentFacts(dep.target, dep.ready_once, dep.failures, dep.scaling, running=running,
                                current=current, others=others)
        status = deployment_status(facts, MAX_START_FAILURES)
        dep.waiting = progress(starting, running, dep.target, now) if starting else ""
        if status == DeploymentStatus.HEALTHY:
            dep.scaling = ""
            dep.unhealthy = False
            if dep.autoscaler is None or not dep.autoscaler.last_error:
                dep.message = ""
        elif dep.unhealthy and status == DeploymentStatus.UPDATING:
            status = DeploymentStatus.UNHEALTHY  # a replica was taken out for a fault, until replaced
        return status

    # ---- membership and routes --------------------------------------------------------------
    def membership(self, app: str, name: str, dep: DeploymentRecord) -> Membership:
        mine = self.registry.of(app, name)
        gone = self._unavailable(app, name, dep, mine)
        return build_membership(app, name, dep, mine, self.publisher.next_epoch(), gone)

    @staticmethod
    def _unavailable(app: str, name: str, dep: DeploymentRecord, mine: list[ReplicaRecord]) -> str:
        if any(r.state == ReplicaState.RUNNING for r in mine):
            return ""  # unavailable()'s first answer, without building its Supply (every deployment, each tick)
        failed = not dep.ready_once and dep.failures >= MAX_START_FAILURES
        supply = Supply(tuple(r.state for r in mine), dep.target, failed, dep.message, dep.resource_blocked,
                        failing=dep.failures >= MAX_START_FAILURES)
        return unavailable(app, name, supply)

    def settled(self, app: str, name: str) -> bool:
        """False while adopted replicas of the deployment have not reconnected yet: until then
        routers keep the membership the previous controller gave them."""
        return not any(r.adopt_deadline for r in self.registry.of(app, name))

    def publish_membership(self, app: str, name: str, dep: DeploymentRecord) -> None:
        """Send the deployment's membership to its routers if it changed (called every tick for
        every deployment: the comparison is made on its key, the whole message built only to send)."""
        mine = self.registry.of(app, name)
        if any(r.adopt_deadline for r in mine):
            return  # not settled(): routers keep what the previous controller gave them
        gone = self._unavailable(app, name, dep, mine)
        running = running_endpoints(dep, mine)
        key = membership_key(dep, running, gone)
        if key == dep.published:
            return
        dep.published = key
        self.publisher.send_membership(build_membership(app, name, dep, mine, self.publisher.next_epoch(), gone,
                                                        running))
        if dep.spec.ingress:
            self.publish_routes()

    def _publish_gone(self, app: str, name: str, why: str) -> None:
        if self.registry.deployment(app, name) is not None:
            return  # redeployed meanwhile
        self.publisher.send_membership(self.publisher.gone(app, name, why))

    def routes(self) -> Routes:
        return build_routes(self.apps, self.replicas.values(), self.canaries)

    def publish_routes(self) -> None:
        self.publisher.send_routes(self.routes())

    # ---- health -----------------------------------------------------------------------------
    def _health_checks(self, now: float) -> None:
        for rec in self.replicas.values():
            if not health.due(rec, now):
                continue
            dep = self.registry.deployment(rec.app, rec.deployment)
            if dep is None:
                continue
            rec.health_busy = True
            asyncio.get_running_loop().create_task(self._check_one(rec, dep))

    async def _check_one(self, rec: ReplicaRecord, dep: DeploymentRecord) -> None:
        cfg = dep.spec.config
        try:
            await self.replica_call(rec, "health", cfg.health_check_timeout_s)
        except Exception as e:
            verdict = health.record(rec, False, self.clock.monotonic(), cfg.health_check_period_s)
            logger.warning("health check %d/%d of replica %s failed: %s", verdict.failures,
                           MAX_HEALTH_FAILURES, rec.replica_id, e)
            if verdict.replace:
                dep.message = f"replica {rec.replica_id} failed {MAX_HEALTH_FAILURES} health checks ({e}); replacing it"
                # Out of the membership at once, then a graceful stop: requests it is serving
                # may still finish (it is killed if it does not stop in time).
                self.lifecycle.stop(rec, "unhealthy", self.clock.monotonic())
                self.publish_membership(rec.app, rec.deployment, dep)
                self._kick.set()
        else:
            health.record(rec, True, self.clock.monotonic(), cfg.health_check_period_s)

    async def replica_call(self, rec: ReplicaRecord, op: str, timeout: float, **args: Any) -> Any:
        if rec.conn is None or rec.conn.closed:
            raise ConnectionError(f"replica {rec.replica_id} is not connected")
        cid = next(self._call_ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[cid] = fut
        try:
            rec.conn.send(Call(cid, op, args))
            reply: Reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._calls.pop(cid, None)
        if not reply.ok:
            raise RuntimeError(reply.error)
        return reply.value

    def on_reply(self, msg: Reply) -> None:
        fut = self._calls.get(msg.id)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _replicas_serve_http(self) -> bool:
        """Whether a running ingress replica accepts connections on the HTTP socket itself."""
        return any(r.serves_http and r.state == ReplicaState.RUNNING for r in self.replicas.values())

    def _watch_proxy(self) -> None:
        if not self.stopping:
            self.front.watch()

    def _adopt_spare_conn(self, conn: FramedProtocol, replica_id: str) -> None:
        self.connections.on_hello_as(conn, replica_id)

    def kick(self) -> None:
        self._kick.set()

    # ---- admin ------------------------------------------------------------------------------
    def on_admin_call(self, proto: FramedProtocol, call: Call) -> None:
        asyncio.get_running_loop().create_task(serve_call(self.admin, proto, call))

    def status(self) -> ServeStatus:
        out = serve_status(self.registry, self.canaries, self.proxy, self.settings.http, self.http_port,
                           self.ledger.summary(), self.front.restart_message(), self.clock.monotonic())
        if self.proxy is not None and self.front.grpc_port:
            from shoal.runtime.grpc_methods import target_address

            out.grpc_address = target_address(self.settings.http.host, self.front.grpc_port)
        return out


_LIVE = (ReplicaState.STARTING, ReplicaState.RUNNING)


def _at_target(dep: DeploymentRecord, mine: list[ReplicaRecord]) -> bool:
    """Exactly ``dep.target`` replicas, all of the current version and starting or running: a
    case where :func:`reconcile` plans nothing, checked without building its views."""
    return len(mine) == dep.target and all(r.version == dep.version and r.state in _LIVE for r in mine)


def _log_failed_world_size(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("telling a replica its world size failed: %s", task.exception())
