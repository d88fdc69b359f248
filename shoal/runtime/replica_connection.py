"""One authenticated connection from a router to one replica, multiplexing requests by id.

It reconnects after a failure (the router's :class:`~shoal.runtime.liveness.ReplicaHealth`
decides when), probes a replica that goes silent while requests are in flight, returns stream
credit (:mod:`shoal.runtime.flow`), sends large HTTP bodies out of band, and carries a
WebSocket's client messages to the replica running it (:mod:`shoal.runtime.wschannel`).
:mod:`shoal.runtime.router` picks which connection a request takes.
"""

from __future__ import annotations

import asyncio
import functools
import pickle
from collections.abc import Callable
from typing import Any

from shoal.exceptions import ReplicaDiedError, wrap_remote_exception
from shoal.runtime.flow import CreditCounter, StreamSink
from shoal.runtime.liveness import ConnEvent, ProbeTimer
from shoal.runtime.wire import (
    CANCEL,
    CREDIT,
    END,
    ERR,
    ITEM,
    OK,
    PING,
    PONG,
    REJECT,
    REQUEST,
    STATS,
    STATS_REPLY,
    FramedProtocol,
    ReplicaEndpoint,
    RequestMeta,
    connect_endpoint,
)
from shoal.runtime.wschannel import ClientMessages

__all__ = ["CONNECT_TIMEOUT_S", "OOB_BODY_BYTES", "ReplicaConnection"]

# HTTP request bodies from this size on travel out of band (see ReplicaConnection._send).
OOB_BODY_BYTES = 64 * 1024
# Connecting to a replica (the connection, then the handshake, each) gives up after this long;
# the replica is then skipped and reconnected with back-off (shoal.runtime.liveness).
CONNECT_TIMEOUT_S = 5.0


class _Rejected(Exception):
    pass


class _Unreachable(Exception):
    pass


# A streamed request's frames, returning credit to the replica as its consumer takes them.
_StreamSink = StreamSink


