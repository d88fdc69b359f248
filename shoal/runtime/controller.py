"""The controller: desired state, replica processes, membership, health, the proxy.

It runs on its own event loop (a thread of the process that called ``serve.run`` or
``shoal run``) and listens on a Unix socket (mode 0600) for replicas, proxies, handles'
routers and the CLI. The per-deployment plan comes from the pure :func:`reconcile`; this
class only executes it and watches processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from shoal.config import HTTPOptions
from shoal.deployment import AppSpec, DeploymentSpec
from shoal.observability.metrics import ControllerMetrics
from shoal.runtime.gang import RankRecord, free_port, place_gang, rank_env, rank_tag
from shoal.runtime.processes import AdoptedProcess, Proc, is_shoal_process, spawn
from shoal.runtime.reconcile import ReplicaView, StartReplica, StopReplica, reconcile
from shoal.runtime.replica import Bootstrap
from shoal.runtime.state import StateStore
from shoal.runtime.wire import (
    Call,
    FramedProtocol,
    HandleStats,
    Hello,
    Membership,
    ProxyReady,
    ReplicaAddress,
    ReplicaFailed,
    ReplicaInit,
    ReplicaModels,
    ReplicaReady,
    ReplicaStats,
    Reply,
    Routes,
    Stop,
    Subscribe,
    SubscribeRoutes,
    serve_unix,
)
from shoal.serving.autoscaling import Autoscaler, PolicyLoadError
from shoal.serving.resources import Ledger, Pending, Request, detect
from shoal.status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    ProxyStatus,
    ReplicaState,
    ServeStatus,
    summarize_requests,
)

logger = logging.getLogger("shoal.controller")

# Constructor failures in a row (with no replica of that version ever ready) before giving up.
MAX_START_FAILURES = 3
# Failed health checks in a row before a replica is replaced.
MAX_HEALTH_FAILURES = 3
TICK_S = 0.05
MAX_PROXY_RESTARTS = 5
# A restarted controller waits this long for a still-running replica to reconnect before
# it gives up on it (and starts a replacement).
ADOPT_WAIT_S = 10.0
CANARY_SUFFIX = "#canary"


class DeployError(RuntimeError):
    """An application could not be deployed; the message says which deployment and why."""


def fingerprint(spec: AppSpec) -> str:
    """The app's version: its deployments' code versions and options, and its ingress.

    Deploying a spec with the same fingerprint (and route prefix) changes nothing.
    """
    h = hashlib.sha256(spec.ingress.encode())
    for name in sorted(spec.deployments):
        d = spec.deployments[name]
        h.update(f"\0{name}\0{d.code_version}\0{d.config!r}".encode())
    return h.hexdigest()[:12]


@dataclass
class Settings:
    """Runtime settings of one instance, read once at start and passed down."""

    run_dir: str
    http: HTTPOptions = field(default_factory=HTTPOptions)
    start_proxy: bool = True
    # Replica processes kept booted (imports done) and waiting for a deployment, so that a
    # new replica skips interpreter start-up: cold start, scale-up and recovery get faster.
    spare_replicas: int = 1
    # GPUs to account for: None finds them with nvidia-smi; a number declares that many.
    num_gpus: int | None = None
    # Refuse to place replicas whose num_cpus exceed the machine's (off: record and warn).
    strict_cpus: bool = False
    die_with_parent: bool = True
    log_level: str = "INFO"
    python: str = sys.executable
    # A detached instance (``shoal start``): desired state and processes are kept in this
    # SQLite file, and a controller started later adopts what still runs. "" = embedded.
    state_path: str = ""


@dataclass(eq=False)
class ReplicaRecord:
    tag: str
    app: str
    deployment: str
    version: str
    socket_path: str
    proc: Proc
    state: ReplicaState = ReplicaState.STARTING
    conn: FramedProtocol | None = None
    started_at: float = 0.0
    stop_deadline: float = 0.0
    failed_reported: bool = False
    health_failures: int = 0
    next_health: float = 0.0
    health_busy: bool = False
    model_ids: tuple[str, ...] = ()
    serves_http: bool = False
    ongoing: int = 0
    stats_at: float = 0.0
    gpus: tuple[int, ...] = ()
    # Adopted from an earlier controller: not confirmed until it reconnects (by this time).
    adopted: bool = False
    adopt_deadline: float = 0.0
    # Requests it finished since it started (count, failures, latency histogram).
    requests: int = 0
    errors: int = 0
    latency_hist: tuple[int, ...] = ()
    # Gang replicas (rank 0's record): the other ranks, and whether rank 0 itself is ready.
    ranks: list[RankRecord] = field(default_factory=list)
    rank0_ready: bool = False


@dataclass(eq=False)
class DeploymentRecord:
    spec: DeploymentSpec
    version: str
    target: int
    status: DeploymentStatus = DeploymentStatus.UPDATING
    message: str = ""
    failures: int = 0
    ready_once: bool = False
    published: tuple[Any, ...] | None = None
    autoscaler: Autoscaler | None = None
    scaling: str = ""  # "UPSCALING" / "DOWNSCALING" while an autoscaling decision is carried out
    resource_blocked: bool = False  # the last replica start found no room
    # Requests finished by this version's replicas that are gone (live ones are added on read).
    finished: RequestTotals = field(default_factory=lambda: RequestTotals())


@dataclass
class RequestTotals:
    requests: int = 0
    errors: int = 0
    hist: list[int] = field(default_factory=list)

    def add(self, requests: int, errors: int, hist: tuple[int, ...] | list[int]) -> None:
        self.requests += requests
        self.errors += errors
        if len(self.hist) < len(hist):
            self.hist.extend([0] * (len(hist) - len(self.hist)))
        for i, n in enumerate(hist):
            self.hist[i] += n


@dataclass(eq=False)
class AppRecord:
    spec: AppSpec
    deployments: dict[str, DeploymentRecord]
    status: ApplicationStatus = ApplicationStatus.DEPLOYING
    message: str = ""
    deployed_at: float = 0.0
    deleting: bool = False


@dataclass(eq=False)
class SpareRecord:
    ident: str
    proc: subprocess.Popen[bytes]
    conn: FramedProtocol | None = None


@dataclass(eq=False)
class ProxyRecord:
    ident: str
    proc: Proc
    conn: FramedProtocol | None = None
    ready: bool = False
    restarts: int = 0


class Controller:
    def __init__(self, settings: Settings, secret: bytes) -> None:
        self.settings = settings
        self.secret = secret
        self.path = os.path.join(settings.run_dir, "controller.sock")
        self.apps: dict[str, AppRecord] = {}
        # Deployments removed from a redeployed app, still stopping: (app, name) -> record.
        self.retiring: dict[tuple[str, str], DeploymentRecord] = {}
        self.replicas: dict[str, ReplicaRecord] = {}
        self.subscribers: dict[tuple[str, str], set[FramedProtocol]] = {}
        self.route_subscribers: set[FramedProtocol] = set()
        # (app, deployment) -> connection id -> (time, queued, in flight), from callers' routers.
        self.handle_stats: dict[tuple[str, str], dict[int, tuple[float, int, int]]] = {}
        self.proxy: ProxyRecord | None = None
        self.spares: dict[str, SpareRecord] = {}
        self.ledger = Ledger(detect(num_gpus=settings.num_gpus), strict_cpus=settings.strict_cpus)
        # Spares have no GPU: on a GPU machine they start with CUDA_VISIBLE_DEVICES="".
        self._spare_env = {"CUDA_VISIBLE_DEVICES": ""} if self.ledger.machine.num_gpus else {}
        # A spare handed a deployment before it connected: spare ident -> replica tag.
        self.spare_alias: dict[str, str] = {}
        self.http_port = 0
        self._listen_sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        # Membership versions only grow, across controller restarts too (routers ignore older ones).
        self._versions = itertools.count(time.time_ns() // 1000)
        self._call_ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._kick = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.stopping = False
        self.stopped = asyncio.Event()
        self.shutdown_requested = asyncio.Event()
        self.store = StateStore(settings.state_path) if settings.state_path else None
        self.fd_path = os.path.join(settings.run_dir, "http-fd.sock") if self.store is not None else ""
        # Ranks 1..N-1 of gang replicas, by their own tag.
        self.ranks: dict[str, RankRecord] = {}
        # Canary releases in progress: app name -> percent of its HTTP traffic for the canary
        # (an app record under "<name>#canary").
        self.canaries: dict[str, float] = {}
        # Prometheus: the replicas' and proxy's multiprocess directory, and this controller's own metrics.
        self.metrics = ControllerMetrics(settings.run_dir)

    # ---- start / stop -----------------------------------------------------------------------
    async def start(self) -> None:
        os.makedirs(self.settings.run_dir, mode=0o700, exist_ok=True)
        self.metrics.prepare()
        self._server = await serve_unix(self.path, self.secret, self._on_connect)
        if self.store is not None:
            self._restore()
        self._task = asyncio.get_running_loop().create_task(self._run())
        if self.settings.start_proxy and self.proxy is None:
            # The socket listens from here on: connections wait in its backlog until the
            # proxy process (started in parallel with the replicas) accepts them.
            if self._listen_sock is None:
                self._bind_http()
            self._spawn_proxy()
        for _ in range(self.settings.spare_replicas):
            self._spawn_spare()

    async def wait_proxy(self, timeout: float = 30.0) -> None:
        """Wait until the HTTP proxy serves; raise if it cannot start."""
        deadline = time.monotonic() + timeout
        while self.proxy is not None and not self.proxy.ready:
            if time.monotonic() > deadline or self.proxy.restarts >= MAX_PROXY_RESTARTS:
                raise RuntimeError("the HTTP proxy failed to start; see its log above")
            await asyncio.sleep(0.01)

    def _bind_http(self) -> None:
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
        self._listen_sock = sock
        self.http_port = sock.getsockname()[1]
        if self.store is not None:
            self.store.set_meta("http_port", str(self.http_port))

    def _spawn_proxy(self) -> None:
        assert self._listen_sock is not None
        ident = f"proxy-{uuid.uuid4().hex[:6]}"
        from shoal.runtime.proxy import FrontOptions, ProxyBootstrap

        boot = ProxyBootstrap(self.path, self.secret, ident, self._listen_sock.fileno(),
                              FrontOptions.of(self.settings.http),
                              os.getpid(), self.settings.die_with_parent, self.settings.log_level, list(sys.path),
                              fd_path=self.fd_path, log_dir=os.path.join(self.settings.run_dir, "logs"))
        proc = self._popen("shoal.runtime.proxy", pickle.dumps(boot), pass_fds=(self._listen_sock.fileno(),))
        restarts = self.proxy.restarts + 1 if self.proxy else 0
        if self.proxy is not None and self.store is not None:
            self.store.delete_process(self.proxy.ident)
        self.proxy = ProxyRecord(ident, proc, restarts=restarts)
        if self.store is not None:
            self.store.save_process(ident, "proxy", proc.pid)

    def _popen(self, module: str, stdin_data: bytes, pass_fds: tuple[int, ...] = (),
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return spawn([self.settings.python, "-m", module], stdin_data, pass_fds, {**self.metrics.env, **(env or {})})

    async def shutdown(self) -> None:
        """Stop every replica (gracefully, then by force) and the proxy; close the socket."""
        if self.stopping:
            await self.stopped.wait()
            return
        self.stopping = True
        for app in list(self.apps.values()):
            self._start_delete(app)
        self._publish_routes()
        deadline = time.monotonic() + max(
            [d.spec.config.graceful_shutdown_timeout_s for a in self.apps.values() for d in a.deployments.values()]
            + [0.0]
        ) + 5
        for spare in list(self.spares.values()):
            self._stop_process(spare.proc, spare.conn)
        while self.replicas and time.monotonic() < deadline:
            self._kick.set()
            await asyncio.sleep(TICK_S)
        for spare in list(self.spares.values()):
            await self._wait_exit(spare.proc, 5.0)
        self.spares.clear()
        for rec in list(self.replicas.values()):
            self._kill(rec.proc)
        if self.proxy is not None:
            proxy = self.proxy
            self.proxy = None
            self._stop_process(proxy.proc, proxy.conn)
            await self._wait_exit(proxy.proc, 5.0)
        if self._task is not None:
            self._task.cancel()
        for conn in list(self.route_subscribers) + [c for s in self.subscribers.values() for c in s]:
            conn.close()
        if self._server is not None:
            self._server.close()
        if self._listen_sock is not None:
            self._listen_sock.close()
        for path in (self.path, self.fd_path):
            try:
                if path:
                    os.unlink(path)
            except OSError:
                pass
        if self.store is not None:
            self.store.clear()  # a deliberate shutdown: the next start begins empty
            self.store.close()
        self.metrics.remove()
        self.stopped.set()

    def _stop_process(self, proc: Proc, conn: FramedProtocol | None) -> None:
        if proc.poll() is not None:
            return
        try:
            if conn is not None and not conn.closed:
                conn.send(Stop("shutdown"))
            else:
                proc.send_signal(signal.SIGTERM)
        except (ConnectionError, ProcessLookupError):
            pass

    async def _wait_exit(self, proc: Proc, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._kill(proc)

    @staticmethod
    def _kill(proc: Proc) -> None:
        if proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.error("process %d did not exit after SIGKILL", proc.pid)

    # ---- a detached instance's memory: restore and adopt --------------------------------------
    def _restore(self) -> None:
        """Read the state file: redeploy its apps, adopt the replicas and proxy still running."""
        from shoal.runtime.proxy import take_listening_fd

        store = self.store
        assert store is not None
        now = time.monotonic()
        for key, spec, deployed_at in store.load_apps():
            deps = {n: self._plan_deployment(key, d, None) for n, d in spec.deployments.items()}
            self.apps[key] = AppRecord(spec, deps, deployed_at=deployed_at)
        saved = json.loads(store.get_meta("canaries") or "{}")
        self.canaries = {k: float(w) for k, w in saved.items() if k in self.apps and k + CANARY_SUFFIX in self.apps}
        adopted = 0
        for row in store.load_processes():
            alive = is_shoal_process(row.pid)
            if row.role == "proxy":
                if alive and self.settings.start_proxy and self.proxy is None and self.fd_path:
                    sock = take_listening_fd(self.fd_path)
                    if sock is not None:
                        sock.set_inheritable(True)
                        self._listen_sock = sock
                        self.http_port = sock.getsockname()[1]
                        self.proxy = ProxyRecord(row.ident, AdoptedProcess(row.pid), ready=True)
                        logger.info("adopted the HTTP proxy (pid %d) on port %d", row.pid, self.http_port)
                        continue
                if alive:  # it holds the port but would not hand it over: replace it
                    AdoptedProcess(row.pid).kill()
                store.delete_process(row.ident)
                continue
            info = row.info
            dep = self._dep_record(str(info.get("app")), str(info.get("deployment")))
            # Gangs are not adopted (their ranks rendezvous once): they are started afresh.
            if not alive or dep is None or row.role == "rank" or info.get("gang"):
                if alive:
                    AdoptedProcess(row.pid).kill()
                store.delete_process(row.ident)
                continue
            gpus = tuple(int(g) for g in info.get("gpus", ()))
            placement = self.ledger.place(row.ident, Request.of(dep.spec.config.ray_actor_options), pin=gpus)
            if isinstance(placement, Pending):
                logger.warning("adopted replica %s does not fit the resources any more: %s", row.ident,
                               placement.reason)
            self.replicas[row.ident] = ReplicaRecord(
                row.ident, str(info["app"]), str(info["deployment"]), str(info["version"]), str(info["socket_path"]),
                AdoptedProcess(row.pid), started_at=now, serves_http=bool(info.get("serves_http")), gpus=gpus,
                adopted=True, adopt_deadline=now + ADOPT_WAIT_S)
            adopted += 1
        # Autoscaled deployments keep the scale they had.
        for app in self.apps.values():
            for name, dep in app.deployments.items():
                if dep.autoscaler is None:
                    continue
                n = sum(1 for r in self.replicas.values()
                        if r.app == app.spec.name and r.deployment == name and r.version == dep.version)
                if n:
                    cfg = dep.autoscaler.config
                    dep.target = dep.autoscaler.target = min(max(n, cfg.min_replicas), cfg.max_replicas)
        port = store.get_meta("http_port")
        if self._listen_sock is None and port and self.apps and self.settings.http.port == 0:
            self.settings.http = self.settings.http.model_copy(update={"port": int(port)})
        if self.apps or adopted:
            logger.info("restored %d application(s) from %s; adopting %d running replica(s)",
                        sum(1 for k in self.apps if CANARY_SUFFIX not in k), store.path, adopted)

    # ---- declarative deploys and canaries (``shoal deploy``) --------------------------------
    async def apply(self, specs: list[AppSpec], canary: float | None = None) -> dict[str, str]:
        """Make the instance run exactly ``specs`` (apps not listed are deleted). Returns what
        happened to each app: created, updated, unchanged, deleted, or a canary started.

        With ``canary`` (percent), an app that exists and changed is not replaced: the new
        version runs beside it as a canary taking that share of the app's HTTP traffic.
        """
        if canary is not None and not 0 < canary < 100:
            raise DeployError(f"canary weight must be between 0 and 100 (exclusive), got {canary}")
        names = [s.name for s in specs]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise DeployError(f"application name(s) {', '.join(sorted(dupes))} appear more than once")
        if any(CANARY_SUFFIX in n or "#" in n for n in names):
            raise DeployError("application names may not contain '#'")
        results: dict[str, str] = {}
        for spec in specs:
            cur = self.apps.get(spec.name)
            live = cur is not None and not cur.deleting
            in_canary = spec.name in self.canaries
            if canary is not None and live:
                assert cur is not None
                canary_rec = self.apps.get(spec.name + CANARY_SUFFIX)
                if fingerprint(cur.spec) == fingerprint(spec) and cur.spec.route_prefix == spec.route_prefix \
                        and not in_canary:
                    results[spec.name] = "unchanged"
                elif in_canary and canary_rec is not None and fingerprint(canary_rec.spec) == fingerprint(spec):
                    self._set_canary_weight(spec.name, canary)
                    results[spec.name] = f"canary weight {canary:g}%"
                else:
                    await self._deploy_canary(spec, cur, canary)
                    results[spec.name] = f"canary started with {canary:g}% of traffic"
                continue
            if in_canary:
                raise DeployError(f"application {spec.name!r} has a canary release in progress: "
                                  f"run `shoal promote {spec.name}` or `shoal rollback {spec.name}` first, "
                                  "or deploy with --canary to replace the canary")
            if live and cur is not None and fingerprint(cur.spec) == fingerprint(spec) \
                    and cur.spec.route_prefix == spec.route_prefix:
                results[spec.name] = "unchanged"
                continue
            await self.deploy(spec)
            results[spec.name] = "updated" if live else "created"
        for name, app in list(self.apps.items()):
            if CANARY_SUFFIX in name or app.deleting or name in results:
                continue
            await self._end_canary(name)
            await self.delete(name, wait=False)
            results[name] = "deleted"
        return results

    async def _deploy_canary(self, spec: AppSpec, stable: AppRecord, weight: float) -> None:
        from dataclasses import replace

        if stable.spec.route_prefix is None:
            raise DeployError(f"application {spec.name!r} has no route_prefix: a canary splits HTTP traffic")
        if spec.route_prefix != stable.spec.route_prefix:
            raise DeployError(f"application {spec.name!r}: a canary keeps the route_prefix "
                              f"{stable.spec.route_prefix!r} (got {spec.route_prefix!r})")
        key = spec.name + CANARY_SUFFIX
        await self.deploy(replace(spec, name=key, route_prefix=None))
        self._set_canary_weight(spec.name, weight)

    def _set_canary_weight(self, name: str, weight: float) -> None:
        self.canaries[name] = weight
        if self.store is not None:
            self.store.set_meta("canaries", json.dumps(self.canaries))
        self._publish_routes()

    async def _end_canary(self, name: str) -> None:
        """Stop splitting traffic, then delete the canary app (its replicas drain)."""
        if name not in self.canaries and name + CANARY_SUFFIX not in self.apps:
            return
        self.canaries.pop(name, None)
        if self.store is not None:
            self.store.set_meta("canaries", json.dumps(self.canaries))
        self._publish_routes()
        # Let fronts that already picked the canary for a request hand it over before the
        # canary's replicas start draining.
        await asyncio.sleep(0.5)
        await self.delete(name + CANARY_SUFFIX, wait=True)

    async def promote(self, name: str, timeout: float | None = 600.0) -> None:
        """Make the canary the app's version: roll the app to it, then remove the canary."""
        from dataclasses import replace

        canary = self.apps.get(name + CANARY_SUFFIX)
        stable = self.apps.get(name)
        if canary is None or stable is None or name not in self.canaries:
            raise DeployError(f"application {name!r} has no canary release to promote")
        await self.deploy(replace(canary.spec, name=name, route_prefix=stable.spec.route_prefix))
        await self.wait_running(name, timeout)
        await self._end_canary(name)

    async def rollback(self, name: str) -> None:
        """Send all traffic back to the app's version and remove the canary."""
        if name not in self.canaries and name + CANARY_SUFFIX not in self.apps:
            raise DeployError(f"application {name!r} has no canary release to roll back")
        await self._end_canary(name)

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
        now = time.time()
        old = self.apps.get(spec.name)
        deps: dict[str, DeploymentRecord] = {}
        for name, dspec in spec.deployments.items():
            prev = old.deployments.get(name) if old is not None and not old.deleting else None
            deps[name] = self._plan_deployment(spec.name, dspec, prev)
        # Only now that every deployment validated: apply in-place changes and swap the state.
        for name, rec in deps.items():
            prev = old.deployments.get(name) if old is not None and not old.deleting else None
            if prev is not None and prev.version == rec.version \
                    and prev.spec.config.user_config != rec.spec.config.user_config:
                self._reconfigure(spec.name, name, rec.spec.config.user_config)
        if old is not None:
            for name, prev in old.deployments.items():
                if name not in deps:
                    prev.target = 0
                    self.retiring[(spec.name, name)] = prev
        self.apps[spec.name] = AppRecord(spec, deps, deployed_at=now)
        if self.store is not None:
            self.store.save_app(spec.name, spec, now)
        self._publish_routes()
        self._kick.set()
        await self._notify()

    def _plan_deployment(self, app: str, dspec: DeploymentSpec, prev: DeploymentRecord | None) -> DeploymentRecord:
        """The record for a (re)deployed deployment; the replica count carries over when it can."""
        version = dspec.code_version
        cfg = dspec.config
        auto = cfg.resolved_autoscaling()
        target = cfg.initial_target()
        autoscaler: Autoscaler | None = None
        try:
            if auto is not None:
                if prev is not None and prev.autoscaler is not None:
                    autoscaler = prev.autoscaler
                    autoscaler.update_config(auto)
                    # Keep the current scale, within the new bounds.
                    target = min(max(prev.target, auto.min_replicas), auto.max_replicas)
                    autoscaler.target = target
                else:
                    autoscaler = Autoscaler(auto, dspec.name, app, target)
        except PolicyLoadError as e:
            raise DeployError(f"deployment {dspec.name!r}: autoscaling_config.policy: {e}") from None
        if prev is not None and auto is None and prev.spec.config.num_replicas == cfg.num_replicas \
                and prev.autoscaler is None:
            target = prev.target
        rec = DeploymentRecord(dspec, version, target, autoscaler=autoscaler,
                               ready_once=prev is not None and prev.ready_once and prev.version == version)
        if prev is not None:
            rec.published = prev.published
            if prev.version == version:
                rec.finished = prev.finished
        return rec

    def _autoscale(self, app: str, dep: DeploymentRecord, now: float) -> None:
        scaler = dep.autoscaler
        if scaler is None:
            return
        name = dep.spec.name
        interval = scaler.config.metrics_interval_s
        fresh = max(3 * interval, 1.0)  # a report older than this no longer counts
        # Load = requests in the replicas (running or queued there, HTTP included) + requests
        # waiting in callers for a replica.
        queued = sum(q for t, q, _ in self.handle_stats.get((app, name), {}).values() if now - t <= fresh)
        mine = [r for r in self.replicas.values() if r.app == app and r.deployment == name
                and r.version == dep.version and r.state in (ReplicaState.STARTING, ReplicaState.RUNNING)]
        ongoing = sum(r.ongoing for r in mine if r.state == ReplicaState.RUNNING and now - r.stats_at <= fresh)
        scaler.record(now, queued + ongoing, queued)
        running = [r.tag for r in mine if r.state == ReplicaState.RUNNING]
        new = scaler.decide(now, len(mine), running)
        self.metrics.autoscale_tick(app, name, queued + ongoing, dep.target, new)
        if new != dep.target:
            logger.info("autoscaling %s/%s from %d to %d replicas", app, name, dep.target, new)
            dep.scaling = "UPSCALING" if new > dep.target else "DOWNSCALING"
            dep.target = new
        if scaler.last_error:
            dep.message = f"autoscaling policy failed: {scaler.last_error}"

    def _reconfigure(self, app: str, deployment: str, user_config: Any) -> None:
        for rec in self.replicas.values():
            if rec.app == app and rec.deployment == deployment and rec.state == ReplicaState.RUNNING:
                asyncio.get_running_loop().create_task(
                    self._replica_call(rec, "reconfigure", 30.0, user_config=user_config))

    async def delete(self, name: str, wait: bool = True) -> None:
        if CANARY_SUFFIX not in name and name + CANARY_SUFFIX in self.apps:
            self.canaries.pop(name, None)
            if self.store is not None:
                self.store.set_meta("canaries", json.dumps(self.canaries))
            await self.delete(name + CANARY_SUFFIX, wait=wait)
        app = self.apps.get(name)
        if app is None:
            return
        self._start_delete(app)
        self._publish_routes()
        self._kick.set()
        while wait and name in self.apps:
            await asyncio.sleep(TICK_S)

    def _start_delete(self, app: AppRecord) -> None:
        app.deleting = True
        app.status = ApplicationStatus.DELETING
        for dep in app.deployments.values():
            dep.target = 0

    async def wait_running(self, name: str, timeout: float | None = None) -> None:
        """Wait until the app is RUNNING; raise :class:`DeployError` if it fails to deploy."""
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self._changed:
            while True:
                app = self.apps.get(name)
                if app is None:
                    raise DeployError(f"application {name!r} was deleted while deploying")
                if app.status == ApplicationStatus.RUNNING:
                    return
                if app.status == ApplicationStatus.DEPLOY_FAILED:
                    raise DeployError(f"application {name!r} failed to deploy: {app.message}")
                remaining = None if deadline is None else deadline - time.monotonic()
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
            try:
                changed = self._tick()
            except Exception:  # the loop must never stop
                logger.exception("controller tick failed")
                changed = True
            if changed:
                await self._notify()

    def _tick(self) -> bool:
        now = time.monotonic()
        changed = self._reap(now)
        for app in list(self.apps.values()):
            for dep in app.deployments.values():
                if not app.deleting:
                    self._autoscale(app.spec.name, dep, now)
                changed |= self._reconcile_deployment(app.spec.name, dep, now)
        for (app_name, name), dep in list(self.retiring.items()):
            self._reconcile_deployment(app_name, dep, now)
            if not any(r.app == app_name and r.deployment == name for r in self.replicas.values()):
                del self.retiring[(app_name, name)]
                self._publish_gone(app_name, name, f"deployment {name!r} was removed from application {app_name!r}")
        for app in list(self.apps.values()):
            changed |= self._update_app_status(app)
        self._health_checks(now)
        self._watch_proxy()
        self._refill_spares()
        return changed

    def _reap(self, now: float) -> bool:
        changed = False
        for member in list(self.ranks.values()):
            code = member.proc.poll()
            if code is not None and member.tag in self.ranks:
                self._gang_member_gone(member, f"exited with code {code}")
                changed = True
        for ident, spare in list(self.spares.items()):
            if spare.proc.poll() is not None:
                if not self.stopping:
                    logger.warning("spare replica process %s exited with code %s", ident, spare.proc.returncode)
                del self.spares[ident]
        for rec in list(self.replicas.values()):
            code = rec.proc.poll()
            if code is None and rec.adopt_deadline and now > rec.adopt_deadline:
                logger.warning("replica %s (pid %d) did not reconnect after the controller restarted; replacing it",
                               rec.tag, rec.proc.pid)
                rec.adopt_deadline = 0.0
                self._kill(rec.proc)
                code = rec.proc.returncode
            if code is None:
                if rec.state == ReplicaState.STOPPING and now > rec.stop_deadline:
                    logger.warning("replica %s did not stop in time; killing it", rec.tag)
                    self._kill(rec.proc)
                    code = rec.proc.returncode
                else:
                    continue
            self._replica_gone(rec, f"exited with code {code}")
            changed = True
        return changed

    def _dep_record(self, app: str, name: str) -> DeploymentRecord | None:
        a = self.apps.get(app)
        rec = a.deployments.get(name) if a is not None else None
        return rec if rec is not None else self.retiring.get((app, name))

    def _replica_gone(self, rec: ReplicaRecord, why: str) -> None:
        if self.replicas.pop(rec.tag, None) is None:
            return
        self.ledger.release(rec.tag)
        self.metrics.process_exited(rec.proc.pid)
        rec.adopt_deadline = 0.0
        for member in rec.ranks:
            self.ranks.pop(member.tag, None)
            self.ledger.release(member.tag)
            self._kill(member.proc)
            self.metrics.process_exited(member.proc.pid)
            if self.store is not None:
                self.store.delete_process(member.tag)
            try:
                os.unlink(member.socket_path)
            except OSError:
                pass
        if self.store is not None:
            self.store.delete_process(rec.tag)
        owner = self._dep_record(rec.app, rec.deployment)
        if owner is not None and owner.version == rec.version and rec.requests:
            owner.finished.add(rec.requests, rec.errors, rec.latency_hist)  # per version: only the current one
        if rec.proc.poll() is None:
            self._kill(rec.proc)
        try:
            os.unlink(rec.socket_path)
        except OSError:
            pass
        dep = self._dep_record(rec.app, rec.deployment)
        if rec.state != ReplicaState.STOPPING:
            logger.warning("replica %s of %s/%s %s unexpectedly", rec.tag, rec.app, rec.deployment, why)
            if dep is not None and rec.state == ReplicaState.STARTING and not rec.failed_reported and not rec.adopted:
                if rec.version == dep.version:
                    dep.failures += 1
                    dep.message = f"replica {rec.tag} {why} before it was ready"
            elif dep is not None:
                dep.message = f"replica {rec.tag} {why}; starting a replacement"
        if dep is not None:
            self._publish(rec.app, rec.deployment, dep)

    def _reconcile_deployment(self, app: str, dep: DeploymentRecord, now: float) -> bool:
        name = dep.spec.name
        mine = [r for r in self.replicas.values() if r.app == app and r.deployment == name]
        views = [ReplicaView(r.tag, r.version, r.state) for r in mine]
        can_start = dep.ready_once or dep.failures < MAX_START_FAILURES
        actions = reconcile(dep.target, dep.version, views, can_start=can_start and not self.stopping)
        by_tag = {r.tag: r for r in mine}
        if dep.resource_blocked:
            dep.resource_blocked = False
            # A new version that has no room to start while the old one holds the resources
            # (e.g. every GPU): retire one old replica at a time to make room.
            old = [r for r in mine if r.version != dep.version]
            if old and not any(r.state == ReplicaState.STOPPING for r in old):
                victim = min(old, key=lambda r: (r.state == ReplicaState.RUNNING, r.tag))
                self._stop_replica(victim, "making room for the new version", now)
                self._publish(app, name, dep)
        for action in actions:
            if isinstance(action, StartReplica):
                self._start_replica(app, dep)
            elif isinstance(action, StopReplica):
                self._stop_replica(by_tag[action.tag], action.reason, now)
        if actions:
            self._publish(app, name, dep)
        return bool(actions)

    def _replica_bootstrap(self, tag: str, http: bool) -> tuple[Bootstrap, tuple[int, ...]]:
        from shoal.runtime.proxy import FrontOptions

        fds = (self._listen_sock.fileno(),) if http and self._listen_sock is not None else ()
        boot = Bootstrap(self.path, self.secret, tag, list(sys.path), os.getcwd(), os.getpid(),
                         self.settings.die_with_parent, self.settings.log_level,
                         http_fd=fds[0] if fds else -1, http=FrontOptions.of(self.settings.http) if fds else None,
                         log_dir=os.path.join(self.settings.run_dir, "logs"))
        return boot, fds

    def _spawn_spare(self) -> None:
        if self.stopping:
            return
        ident = f"spare-{uuid.uuid4().hex[:8]}"
        # Spares inherit the HTTP socket, so that any of them can become an ingress replica.
        boot, fds = self._replica_bootstrap(ident, self.settings.http.ingress_serves_http)
        try:
            proc = self._popen("shoal.runtime.replica", pickle.dumps(boot), pass_fds=fds, env=self._spare_env)
        except OSError as e:
            logger.warning("could not start a spare replica process: %s", e)
            return
        self.spares[ident] = SpareRecord(ident, proc)

    def _start_replica(self, app: str, dep: DeploymentRecord) -> None:
        uid = uuid.uuid4().hex[:8]
        tag = f"{dep.spec.name}-{uid}"
        socket_path = os.path.join(self.settings.run_dir, f"r-{uid}.sock")
        app_rec = self.apps.get(app)
        serves_http = (dep.spec.ingress and self._listen_sock is not None and self.settings.http.ingress_serves_http
                       and app_rec is not None and app_rec.spec.route_prefix is not None)
        if dep.spec.config.world_size > 1:
            self._start_gang(app, dep, tag, uid, socket_path, serves_http)
            return
        placement = self.ledger.place(tag, Request.of(dep.spec.config.ray_actor_options))
        if isinstance(placement, Pending):
            self._pending(dep, placement)
            return
        env = self.ledger.cuda_env(placement)
        spare = None
        if not placement.gpus:
            spare = next((s for s in self.spares.values() if s.proc.poll() is None), None)
        conn: FramedProtocol | None = None
        if spare is not None:
            del self.spares[spare.ident]
            proc = spare.proc
            conn = spare.conn if spare.conn is not None and not spare.conn.closed else None
            if conn is None:
                self.spare_alias[spare.ident] = tag  # it will say hello under its spare name
        else:
            boot, fds = self._replica_bootstrap(tag, serves_http)
            try:
                proc = self._popen("shoal.runtime.replica", pickle.dumps(boot), pass_fds=fds, env=env)
            except OSError as e:
                self.ledger.release(tag)
                dep.failures += 1
                dep.message = f"could not start a replica process: {e}"
                return
        rec = ReplicaRecord(tag, app, dep.spec.name, dep.version, socket_path, proc,
                            started_at=time.monotonic(), serves_http=serves_http, gpus=placement.gpus)
        self.replicas[tag] = rec
        self.metrics.replica_started(app, dep.spec.name)
        if self.store is not None:
            self.store.save_process(tag, "replica", proc.pid, app=app, deployment=dep.spec.name, version=dep.version,
                                    socket_path=socket_path, serves_http=serves_http, gpus=list(placement.gpus))
        if conn is not None:
            self._on_hello(conn, Hello("replica", tag))

    @staticmethod
    def _pending(dep: DeploymentRecord, why: Pending) -> None:
        """A replica (or gang) that does not fit stays pending with a status message naming what
        is missing, retried each tick; one that can never fit fails the deploy."""
        dep.message = f"replica pending: {why.reason}"
        dep.resource_blocked = True
        if why.can_never_fit:
            dep.failures = MAX_START_FAILURES
            dep.ready_once = False

    def _start_gang(self, app: str, dep: DeploymentRecord, tag: str, uid: str, socket_path: str,
                    serves_http: bool) -> None:
        """Start every rank of one gang replica (all placed, or none and the gang pending)."""
        cfg = dep.spec.config
        n = cfg.world_size
        placements = place_gang(self.ledger, tag, [Request.of(cfg.rank_resources(i)) for i in range(n)])
        if isinstance(placements, Pending):
            self._pending(dep, placements)
            return
        port = free_port()
        procs: list[Proc] = []
        try:
            for rank, placement in enumerate(placements):
                env = {**self.ledger.cuda_env(placement), **rank_env(rank, n, port)}
                ident = tag if rank == 0 else rank_tag(tag, rank)
                boot, fds = self._replica_bootstrap(ident, serves_http and rank == 0)
                procs.append(self._popen("shoal.runtime.replica", pickle.dumps(boot), pass_fds=fds, env=env))
        except OSError as e:
            for p in procs:
                self._kill(p)
            for placement in placements:
                self.ledger.release(placement.tag)
            dep.failures += 1
            dep.message = f"could not start the gang's rank processes: {e}"
            return
        rec = ReplicaRecord(tag, app, dep.spec.name, dep.version, socket_path, procs[0],
                            started_at=time.monotonic(), serves_http=serves_http, gpus=placements[0].gpus)
        for rank in range(1, n):
            member = RankRecord(rank_tag(tag, rank), tag, rank,
                                os.path.join(self.settings.run_dir, f"r-{uid}-{rank}.sock"), procs[rank])
            rec.ranks.append(member)
            self.ranks[member.tag] = member
        self.replicas[tag] = rec
        if self.store is not None:
            self.store.save_process(tag, "replica", procs[0].pid, app=app, deployment=dep.spec.name,
                                    version=dep.version, socket_path=socket_path, serves_http=serves_http,
                                    gpus=list(placements[0].gpus), gang=True)
            for member in rec.ranks:
                self.store.save_process(member.tag, "rank", member.proc.pid, parent=tag)

    def _gang_member_gone(self, member: RankRecord, why: str) -> None:
        """A rank of a gang died: the whole gang replica goes (and is replaced)."""
        parent = self.replicas.get(member.parent)
        if parent is None:
            return
        dep = self._dep_record(parent.app, parent.deployment)
        if dep is not None and parent.state != ReplicaState.STOPPING:
            dep.message = f"rank {member.rank} of replica {parent.tag} {why}; replacing the whole gang"
            if parent.state == ReplicaState.STARTING and parent.version == dep.version:
                parent.failed_reported = True
                dep.failures += 1
        self._kill(parent.proc)
        self._replica_gone(parent, f"lost rank {member.rank} ({why})")

    def _stop_replica(self, rec: ReplicaRecord, reason: str, now: float) -> None:
        if rec.state == ReplicaState.STOPPING:
            return
        for member in rec.ranks:
            self._stop_process(member.proc, member.conn)
        dep = self._dep_record(rec.app, rec.deployment)
        grace = dep.spec.config.graceful_shutdown_timeout_s if dep else 20.0
        rec.state = ReplicaState.STOPPING
        rec.stop_deadline = now + grace + 5.0
        logger.debug("stopping replica %s: %s", rec.tag, reason)
        self._stop_process(rec.proc, rec.conn)

    def _update_app_status(self, app: AppRecord) -> bool:
        before = (app.status, app.message)
        if app.deleting:
            if not any(r.app == app.spec.name for r in self.replicas.values()):
                del self.apps[app.spec.name]
                if self.store is not None:
                    self.store.delete_app(app.spec.name)
                for name in app.deployments:
                    self._publish_gone(app.spec.name, name, f"application {app.spec.name!r} was deleted")
                return True
            return False
        for dep in app.deployments.values():
            dep.status = self._deployment_status(app.spec.name, dep)
        statuses = {d.status for d in app.deployments.values()}
        problems = "; ".join(f"deployment {d.spec.name!r}: {d.message}" for d in app.deployments.values()
                             if d.message and d.status != DeploymentStatus.HEALTHY)
        if DeploymentStatus.DEPLOY_FAILED in statuses:
            app.status = ApplicationStatus.DEPLOY_FAILED
        elif DeploymentStatus.UNHEALTHY in statuses:
            app.status = ApplicationStatus.UNHEALTHY
        elif DeploymentStatus.UPDATING in statuses and app.status != ApplicationStatus.RUNNING:
            app.status = ApplicationStatus.DEPLOYING  # a (re)deploy is rolling out
        else:
            # Autoscaling, or replacing a crashed replica, keeps a running app RUNNING.
            app.status = ApplicationStatus.RUNNING
        app.message = problems
        return (app.status, app.message) != before

    def _deployment_status(self, app: str, dep: DeploymentRecord) -> DeploymentStatus:
        mine = [r for r in self.replicas.values() if r.app == app and r.deployment == dep.spec.name]
        current = [r for r in mine if r.version == dep.version and r.state != ReplicaState.STOPPING]
        running = sum(1 for r in current if r.state == ReplicaState.RUNNING)
        others = sum(1 for r in mine if r.version != dep.version)
        if not dep.ready_once and dep.failures >= MAX_START_FAILURES:
            return DeploymentStatus.DEPLOY_FAILED
        if running == dep.target == len(current) and others == 0:
            dep.scaling = ""
            if dep.autoscaler is None or not dep.autoscaler.last_error:
                dep.message = ""
            return DeploymentStatus.HEALTHY
        if dep.scaling and dep.ready_once:
            return DeploymentStatus.UPSCALING if dep.scaling == "UPSCALING" else DeploymentStatus.DOWNSCALING
        if dep.ready_once and running == 0 and dep.target > 0 and others == 0:
            return DeploymentStatus.UNHEALTHY
        return DeploymentStatus.UPDATING

    # ---- membership and routes --------------------------------------------------------------
    def _membership(self, app: str, name: str, dep: DeploymentRecord) -> Membership:
        cfg = dep.spec.config
        running = tuple(sorted(
            (ReplicaAddress(r.tag, r.socket_path, cfg.max_ongoing_requests, r.model_ids)
             for r in self.replicas.values()
             if r.app == app and r.deployment == name and r.state == ReplicaState.RUNNING),
            key=lambda a: a.tag,
        ))
        auto = cfg.resolved_autoscaling()
        return Membership(app, name, next(self._versions), running, cfg.max_queued_requests,
                          metrics_interval_s=auto.metrics_interval_s if auto else 0.0)

    def _settled(self, app: str, name: str) -> bool:
        """False while adopted replicas of the deployment have not reconnected yet: until then
        routers keep the membership the previous controller gave them."""
        return not any(r.adopt_deadline and r.app == app and r.deployment == name for r in self.replicas.values())

    def _publish(self, app: str, name: str, dep: DeploymentRecord) -> None:
        if not self._settled(app, name):
            return
        m = self._membership(app, name, dep)
        key = (m.replicas, m.max_queued_requests, m.metrics_interval_s)
        if key == dep.published:
            return
        dep.published = key
        self._send_membership(m)
        if dep.spec.ingress:
            self._publish_routes()

    def _publish_gone(self, app: str, name: str, why: str) -> None:
        if self._dep_record(app, name) is not None:
            return  # redeployed meanwhile
        self._send_membership(Membership(app, name, next(self._versions), (), -1, gone=why))

    def _send_membership(self, m: Membership) -> None:
        for conn in list(self.subscribers.get((m.app, m.deployment), ())):
            try:
                conn.send(m)
            except ConnectionError:
                pass

    def _routes(self) -> Routes:
        routed = [a for a in self.apps.values() if a.spec.route_prefix is not None and not a.deleting]
        table = {a.spec.route_prefix: (a.spec.name, a.spec.ingress) for a in routed if a.spec.route_prefix}
        # The proxy steps aside only while every routed app has an ingress replica serving
        # HTTP itself; otherwise it accepts too (to hold requests for a cold app, answer 404s).
        served = {(r.app, r.deployment) for r in self.replicas.values()
                  if r.serves_http and r.state == ReplicaState.RUNNING}
        direct = bool(routed) and all((a.spec.name, a.spec.ingress) in served for a in routed)
        split = {}
        for name, weight in self.canaries.items():
            stable, canary = self.apps.get(name), self.apps.get(name + CANARY_SUFFIX)
            if stable is not None and canary is not None and stable.spec.route_prefix and not canary.deleting:
                split[stable.spec.route_prefix] = (canary.spec.name, canary.spec.ingress, weight)
        return Routes(table, proxy_accepts=not direct, split=split)

    def _publish_routes(self) -> None:
        routes = self._routes()
        for conn in list(self.route_subscribers):
            try:
                conn.send(routes)
            except ConnectionError:
                pass

    # ---- health -----------------------------------------------------------------------------
    def _health_checks(self, now: float) -> None:
        for rec in self.replicas.values():
            if rec.state != ReplicaState.RUNNING or rec.conn is None or rec.health_busy or now < rec.next_health:
                continue
            dep = self._dep_record(rec.app, rec.deployment)
            if dep is None:
                continue
            rec.health_busy = True
            asyncio.get_running_loop().create_task(self._check_one(rec, dep))

    async def _check_one(self, rec: ReplicaRecord, dep: DeploymentRecord) -> None:
        cfg = dep.spec.config
        try:
            await self._replica_call(rec, "health", cfg.health_check_timeout_s)
            rec.health_failures = 0
        except Exception as e:
            rec.health_failures += 1
            logger.warning("health check %d/%d of replica %s failed: %s", rec.health_failures,
                           MAX_HEALTH_FAILURES, rec.tag, e)
            if rec.health_failures >= MAX_HEALTH_FAILURES and rec.state == ReplicaState.RUNNING:
                dep.message = f"replica {rec.tag} failed {MAX_HEALTH_FAILURES} health checks ({e}); replacing it"
                # Out of the membership at once, then a graceful stop: requests it is serving
                # may still finish (it is killed if it does not stop in time).
                self._stop_replica(rec, "unhealthy", time.monotonic())
                self._publish(rec.app, rec.deployment, dep)
                self._kick.set()
        finally:
            rec.health_busy = False
            rec.next_health = time.monotonic() + cfg.health_check_period_s

    async def _replica_call(self, rec: ReplicaRecord, op: str, timeout: float, **args: Any) -> Any:
        if rec.conn is None or rec.conn.closed:
            raise ConnectionError(f"replica {rec.tag} is not connected")
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

    def _watch_proxy(self) -> None:
        proxy = self.proxy
        if proxy is None or self.stopping or proxy.proc.poll() is None or proxy.restarts >= MAX_PROXY_RESTARTS:
            return
        proxy.ready = False
        if proxy.restarts + 1 >= MAX_PROXY_RESTARTS:
            logger.error("the HTTP proxy exited with code %s %d times; giving up", proxy.proc.returncode,
                         MAX_PROXY_RESTARTS)
            proxy.restarts += 1
            return
        logger.error("the HTTP proxy exited with code %s; restarting it", proxy.proc.returncode)
        self.metrics.process_exited(proxy.proc.pid)
        self._spawn_proxy()

    # ---- connections ------------------------------------------------------------------------
    def _on_connect(self, proto: FramedProtocol) -> None:
        proto.on_message = self._on_message
        proto.on_close = self._on_close

    def _on_close(self, proto: FramedProtocol, exc: BaseException | None) -> None:
        self.route_subscribers.discard(proto)
        for subs in self.subscribers.values():
            subs.discard(proto)
        for stats in self.handle_stats.values():
            stats.pop(id(proto), None)
        peer = proto.peer
        if isinstance(peer, Hello) and peer.role == "replica":
            rec = self.replicas.get(peer.ident)
            if rec is not None and rec.conn is proto:
                # The process may still be exiting; _reap() notices the exit code.
                rec.conn = None
                self._kick.set()

    def _on_message(self, proto: FramedProtocol, msg: Any) -> None:
        if isinstance(msg, Hello):
            self._on_hello(proto, msg)
        elif isinstance(msg, Subscribe):
            key = (msg.app, msg.deployment)
            self.subscribers.setdefault(key, set()).add(proto)
            dep = self._dep_record(msg.app, msg.deployment)
            if dep is None:
                proto.send(Membership(msg.app, msg.deployment, next(self._versions), (), -1,
                                      gone=f"deployment {msg.deployment!r} of application {msg.app!r} does not exist"))
            elif self._settled(msg.app, msg.deployment):
                proto.send(self._membership(msg.app, msg.deployment, dep))
        elif isinstance(msg, SubscribeRoutes):
            self.route_subscribers.add(proto)
            proto.send(self._routes())
        elif isinstance(msg, ReplicaStats):
            stats_rec = self.replicas.get(msg.tag)
            if stats_rec is not None:
                stats_rec.ongoing, stats_rec.stats_at = msg.ongoing, time.monotonic()
                if msg.latency_hist:
                    stats_rec.requests, stats_rec.errors = msg.requests, msg.errors
                    stats_rec.latency_hist = msg.latency_hist
        elif isinstance(msg, HandleStats):
            key = (msg.app, msg.deployment)
            self.handle_stats.setdefault(key, {})[id(proto)] = (time.monotonic(), msg.queued, msg.in_flight)
            if msg.queued:
                self._kick.set()  # maybe a scale from zero
        elif isinstance(msg, ReplicaReady):
            self._on_ready(msg)
        elif isinstance(msg, ReplicaFailed):
            self._on_failed(msg)
        elif isinstance(msg, ReplicaModels):
            rec = self.replicas.get(msg.tag)
            dep = self._dep_record(rec.app, rec.deployment) if rec is not None else None
            if rec is not None and dep is not None:
                rec.model_ids = msg.model_ids
                self._publish(rec.app, rec.deployment, dep)
        elif isinstance(msg, ProxyReady):
            if self.proxy is not None and self.proxy.ident == msg.ident:
                self.proxy.ready = True
        elif isinstance(msg, Reply):
            fut = self._calls.get(msg.id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, Call):
            asyncio.get_running_loop().create_task(self._admin(proto, msg))

    def _on_hello(self, proto: FramedProtocol, hello: Hello) -> None:
        if hello.role == "replica" and hello.ident in self.spare_alias:
            hello = Hello("replica", self.spare_alias.pop(hello.ident))
        proto.peer = hello
        if hello.role == "replica" and hello.ident in self.spares:
            self.spares[hello.ident].conn = proto  # booted; waits for a deployment
            return
        if hello.role == "replica" and hello.ident in self.ranks:
            self._init_rank(proto, self.ranks[hello.ident])
            return
        if hello.role == "replica":
            rec = self.replicas.get(hello.ident)
            dep = self._dep_record(rec.app, rec.deployment) if rec is not None else None
            if rec is None or dep is None or rec.state == ReplicaState.STOPPING:
                proto.send(Stop("not wanted"))
                return
            rec.conn = proto
            if hello.resumed:
                return  # an adopted replica, already serving: its ReplicaReady follows
            spec = dep.spec
            app_rec = self.apps.get(rec.app)
            sys_path, cwd = (app_rec.spec.sys_path, app_rec.spec.cwd) if app_rec is not None else ((), "")
            proto.send(ReplicaInit(rec.app, rec.deployment, rec.tag, spec.serialized(), spec.config,
                                   spec.is_function, rec.socket_path, rec.serves_http, sys_path, cwd,
                                   rank=0, world_size=spec.config.world_size,
                                   peers=tuple(m.socket_path for m in rec.ranks)))
        elif hello.role == "proxy":
            if self.proxy is not None and self.proxy.ident == hello.ident:
                self.proxy.conn = proto
            elif hello.resumed:
                proto.send(Stop("not wanted"))
                return
            self.route_subscribers.add(proto)
            proto.send(self._routes())

    def _init_rank(self, proto: FramedProtocol, member: RankRecord) -> None:
        parent = self.replicas.get(member.parent)
        dep = self._dep_record(parent.app, parent.deployment) if parent is not None else None
        if parent is None or dep is None or parent.state == ReplicaState.STOPPING:
            proto.send(Stop("not wanted"))
            return
        member.conn = proto
        spec = dep.spec
        app_rec = self.apps.get(parent.app)
        sys_path, cwd = (app_rec.spec.sys_path, app_rec.spec.cwd) if app_rec is not None else ((), "")
        proto.send(ReplicaInit(parent.app, parent.deployment, member.tag, spec.serialized(), spec.config,
                               spec.is_function, member.socket_path, False, sys_path, cwd,
                               rank=member.rank, world_size=spec.config.world_size))

    def _refill_spares(self) -> None:
        # Only when nothing is starting: a spare booting now would compete for the CPU with
        # the replicas someone is waiting for.
        if any(r.state == ReplicaState.STARTING for r in self.replicas.values()):
            return
        while len(self.spares) < self.settings.spare_replicas and not self.stopping:
            before = len(self.spares)
            self._spawn_spare()
            if len(self.spares) == before:
                return

    def _on_ready(self, msg: ReplicaReady) -> None:
        member = self.ranks.get(msg.tag)
        if member is not None:
            member.ready = True
            parent = self.replicas.get(member.parent)
            if parent is not None and parent.rank0_ready:
                self._on_ready(ReplicaReady(parent.tag, parent.proc.pid))
            return
        rec = self.replicas.get(msg.tag)
        if rec is None:
            return
        if rec.state == ReplicaState.STOPPING:
            return
        rec.rank0_ready = True
        if not all(m.ready for m in rec.ranks):
            return  # a gang is ready when every rank is
        rec.state = ReplicaState.RUNNING
        rec.adopt_deadline = 0.0
        dep = self._dep_record(rec.app, rec.deployment)
        if dep is not None:
            cfg = dep.spec.config
            rec.next_health = time.monotonic() + cfg.health_check_period_s
            if rec.version == dep.version:
                dep.ready_once = True
                dep.failures = 0
            self._publish(rec.app, rec.deployment, dep)
        self._kick.set()

    def _on_failed(self, msg: ReplicaFailed) -> None:
        member = self.ranks.get(msg.tag)
        if member is not None:
            parent = self.replicas.get(member.parent)
            dep = self._dep_record(parent.app, parent.deployment) if parent is not None else None
            if parent is not None and dep is not None and parent.version == dep.version:
                parent.failed_reported = True
                dep.failures += 1
                dep.message = f"rank {member.rank} constructor failed: {msg.error.strip()}"
            logger.error("rank %d of replica %s failed to start", member.rank, member.parent)
            self._kick.set()
            return
        rec = self.replicas.get(msg.tag)
        if rec is None:
            return
        rec.failed_reported = True
        dep = self._dep_record(rec.app, rec.deployment)
        if dep is not None and rec.version == dep.version:
            dep.failures += 1
            dep.message = f"replica constructor failed: {msg.error.strip()}"
        logger.error("replica %s of %s/%s failed to start", rec.tag, rec.app, rec.deployment)
        self._kick.set()

    # ---- admin ------------------------------------------------------------------------------
    async def _admin(self, proto: FramedProtocol, call: Call) -> None:
        try:
            if call.op == "status":
                value: Any = self.status()
            elif call.op == "delete":
                await self.delete(call.args["name"], wait=bool(call.args.get("wait", True)))
                value = None
            elif call.op == "shutdown":
                self.shutdown_requested.set()
                value = None
            elif call.op == "app_info":
                value = {n: (a.spec.ingress, a.spec.route_prefix) for n, a in self.apps.items()
                         if not a.deleting and CANARY_SUFFIX not in n}
            elif call.op == "apply":
                value = await self.apply(list(call.args["specs"]), call.args.get("canary"))
            elif call.op == "promote":
                await self.promote(str(call.args["name"]))
                value = None
            elif call.op == "rollback":
                await self.rollback(str(call.args["name"]))
                value = None
            elif call.op == "metrics":  # the controller's part of a local /metrics page
                value = self.metrics.render(self)
            elif call.op == "app_graphs":  # the dashboard's call graphs and deployment options
                from shoal.observability.dashboard import describe_apps

                value = describe_apps(a.spec for a in self.apps.values() if not a.deleting)
            else:
                raise ValueError(f"unknown operation {call.op!r}")
            reply = Reply(call.id, True, value)
        except Exception as e:
            reply = Reply(call.id, False, error=str(e))
        try:
            proto.send(reply)
        except ConnectionError:
            pass

    def status(self) -> ServeStatus:
        http = self.settings.http
        out = ServeStatus(http_address=f"{http.scheme}://{http.host}:{self.http_port}" if self.proxy else "",
                          resources=self.ledger.summary())
        if self.proxy is not None:
            alive = self.proxy.proc.poll() is None
            out.proxies[self.proxy.ident] = (ProxyStatus.HEALTHY if self.proxy.ready and alive
                                             else ProxyStatus.STARTING if alive else ProxyStatus.UNHEALTHY)
        for name, app in self.apps.items():
            if CANARY_SUFFIX in name:
                continue
            overview = self._app_overview(name, app)
            canary = self.apps.get(name + CANARY_SUFFIX)
            if canary is not None and not canary.deleting:
                c = self._app_overview(canary.spec.name, canary)
                overview.canary = {"weight": self.canaries.get(name, 0.0), "status": c.status.value,
                                   "message": c.message, "version": c.version, "metrics": c.metrics,
                                   "deployments": {k: {"status": d.status.value, "replica_states": d.replica_states,
                                                       "message": d.message} for k, d in c.deployments.items()}}
            out.applications[name] = overview
        return out

    def _app_overview(self, key: str, app: AppRecord) -> ApplicationStatusOverview:
        deps = {}
        for dname, dep in app.deployments.items():
            counts: dict[str, int] = {}
            totals = RequestTotals(dep.finished.requests, dep.finished.errors, list(dep.finished.hist))
            for r in self.replicas.values():
                if r.app == key and r.deployment == dname:
                    counts[r.state.value] = counts.get(r.state.value, 0) + 1
                    if r.requests and r.version == dep.version:
                        totals.add(r.requests, r.errors, r.latency_hist)
            deps[dname] = DeploymentStatusOverview(
                dep.status, counts, dep.message, version=dep.version, target_replicas=dep.target,
                metrics=summarize_requests(totals.requests, totals.errors, totals.hist))
        ingress = deps.get(app.spec.ingress)
        return ApplicationStatusOverview(
            app.status, app.message, app.deployed_at, deps, app.spec.route_prefix, app.spec.ingress,
            version=fingerprint(app.spec), metrics=dict(ingress.metrics) if ingress is not None else {})
