"""The replica core with a fake transport, fake connections and fake sinks: admission at the
slot limit, the bookkeeping of finished requests, and the drain. No processes, no sleeps."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest

from shoal.context import ReplicaContext
from shoal.exceptions import BackPressureError
from shoal.runtime.callable import UserCallable
from shoal.runtime.replica.accounting import Sinks
from shoal.runtime.replica.core import ReplicaCore
from shoal.runtime.wire import CANCEL, END, ERR, ITEM, OK, REJECT, REQUEST, RequestMeta


class Gated:
    """A deployment whose ``wait`` calls finish only when the test opens their gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = 0
        self.deleted = False
        self.reconfigured: Any = None
        self.healthy = True

    async def wait(self, x: Any) -> Any:
        self.started += 1
        await self.gate.wait()
        return x

    async def echo(self, x: Any) -> Any:
        return x

    async def fail(self) -> None:
        raise ValueError("boom")

    async def items(self, n: int) -> Any:
        for i in range(n):
            yield i

    async def __call__(self, request: Any) -> Any:  # HTTP requests
        from starlette.responses import Response

        await self.gate.wait()
        return Response(b"made", status_code=201)

    def reconfigure(self, config: Any) -> None:
        self.reconfigured = config

    def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("sick")

    def __del__(self) -> None:
        self.deleted = True


