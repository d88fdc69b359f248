"""The replica process: one instance of one deployment, serving requests over a Unix socket.

Started by the controller as ``python -m shoal.runtime.replica`` with a pickled bootstrap
on stdin (from its trusted parent, never from the network). It connects back to the
controller, receives its deployment, constructs it, listens, and reports ready. It enforces
``max_ongoing_requests`` (refusing extra requests so the caller's router goes elsewhere),
answers health checks and ``reconfigure``, and drains on stop.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import os
import pickle
import signal
import sys
import time
import traceback
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from shoal.context import ReplicaContext, RequestContext, _request_ctx, set_process_replica_context
from shoal.exceptions import BackPressureError, RayServeException
from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing
from shoal.observability.logs import Identity, JSONFormatter, RecordContext, log_access, replica_log_path, safe_name
from shoal.observability.logs import setup as setup_log_file
from shoal.runtime import backend
from shoal.runtime.callable import UserCallable
from shoal.runtime.client import ControllerClient
from shoal.runtime.wire import (
    CANCEL,
    END,
    ERR,
    ITEM,
    LATENCY_BUCKETS_MS,
    OK,
    REJECT,
    REQUEST,
    Call,
    FramedProtocol,
    ReplicaFailed,
    ReplicaInit,
    ReplicaModels,
    ReplicaReady,
    ReplicaStats,
    Reply,
    RequestMeta,
    Routes,
    Stop,
    SubscribeRoutes,
    serve_unix,
)
from shoal.serving import multiplex

logger = logging.getLogger("shoal.replica")

# How long a replica of a detached instance keeps serving without a controller, waiting for a
# restarted one to adopt it, before it exits ($SHOAL_ORPHAN_TIMEOUT_S).
ORPHAN_TIMEOUT_S = float(os.environ.get("SHOAL_ORPHAN_TIMEOUT_S", "600"))


@dataclass
class Bootstrap:
    controller_path: str
    secret: bytes
    tag: str
    sys_path: list[str]
    cwd: str
    parent_pid: int
    # Exit with the parent (embedded mode); a detached instance lets replicas be adopted.
    die_with_parent: bool = True
    log_level: str = "INFO"
    # An inherited listening socket: set for ingress replicas that serve HTTP themselves.
    http_fd: int = -1
    http: Any = None  # proxy.FrontOptions
    # The instance's log folder: the replica logs into its own file there (stdout and stderr
    # too). "" = log to stderr (a Kubernetes pod).
    log_dir: str = ""


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM us when the parent goes away; a no-op elsewhere."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


class RequestCounters:
    """Requests this replica finished: count, failures, latency histogram (LATENCY_BUCKETS_MS)."""

    __slots__ = ("errors", "hist", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)

    def record(self, started: float, failed: bool) -> None:
        self.requests += 1
        if failed:
            self.errors += 1
        self.hist[bisect_left(LATENCY_BUCKETS_MS, (time.monotonic() - started) * 1000.0)] += 1


def _error_payload(exc: BaseException) -> tuple[BaseException, str]:
    tb = "".join(traceback.format_exception(exc))
    try:
        cloudpickle.dumps(exc)
        return exc, tb
    except Exception:
        return RayServeException(f"{type(exc).__name__}: {exc}"), tb


class ReplicaServer:
    def __init__(self, boot: Bootstrap) -> None:
        self.boot = boot
        self.loop = asyncio.get_running_loop()
        # Replicas of a detached instance outlive a controller crash and wait for the next one;
        # spares (no deployment yet) just exit.
        reconnect = 0.0 if boot.die_with_parent or boot.tag.startswith("spare-") else ORPHAN_TIMEOUT_S
        self.client = ControllerClient(boot.controller_path, boot.secret, "replica", boot.tag, self.loop,
                                       on_control=self._on_control, reconnect_s=reconnect,
                                       on_reconnect=self._on_reconnect)
        self.counters = RequestCounters()
        self.gang: Any = None  # GangPeers on rank 0 of a gang replica
        self.ready_tag = ""
        self.user: UserCallable | None = None
        self.init_msg: asyncio.Future[ReplicaInit] = self.loop.create_future()
        self.max_ongoing = 5
        self.ongoing = 0
        self.draining = False
        self.tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.idle = asyncio.Event()
        self.idle.set()
        self.stop_requested = asyncio.Event()
        self.graceful_timeout = 20.0
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[FramedProtocol] = set()
        self.key: tuple[str, str] = ("", "")
        self.max_queued = -1
        self.local_waiters: deque[asyncio.Future[None]] = deque()
        self.model_ids: tuple[str, ...] = ()
        self.front: Any = None  # HTTPFront when serving HTTP itself
        self.proxy_app: Any = None
        self.access_log = True  # logging_config.enable_access_log

    async def run(self) -> int:
        spare = self.boot.tag.startswith("spare-")
        if spare:
            # Do now the imports every replica needs, while nobody is waiting for us.
            modules = ["shoal.serve"] + (["uvicorn", "shoal.runtime.proxy"] if self.boot.http_fd >= 0 else [])
            for name in modules:
                importlib.import_module(name)
        await self.client.connect()
        backend.set_current(self.client)
        if spare:
            waits: set[asyncio.Future[Any]] = {self.init_msg, asyncio.ensure_future(self.stop_requested.wait()),
                                               asyncio.ensure_future(self.client.closed.wait())}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not self.init_msg.done():
                return 0  # stopped (or the controller went away) before being given a deployment
            _setup_logging(self.boot, self.init_msg.result().tag)
        init = await asyncio.wait_for(self.init_msg, 60)
        # A spare given a deployment is that replica from now on, also to a restarted controller.
        self.client.ident = init.tag
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
        self.max_ongoing = cfg.max_ongoing_requests
        self.graceful_timeout = cfg.graceful_shutdown_timeout_s
        ctx = ReplicaContext(visible_app, init.deployment, init.tag, rank=init.rank, world_size=init.world_size)
        set_process_replica_context(ctx)
        apply_logging_config(cfg.logging_config, ctx, log_dir=self.boot.log_dir, app_key=init.app,
                             shoal_level=self.boot.log_level)
        self.access_log = cfg.logging_config is None or cfg.logging_config.enable_access_log
        multiplex.models_changed_hook = lambda ids: self._models_changed(init.tag, ids)
        try:
            target, args, kwargs = cloudpickle.loads(init.blob)
            self.user = UserCallable(target, args, kwargs, is_function=init.is_function, context=ctx)
            await self.user.initialize(cfg.user_config)
            self.server = await serve_unix(init.socket_path, self.boot.secret, self._on_connect)
        except BaseException as e:  # the constructor's failure is the deployment's status message
            logger.error("replica %s failed to start:\n%s", init.tag, traceback.format_exc())
            self.client.send(ReplicaFailed(init.tag, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            await asyncio.sleep(0.05)  # let the message flush
            return 1
        set_process_replica_context(ReplicaContext(visible_app, init.deployment, init.tag, self.user.instance,
                                                   rank=init.rank, world_size=init.world_size))
        if init.peers:
            from shoal.runtime.gang import GangPeers

            self.gang = GangPeers(init.peers, self.boot.secret, cfg.max_ongoing_requests)
        self.key = (init.app, init.deployment)
        self.max_queued = cfg.max_queued_requests
        _metrics.PROCESS.setup(init.tag, app=init.app, deployment=init.deployment, server=self,
                               routers=self.client.routers, page_source=self.client)
        _metrics.PROCESS.start_flusher(self.loop)
        if init.serves_http and self.boot.http_fd >= 0:
            try:
                await self._start_http()
            except Exception as e:
                logger.error("replica %s could not serve HTTP:\n%s", init.tag, traceback.format_exc())
                self.client.send(ReplicaFailed(init.tag, f"could not serve HTTP: {e}"))
                await asyncio.sleep(0.05)
                return 1
        auto = cfg.resolved_autoscaling()
        self.loop.create_task(self._report_load(init.tag, auto.metrics_interval_s if auto is not None else 0.0))
        self.ready_tag = init.tag
        self.client.resumed = True
        self._send(ReplicaReady(init.tag, os.getpid()))
        closed = asyncio.ensure_future(self.client.closed.wait())
        stop = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait({closed, stop}, return_when=asyncio.FIRST_COMPLETED)
        await self.drain()
        return 0

    async def _start_http(self) -> None:
        from shoal.runtime.proxy import HTTPFront, ProxyApp

        self.proxy_app = ProxyApp(self.client, self.boot.http, local=self)
        self.client.send(SubscribeRoutes())
        self.front = HTTPFront(self.proxy_app, self.boot.http_fd, self.boot.http)
        await self.front.start()

    async def _report_load(self, tag: str, interval: float) -> None:
        """Report load every ``interval`` (autoscaling deployments), and finished-request
        counters when they changed, at most once a second."""
        last: tuple[int, int] = (0, 0)
        next_counters = 0.0
        while not self.draining:
            now = self.loop.time()
            c = self.counters
            counters_due = now >= next_counters and (c.requests, c.errors) != last
            if interval > 0 or counters_due:
                self._send(ReplicaStats(tag, self.ongoing + len(self.local_waiters), c.requests, c.errors,
                                        tuple(c.hist)))
                last = (c.requests, c.errors)
                next_counters = now + 1.0
            await asyncio.sleep(interval if interval > 0 else 1.0)

    def _on_reconnect(self) -> None:
        """A restarted controller: say again what this replica is and does."""
        if self.ready_tag:
            self._send(ReplicaReady(self.ready_tag, os.getpid()))
            if self.model_ids:
                self._send(ReplicaModels(self.ready_tag, self.model_ids))
        if self.proxy_app is not None:
            self._send(SubscribeRoutes())

    # -- HTTP served in this process (LocalIngress for ProxyApp)
    async def serve(self, scope: dict[str, Any], body: bytes, meta: RequestMeta,
                    send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        assert self.user is not None
        if self.ongoing >= self.max_ongoing or self.local_waiters:
            if self.max_queued != -1 and len(self.local_waiters) >= self.max_queued:
                raise BackPressureError(len(self.local_waiters), self.max_queued)
            # Wait in FIFO order for a slot; the request that frees one hands it over.
            fut: asyncio.Future[None] = self.loop.create_future()
            self.local_waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release_slot()  # we were handed a slot but no longer want it
                else:
                    self.local_waiters.remove(fut)
                raise
        else:
            self.ongoing += 1
            self.idle.clear()
        started = time.monotonic()
        status = [500]
        token = _request_ctx.set(RequestContext(meta.request_id, meta.multiplexed_model_id, meta.route))
        trace = _tracing.start_request(meta, "__call__", *self.key, self.ready_tag) if meta.trace else None

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.gang is None:
                await self.user.http(scope, body, watch, meta)
            else:  # rank 0 of a gang serving HTTP itself: the other ranks run the request too
                user = self.user
                await self.gang.run("__call__", (scope, body), {}, meta._replace(http=True),
                                    lambda: user.http(scope, body, watch, meta))
        except asyncio.CancelledError:
            if status[0] == 500:
                status[0] = 499  # the client went away (or timed out) before a response
            raise
        finally:
            self.counters.record(started, status[0] >= 500)
            _metrics.PROCESS.request_done(meta.route, started, status[0] >= 500)
            if trace is not None:
                _tracing.end_request(trace, status[0] >= 500)
            self._release_slot()
            if self.access_log:
                log_access(scope["method"], scope["path"], status[0], started, meta.request_id, meta.route)
            _request_ctx.reset(token)

    def _release_slot(self) -> None:
        while self.local_waiters:
            fut = self.local_waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on; `ongoing` stays the same
                return
        self.ongoing -= 1
        if self.ongoing == 0:
            self.idle.set()

    async def drain(self) -> None:
        self.draining = True
        if self.front is not None:
            await self.front.stop(self.graceful_timeout)
        if self.server is not None:
            self.server.close()
        try:
            await asyncio.wait_for(self.idle.wait(), self.graceful_timeout)
        except TimeoutError:
            pass
        await self.finish_drain()

    async def finish_drain(self) -> None:
        """The end of a drain: cancel what still runs, run the deployment's ``__del__``, close
        the callers' connections (shared with the pod runtime's drain)."""
        if not self.idle.is_set():
            logger.warning("graceful shutdown timed out with %d requests in flight; cancelling them", self.ongoing)
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.sleep(0)
        if self.user is not None:
            try:
                await asyncio.wait_for(self.user.shutdown(), 10)
            except Exception:
                logger.exception("error in the deployment's __del__")
        for conn in list(self.conns):
            conn.close()

    def _models_changed(self, tag: str, ids: tuple[str, ...]) -> None:
        self.model_ids = ids
        self._send(ReplicaModels(tag, ids))

    # -- control plane
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
        elif isinstance(msg, Routes) and self.proxy_app is not None:
            self.proxy_app.set_routes(msg)

    async def _control_call(self, call: Call) -> None:
        try:
            if self.user is None:
                raise RuntimeError("replica is not initialized")
            if call.op == "health":
                await self.user.check_health()
                value: Any = None
            elif call.op == "reconfigure":
                await self.user.reconfigure(call.args.get("user_config"))
                value = None
            elif call.op == "stats":
                value = {"ongoing": self.ongoing}
            else:
                raise ValueError(f"unknown op {call.op!r}")
            reply = Reply(call.id, True, value)
        except Exception as e:
            reply = Reply(call.id, False, error=f"{type(e).__name__}: {e}")
        try:
            self.client.send(reply)
        except ConnectionError:
            pass

    # -- data plane
    def _on_connect(self, proto: FramedProtocol) -> None:
        self.conns.add(proto)
        proto.on_message = self._on_message
        proto.on_close = self._on_conn_close

    def _on_conn_close(self, proto: FramedProtocol, exc: BaseException | None) -> None:
        self.conns.discard(proto)
        key = id(proto)
        for (pid, _rid), task in list(self.tasks.items()):
            if pid == key:
                task.cancel()

    def _on_message(self, proto: FramedProtocol, msg: Any) -> None:
        kind = msg[0]
        if kind == REQUEST:
            rid = msg[1]
            if self.draining or self.ongoing >= self.max_ongoing or self.local_waiters:
                proto.send((REJECT, rid))
                return
            # A malformed request fails here, before it takes a slot it would never give back.
            handling = self._handle(proto, rid, msg[2], msg[3], msg[4], msg[5])
            self.ongoing += 1
            self.idle.clear()
            key = (id(proto), rid)
            task = self.loop.create_task(handling)
            self.tasks[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        elif kind == CANCEL:
            running = self.tasks.get((id(proto), msg[1]))
            if running is not None:
                running.cancel()

    def _done(self, key: tuple[int, int], _task: asyncio.Task[None]) -> None:
        # Normally _handle released the slot already; this covers a task cancelled before it ran.
        if self.tasks.pop(key, None) is not None:
            self._release_slot()

    async def _handle(self, proto: FramedProtocol, rid: int, method: str, args: tuple[Any, ...],
                      kwargs: dict[str, Any], meta: RequestMeta) -> None:
        user = self.user
        assert user is not None
        started = time.monotonic()
        failed = True
        status: int | str = 500 if meta.http else "ERROR"
        trace = _tracing.start_request(meta, method, *self.key, self.ready_tag) if meta.trace else None
        # This task's own context: shoal's log records about the request carry its id too.
        _request_ctx.set(RequestContext(meta.request_id, meta.multiplexed_model_id, meta.route))
        try:
            if self.gang is None:
                status = await self._execute(proto, rid, method, args, kwargs, meta)
            else:  # rank 0 of a gang: every rank runs the request, rank 0 answers
                status = await self.gang.run(method, args, kwargs, meta,
                                             lambda: self._execute(proto, rid, method, args, kwargs, meta))
            failed = isinstance(status, int) and status >= 500
        except asyncio.CancelledError:
            failed = False
            status = 499 if meta.http else "CANCELLED"
            return  # the caller gave up; nobody is waiting for an answer
        except ConnectionError:
            failed = False
            status = 499 if meta.http else "CANCELLED"
            return
        except Exception as e:
            logger.error("request %s to %s failed:\n%s", meta.request_id, method, traceback.format_exc())
            exc, tb = _error_payload(e)
            try:
                proto.send_user((ERR, rid, exc, tb))
            except ConnectionError:
                pass
        finally:
            # The answer is sent: free the slot now, before the bookkeeping below, so that the
            # caller's next request (it may already be on its way) is admitted, not refused.
            if self.tasks.pop((id(proto), rid), None) is not None:
                self._release_slot()
            self.counters.record(started, failed)
            _metrics.PROCESS.request_done(meta.route, started, failed)
            if trace is not None:
                _tracing.end_request(trace, failed)
            if self.access_log:
                if meta.http:
                    log_access(args[0]["method"], args[0]["path"], status, started, meta.request_id, meta.route)
                else:
                    log_access("STREAM" if meta.stream else "CALL", method, status, started, meta.request_id)

    async def _execute(self, proto: FramedProtocol, rid: int, method: str, args: tuple[Any, ...],
                       kwargs: dict[str, Any], meta: RequestMeta) -> int | str:
        """Run one request and send its answer; the HTTP status, or "OK"."""
        user = self.user
        assert user is not None
        if meta.http:
            return await self._handle_http(proto, rid, args[0], args[1], meta)
        if meta.stream:
            async for item in user.stream(method, args, kwargs, meta):
                proto.send_user((ITEM, rid, item))
            proto.send((END, rid))
            return "OK"
        result = await user.call(method, args, kwargs, meta)
        try:
            proto.send_user((OK, rid, result))
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise TypeError(f"the result of {method!r} could not be serialized: {e}") from None
        return "OK"

    async def _handle_http(self, proto: FramedProtocol, rid: int, scope: dict[str, Any], body: bytes,
                           meta: RequestMeta) -> int:
        """Serve a proxied HTTP request; returns the response status."""
        assert self.user is not None
        pending: list[dict[str, Any]] = []
        state = {"streaming": False, "done": False}
        status = [500]

        async def send(message: dict[str, Any]) -> None:
            if state["done"]:
                return
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            pending.append(message)
            if message["type"] != "http.response.body":
                return
            # ASGI messages are plain data: plain pickle (see Router._send).
            if not state["streaming"] and not message.get("more_body", False):
                proto.send((OK, rid, list(pending)))
                state["done"] = True
            else:
                state["streaming"] = True
                proto.send((ITEM, rid, list(pending)))
                if not message.get("more_body", False):
                    proto.send((END, rid))
                    state["done"] = True
            pending.clear()

        await self.user.http(scope, body, send, meta)
        if not state["done"]:
            if state["streaming"]:
                if pending:
                    proto.send((ITEM, rid, list(pending)))
                proto.send((END, rid))
            else:
                pending.append({"type": "http.response.body", "body": b"", "more_body": False})
                proto.send((OK, rid, list(pending)))
        return status[0]


def apply_logging_config(lc: Any, ctx: ReplicaContext, *, log_dir: str = "", app_key: str = "",
                         shoal_level: str | None = None) -> None:
    """Apply a deployment's ``logging_config``: level, encoding, where records go.

    With ``log_dir`` (a local instance) the replica writes its own rotating file there,
    ``<app>/<deployment>/<tag>.log`` (stdout and stderr included; in ``logging_config.logs_dir``
    instead when set, linked from there), and WARNING and above also to the terminal; see
    :mod:`shoal.observability.logs`. Without it (a Kubernetes pod) records keep going to stderr.
    Either way each record carries the application, deployment, replica and request id.
    """
    who = Identity("replica", ctx.replica_tag, ctx.app_name, ctx.deployment)
    if log_dir:
        own = replica_log_path(log_dir, app_key or ctx.app_name, ctx.deployment, ctx.replica_tag)
        path, link = own, ""
        if lc is not None and lc.logs_dir:
            name = f"replica_{safe_name(ctx.app_name)}_{safe_name(ctx.deployment)}_{safe_name(ctx.replica_tag)}.log"
            path, link = os.path.join(lc.logs_dir, name), own
        try:
            setup_log_file(who, path=path, link=link, encoding=lc.encoding if lc is not None else "TEXT",
                           level=lc.log_level if lc is not None else "INFO",
                           shoal_level=lc.log_level if lc is not None else shoal_level,
                           extra_attrs=lc.additional_log_standard_attrs if lc is not None else ())
            return
        except OSError as e:
            logger.warning("cannot write the replica's log file %s (%s); logging to stderr", path, e)
    root = logging.getLogger()
    context = RecordContext(who)
    for handler in root.handlers:
        handler.addFilter(context)
    if lc is None:
        return
    logging.getLogger("shoal").setLevel(lc.log_level)
    root.setLevel(lc.log_level)
    if lc.logs_dir:
        os.makedirs(lc.logs_dir, exist_ok=True)
        name = f"replica_{safe_name(ctx.app_name)}_{safe_name(ctx.deployment)}_{safe_name(ctx.replica_tag)}.log"
        file_handler = logging.FileHandler(os.path.join(lc.logs_dir, name))
        file_handler.addFilter(context)
        root.addHandler(file_handler)
    if lc.encoding == "JSON":
        for handler in root.handlers:
            handler.setFormatter(JSONFormatter(who, extra_attrs=lc.additional_log_standard_attrs))


def _setup_logging(boot: Bootstrap, tag: str) -> None:
    # Third-party libraries log at WARNING (as in a plain Python program); shoal's own
    # loggers at the instance's level.
    fmt = f"%(asctime)s %(levelname)s replica {tag} pid={os.getpid()} %(name)s: %(message)s"
    root = logging.getLogger()
    if root.handlers:  # a spare that just became a replica: name it in its log lines
        for handler in root.handlers:
            handler.setFormatter(logging.Formatter(fmt))
    else:
        logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    logging.getLogger("shoal").setLevel(boot.log_level)


def main() -> None:
    boot: Bootstrap = pickle.loads(sys.stdin.buffer.read())
    if boot.die_with_parent:
        die_with_parent(boot.parent_pid)
    sys.path[:] = boot.sys_path
    try:
        os.chdir(boot.cwd)
    except OSError:
        pass
    _setup_logging(boot, boot.tag)
    _tracing.setup_from_env("shoal-replica")
    # SIGTERM (from the controller or Kubernetes) means: drain, then exit.
    loop = backend.new_event_loop()
    asyncio.set_event_loop(loop)

    async def runner() -> int:
        server = ReplicaServer(boot)
        loop.add_signal_handler(signal.SIGTERM, server.stop_requested.set)
        loop.add_signal_handler(signal.SIGINT, server.stop_requested.set)
        return await server.run()

    try:
        code = loop.run_until_complete(runner())
    except (TimeoutError, ConnectionError, OSError) as e:
        logger.error("replica %s could not reach the controller: %s", boot.tag, e)
        code = 3
    _metrics.process_exit()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
