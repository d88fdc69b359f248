"""The router inside every handle: replica choice, back-pressure, retries.

One :class:`Router` per (process, deployment). It knows the deployment's running replicas
from membership pushed by the controller, keeps one multiplexed connection per replica,
picks a replica by power-of-two-choices on the requests it has in flight there, and never
sends a replica more than ``max_ongoing_requests``. When every replica is full, callers
wait in FIFO order (up to ``max_queued_requests`` of them, then ``BackPressureError``).
A replica that refuses a request (it is full because of other callers) or that cannot be
reached is skipped and the request goes elsewhere; a request already accepted by a replica
that then dies fails at once with ``ReplicaDiedError``.

The connection to each replica is :class:`~shoal.runtime.replica_connection.ReplicaConnection`.
A replica that membership lists is never forgotten because its connection failed: while it
cannot be reached it is skipped and reconnected with back-off. A replica that stops answering
(no frame for a while although requests are in flight, then no answer to a ping: frozen, or
its event loop blocked) is skipped for new requests until any frame arrives from it again
(:mod:`shoal.runtime.liveness`).

A deployment configured with a custom request router (``request_router_config``) is routed by
that class instead (:mod:`shoal.runtime.custom_routing`): it ranks the replicas, and a replica
with room is taken from the first rank that has one. Waiting, back-pressure and
``max_queue_wait_s`` are the same; deployments without one take none of that code path.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.exceptions import BackPressureError, DeploymentUnavailableError
from shoal.runtime.liveness import ReplicaHealth
from shoal.runtime.replica_connection import ReplicaConnection, _Rejected, _Unreachable
from shoal.runtime.wire import END, ITEM, REJECT, Membership, ReplicaEndpoint, RequestMeta

if TYPE_CHECKING:
    from shoal.request_router import PendingRequest, RunningReplica
    from shoal.runtime.custom_routing import CustomRouting

logger = logging.getLogger("shoal.router")

# How long a replica that refused a request is skipped, unless one of ours finishes there first.
REJECT_BACKOFF_S = 0.02
CLOCK_SLACK_S = 0.002
# A request whose custom router picked no free replica asks it again after this long (doubling
# up to CUSTOM_RETRY_MAX_S) even when nothing woke it: a router may be waiting for something
# shoal does not see (its own state, stats it asked for), as Ray's routers retry with backoff.
CUSTOM_RETRY_S = 0.025
CUSTOM_RETRY_MAX_S = 0.5

__all__ = ["ReplicaConnection", "Reservation", "Router", "resolve_arguments"]


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
        # Counts wake-ups: a request that awaited a custom router's answer compares it before
        # and after, so that a wake-up that came meanwhile (a membership with fresh routing
        # stats, a released slot) is not lost.
        self._wakes = 0
        self._rng = rng or random.Random()
        self._wake_handle: asyncio.TimerHandle | None = None
        self.metrics_interval_s = 0.0
        # Called when a request starts waiting while the deployment has no replica (scale from zero).
        self.on_cold_wait: Callable[[Router], None] | None = None
        # Called once per outage when a replica could not be reached or its connection died
        # (the router keeps the replica and reconnects; the membership owner may leave it out).
        self.on_drop: Callable[[ReplicaEndpoint], None] | None = None
        # A custom request router (request_router_config), the membership blob it came from,
        # and the replicas as it sees them (custom routing only).
        self._policy: CustomRouting | None = None
        self._policy_blob = b""
        self._views: list[tuple[RunningReplica, _Slot]] = []

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
        if m.request_router != self._policy_blob:
            self._set_policy(m.request_router)
        if self._policy is not None:
            self._update_views(m.routing_stats)
        self._wake(all_waiters=True)

    # -- custom request routers
    def _set_policy(self, blob: bytes) -> None:
        self._policy_blob = blob
        self._views = []
        self._policy = None
        if blob:
            from shoal.runtime.custom_routing import CustomRouting

            self._policy = CustomRouting.load(blob, self.app, self.deployment)

    def _update_views(self, stats: dict[str, dict[str, Any]]) -> None:
        """The replicas as the custom router sees them (after each membership)."""
        from shoal.context import ReplicaID
        from shoal.request_router import RunningReplica, local_node_id

        assert self._policy is not None
        app = self.app.split("#", 1)[0]
        node = local_node_id()
        views = []
        for slot in self._slots.values():
            r = slot.replica
            views.append((RunningReplica(
                ReplicaID(r.replica_id, self.deployment, app), max_ongoing_requests=r.max_ongoing,
                multiplexed_model_ids=r.model_ids, routing_stats=stats.get(r.replica_id),
                # A Unix socket is on this machine; a pod's node is not known (host:port).
                node_id=node if r.endpoint.startswith("/") else "",
                queue_len=functools.partial(_in_flight, slot), available=functools.partial(self._available, slot),
            ), slot))
        self._views = views
        self._policy.update([v for v, _ in views])

    @property
    def _custom_possible(self) -> bool:
        """Whether a request may be routed by a custom router: one is configured, or no
        membership came yet (the first requests wait for it, and it may name one)."""
        return self._policy is not None or self._epoch < 0

    def _available(self, slot: _Slot) -> bool:
        """Whether a request may go to ``slot`` now (the same test as :meth:`_choose`)."""
        now = asyncio.get_running_loop().time()
        return (slot.in_flight < slot.replica.max_ongoing and slot.blocked_until <= now + CLOCK_SLACK_S
                and slot.health.usable and not slot.conn.connecting and not slot.removed)

    def _pending(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta) -> PendingRequest:
        from shoal.request_router import PendingRequest, RequestMetadata

        return PendingRequest(list(args), dict(kwargs), RequestMetadata(
            request_id=meta.request_id, internal_request_id=meta.request_id, call_method=method, route=meta.route,
            multiplexed_model_id=meta.multiplexed_model_id, is_streaming=meta.stream, is_http_request=meta.http,
            app_name=self.app.split("#", 1)[0]))

    async def _choose_custom(self, pending: PendingRequest, model_id: str) -> _Slot | None:
        """A free replica from the first of the custom router's ranks that has one; the default
        choice when the router failed (:mod:`shoal.runtime.custom_routing`)."""
        loop = asyncio.get_running_loop()
        policy = self._policy
        if policy is None:  # the deployment's router changed meanwhile
            return self._choose(loop.time(), model_id)
        candidates = [v for v, s in self._views if s.health.usable and not s.removed]
        if not candidates:
            return None
        ranks = await policy.choose(candidates, pending)
        if self._gone:
            return None
        if ranks is None:
            return self._choose(loop.time(), model_id)
        for rank in ranks:
            best: _Slot | None = None
            for view in rank:
                slot = self._slots.get(view.replica_id.unique_id)
                if slot is not None and self._available(slot) and (best is None or slot.in_flight < best.in_flight):
                    best = slot
            if best is not None:
                return best
        return None

    def _routed(self, pending: PendingRequest | None, slot: _Slot, meta: RequestMeta) -> None:
        policy = self._policy
        if pending is None or policy is None:
            return
        from shoal.context import ReplicaID

        rid = ReplicaID(slot.replica.replica_id, self.deployment, self.app.split("#", 1)[0])
        policy.routed(pending, rid, meta.request_id, meta.stream)

    def _wake_after(self, waiter: list[asyncio.Future[None]]) -> None:
        """Pass a wake-up on to the first waiter behind ``waiter`` (custom routing: a request
        whose router wants other replicas than the free one lets the next request try)."""
        behind = False
        for other in self._waiters:
            if behind and not other[0].done():
                other[0].set_result(None)
                return
            behind = behind or other is waiter

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

    @property
    def custom_router_config(self) -> Any:
        """The RequestRouterConfig of the custom router in use, or None (shoal's own routing)."""
        return self._policy.config if self._policy is not None else None

    def connection(self, replica_id: str) -> ReplicaConnection | None:
        """The connection to a listed replica that is reachable and answering, else None."""
        slot = self._slots.get(replica_id)
        return slot.conn if slot is not None and slot.health.usable and not slot.removed else None

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

    async def _acquire(self, model_id: str = "", began: float | None = None,
                       pending: PendingRequest | None = None) -> _Slot:
        """A replica slot, waiting in line for one; ``began``: when the request started asking
        (its retries after a replica refused it share one ``max_queue_wait_s``); ``pending``:
        the request, for a custom router (None: the default choice)."""
        loop = asyncio.get_running_loop()
        if self._gone:
            raise DeploymentUnavailableError(self._gone)
        seen = self._wakes
        if not self._waiters:
            slot = (self._choose(loop.time(), model_id) if pending is None
                    else await self._pick_custom(pending, model_id))
            if slot is not None:
                slot.in_flight += 1
                return slot
        if self._max_queued != -1 and len(self._waiters) >= self._max_queued:
            raise BackPressureError(len(self._waiters), self._max_queued)
        return await self._wait_in_line(model_id, began, pending, seen)

    async def _wait_in_line(self, model_id: str, began: float | None, pending: PendingRequest | None,
                            seen: int) -> _Slot:
        """:meth:`_acquire` for a request that found no free replica: wait for one, in line;
        ``seen``: the wake-up count before the custom router was first asked."""
        loop = asyncio.get_running_loop()
        # A waiter keeps its place in line across wake-ups: its future is replaced in place.
        waiter: list[asyncio.Future[None]] = [loop.create_future()]
        self._waiters.append(waiter)
        retry_s = CUSTOM_RETRY_S
        retry: asyncio.TimerHandle | None = None
        if pending is not None:
            retry = self._ask_again(waiter[0], seen, retry_s)
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
                seen = self._wakes
                slot = (self._choose(loop.time(), model_id) if pending is None
                        else await self._pick_custom(pending, model_id, waiter))
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
                if pending is not None:
                    retry_s = min(retry_s * 2, CUSTOM_RETRY_MAX_S)
                    if retry is not None:
                        retry.cancel()  # it was for the previous future
                    retry = self._ask_again(waiter[0], seen, retry_s)
                self._schedule_unblock(loop)
        finally:
            if deadline is not None:
                deadline.cancel()
            if retry is not None:
                retry.cancel()
            self._waiters.remove(waiter)
            # Pass the turn on: after a success there may be more room, after a failure
            # (cancellation, timeout) our wake-up must not be lost.
            if self._waiters and (not got or self._choose(loop.time(), model_id) is not None):
                self._wake()

    def _ask_again(self, fut: asyncio.Future[None], seen: int, after_s: float) -> asyncio.TimerHandle | None:
        """After a custom router picked nothing: wake ``fut`` now if a wake-up came while the
        router was being asked (``seen``: the count before), else after ``after_s``."""
        if self._policy is None:
            return None
        if self._wakes != seen:
            fut.set_result(None)
            return None
        return asyncio.get_running_loop().call_later(after_s, _retry, fut) if self._slots else None

    async def _pick_custom(self, pending: PendingRequest, model_id: str,
                           waiter: list[asyncio.Future[None]] | None = None) -> _Slot | None:
        """The custom router's choice of a slot (None: none of its picks has room). A waiter that
        got nothing while the default choice would have found room is woken again later."""
        slot = await self._choose_custom(pending, model_id)
        if self._gone:
            raise DeploymentUnavailableError(self._gone)
        now = asyncio.get_running_loop().time()
        if slot is None and waiter is not None and self._choose(now, model_id) is not None:
            self._wake_after(waiter)
        return slot

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
        self._wakes += 1
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
        pending = self._pending(method, args, kwargs, meta) if self._policy or self._epoch < 0 else None
        while True:
            slot = await self._acquire(meta.multiplexed_model_id, began, pending)
            try:
                conn = slot.conn
                await conn.connect()
                rid, fut = conn.send_unary(method, args, kwargs, meta)
                if pending is not None:
                    self._routed(pending, slot, meta)
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
        pending = None
        if self._custom_possible:
            pending = self._pending("__call__", (), {}, RequestMeta("", stream=True, http=True,
                                                                    multiplexed_model_id=model_id))
        return Reservation(self, await self._acquire(model_id, pending=pending))

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta, reserved: Reservation | None = None) -> AsyncIterator[Any]:
        """The items of a streamed request (an HTTP request's ASGI messages too), taken
        replica by replica as they come: the replica sends at most about a window ahead
        (:mod:`shoal.runtime.flow`). ``reserved``: a slot taken by :meth:`reserve`, used first."""
        args, kwargs = await resolve_arguments(args, kwargs)
        began = asyncio.get_running_loop().time()
        pending = self._pending(method, args, kwargs, meta) if self._policy or self._epoch < 0 else None
        while True:
            slot = reserved.take() if reserved is not None else None
            reserved = None
            if slot is None:
                slot = await self._acquire(meta.multiplexed_model_id, began, pending)
            # Released once: when the replica's last frame arrives (its slot there is free
            # then, even if the consumer has not taken everything yet), or at the latest below.
            release = functools.partial(self._release_once, [slot])
            try:
                conn = slot.conn
                await conn.connect()
                rid, q = conn.send_stream(method, args, kwargs, meta)
                q.on_end = release
                if pending is not None:
                    self._routed(pending, slot, meta)
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


def _in_flight(slot: _Slot) -> int:
    return slot.in_flight


def _retry(fut: asyncio.Future[None]) -> None:
    """Ask a custom router again (:data:`CUSTOM_RETRY_S`)."""
    if not fut.done():
        fut.set_result(None)


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
