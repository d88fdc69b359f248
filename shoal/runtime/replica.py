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

from shoal import multiplex
from shoal.context import ReplicaContext, set_process_replica_context
from shoal.exceptions import BackPressureError, RayServeException
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
        ctx = ReplicaContext(visible_app, init.deployment, init.tag)
        set_process_replica_context(ctx)
        apply_logging_config(cfg.logging_config, ctx)
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
        set_process_replica_context(ReplicaContext(visible_app, init.deployment, init.tag, self.user.instance))
        self.key = (init.app, init.deployment)
        self.max_queued = cfg.max_queued_requests
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

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.user.http(scope, body, watch, meta)
        finally:
            self.counters.record(started, status[0] >= 500)
            self._release_slot()

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
            self.ongoing += 1
            self.idle.clear()
            key = (id(proto), rid)
            task = self.loop.create_task(self._handle(proto, rid, msg[2], msg[3], msg[4], msg[5]))
            self.tasks[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        elif kind == CANCEL:
            running = self.tasks.get((id(proto), msg[1]))
            if running is not None:
                running.cancel()

    def _done(self, key: tuple[int, int], _task: asyncio.Task[None]) -> None:
        self.tasks.pop(key, None)
        self._release_slot()

    async def _handle(self, proto: FramedProtocol, rid: int, method: str, args: tuple[Any, ...],
                      kwargs: dict[str, Any], meta: RequestMeta) -> None:
        user = self.user
        assert user is not None
        started = time.monotonic()
        failed = True
        try:
            if meta.http:
                failed = await self._handle_http(proto, rid, args[0], args[1], meta) >= 500
            elif meta.stream:
                async for item in user.stream(method, args, kwargs, meta):
                    proto.send_user((ITEM, rid, item))
                proto.send((END, rid))
            else:
                result = await user.call(method, args, kwargs, meta)
                try:
                    proto.send_user((OK, rid, result))
                except (pickle.PicklingError, TypeError, AttributeError) as e:
                    raise TypeError(f"the result of {method!r} could not be serialized: {e}") from None
            if not meta.http:
                failed = False
        except asyncio.CancelledError:
            failed = False
            return  # the caller gave up; nobody is waiting for an answer
        except ConnectionError:
            failed = False
            return
        except Exception as e:
            logger.error("request %s to %s failed:\n%s", meta.request_id, method, traceback.format_exc())
            exc, tb = _error_payload(e)
            try:
                proto.send_user((ERR, rid, exc, tb))
            except ConnectionError:
                pass
        finally:
            self.counters.record(started, failed)

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


class JSONFormatter(logging.Formatter):
    """One JSON object per line, with the replica's identity (``logging_config.encoding: JSON``)."""

    def __init__(self, ctx: ReplicaContext) -> None:
        super().__init__()
        self._ids = {"application": ctx.app_name, "deployment": ctx.deployment, "replica": ctx.replica_tag}

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {"asctime": self.formatTime(record), "levelname": record.levelname, "name": record.name,
               "message": record.getMessage(), **self._ids}
        if record.exc_info:
            out["exc_text"] = self.formatException(record.exc_info)
        return json.dumps(out)


def apply_logging_config(lc: Any, ctx: ReplicaContext) -> None:
    """Apply a deployment's ``logging_config``: level, encoding, and an optional log file."""
    if lc is None:
        return
    root = logging.getLogger()
    logging.getLogger("shoal").setLevel(lc.log_level)
    root.setLevel(lc.log_level)
    if lc.logs_dir:
        os.makedirs(lc.logs_dir, exist_ok=True)
        name = f"replica_{ctx.app_name}_{ctx.deployment}_{ctx.replica_tag}.log"
        root.addHandler(logging.FileHandler(os.path.join(lc.logs_dir, name)))
    if lc.encoding == "JSON":
        for handler in root.handlers:
            handler.setFormatter(JSONFormatter(ctx))


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
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