class FakeConn:
    """A caller's connection: what the core sent on it."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.closed = False
        self.on_message: Any = None
        self.on_close: Any = None

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    send_user = send

    def send_bytes(self, payload: bytes) -> None:
        self.sent.append(pickle.loads(payload))

    def close(self) -> None:
        self.closed = True

    def request(self, rid: int, method: str, *args: Any, stream: bool = False) -> None:
        self.on_message(self, (REQUEST, rid, method, args, {}, RequestMeta(request_id=str(rid), stream=stream)))

    def kinds(self, rid: int) -> list[int]:
        return [m[0] for m in self.sent if m[1] == rid]


class FakeServer:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeTransport:
    def __init__(self) -> None:
        self.server = FakeServer()
        self.on_connect: Any = None

    async def listen(self, on_connect: Any) -> Any:
        self.on_connect = on_connect
        return self.server


class FakeControl:
    def __init__(self) -> None:
        self.models: list[tuple[str, ...]] = []

    def models_changed(self, ids: tuple[str, ...]) -> None:
        self.models.append(ids)


class Recorder:
    """Sinks that remember what was reported."""

    def __init__(self) -> None:
        self.metrics: list[tuple[str, bool]] = []
        self.access: list[tuple[str, str, Any]] = []

    def sinks(self) -> Sinks:
        return Sinks(start_span=lambda *a: None, end_span=lambda *a: None, metrics=self._metric, access=self._access)

    def _metric(self, route: str, started: float, failed: bool) -> None:
        self.metrics.append((route, failed))

    def _access(self, verb: str, target: str, status: Any, started: float, rid: str, route: str) -> None:
        self.access.append((verb, target, status))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(self, limit: int = 2, max_queued: int = -1, graceful: float = 30.0) -> None:
        self.rec = Recorder()
        self.control = FakeControl()
        self.clock = Clock()
        self.core = ReplicaCore(channel=self.control, routers=None, replica_id="r1",  # type: ignore[arg-type]
                                clock=self.clock, sinks=self.rec.sinks())
        self.core.slots.limit = limit
        self.core.slots.max_queued = max_queued
        self.core.graceful_timeout = graceful
        self.transport = FakeTransport()

    async def start(self) -> Gated:
        user = UserCallable(Gated, (), {}, is_function=False, context=ReplicaContext("app", "dep", "r1"))
        await user.initialize(None)
        self.core.user = user
        await self.core.listen(self.transport)
        return user.instance  # type: ignore[no-any-return]

    def connect(self) -> FakeConn:
        conn = FakeConn()
        self.transport.on_connect(conn)
        return conn


async def settle() -> None:
    """Let every ready task run to its next wait (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_rpc_requests_beyond_the_slot_limit_are_refused_and_a_freed_slot_admits_again() -> None:
    s = Setup(limit=2)
    dep = await s.start()
    conn = s.connect()
    conn.request(1, "wait", "a")
    conn.request(2, "wait", "b")
    conn.request(3, "wait", "c")
    await settle()
    assert conn.kinds(3) == [REJECT] and s.core.rejected == 1
    assert s.core.ongoing == 2 and dep.started == 2
    dep.gate.set()
    await settle()
    assert (OK, 1, "a") in conn.sent and (OK, 2, "b") in conn.sent
    assert s.core.ongoing == 0 and s.core.slots.idle.is_set()
    conn.request(4, "echo", "d")
    await settle()
    assert (OK, 4, "d") in conn.sent


async def test_finished_requests_are_counted_metered_and_access_logged() -> None:
    s = Setup(limit=3)
    await s.start()
    conn = s.connect()
    conn.request(1, "echo", 7)
    conn.request(2, "fail")
    conn.request(3, "items", 2, stream=True)
    await settle()
    assert (OK, 1, 7) in conn.sent
    err = next(m for m in conn.sent if m[0] == ERR)
    assert err[1] == 2 and isinstance(err[2], ValueError) and "boom" in err[3]
    assert conn.kinds(3) == [ITEM, ITEM, END]
    c = s.core.counters
    assert (c.requests, c.errors, sum(c.hist)) == (3, 1, 3)
    assert sorted(s.rec.metrics) == [("", False), ("", False), ("", True)]
    assert sorted(s.rec.access) == [("CALL", "echo", "OK"), ("CALL", "fail", "ERROR"), ("STREAM", "items", "OK")]


async def test_a_cancelled_request_frees_its_slot_and_is_not_an_error() -> None:
    s = Setup(limit=1)
    await s.start()
    conn = s.connect()
    conn.request(1, "wait", "a")
    await settle()
    conn.on_message(conn, (CANCEL, 1))
    await settle()
    assert s.core.ongoing == 0 and conn.kinds(1) == []
    assert s.core.counters.errors == 0 and s.rec.access == [("CALL", "wait", "CANCELLED")]


async def test_http_from_the_own_front_waits_for_a_slot_in_order_and_meets_back_pressure() -> None:
    s = Setup(limit=1, max_queued=1)
    dep = await s.start()
    conn = s.connect()
    got: list[tuple[str, dict[str, Any]]] = []

    def serve(name: str) -> asyncio.Task[None]:
        async def send(message: dict[str, Any]) -> None:
            got.append((name, message))

        scope = {"type": "http", "method": "GET", "path": f"/{name}", "headers": []}
        return asyncio.ensure_future(s.core.serve(scope, b"", RequestMeta(request_id=name, route="/"), send))

    first, second = serve("first"), serve("second")
    await settle()
    assert s.core.ongoing == 1 and len(s.core.local_waiters) == 1
    with pytest.raises(BackPressureError):
        await s.core.serve({"method": "GET", "path": "/x"}, b"", RequestMeta(request_id="x"), lambda m: None)  # type: ignore[arg-type, return-value]
    # The front's waiters come first: an RPC request is refused meanwhile.
    conn.request(9, "echo", 1)
    assert conn.kinds(9) == [REJECT]
    dep.gate.set()
    await asyncio.gather(first, second)
    assert [name for name, m in got if m["type"] == "http.response.start"] == ["first", "second"]
    assert s.core.ongoing == 0
    assert s.rec.access == [("GET", "/first", 201), ("GET", "/second", 201)]
    assert s.core.counters.requests == 2 and s.core.counters.errors == 0


async def test_drain_refuses_new_requests_and_waits_for_those_in_flight() -> None:
    s = Setup()
    dep = await s.start()
    conn = s.connect()
    conn.request(1, "wait", "a")
    await settle()
    drain = asyncio.ensure_future(s.core.drain())
    await settle()
    assert s.transport.server.closed and s.core.draining
    conn.request(2, "echo", "b")
    assert conn.kinds(2) == [REJECT]
    assert not drain.done()
    dep.gate.set()
    await asyncio.wait_for(drain, 5)
    assert (OK, 1, "a") in conn.sent
    assert dep.deleted and conn.closed


async def test_drain_past_the_graceful_timeout_cancels_what_still_runs() -> None:
    s = Setup(graceful=0.0)
    dep = await s.start()
    conn = s.connect()
    conn.request(1, "wait", "a")
    await settle()
    await s.core.drain()
    await settle()
    assert dep.started == 1 and conn.kinds(1) == []
    assert s.core.ongoing == 0 and s.core.tasks == {}
    assert dep.deleted and conn.closed


async def test_control_operations_and_models() -> None:
    s = Setup()
    dep = await s.start()
    assert await s.core.control_op("stats", {}) == {"ongoing": 0}
    await s.core.control_op("reconfigure", {"user_config": {"k": 1}})
    assert dep.reconfigured == {"k": 1}
    await s.core.control_op("health", {})
    dep.healthy = False
    with pytest.raises(RuntimeError, match="sick"):
        await s.core.check_health()
    with pytest.raises(ValueError, match="unknown op"):
        await s.core.control_op("nope", {})
    s.core.models_changed(("m1",))
    assert s.core.model_ids == ("m1",) and s.control.models == [("m1",)]


async def test_a_request_before_the_deployment_is_constructed_is_not_served() -> None:
    s = Setup()
    with pytest.raises(RuntimeError, match="not initialized"):
        await s.core.control_op("health", {})
