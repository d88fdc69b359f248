"""The replica core: one deployment's callable behind its slots, whatever runtime it runs in.

The local replica process (:mod:`shoal.runtime.replica.process`), a Kubernetes pod
(:mod:`shoal.kubernetes.pod`) and every rank of a gang compose a :class:`ReplicaCore` with
their own transport, control channel and membership (:mod:`shoal.runtime.replica.ports`).
The core owns what must behave the same everywhere:

* the user callable, and the ``max_ongoing_requests`` slots (:class:`Slots`) every request
  takes: RPC calls and RPC-forwarded HTTP requests are refused when none is free (their router
  goes elsewhere), HTTP requests from the replica's own front wait for one;
* the bookkeeping of every request (:class:`Accounts`: counters, metrics, trace span, access log);
* gang fan-out (rank 0 runs each request on ranks 1..N-1 too), health checks, reconfigure;
* the drain: refuse new requests, let those in flight finish within the graceful timeout,
  then cancel the rest and run the deployment's ``__del__``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from shoal.context import RequestContext, _request_ctx
from shoal.runtime import wire
from shoal.runtime.callable import UserCallable
from shoal.runtime.flow import STREAM_STALL_TIMEOUT_S, STREAM_WINDOW_BYTES, SendWindow
from shoal.runtime.http.admit import RouterSource, Send
from shoal.runtime.replica.accounting import Accounts, RequestCounters, Sinks, error_payload
from shoal.runtime.replica.ports import ControlChannel, Transport
from shoal.runtime.replica.rpc_http import RPCResponse
from shoal.runtime.replica.rpc_ws import WebSocketRun, ws_status
from shoal.runtime.replica.slots import Slots
from shoal.runtime.wire import (
    CANCEL,
    CREDIT,
    END,
    ERR,
    ITEM,
    OK,
    REJECT,
    REQUEST,
    FramedProtocol,
    RequestMeta,
    Routes,
    dumps_user,
)

if TYPE_CHECKING:
    from shoal.config import DeploymentConfig
    from shoal.runtime.http.options import FrontOptions

__all__ = ["ReplicaCore"]

logger = logging.getLogger("shoal.replica")

# How often a drain that waits for callers to go quiet looks again.
_QUIET_POLL_S = 0.05

# A drain closes its callers' connections once no request came for this long (see drain).
_CALLERS_QUIET_S = 0.25
_CALLERS_QUIET_ROUNDS = 8  # at most 2 s


def _client_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the caller asked for something wrong (a ``status_code`` of 4xx, as
    shoal.llm's ContextLengthError or starlette's HTTPException have): logged without a traceback."""
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500


