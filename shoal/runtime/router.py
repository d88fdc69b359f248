"""The router inside every handle: replica choice, back-pressure, retries.

One :class:`Router` per (process, deployment). It knows the deployment's running replicas
from membership pushed by the controller, keeps one multiplexed connection per replica,
picks a replica by power-of-two-choices on the requests it has in flight there, and never
sends a replica more than ``max_ongoing_requests``. When every replica is full, callers
wait in FIFO order (up to ``max_queued_requests`` of them, then ``BackPressureError``).
A replica that refuses a request (it is full because of other callers) or that cannot be
reached is skipped and the request goes elsewhere; a request already accepted by a replica
that then dies fails at once with ``ReplicaDiedError``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from shoal.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaDiedError, wrap_remote_exception
from shoal.runtime.wire import (
    CANCEL,
    END,
    ERR,
    ITEM,
    OK,
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


class _Rejected(Exception):
    pass


class _Unreachable(Exception):
    pass


class _StreamSink:
    """A minimal single-consumer queue of (kind, value) frames for one streamed request."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque[tuple[int, Any]] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: tuple[int, Any]) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> tuple[int, Any]:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class ReplicaConnection:
    """One authenticated connection to one replica, multiplexing requests by id."""

    def __init__(self, replica: ReplicaEndpoint, secret: bytes) -> None:
        self.replica = replica
        self._secret = secret
        self._proto: FramedProtocol | None = None
        self._connecting: asyncio.Task[FramedProtocol] | None = None
        self._next = 0
        # rid -> Future (unary) or Queue (stream)
        self._pending: dict[int, asyncio.Future[Any] | _StreamSink] = {}
        self.dead = False
        self.on_dead: Callable[[ReplicaConnection], None] | None = None

    async def connect(self) -> FramedProtocol:
        if self._proto is not None and not self._proto.closed:
            return self._proto
        if self.dead:
            raise _Unreachable(self.replica.replica_id)
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(
                connect_endpoint(self.replica.endpoint, self._secret, self._on_message, self._on_close, timeout=5.0)
            )
        try:
            proto = await asyncio.shield(self._connecting)
        except (TimeoutError, OSError, ConnectionError) as e:
            self._connecting = None
            self._mark_dead()
            raise _Unreachable(f"{self.replica.replica_id}: {e}") from None
        self._proto = proto
        return proto

    def _mark_dead(self) -> None:
        if not self.dead:
            self.dead = True
            if self.on_dead is not None:
                self.on_dead(self)

    def _on_message(self, proto: FramedProtocol, msg: Any) -> None:
        kind, rid = msg[0], msg[1]
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
            sink.put_nowait((ITEM, msg[2]))
            return
        del self._pending[rid]
        if kind == OK:
            sink.put_nowait((ITEM, msg[2]))
            sink.put_nowait((END, None))
        elif kind == END:
            sink.put_nowait((END, None))
        elif kind == ERR:
            sink.put_nowait((ERR, wrap_remote_exception(msg[2], msg[3])))
        elif kind == REJECT:
            sink.put_nowait((REJECT, None))

    def _on_close(self, proto: FramedProtocol, exc: BaseException | None) -> None:
        self._mark_dead()
        err = ReplicaDiedError(f"replica {self.replica.replica_id} died or closed its connection "
                               "while handling the request")
        pending, self._pending = self._pending, {}
        for sink in pending.values():
            if isinstance(sink, asyncio.Future):
                if not sink.done():
                    sink.set_exception(err)
            else:
                sink.put_nowait((ERR, err))

    def _send(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta,
              sink: asyncio.Future[Any] | _StreamSink) -> int:
        proto = self._proto
        if proto is None or proto.closed:
            raise _Unreachable(self.replica.replica_id)
        self._next += 1
        rid = self._next
        self._pending[rid] = sink
        try:
            msg = (REQUEST, rid, method, args, kwargs, meta)
            # HTTP requests carry only plain data (an ASGI scope and bytes): plain pickle is
            # enough and much faster; user values may need cloudpickle.
            if meta.http:
                proto.send(msg)
            else:
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
        return self._send(method, args, kwargs, meta, q), q

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


@dataclass(eq=False)
class _Slot:
    replica: ReplicaEndpoint
    conn: ReplicaConnection
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
        self._gone = ""
        self._waiters: deque[list[asyncio.Future[None]]] = deque()
        self._rng = rng or random.Random()
        self._wake_handle: asyncio.TimerHandle | None = None
        self.metrics_interval_s = 0.0
        # Called when a request starts waiting while the deployment has no replica (scale from zero).
        self.on_cold_wait: Callable[[Router], None] | None = None
        # Called when a replica is dropped because it could not be reached or its connection died.
        self.on_drop: Callable[[ReplicaEndpoint], None] | None = None

    # -- membership
    def update(self, m: Membership) -> None:
        if m.epoch <= self._epoch and not m.gone:
            return
        self._epoch = m.epoch
        self._max_queued = m.max_queued_requests
        self._gone = m.gone
        self.metrics_interval_s = m.metrics_interval_s
        new = {r.replica_id: r for r in m.replicas}
        for replica_id, slot in list(self._slots.items()):
            if replica_id not in new:
                slot.removed = True
                del self._slots[replica_id]
                if slot.conn.idle:
                    slot.conn.close()
        for replica_id, addr in new.items():
            existing = self._slots.get(replica_id)
            if existing is None or existing.conn.dead:
                self._slots[replica_id] = self._new_slot(addr)
            else:
                existing.replica = addr
        self._wake(all_waiters=True)

    def _new_slot(self, addr: ReplicaEndpoint) -> _Slot:
        conn = ReplicaConnection(addr, self._secret)
        slot = _Slot(addr, conn)
        conn.on_dead = lambda _c: self._drop(slot)
        return slot

    def _drop(self, slot: _Slot) -> None:
        if self._slots.get(slot.replica.replica_id) is slot:
            del self._slots[slot.replica.replica_id]
            slot.removed = True
            if self.on_drop is not None:
                self.on_drop(slot.replica)
            self._wake(all_waiters=True)

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
        free = [s for s in self._slots.values()
                if s.in_flight < s.replica.max_ongoing and s.blocked_until <= now + CLOCK_SLACK_S]
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

    async def _acquire(self, model_id: str = "") -> _Slot:
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
                waiter[0] = loop.create_future()
                self._schedule_unblock(loop)
        finally:
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
        while True:
            slot = await self._acquire(meta.multiplexed_model_id)
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
                self._drop(slot)
            finally:
                self._release(slot)

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[Any]:
        args, kwargs = await resolve_arguments(args, kwargs)
        while True:
            slot = await self._acquire(meta.multiplexed_model_id)
            try:
                conn = slot.conn
                await conn.connect()
                rid, q = conn.send_stream(method, args, kwargs, meta)
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
                self._drop(slot)
            finally:
                self._release(slot)

    def close(self) -> None:
        for slot in self._slots.values():
            slot.conn.close()
        self._slots.clear()
        self._gone = self._gone or "the router was closed"
        self._wake(all_waiters=True)


async def resolve_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Await DeploymentResponses passed as top-level arguments (chaining without awaiting)."""
    from shoal.handle import DeploymentResponse

    if any(isinstance(a, DeploymentResponse) for a in args):
        args = tuple([await a if isinstance(a, DeploymentResponse) else a for a in args])
    if kwargs and any(isinstance(v, DeploymentResponse) for v in kwargs.values()):
        kwargs = {k: (await v if isinstance(v, DeploymentResponse) else v) for k, v in kwargs.items()}
    return args, kwargs