class ReplicaConnection:
    """One authenticated connection to one replica, multiplexing requests by id.

    It can be connected again after it failed or closed. ``on_event`` (when set) learns of
    every :class:`~shoal.runtime.liveness.ConnEvent`; while requests are in flight, a probe
    pings the replica when it has been silent (:class:`~shoal.runtime.liveness.ProbeTimer`).
    """

    def __init__(self, replica: ReplicaEndpoint, secret: bytes) -> None:
        self.replica = replica
        self._secret = secret
        self._proto: FramedProtocol | None = None
        self._connecting: asyncio.Task[FramedProtocol] | None = None
        self._next = 0
        # rid -> Future (unary) or Queue (stream)
        self._pending: dict[int, asyncio.Future[Any] | _StreamSink] = {}
        # rid -> the client messages of a websocket request, sent as WS_IN frames
        self._inboxes: dict[int, ClientMessages] = {}
        # rid -> a routing-stats question waiting for its answer (ask_routing_stats)
        self._asks: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self._watch: ProbeTimer | None = None
        self.on_event: Callable[[ReplicaConnection, ConnEvent, str], None] | None = None

    @property
    def connecting(self) -> bool:
        """A connection attempt is under way."""
        return self._connecting is not None

    async def connect(self) -> FramedProtocol:
        """The open connection, or a new one (raises ``_Unreachable`` when that fails)."""
        if self._proto is not None and not self._proto.closed:
            return self._proto
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            # Retrieved here too: every caller awaiting it may have been cancelled.
            self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            return await asyncio.shield(self._connecting)
        except (TimeoutError, OSError, ConnectionError) as e:
            raise _Unreachable(f"{self.replica.replica_id}: {_why(e)}") from None

    async def try_connect(self) -> None:
        """Connect if not connected; the outcome is reported to ``on_event`` only."""
        try:
            await self.connect()
        except _Unreachable:
            pass

    async def _open(self) -> FramedProtocol:
        try:
            proto = await connect_endpoint(self.replica.endpoint, self._secret, self._on_message, self._on_close,
                                           timeout=CONNECT_TIMEOUT_S)
            if proto.closed:
                raise ConnectionError("connection closed during the handshake")
        except (TimeoutError, OSError, ConnectionError) as e:
            self._connecting = None
            self._event(ConnEvent.FAILED, _why(e))
            raise
        except BaseException:
            self._connecting = None
            raise
        self._connecting = None
        self._proto = proto
        self._watch = ProbeTimer(asyncio.get_running_loop(), self._ping, lambda: bool(self._pending), self._event)
        self._event(ConnEvent.UP)
        return proto

    def _event(self, event: ConnEvent, why: str = "") -> None:
        if self.on_event is not None:
            self.on_event(self, event, why)

    def _on_message(self, proto: FramedProtocol, msg: Any) -> None:
        kind, rid = msg[0], msg[1]
        if self._watch is not None:
            self._watch.heard()
        if kind == PONG:
            return
        if kind == STATS_REPLY:
            ask = self._asks.pop(rid, None)
            if ask is not None and not ask.done():
                ask.set_result(msg[2] if isinstance(msg[2], dict) else None)
            return
        if kind == CREDIT:  # a websocket's application took client messages (wschannel)
            inbox = self._inboxes.get(rid)
            if inbox is not None:
                inbox.credit(msg[2])
            return
        sink = self._pending.get(rid)
        if sink is None:
            return  # cancelled by the caller
        if isinstance(sink, asyncio.Future):
            del self._pending[rid]
            if sink.done():
                return
            if kind == OK:
                sink.set_result(msg[2])
            elif kind == ERR:
                sink.set_exception(wrap_remote_exception(msg[2], msg[3]))
            elif kind == REJECT:
                sink.set_exception(_Rejected())
            return
        if kind == ITEM:
            sink.put_nowait((ITEM, msg[2]), proto.frame_size)
            return
        del self._pending[rid]
        self._detach(rid)
        if kind == OK:
            sink.put_nowait((ITEM, msg[2]))
            sink.end((END, None))
        elif kind == END:
            sink.end((END, None))
        elif kind == ERR:
            sink.end((ERR, wrap_remote_exception(msg[2], msg[3])))
        elif kind == REJECT:
            sink.put_nowait((REJECT, None))

    def _on_close(self, proto: FramedProtocol, exc: BaseException | None) -> None:
        if proto is not self._proto:
            return  # a connection that never finished its handshake
        self._proto = None
        self._stop_probe()
        err = ReplicaDiedError(f"replica {self.replica.replica_id} died or closed its connection "
                               "while handling the request")
        pending, self._pending = self._pending, {}
        asks, self._asks = self._asks, {}
        for ask in asks.values():
            if not ask.done():
                ask.set_exception(ConnectionError(f"replica {self.replica.replica_id} closed its connection"))
        for rid in list(self._inboxes):
            self._detach(rid)
        for sink in pending.values():
            if isinstance(sink, asyncio.Future):
                if not sink.done():
                    sink.set_exception(err)
            else:
                sink.put_nowait((ERR, err))
        self._event(ConnEvent.LOST, "its connection closed")

    def _ping(self) -> bool:
        try:
            if self._proto is not None:
                self._proto.send((PING, 0))
                return True
        except ConnectionError:
            pass
        return False

    def _stop_probe(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _send(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta,
              sink: asyncio.Future[Any] | _StreamSink) -> int:
        proto = self._proto
        if proto is None or proto.closed:
            raise _Unreachable(self.replica.replica_id)
        self._next += 1
        rid = self._next
        if not self._pending and self._watch is not None:
            self._watch.started()
        self._pending[rid] = sink
        inbox: ClientMessages | None = None
        try:
            # HTTP requests carry only plain data (an ASGI scope and bytes): plain pickle is
            # enough and much faster; user values may need cloudpickle. A large body travels
            # after the pickle, not copied into it (FramedProtocol.send_oob).
            if meta.http:
                if len(args) == 2 and isinstance(args[1], ClientMessages):
                    # A websocket: the client's messages follow as WS_IN frames, not in the body.
                    inbox, args = args[1], (args[0], b"")
                elif len(args) == 2 and len(args[1]) >= OOB_BODY_BYTES:
                    args = (args[0], pickle.PickleBuffer(args[1]))
                proto.send_oob((REQUEST, rid, method, args, kwargs, meta))
            else:
                msg = (REQUEST, rid, method, args, kwargs, meta)
                proto.send_user(msg)
        except ConnectionError:
            self._pending.pop(rid, None)
            raise _Unreachable(self.replica.replica_id) from None
        except BaseException:
            self._pending.pop(rid, None)
            raise
        if inbox is not None:
            self._inboxes[rid] = inbox
            inbox.attach(proto.send_bytes, rid)
        return rid

    async def ask_routing_stats(self, timeout: float) -> dict[str, Any] | None:
        """What the replica's ``record_routing_stats()`` last returned (None: nothing yet), asked
        on this connection (connected first if need be) within ``timeout`` seconds. Raises
        TimeoutError (a replica that does not know the question never answers) or
        ConnectionError (it cannot be reached, or the connection closed first)."""
        async with asyncio.timeout(timeout):
            try:
                proto = await self.connect()
            except _Unreachable as e:
                raise ConnectionError(str(e)) from None
            self._next += 1
            rid = self._next
            ask: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
            self._asks[rid] = ask
            try:
                proto.send((STATS, rid))
                return await ask
            finally:
                self._asks.pop(rid, None)

    def _detach(self, rid: int) -> None:
        inbox = self._inboxes.pop(rid, None)
        if inbox is not None:
            inbox.detach()

    def send_unary(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   meta: RequestMeta) -> tuple[int, asyncio.Future[Any]]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        return self._send(method, args, kwargs, meta, fut), fut

    def send_stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                    meta: RequestMeta) -> tuple[int, _StreamSink]:
        q = _StreamSink()
        rid = self._send(method, args, kwargs, meta, q)
        q.credits = CreditCounter(functools.partial(self.credit, rid))
        return rid, q

    def credit(self, rid: int, nbytes: int) -> None:
        """Give ``nbytes`` of stream ``rid`` back to the replica (flow control)."""
        proto = self._proto
        if rid in self._pending and proto is not None and not proto.closed:
            try:
                proto.send((CREDIT, rid, nbytes))
            except ConnectionError:
                pass

    def cancel(self, rid: int) -> None:
        self._detach(rid)
        if self._pending.pop(rid, None) is not None and self._proto is not None and not self._proto.closed:
            try:
                self._proto.send((CANCEL, rid))
            except ConnectionError:
                pass

    @property
    def idle(self) -> bool:
        return not self._pending

    def close(self) -> None:
        if self._proto is not None:
            self._proto.close()
        self._stop_probe()


def _why(e: BaseException) -> str:
    """Why a connection attempt failed, in a few words."""
    if isinstance(e, TimeoutError):
        return f"no connection or handshake within {CONNECT_TIMEOUT_S:g} s"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
