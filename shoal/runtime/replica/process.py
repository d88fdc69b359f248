"""The local replica process: a :class:`ReplicaCore` behind a Unix socket, run by the controller.

Started by the controller as ``python -m shoal.runtime.replica`` with a pickled
:class:`Bootstrap` on stdin (from its trusted parent, never from the network). It connects
back to the controller (its control channel; the controller also pushes the membership of
the deployments it calls), receives its deployment, constructs it, listens (an ingress replica
also on the shared HTTP and gRPC ports: :mod:`shoal.runtime.replica.grpc_ingress`), and reports
ready; then it reports its load, answers health checks and ``reconfigure``, and drains on stop.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pickle
import signal
import sys
import traceback
from typing import Any

import cloudpickle

from shoal.context import ReplicaContext, set_process_replica_context
from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing
from shoal.runtime import backend
from shoal.runtime.callable import UserCallable
from shoal.runtime.client import ControllerClient
from shoal.runtime.lifeline import ORPHAN_TIMEOUT_S, die_with_parent
from shoal.runtime.replica.autoscaling_stats import StatsCaller
from shoal.runtime.replica.bootstrap import Bootstrap
from shoal.runtime.replica.core import ReplicaCore
from shoal.runtime.replica.logconfig import apply_logging_config, setup_process_logging
from shoal.runtime.replica.ports import UnixTransport
from shoal.runtime.replica.routing_stats import RoutingStatsReporter, routing_stats_method
from shoal.runtime.replica.tracebacks import failure_message
from shoal.runtime.rundir import RunDir, recheck_or_exit
from shoal.runtime.wire import (
    Call,
    ReplicaFailed,
    ReplicaInit,
    ReplicaModels,
    ReplicaReady,
    ReplicaStats,
    Reply,
    Role,
    Routes,
    Stop,
    SubscribeRoutes,
)
from shoal.serving import multiplex

__all__ = ["Bootstrap", "ReplicaProcess", "main"]

logger = logging.getLogger("shoal.replica")

# How long a replica that failed to start waits for the controller's Stop before it exits.
FAILED_REPORT_WAIT_S = 10.0
# How long an ingress replica that serves gRPC waits for the route table before it listens.
ROUTES_WAIT_S = 10.0


class ReplicaProcess:
    """Composes a :class:`ReplicaCore` with the controller: the control channel, and the
    membership the controller pushes (see the module docstring)."""

    def __init__(self, boot: Bootstrap) -> None:
        self.boot = boot
        self.loop = asyncio.get_running_loop()
        # Replicas of a detached instance outlive a controller crash and wait for the next one;
        # spares (no deployment yet) just exit.
        reconnect = 0.0 if boot.die_with_parent or self.spare else ORPHAN_TIMEOUT_S
        self.client = ControllerClient(boot.controller_path, boot.secret, Role.REPLICA, boot.process_id, self.loop,
                                       on_control=self._on_control, reconnect_s=reconnect,
                                       on_reconnect=self._on_reconnect)
        self.core = ReplicaCore(channel=self, routers=self.client, replica_id=boot.process_id)
        self.ready_replica_id = ""
        self.init_msg: asyncio.Future[ReplicaInit] = self.loop.create_future()
        self.stop_requested = asyncio.Event()
        self._routing_stats: RoutingStatsReporter | None = None
        self.grpc: Any = None  # shoal.runtime.grpc_front.GRPCFront: gRPC on the shared port
        self.routes_seen = asyncio.Event()
        self.last_routes: Routes | None = None

    @property
    def fd_socket(self) -> str:
        """Where this replica hands the HTTP listening socket over (a detached instance)."""
        return RunDir(os.path.dirname(self.boot.controller_path)).replica_fd_socket(os.getpid())

    @property
    def spare(self) -> bool:
        """A process started ahead of need, given its deployment later."""
        return self.boot.process_id.startswith("spare-")

    async def run(self) -> int:
        """Serve until stopped (or the controller is gone for good); the exit code."""
        if self.spare:
            # Do now the imports every replica needs, while nobody is waiting for us.
            modules = ["shoal.serve"] + (["uvicorn", "shoal.runtime.proxy"] if self.boot.http_fd >= 0 else [])
            for name in modules:
                importlib.import_module(name)
        await self.client.connect()
        backend.set_current(self.client)
        if self.spare and not await self._given_deployment():
            return 0  # stopped (or the controller went away) before being given a deployment
        init = await asyncio.wait_for(self.init_msg, 60)
        ctx = self._become(init)
        if not await self._start(init, ctx):
            return 1
        auto = init.config.resolved_autoscaling()
        self.loop.create_task(self._report_load(init.replica_id, auto.metrics_interval_s if auto is not None else 0.0))
        self._start_routing_stats(init)
        self.ready_replica_id = init.replica_id
        self.client.resumed = True
        self._send(ReplicaReady(init.replica_id, os.getpid()))
        closed = asyncio.ensure_future(self.client.closed.wait())
        stop = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait({closed, stop}, return_when=asyncio.FIRST_COMPLETED)
        try:
            os.unlink(self.fd_socket)  # stop offering the listening socket: this replica leaves
        except OSError:
            pass
        # gRPC: no new calls from now on (channels reconnect to the proxy or other replicas);
        # running ones get the graceful shutdown timeout, then are cancelled.
        grace = self.core.graceful_timeout
        grpc_stop = asyncio.ensure_future(self.grpc.stop(grace)) if self.grpc is not None else None
        deadline = self.loop.time() + grace + 1.0
        await self.core.drain()
        if grpc_stop is not None:  # calls forwarded to other apps hold no slot here: wait for them too
            try:
                await asyncio.wait_for(grpc_stop, max(0.1, deadline - self.loop.time()))
            except Exception as e:
                logger.warning("the gRPC server did not stop in time: %r", e)
        return 0

    async def _given_deployment(self) -> bool:
        """A spare waits for its deployment; False when stopped first."""
        waits: set[asyncio.Future[Any]] = {self.init_msg, asyncio.ensure_future(self.stop_requested.wait()),
                                           asyncio.ensure_future(self.client.closed.wait())}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not self.init_msg.done():
            return False
        setup_process_logging(self.init_msg.result().replica_id, self.boot.log_level)
        return True

    def _become(self, init: ReplicaInit) -> ReplicaContext:
        """Take on the deployment's identity: replica id, code location, context, logging, limits."""
        # A spare given a deployment is that replica from now on, also to a restarted controller.
        self.client.process_id = init.replica_id
        self.core.accounts.replica_id = init.replica_id
        if not self.boot.die_with_parent:
            self.client.reconnect_s = ORPHAN_TIMEOUT_S
        if init.sys_path:
            sys.path[:0] = [p for p in init.sys_path if p not in sys.path]
        if init.cwd:
            try:
                os.chdir(init.cwd)
            except OSError as e:
                logger.warning("cannot change to the app's directory %s: %s", init.cwd, e)
        cfg = init.config
        # A canary's app key is "<app>#canary": user code sees the app's name, and the handles
        # it makes reach the canary's own deployments.
        visible_app = init.app.split("#", 1)[0]
        if visible_app != init.app:
            self.client.app_alias[visible_app] = init.app
        self.core.configure(cfg, (init.app, init.deployment))
        if init.replica_rank >= 0 and init.world_size <= 1:  # Ray's replica ranks (not a gang)
            ctx = ReplicaContext(visible_app, init.deployment, init.replica_id, rank=init.replica_rank,
                                 world_size=max(1, init.num_replicas))
        else:
            ctx = ReplicaContext(visible_app, init.deployment, init.replica_id, rank=init.rank,
                                 world_size=init.world_size)
        set_process_replica_context(ctx)
        apply_logging_config(cfg.logging_config, ctx, log_dir=self.boot.log_dir, app_key=init.app,
                             shoal_level=self.boot.log_level)
        multiplex.models_changed_hook = self.core.models_changed
        return ctx

    async def _start(self, init: ReplicaInit, ctx: ReplicaContext) -> bool:
        """Construct the deployment and start serving; False (the controller told) if that failed."""
        cfg = init.config
        try:
            target, args, kwargs = cloudpickle.loads(init.blob)
            user = UserCallable(target, args, kwargs, is_function=init.is_function, context=ctx)
            self.core.user = user
            await user.initialize(cfg.user_config)
            await self.core.listen(UnixTransport(init.socket_path, self.boot.secret))
        except BaseException as e:  # the constructor's failure is the deployment's status message
            message = failure_message(e)
            logger.error("replica %s of %s/%s failed to start: %s", init.replica_id, init.app, init.deployment,
                         message)
            await self._failed(init.replica_id, message)
            return False
        set_process_replica_context(ReplicaContext(ctx.app_name, init.deployment, init.replica_id, user.instance,
                                                   rank=init.rank, world_size=init.world_size))
        if init.peers:
            from shoal.runtime.gang import GangPeers

            self.core.gang = GangPeers(init.peers, self.boot.secret, cfg.max_ongoing_requests)
        _metrics.PROCESS.setup(init.replica_id, app=init.app, deployment=init.deployment, server=self.core,
                               routers=self.client.routers, page_source=self.client)
        _metrics.PROCESS.start_flusher(self.loop)
        if init.serves_http and self.boot.http_fd >= 0:
            try:
                self.client.send(SubscribeRoutes())
                await self.core.serve_http(self.boot.http, [self.boot.http_fd], share_port=True)
                if not self.boot.die_with_parent:
                    # A detached instance: should the controller and the proxy both die, the
                    # next controller takes the port from here (the proxy's copy is gone).
                    from shoal.runtime.proxy import serve_listening_fd

                    serve_listening_fd(self.fd_socket, self.boot.http_fd)
            except Exception as e:
                logger.error("replica %s could not serve HTTP:\n%s", init.replica_id, traceback.format_exc())
                await self._failed(init.replica_id, f"could not serve HTTP: {e}")
                return False
        if init.grpc is not None:
            await self._serve_grpc(init)
        return True

    async def _serve_grpc(self, init: ReplicaInit) -> None:
        """Serve gRPC on the shared port (:mod:`shoal.runtime.replica.grpc_ingress`) once the
        route table came; one that cannot only logs why (the proxy serves the port anyway)."""
        from shoal.runtime.replica.grpc_ingress import start_grpc

        if self.core.proxy_app is None:
            self.client.send(SubscribeRoutes())
        try:
            await asyncio.wait_for(self.routes_seen.wait(), ROUTES_WAIT_S)
        except TimeoutError:
            logger.warning("replica %s: no route table came within %g s; not serving gRPC", init.replica_id,
                           ROUTES_WAIT_S)
            return
        try:
            options, front = init.grpc
            self.grpc = await start_grpc(self.core, self.client, options, front, self.last_routes)
        except Exception as e:
            logger.warning("replica %s could not serve gRPC (the proxy still does): %s", init.replica_id, e)

    async def _failed(self, replica_id: str, why: str) -> None:
        """Report a failed start, then wait (bounded) for the controller to tell this replica to
        stop: exiting first would let the controller see the exit before the report, and
        show "exited with code 1" instead of the error."""
        self.client.send(ReplicaFailed(replica_id, why))
        stop = asyncio.ensure_future(self.stop_requested.wait())
        closed = asyncio.ensure_future(self.client.closed.wait())
        try:
            await asyncio.wait({stop, closed}, timeout=FAILED_REPORT_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            closed.cancel()

    async def _report_load(self, replica_id: str, interval: float) -> None:
        """Report load every ``interval`` (autoscaling deployments), and finished-request
        counters when they changed, at most once a second."""
        last: tuple[int, int] = (0, 0)
        next_counters = 0.0
        user = self.core.user
        stats = StatsCaller(user, self.loop.time) if interval > 0 and user is not None \
            and user.records_autoscaling_stats else None
        while not self.core.draining:
            custom: tuple[tuple[str, float], ...] = ()
            if stats is not None:
                custom = await stats.call()
            now = self.loop.time()
            c = self.core.counters
            counters_due = now >= next_counters and (c.requests, c.errors) != last
            if interval > 0 or counters_due:
                self._send(ReplicaStats(replica_id, self.core.slots.load, c.requests, c.errors, tuple(c.hist),
                                        custom))
                last = (c.requests, c.errors)
                next_counters = now + 1.0
            await asyncio.sleep(interval if interval > 0 else 1.0)

    def _start_routing_stats(self, init: ReplicaInit) -> None:
        """Deployments with a custom request router and a record_routing_stats() method report
        its answer (:mod:`shoal.runtime.replica.routing_stats`); others pay nothing."""
        rc = init.config.custom_router() if init.rank == 0 else None  # a gang reports from rank 0
        user = self.core.user
        fn = routing_stats_method(user) if rc is not None and user is not None else None
        if rc is None or user is None or fn is None:
            return
        self._routing_stats = RoutingStatsReporter(init.replica_id, user, fn, rc, self._send)
        self.loop.create_task(self._routing_stats.run(lambda: self.core.draining))

    # -- the control channel
    def models_changed(self, ids: tuple[str, ...]) -> None:
        self._send(ReplicaModels(self.core.accounts.replica_id, ids))

    def _on_reconnect(self) -> None:
        """A restarted controller: say again what this replica is and does."""
        if self._routing_stats is not None:
            self._routing_stats.resend()
        if self.ready_replica_id:
            self._send(ReplicaReady(self.ready_replica_id, os.getpid()))
            if self.core.model_ids:
                self._send(ReplicaModels(self.ready_replica_id, self.core.model_ids))
        if self.core.proxy_app is not None or self.grpc is not None:
            self._send(SubscribeRoutes())

    def _send(self, msg: Any) -> None:
        try:
            self.client.send(msg)
        except ConnectionError:
            pass

    def _on_control(self, msg: Any) -> None:
        if isinstance(msg, ReplicaInit):
            if not self.init_msg.done():
                self.init_msg.set_result(msg)
        elif isinstance(msg, Call):
            self.loop.create_task(self._control_call(msg))
        elif isinstance(msg, Stop):
            self.stop_requested.set()
        elif isinstance(msg, Routes):
            self.last_routes = msg
            self.routes_seen.set()
            if self.core.proxy_app is not None:
                self.core.proxy_app.set_routes(msg)
            if self.grpc is not None:
                self.grpc.set_routes(msg)

    async def _control_call(self, call: Call) -> None:
        try:
            reply = Reply(call.id, True, await self.core.control_op(call.op, call.args))
        except Exception as e:
            reply = Reply(call.id, False, error=f"{type(e).__name__}: {e}")
        self._send(reply)


def main() -> None:
    from shoal.context import _mark_worker_process

    _mark_worker_process("replica")
    boot: Bootstrap = pickle.loads(sys.stdin.buffer.read())
    if boot.die_with_parent:
        die_with_parent(boot.parent_pid)
    sys.path[:] = boot.sys_path
    try:
        os.chdir(boot.cwd)
    except OSError:
        pass
    setup_process_logging(boot.process_id, boot.log_level)
    recheck_or_exit(boot.controller_path, f"replica {boot.process_id}")
    _tracing.setup_from_env("shoal-replica")
    # SIGTERM (from the controller or Kubernetes) means: drain, then exit.
    loop = backend.new_event_loop()
    asyncio.set_event_loop(loop)

    async def runner() -> int:
        process = ReplicaProcess(boot)
        loop.add_signal_handler(signal.SIGTERM, process.stop_requested.set)
        loop.add_signal_handler(signal.SIGINT, process.stop_requested.set)
        return await process.run()

    try:
        code = loop.run_until_complete(runner())
    except (TimeoutError, ConnectionError, OSError) as e:
        logger.error("replica %s could not reach the controller: %s", boot.process_id, e)
        code = 3
    _metrics.process_exit()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
