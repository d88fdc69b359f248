"""Placing and starting replicas: the resources ledger, spare processes (booted and waiting
for a deployment), and gangs (every rank placed, or none)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable

from shoal.observability.controller_metrics import ControllerMetrics
from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.records import (
    MAX_START_FAILURES,
    SPARE_STOP_S,
    DeploymentRecord,
    ReplicaRecord,
    Settings,
    SpareRecord,
)
from shoal.runtime.controller.registry import Registry
from shoal.runtime.controller.supervisor import Supervisor
from shoal.runtime.gang import RankRecord, free_port, place_gang, rank_env, rank_replica_id
from shoal.runtime.processes import Proc
from shoal.runtime.replica.bootstrap import Bootstrap
from shoal.runtime.rundir import RunDir
from shoal.runtime.state import Store
from shoal.runtime.wire import FramedProtocol
from shoal.serving.resources import Ledger, Pending, Placement, Request
from shoal.status import ReplicaState

logger = logging.getLogger("shoal.controller")

REPLICA_MODULE = "shoal.runtime.replica"


def mark_pending(dep: DeploymentRecord, why: Pending) -> None:
    """A replica (or gang) that does not fit stays pending with a status message naming what
    is missing, retried each tick; one that can never fit fails the deploy."""
    dep.message = f"replica pending: {why.reason}"
    dep.resource_blocked = True
    if why.can_never_fit:
        dep.failures = MAX_START_FAILURES
        dep.ready_once = False


class Launcher:
    """Starts replicas (from a spare when one fits), gangs and spares, and records them.

    ``listen_sock`` returns the HTTP socket replicas inherit (None without one); ``adopt_conn``
    is called with a spare's open connection when it becomes a replica.
    """

    def __init__(self, settings: Settings, secret: bytes, ledger: Ledger, supervisor: Supervisor,
                 registry: Registry, store: Store, metrics: ControllerMetrics, clock: Clock,
                 listen_sock: Callable[[], socket.socket | None],
                 adopt_conn: Callable[[FramedProtocol, str], None]) -> None:
        self.settings = settings
        self.secret = secret
        self.run_dir = RunDir(settings.run_dir)
        self.ledger = ledger
        self.supervisor = supervisor
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.listen_sock = listen_sock
        self.adopt_conn = adopt_conn
        self.spares: dict[str, SpareRecord] = {}
        # A spare handed a deployment before it connected: spare's process id -> replica id.
        self.spare_alias: dict[str, str] = {}
        # Spares have no GPU: on a GPU machine they start with CUDA_VISIBLE_DEVICES="".
        self.spare_env = {"CUDA_VISIBLE_DEVICES": ""} if ledger.machine.num_gpus else {}
        self.stopping = False
        # When a replica (or gang) was last started: spares are kept while starts are recent.
        self.last_start = clock.monotonic()

    def bootstrap(self, process_id: str, http: bool) -> tuple[Bootstrap, tuple[int, ...]]:
        """A replica process's bootstrap, and the fds it inherits (the HTTP socket if it serves HTTP)."""
        from shoal.runtime.http.options import FrontOptions

        sock = self.listen_sock()
        fds = (sock.fileno(),) if http and sock is not None else ()
        boot = Bootstrap(self.run_dir.controller_socket, self.secret, process_id, list(sys.path), os.getcwd(),
                         os.getpid(), self.settings.die_with_parent, self.settings.log_level,
                         http_fd=fds[0] if fds else -1, http=FrontOptions.of(self.settings.http) if fds else None,
                         log_dir=self.run_dir.logs_dir)
        return boot, fds

    # -- spares
    def spawn_spare(self) -> None:
        if self.stopping:
            return
        process_id = f"spare-{uuid.uuid4().hex[:8]}"
        # Spares inherit the HTTP socket, so that any of them can become an ingress replica.
        boot, fds = self.bootstrap(process_id, self.settings.http.ingress_serves_http)
        try:
            proc = self.supervisor.spawn(REPLICA_MODULE, boot, pass_fds=fds, env=self.spare_env)
        except OSError as e:
            logger.warning("could not start a spare replica process: %s", e)
            return
        self.spares[process_id] = SpareRecord(process_id, proc)

    def tend_spares(self) -> None:
        """Keep ``spare_replicas`` spares while replicas start; release them once none has
        started for ``spare_idle_s`` (an instance that stays the same size gives the memory
        back; the next replica start brings a spare back)."""
        if self.clock.monotonic() - self.last_start >= self.settings.spare_idle_s:
            self.release_spares()
            return
        # Only when nothing is starting: a spare booting now would compete for the CPU with
        # the replicas someone is waiting for.
        if any(r.state == ReplicaState.STARTING for r in self.registry.replicas.values()):
            return
        while len(self.waiting_spares()) < self.settings.spare_replicas and not self.stopping:
            before = len(self.spares)
            self.spawn_spare()
            if len(self.spares) == before:
                return

    def waiting_spares(self) -> list[SpareRecord]:
        """The spares that can still be given a deployment (not released)."""
        return [s for s in self.spares.values() if s.stop_deadline is None]

    def release_spares(self) -> None:
        waiting = self.waiting_spares()
        if waiting:
            logger.info("releasing %d spare replica process(es): no replica has started for %.0f s",
                        len(waiting), self.settings.spare_idle_s)
        for spare in waiting:
            spare.stop_deadline = self.clock.monotonic() + SPARE_STOP_S
            self.supervisor.stop(spare.proc, spare.conn)

    def reap_spares(self) -> None:
        now = self.clock.monotonic()
        for process_id, spare in list(self.spares.items()):
            if spare.proc.poll() is not None:
                if not self.stopping and spare.stop_deadline is None:
                    logger.warning("spare replica process %s exited with code %s", process_id, spare.proc.returncode)
                del self.spares[process_id]
            elif spare.stop_deadline is not None and now >= spare.stop_deadline:
                logger.warning("released spare replica process %s did not exit; killing it", process_id)
                self.supervisor.kill(spare.proc)
                del self.spares[process_id]

    def _take_spare(self, replica_id: str) -> tuple[Proc, FramedProtocol | None] | None:
        spare = next((s for s in self.waiting_spares() if s.proc.poll() is None), None)
        if spare is None:
            return None
        del self.spares[spare.process_id]
        conn = spare.conn if spare.conn is not None and not spare.conn.closed else None
        if conn is None:
            self.spare_alias[spare.process_id] = replica_id  # it will say hello under its spare name
        return spare.proc, conn

    # -- replicas
    def start_replica(self, app: str, dep: DeploymentRecord, serves_http: bool) -> None:
        """Place and start one replica of ``dep`` (or a gang); a failure is noted on ``dep``."""
        self.last_start = self.clock.monotonic()
        uid = uuid.uuid4().hex[:8]
        replica_id = f"{dep.spec.name}-{uid}"
        socket_path = self.run_dir.replica_socket(uid)
        if dep.spec.config.world_size > 1:
            self.start_gang(app, dep, replica_id, uid, serves_http)
            return
        placement = self.ledger.place(replica_id, Request.of(dep.spec.config.ray_actor_options))
        if isinstance(placement, Pending):
            mark_pending(dep, placement)
            return
        taken = None if placement.gpus else self._take_spare(replica_id)
        conn: FramedProtocol | None = None
        if taken is not None:
            proc, conn = taken
        else:
            boot, fds = self.bootstrap(replica_id, serves_http)
            try:
                proc = self.supervisor.spawn(REPLICA_MODULE, boot, pass_fds=fds,
                                             env=self.ledger.cuda_env(placement))
            except OSError as e:
                self.ledger.release(replica_id)
                dep.failures += 1
                dep.message = f"could not start a replica process: {e}"
                return
        rec = ReplicaRecord(replica_id, app, dep.spec.name, dep.version, socket_path, proc,
                            started_at=self.clock.monotonic(), serves_http=serves_http, gpus=placement.gpus,
                            replica_rank=self.free_rank(app, dep))
        self.registry.add(rec)
        self.metrics.replica_started(app, dep.spec.name)
        self.store.save_process(replica_id, "replica", proc.pid, app=app, deployment=dep.spec.name, version=dep.version,
                                socket_path=socket_path, serves_http=serves_http, gpus=list(placement.gpus),
                                rank=rec.replica_rank)
        if conn is not None:
            self.adopt_conn(conn, replica_id)

    def free_rank(self, app: str, dep: DeploymentRecord) -> int:
        """The lowest rank no live replica of ``dep``'s current version holds (Ray's replica ranks:
        0..N-1; scale-down stops the highest ranks, a replacement takes the freed one)."""
        taken = {r.replica_rank for r in self.registry.replicas.values()
                 if r.app == app and r.deployment == dep.spec.name and r.version == dep.version
                 and r.state != ReplicaState.STOPPING}
        rank = 0
        while rank in taken:
            rank += 1
        return rank

    def _spawn_ranks(self, replica_id: str, placements: list[Placement], port: int, serves_http: bool) -> list[Proc]:
        n = len(placements)
        procs: list[Proc] = []
        try:
            for rank, placement in enumerate(placements):
                env = {**self.ledger.cuda_env(placement), **rank_env(rank, n, port)}
                process_id = replica_id if rank == 0 else rank_replica_id(replica_id, rank)
                boot, fds = self.bootstrap(process_id, serves_http and rank == 0)
                procs.append(self.supervisor.spawn(REPLICA_MODULE, boot, pass_fds=fds, env=env))
        except OSError:
            for p in procs:
                self.supervisor.kill(p)
            raise
        return procs

    def start_gang(self, app: str, dep: DeploymentRecord, replica_id: str, uid: str, serves_http: bool) -> None:
        """Start every rank of one gang replica (all placed, or none and the gang pending)."""
        cfg = dep.spec.config
        n = cfg.world_size
        placements = place_gang(self.ledger, replica_id, [Request.of(cfg.rank_resources(i)) for i in range(n)])
        if isinstance(placements, Pending):
            mark_pending(dep, placements)
            return
        try:
            procs = self._spawn_ranks(replica_id, placements, free_port(), serves_http)
        except OSError as e:
            for placement in placements:
                self.ledger.release(placement.replica_id)
            dep.failures += 1
            dep.message = f"could not start the gang's rank processes: {e}"
            return
        socket_path = self.run_dir.replica_socket(uid)
        rec = ReplicaRecord(replica_id, app, dep.spec.name, dep.version, socket_path, procs[0],
                            started_at=self.clock.monotonic(), serves_http=serves_http, gpus=placements[0].gpus)
        for rank in range(1, n):
            rec.ranks.append(RankRecord(rank_replica_id(replica_id, rank), replica_id, rank,
                                        self.run_dir.replica_socket(uid, rank), procs[rank]))
        self.registry.add(rec)
        self.store.save_process(replica_id, "replica", procs[0].pid, app=app, deployment=dep.spec.name,
                                version=dep.version, socket_path=socket_path, serves_http=serves_http,
                                gpus=list(placements[0].gpus), gang=True)
        for member in rec.ranks:
            self.store.save_process(member.replica_id, "rank", member.proc.pid, parent=replica_id)
