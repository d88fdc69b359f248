"""The router inside every handle: replica choice, back-pressure, retries.

One :class:`Router` per (process, deployment). It knows the deployment's running replicas
from membership pushed by the controller, keeps one multiplexed connection per replica,
picks a replica by power-of-two-choices on the requests it has in flight there, and never
sends a replica more than ``max_ongoing_requests``. When every replica is full, callers
wait in FIFO order (up to ``max_queued_requests`` of them, then ``BackPressureError``).
A replica that refuses a request (it is full because of other callers) or that cannot be
reached is skipped and the request goes elsewhere; a request already accepted by a replica
that then dies fails at once with ``ReplicaDiedError``.

A replica that membership lists is never forgotten because its connection failed: while it
cannot be reached it is skipped and reconnected with back-off. A replica that stops answering
(no frame for a while although requests are in flight, then no answer to a ping: frozen, or
its event loop blocked) is skipped for new requests until any frame arrives from it again
(:mod:`shoal.runtime.liveness`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from shoal.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaDiedError, wrap_remote_exception
from shoal.runtime.flow import CreditCounter, StreamSink
from shoal.runtime.liveness import ConnEvent, ProbeTimer, ReplicaHealth
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
    FramedProtocol,
    Membership,
    ReplicaEndpoint,
    RequestMeta,
    connect_endpoint,
)

logger = logging.getLogger("shoal.router")

# How long a replica that refused a request is skipped, unless one of ours finishes there first.
REJECT_BACKOFF_S = 0.02
CLOCK_SLACK_S = 0.002
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
        try:
            # HTTP requests carry only plain data (an ASGI scope and bytes): plain pickle is
            # enough and much faster; user values may need cloudpickle. A large body travels
            # after the pickle, not copied into it (FramedProtocol.send_oob).
            if meta.http:
                if len(args) == 2 and len(args[1]) >= OOB_BODY_BYTES:
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
        return rid

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


class Reservation:
    """A replica slot taken ahead of its request (:meth:`Router.reserve`): given to
    :meth:`Router.stream`, or released (releasing twice, or after handing it over, is a no-op)."""

    __slots__ = ("_router", "_slot")

    def __init__(self, router: Router, slot: _Slot) -> None:
        self._router: Router | None = router
        self._slot: _Slot | None = slot

    def take(self) -> _Slot | None:
        slot, self._slot = self._slot, None
        return slot

    def release(self) -> None:
        slot, router = self.take(), self._router
        if slot is not None and router is not None:
            router._release(slot)


@dataclass(eq=False)
class _Slot:
    replica: ReplicaEndpoint
    conn: ReplicaConnection
    health: ReplicaHealth  # reachable and answering (else skipped); reconnects with back-off
    in_flight: int = 0
    blocked_until: float = 0.0
    removed: bool = False


class Router:
    """Routes one deployment's requests from one process. Runs on its backend's loop."""

    def __init__(self, app: str, deployment: str, secret: bytes,
                 rng: random.Random | None = None) -> None:
        self.app = app
        self.deployment = deployment
        self._secret = secret
        self._slots: dict[str, _Slot] = {}
        self._epoch = -1
        self._max_queued = -1
        self._max_wait = 0.0  # seconds a request may wait for a free replica (0: no bound)
        self._gone = ""
        self._waiters: deque[list[asyncio.Future[None]]] = deque()
        self._rng = rng or random.Random()
        self._wake_handle: asyncio.TimerHandle | None = None
        self.metrics_interval_s = 0.0
        # Called when a request starts waiting while the deployment has no replica (scale from zero).
        self.on_cold_wait: Callable[[Router], None] | None = None
        # Called once per outage when a replica could not be reached or its connection died
        # (the router keeps the replica and reconnects; the membership owner may leave it out).
        self.on_drop: Callable[[ReplicaEndpoint], None] | None = None

    # -- membership
    def update(self, m: Membership) -> None:
        if m.epoch <= self._epoch and not m.gone:
            return
        self._epoch = m.epoch
        self._max_queued = m.max_queued_requests
        self._max_wait = m.max_queue_wait_s
        self._gone = m.gone
        self.metrics_interval_s = m.metrics_interval_s
        new = {r.replica_id: r for r in m.replicas}
        for replica_id, slot in list(self._slots.items()):
            if replica_id not in new:
                self._remove(slot)
        for replica_id, addr in new.items():
            existing = self._slots.get(replica_id)
            if existing is None:
                self._slots[replica_id] = self._new_slot(addr)
            else:
                existing.replica = addr
        self._wake(all_waiters=True)

    def _new_slot(self, addr: ReplicaEndpoint) -> _Slot:
        conn = ReplicaConnection(addr, self._secret)

        def outage() -> None:
            if self.on_drop is not None:
                self.on_drop(slot.replica)

        health = ReplicaHealth(f"replica {addr.replica_id} of {self.app}/{self.deployment}", conn.try_connect,
                               lambda: self._wake(all_waiters=True), outage)
        slot = _Slot(addr, conn, health)
        conn.on_event = lambda _c, event, why: health.event(event, why)
        return slot

    def _remove(self, slot: _Slot) -> None:
        """Membership no longer lists the slot's replica."""
        slot.removed = True
        del self._slots[slot.replica.replica_id]
        slot.health.close()
        if slot.conn.idle:
            slot.conn.close()

    @property
    def num_replicas(self) -> int:
        return len(self._slots)

    @property
    def num_queued(self) -> int:
        return len(self._waiters)

    def holds_model(self, model_id: str) -> bool:
        """Whether some replica reported holding this multiplexed model."""
        return any(model_id in s.replica.model_ids for s in self._slots.values())

    @property
    def num_in_flight(self) -> int:
        return sum(s.in_flight for s in self._slots.values())

    # -- choice
    def _choose(self, now: float, model_id: str = "") -> _Slot | None:
        # uvloop's clock has millisecond granularity: a slot whose block ends within the
        # current millisecond counts as free (else a timer set for its end would spin).
        # Skipped too: replicas that cannot be reached or do not answer, and one being connected
        # to (the request that started the connection waits for it; the others go elsewhere).
        free = [s for s in self._slots.values()
                if s.in_flight < s.replica.max_ongoing and s.blocked_until <= now + CLOCK_SLACK_S
                and s.health.usable and not s.conn.connecting]
        if not free:
            return None
        if model_id:
            # Prefer replicas that already hold the model; among the rest, those holding fewest.
            holding = [s for s in free if model_id in s.replica.model_ids]
            if holding:
                free = holding
            else:
                fewest = min(len(s.replica.model_ids) for s in free)
                free = [s for s in free if len(s.replica.model_ids) == fewest]
        if len(free) == 1:
            return free[0]
        a, b = self._rng.sample(free, 2)
        return a if a.in_flight <= b.in_flight else b

    def _waited_too_long(self) -> BackPressureError:
        return BackPressureError(len(self._waiters), self._max_queued, message=(
            f"no replica of {self.app}/{self.deployment} was free within {self._max_wait:g} s "
            "(max_queue_wait_s)"))

    async def _acquire(self, model_id: str = "", began: float | None = None) -> _Slot:
        """A replica slot, waiting in line for one; ``began``: when the request started asking
        (its retries after a replica refused it share one ``max_queue_wait_s``)."""
        loop = asyncio.get_running_loop()
        if self._gone:
            raise DeploymentUnavailableError(self._gone)
        if not self._waiters:
            slot = self._choose(loop.time(), model_id)
            if slot is not None:
                slot.in_flight += 1
                return slot
        if self._max_queued != -1 and len(self._waiters) >= self._max_queued:
            raise BackPressureError(len(self._waiters), self._max_queued)
        # A waiter keeps its place in line across wake-ups: its future is replaced in place.
        waiter: list[asyncio.Future[None]] = [loop.create_future()]
        self._waiters.append(waiter)
        if not self._slots and self.on_cold_wait is not None:
            self.on_cold_wait(self)
        got = False
        # The wait for a free replica is bounded (max_queue_wait_s); waiting for the first
        # replica of a deployment that has none is bounded by its start deadline instead.
        expired: list[bool] = [False]
        deadline = None
        if self._max_wait > 0:
            left = self._max_wait - (loop.time() - began if began is not None else 0.0)
            deadline = loop.call_later(max(0.0, left), _expire, waiter, expired)
        try:
            while True:
                await waiter[0]
                if self._gone:
                    raise DeploymentUnavailableError(self._gone)
                slot = self._choose(loop.time(), model_id)
                if slot is not None:
                    slot.in_flight += 1
                    got = True
                    return slot
                if expired[0]:
                    if self._slots:
                        raise self._waited_too_long()
                    expired[0] = False
                    deadline = loop.call_later(self._max_wait, _expire, waiter, expired)
                waiter[0] = loop.create_future()
                self._schedule_unblock(loop)
        finally:
            if deadline is not None:
                deadline.cancel()
            self._waiters.remove(waiter)
            # Pass the turn on: after a success there may be more room, after a failure
            # (cancellation, timeout) our wake-up must not be lost.
            if self._waiters and (not got or self._choose(loop.time(), model_id) is not None):
                self._wake()

    def _schedule_unblock(self, loop: asyncio.AbstractEventLoop) -> None:
        blocked = [s.blocked_until for s in self._slots.values() if s.blocked_until > loop.time()]
        if blocked and self._wake_handle is None:
            def fire() -> None:
                self._wake_handle = None
                self._wake()
            self._wake_handle = loop.call_at(min(blocked) + CLOCK_SLACK_S, fire)

    def _release(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        if slot.removed and slot.conn.idle and slot.in_flight == 0:
            slot.conn.close()
        self._wake()

    def _release_once(self, held: list[_Slot]) -> None:
        if held:
            self._release(held.pop())

    def _wake(self, all_waiters: bool = False) -> None:
        for waiter in self._waiters:
            fut = waiter[0]
            if not fut.done():
                fut.set_result(None)
                if not all_waiters:
                    return

    def _rejected(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        slot.blocked_until = loop.time() + REJECT_BACKOFF_S
        self._schedule_unblock(loop)

    # -- calls
    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta) -> Any:
        args, kwargs = await resolve_arguments(args, kwargs)
        began = asyncio.get_running_loop().time()
        while True:
            slot = await self._acquire(meta.multiplexed_model_id, began)
            try:
                conn = slot.conn
                await conn.connect()
                rid, fut = conn.send_unary(method, args, kwargs, meta)
                try:
                    return await fut
                except asyncio.CancelledError:
                    conn.cancel(rid)
                    raise
            except _Rejected:
                self._rejected(slot)
            except _Unreachable:
                pass  # the slot is marked down (its health saw the failure): try another replica
            finally:
                self._release(slot)

    async def reserve(self, model_id: str = "") -> Reservation:
        """Take a replica slot now for a request sent later (an HTTP request once its body is
        read), queueing like a request does (``BackPressureError`` past ``max_queued_requests``).
        Hand it to :meth:`stream`, or release it."""
        return Reservation(self, await self._acquire(model_id))

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta, reserved: Reservation | None = None) -> AsyncIterator[Any]:
        """The items of a streamed request (an HTTP request's ASGI messages too), taken
        replica by replica as they come: the replica sends at most about a window ahead
        (:mod:`shoal.runtime.flow`). ``reserved``: a slot taken by :meth:`reserve`, used first."""
        args, kwargs = await resolve_arguments(args, kwargs)
        began = asyncio.get_running_loop().time()
        while True:
            slot = reserved.take() if reserved is not None else None
            reserved = None
            if slot is None:
                slot = await self._acquire(meta.multiplexed_model_id, began)
            # Released once: when the replica's last frame arrives (its slot there is free
            # then, even if the consumer has not taken everything yet), or at the latest below.
            release = functools.partial(self._release_once, [slot])
            try:
                conn = slot.conn
                await conn.connect()
                rid, q = conn.send_stream(method, args, kwargs, meta)
                q.on_end = release
                done = False
                try:
                    first = True
                    while True:
                        kind, value = await q.get()
                        if kind == ITEM:
                            first = False
                            yield value
                        elif kind == END:
                            done = True
                            return
                        elif kind == REJECT and first:
                            done = True
                            raise _Rejected()
                        else:
                            done = True
                            raise value
                finally:
                    if not done:
                        conn.cancel(rid)
            except _Rejected:
                self._rejected(slot)
            except _Unreachable:
                pass  # the slot is marked down (its health saw the failure): try another replica
            finally:
                release()

    def close(self) -> None:
        for slot in self._slots.values():
            slot.removed = True
            slot.health.close()
            slot.conn.close()
        self._slots.clear()
        self._gone = self._gone or "the router was closed"
        self._wake(all_waiters=True)


def _expire(waiter: list[asyncio.Future[None]], expired: list[bool]) -> None:
    """A queued request's wait for a replica is over: wake it to give up (or to wait on for a
    deployment's first replica)."""
    expired[0] = True
    if not waiter[0].done():
        waiter[0].set_result(None)


async def resolve_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Await DeploymentResponses passed as top-level arguments (chaining without awaiting)."""
    from shoal.handle import DeploymentResponse

    if any(isinstance(a, DeploymentResponse) for a in args):
        args = tuple([await a if isinstance(a, DeploymentResponse) else a for a in args])
    if kwargs and any(isinstance(v, DeploymentResponse) for v in kwargs.values()):
        kwargs = {k: (await v if isinstance(v, DeploymentResponse) else v) for k, v in kwargs.items()}
    return args, kwargs