class ReplicaCore:
    """One replica's serving state (see the module docstring).

    ``quiet_s``: once nothing is in flight, a drain keeps the callers' connections open
    (refusing requests) until they have sent nothing for this long, so that a request in
    transit is refused and retried elsewhere rather than lost with a closed connection (pods,
    whose callers learn of a drain only from DNS); 0 closes at once (local replicas, whose
    callers the controller tells).
    """

    def __init__(self, *, channel: ControlChannel, routers: RouterSource, replica_id: str = "",
                 clock: Callable[[], float] = time.monotonic, sinks: Sinks | None = None,
                 quiet_s: float = 0.0) -> None:
        self.channel = channel
        self.routers = routers  # membership: routers to the deployments this replica calls
        self.clock = clock
        self.quiet_s = quiet_s
        self.slots = Slots()
        self.accounts = Accounts(sinks, clock)
        self.accounts.replica_id = replica_id
        self.user: UserCallable | None = None
        self.gang: Any = None  # GangPeers (or gang_pod.Unassembled) on rank 0 of a gang replica
        self.graceful_timeout = 20.0
        self.key: tuple[str, str] = ("", "")  # (app key, deployment) served here
        self.model_ids: tuple[str, ...] = ()
        self.rejected = 0  # RPC requests refused (full, or draining)
        self.last_request = clock()  # when the latest RPC request arrived
        self.tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        # Streams' credit windows (shoal.runtime.flow), by (connection, request id).
        self.windows: dict[tuple[int, int], SendWindow] = {}
        # Websocket requests running here for routers' callers, by (connection, request id).
        self.websockets: dict[tuple[int, int], WebSocketRun] = {}
        self.stream_window_bytes = STREAM_WINDOW_BYTES
        self.stream_stall_s = STREAM_STALL_TIMEOUT_S
        self.conns: set[FramedProtocol] = set()
        self.server: asyncio.AbstractServer | None = None
        self.fronts: list[Any] = []  # proxy.HTTPFront when serving HTTP itself
        self.proxy_app: Any = None  # its http.app.ProxyApp
        # What record_routing_stats() last returned, for callers that ask (pods; None: nothing yet).
        self.routing_stats: dict[str, Any] | None = None

    # -- what metrics and the HTTP front read (LocalIngress)
    @property
    def counters(self) -> RequestCounters:
        return self.accounts.counters

    @property
    def ongoing(self) -> int:
        return self.slots.ongoing

    @property
    def local_waiters(self) -> deque[asyncio.Future[None]]:
        return self.slots.waiters

    @property
    def draining(self) -> bool:
        return self.slots.draining

    # -- set-up
    def configure(self, cfg: DeploymentConfig, key: tuple[str, str]) -> None:
        """Take the deployment's limits; ``key`` is (app key, deployment)."""
        self.slots.limit = cfg.max_ongoing_requests
        self.slots.max_queued = cfg.max_queued_requests
        self.slots.max_wait = cfg.resolved_max_queue_wait_s()
        self.graceful_timeout = cfg.graceful_shutdown_timeout_s
        self.key = self.accounts.key = key
        self.accounts.access_log = cfg.logging_config is None or cfg.logging_config.enable_access_log

    async def listen(self, transport: Transport) -> None:
        """Accept callers' connections (the user callable is installed first)."""
        self.server = await transport.listen(self.on_connect)

    async def serve_http(self, options: FrontOptions, fds: Sequence[int], routes: Routes | None = None,
                         share_port: bool = False) -> None:
        """Serve HTTP on the listening sockets ``fds`` (an ingress replica), routing other
        apps' requests through :attr:`routers`. ``share_port``: the proxy stands by on the same
        socket, so this front holds at most ``max_ongoing_requests`` connections and leaves the
        rest to it (a replica that dies then fails only the requests it was running)."""
        # Imported here, not at the top: uvicorn costs every replica that never serves HTTP.
        from shoal.runtime.proxy import HTTPFront, ProxyApp

        self.proxy_app = ProxyApp(self.routers, options, local=self)
        if routes is not None:
            self.proxy_app.set_routes(routes)
        for fd in fds:
            front = HTTPFront(self.proxy_app, fd, options,
                              accept_limit=(lambda: self.slots.limit) if share_port else None,
                              spread=self._has_siblings)
            self.fronts.append(front)
            await front.start()

    def _has_siblings(self) -> bool:
        """Whether other replicas of this deployment share the port (connections are spread)."""
        # A gang's world size counts its ranks, of which only rank 0 serves HTTP.
        return self.gang is None and self.user is not None and self.user.context.world_size > 1

    def models_changed(self, ids: tuple[str, ...]) -> None:
        """The multiplexed models loaded here changed (``multiplex.models_changed_hook``)."""
        self.model_ids = ids
        self.channel.models_changed(ids)

    # -- control operations
    async def check_health(self) -> None:
        await self._user().check_health()

    async def control_op(self, op: str, args: dict[str, Any]) -> Any:
        """A control-plane operation: ``health``, ``reconfigure``, ``stats`` or ``world_size``
        (the deployment's replica count changed: Ray's replica ranks)."""
        user = self._user()
        if op == "health":
            await user.check_health()
            return None
        if op == "reconfigure":
            await user.reconfigure(args.get("user_config"))
            return None
        if op == "stats":
            return {"ongoing": self.slots.ongoing}
        if op == "world_size":
            user.update_context(world_size=int(args["world_size"]))
            return None
        raise ValueError(f"unknown op {op!r}")

    def _user(self) -> UserCallable:
        if self.user is None:
            raise RuntimeError("replica is not initialized")
        return self.user

    async def _on_every_rank(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta,
                             local: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``local()``; on rank 0 of a gang, every other rank runs the request too."""
        if self.gang is None:
            return await local()
        return await self.gang.run(method, args, kwargs, meta, local)

    # -- HTTP served by this replica's own front (LocalIngress for ProxyApp)
    async def serve(self, scope: dict[str, Any], body: bytes, meta: RequestMeta, send: Send) -> None:
        """Serve one HTTP request from this process's front: wait for a slot, run, account."""
        user = self._user()
        await self.slots.admit()
        ticket = self.accounts.open(meta, "__call__")
        status = 500
        token = _request_ctx.set(RequestContext(meta.request_id, meta.multiplexed_model_id, meta.route))

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._on_every_rank("__call__", (scope, body), {}, meta._replace(http=True),
                                      lambda: user.http(scope, body, watch, meta))
        except asyncio.CancelledError:
            if status == 500:
                status = 499  # the client went away (or timed out) before a response
            raise
        finally:
            self.slots.release()
            self.accounts.close(ticket, status >= 500, status, scope["method"], scope["path"], meta.route)
            _request_ctx.reset(token)

    async def serve_websocket(self, scope: dict[str, Any], receive: Any, send: Send, meta: RequestMeta) -> None:
        """Serve one WebSocket from this process's front: wait for a slot, run it for as long
        as it stays open (it holds the slot meanwhile, as a request does), account."""
        user = self._user()
        await self.slots.admit()
        ticket = self.accounts.open(meta, "__call__")
        status = 500
        token = _request_ctx.set(RequestContext(meta.request_id, meta.multiplexed_model_id, meta.route))

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            status = ws_status(message, status)
            await send(message)

        try:
            await user.websocket(scope, receive, watch, meta)
        except asyncio.CancelledError:
            if status == 500:
                status = 499
            raise
        finally:
            self.slots.release()
            self.accounts.close(ticket, status >= 500, status, "WEBSOCKET", scope["path"], meta.route)
            _request_ctx.reset(token)

    # -- RPC: calls, streams and forwarded HTTP requests from routers
    def on_connect(self, proto: FramedProtocol) -> None:
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
            self.last_request = self.clock()
            if self.slots.refuses():
                self.rejected += 1
                proto.send((REJECT, rid))
                return
            # A malformed request fails here, before it takes a slot it would never give back.
            handling = self._handle(proto, rid, msg[2], msg[3], msg[4], msg[5])
            self.slots.take()
            key = (id(proto), rid)
            task = asyncio.get_running_loop().create_task(handling)
            self.tasks[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        elif kind == CREDIT:
            window = self.windows.get((id(proto), msg[1]))
            if window is not None:
                window.credit(msg[2])
        elif kind == wire.WS_IN:
            run = self.websockets.get((id(proto), msg[1]))
            if run is not None:
                run.client_message(msg[2], proto.frame_size)
        elif kind == CANCEL:
            running = self.tasks.get((id(proto), msg[1]))
            if running is not None:
                running.cancel()
        elif kind == wire.PING:
            proto.send((wire.PONG, msg[1]))  # the router's liveness probe: this loop is running
        elif kind == wire.STATS:  # a caller's custom router wants this replica's routing stats
            proto.send_user((wire.STATS_REPLY, msg[1], self.routing_stats))

    def _done(self, key: tuple[int, int], _task: asyncio.Task[None]) -> None:
        # Normally _handle released the slot already; this covers a task cancelled before it ran.
        if self.tasks.pop(key, None) is not None:
            self.slots.release()

    async def _handle(self, proto: FramedProtocol, rid: int, method: str, args: tuple[Any, ...],
                      kwargs: dict[str, Any], meta: RequestMeta) -> None:
        ticket = self.accounts.open(meta, method)
        failed = True
        status: int | str = 500 if meta.http else "ERROR"
        # This task's own context: shoal's log records about the request carry its id too.
        _request_ctx.set(RequestContext(meta.request_id, meta.multiplexed_model_id, meta.route))
        try:
            if meta.http and args[0].get("type") == "websocket":
                # A websocket runs on this rank only: its messages cannot be replayed on others.
                status = await self._execute_websocket(proto, rid, args[0], meta)
            else:
                status = await self._on_every_rank(method, args, kwargs, meta,
                                                   lambda: self._execute(proto, rid, method, args, kwargs, meta))
            failed = isinstance(status, int) and status >= 500
        except (asyncio.CancelledError, ConnectionError):
            failed = False
            status = 499 if meta.http else "CANCELLED"
            return  # the caller gave up (or went away); nobody is waiting for an answer
        except Exception as e:
            if _client_error(e):
                logger.warning("request %s to %s refused: %s: %s", meta.request_id, method, type(e).__name__, e)
            else:
                logger.error("request %s to %s failed:\n%s", meta.request_id, method, traceback.format_exc())
            exc, tb = error_payload(e)
            try:
                proto.send_user((ERR, rid, exc, tb))
            except ConnectionError:
                pass
        finally:
            # The answer is sent: free the slot now, before the bookkeeping below, so that the
            # caller's next request (it may already be on its way) is admitted, not refused.
            if self.tasks.pop((id(proto), rid), None) is not None:
                self.slots.release()
            if meta.http:
                self.accounts.close(ticket, failed, status, args[0].get("method", "WEBSOCKET"), args[0]["path"],
                                    meta.route)
            else:
                self.accounts.close(ticket, failed, status, "STREAM" if meta.stream else "CALL", method, "")

    async def _execute(self, proto: FramedProtocol, rid: int, method: str, args: tuple[Any, ...],
                       kwargs: dict[str, Any], meta: RequestMeta) -> int | str:
        """Run one request and send its answer; the HTTP status, or "OK"."""
        user = self._user()
        if meta.http or meta.stream:
            return await self._execute_stream(user, proto, rid, method, args, kwargs, meta)
        result = await user.call(method, args, kwargs, meta)
        try:
            proto.send_user((OK, rid, result))
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise TypeError(f"the result of {method!r} could not be serialized: {e}") from None
        return "OK"

    async def _execute_stream(self, user: UserCallable, proto: FramedProtocol, rid: int, method: str,
                              args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta) -> int | str:
        """A streamed request (or an HTTP request, whose response may stream): its items go
        out within the stream's credit window (:mod:`shoal.runtime.flow`); a caller that takes
        nothing for ``stream_stall_s`` gets the request cancelled here."""
        key = (id(proto), rid)
        window = self.windows[key] = SendWindow(self.stream_window_bytes, stall_s=self.stream_stall_s)
        try:
            if meta.http:
                body = args[1] if isinstance(args[1], bytes) else bytes(args[1])
                response = RPCResponse(proto, rid, window)
                await user.http(args[0], body, response.send, meta)
                response.finish()
                return response.status
            items = user.stream(method, args, kwargs, meta)
            try:
                async for item in items:
                    payload = dumps_user((ITEM, rid, item))
                    await window.reserve(len(payload))
                    proto.send_bytes(payload)
            finally:
                aclose = getattr(items, "aclose", None)
                if aclose is not None:
                    await aclose()
            proto.send((END, rid))
            return "OK"
        except Exception as e:
            if not window.stalled:
                raise
            logger.warning("request %s to %s cancelled: %s (unacknowledged: %d bytes)", meta.request_id,
                           method, e, window.unacked)
            exc, tb = error_payload(TimeoutError(f"stream cancelled by the replica: {e}"))
            try:
                proto.send_user((ERR, rid, exc, tb))
            except ConnectionError:
                pass
            return 499 if meta.http else "CANCELLED"
        finally:
            self.windows.pop(key, None)

    async def _execute_websocket(self, proto: FramedProtocol, rid: int, scope: dict[str, Any],
                                 meta: RequestMeta) -> int:
        """Run one websocket for a router's caller (:mod:`shoal.runtime.replica.rpc_ws`): the
        caller's WS_IN frames feed the application's ``receive``; what it sends goes back as
        ITEM frames within the stream's credit window. A caller that takes nothing for
        ``stream_stall_s`` gets the websocket ended here, as a stalled stream does."""
        user = self._user()
        key = (id(proto), rid)
        window = self.windows[key] = SendWindow(self.stream_window_bytes, stall_s=self.stream_stall_s)
        run = self.websockets[key] = WebSocketRun(proto, rid, window)
        try:
            await user.websocket(scope, run.receive, run.send, meta)
            run.finish()
            return run.status
        except Exception as e:
            if not window.stalled:
                raise
            logger.warning("websocket %s cancelled: %s (unacknowledged: %d bytes)", meta.request_id, e,
                           window.unacked)
            exc, tb = error_payload(TimeoutError(f"websocket ended by the replica: {e}"))
            try:
                proto.send_user((ERR, rid, exc, tb))
            except ConnectionError:
                pass
            return 499
        finally:
            self.windows.pop(key, None)
            self.websockets.pop(key, None)

    # -- drain
    async def drain(self) -> None:
        """Stop taking requests, let those in flight finish (within the graceful timeout), and
        wind down: see :meth:`finish_drain`."""
        self.slots.draining = True
        deadline = self.clock() + self.graceful_timeout
        if self.server is not None:
            self.server.close()  # no new connections; open ones get their requests refused
        http_stop: asyncio.Future[Any] | None = None
        if self.fronts:
            # The front drains as Envoy does: Connection: close on every answer, idle keep-alive
            # connections closed after a grace, none closed under a request (HTTPFront.stop).
            grace = None if self._still_routed() else 0.0
            http_stop = asyncio.gather(*(f.stop(self.graceful_timeout, grace) for f in self.fronts))
        try:
            await asyncio.wait_for(self.slots.idle.wait(), max(0.0, deadline - self.clock()))
        except TimeoutError:
            pass
        # Nothing in flight: wait for callers to notice we are gone (they are refused meanwhile).
        while (self.quiet_s > 0 and self.conns and self.clock() < deadline
               and self.clock() - self.last_request < self.quiet_s):
            await asyncio.sleep(_QUIET_POLL_S)
        # Callers learn of the drain from the controller, so a request may still be on its way:
        # it is refused (and retried elsewhere), but one cut off by closing the connection would
        # fail. Close only once a short while passed without any.
        seen = -1
        for _ in range(_CALLERS_QUIET_ROUNDS):  # bounded: a caller that never learns cannot hold us
            if not self.conns or seen == self.rejected or self.clock() >= deadline:
                break
            seen = self.rejected
            await asyncio.sleep(_CALLERS_QUIET_S)
        if http_stop is not None:
            try:
                await asyncio.wait_for(http_stop, max(0.1, deadline - self.clock()))
            except TimeoutError:
                pass
        await self.finish_drain()

    def _still_routed(self) -> bool:
        """Whether this replica's app is still routed (other replicas take its requests): then
        the HTTP front's idle connections get the drain grace; when the app is being deleted
        (or the instance shut down) nobody would serve their next request, so they close now."""
        app = self.proxy_app
        return app is not None and self.key in set(app.table.targets())

    async def finish_drain(self) -> None:
        """The end of a drain: cancel what still runs, run the deployment's ``__del__``, close
        the callers' connections."""
        if not self.slots.idle.is_set():
            logger.warning("graceful shutdown timed out with %d requests in flight; cancelling them",
                           self.slots.ongoing)
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

