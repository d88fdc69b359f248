"""Bounded uploads: the front's request-body budget (shoal.runtime.http.budget), reading a body
into one buffer, and admission before buffering (ProxyApp with fakes: no sockets, no processes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal.exceptions import BackPressureError
from shoal.runtime.http.app import ADMIT_FIRST_BYTES, ProxyApp
from shoal.runtime.http.budget import BUDGET_FREE_BYTES, BUDGET_STEP_BYTES, BodyBudget
from shoal.runtime.http.guard import BUSY, TOO_LARGE, Guard
from shoal.runtime.http.options import FrontOptions
from shoal.runtime.wire import RequestMeta, Routes

MIB = 1024 * 1024


async def test_what_fits_is_taken_at_once_and_what_never_fits_is_refused() -> None:
    b = BodyBudget(100, wait_s=10)
    assert await b.acquire(60) and await b.acquire(40) and b.used == 100
    assert not await b.acquire(101)  # larger than the whole budget: no wait
    b.release(100)
    assert b.used == 0


async def test_waiters_are_served_in_order_as_room_comes_back() -> None:
    b = BodyBudget(100, wait_s=10)
    assert await b.acquire(90)
    big = asyncio.ensure_future(b.acquire(50))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(b.acquire(5))  # would fit, but waits its turn
    await asyncio.sleep(0)
    assert not big.done() and not small.done()
    b.release(90)
    assert await big and await small and b.used == 55


async def test_a_wait_that_runs_out_is_refused_and_leaves_nothing_behind() -> None:
    b = BodyBudget(100, wait_s=0.05)
    assert await b.acquire(100)
    assert not await b.acquire(10)
    assert not b.waiters and b.used == 100
    b.release(100)
    assert b.used == 0


async def test_a_cancelled_wait_passes_its_turn_on() -> None:
    b = BodyBudget(100, wait_s=10)
    assert await b.acquire(80)
    first = asyncio.ensure_future(b.acquire(50))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(b.acquire(20))
    await asyncio.sleep(0)
    assert not second.done()
    first.cancel()
    await asyncio.sleep(0)
    assert await second and b.used == 100 and not b.waiters


async def test_a_lease_grows_with_the_body_and_gives_everything_back() -> None:
    b = BodyBudget(10 * MIB, wait_s=1)
    lease = b.lease()
    assert await lease.cover(BUDGET_FREE_BYTES - 1) and lease.held == 0  # small: free
    assert await lease.cover(BUDGET_FREE_BYTES, step=True) and lease.held == BUDGET_STEP_BYTES
    assert await lease.cover(BUDGET_STEP_BYTES, step=True) and lease.held == BUDGET_STEP_BYTES
    assert await lease.cover(3 * MIB) and lease.held == 3 * MIB
    lease.release()
    lease.release()
    assert b.used == 0 and lease.held == 0


def feed(*messages: dict[str, Any]) -> Any:
    it = iter(messages)

    async def receive() -> dict[str, Any]:
        return next(it)

    return receive


async def test_a_declared_body_is_read_into_one_buffer_within_its_lease() -> None:
    guard = Guard(FrontOptions(max_request_body_bytes=10 * MIB), None)
    budget = BodyBudget(4 * MIB, wait_s=0.05)
    lease = budget.lease()
    chunk = b"a" * MIB
    body = await guard.read_body(feed(*[{"type": "http.request", "body": chunk, "more_body": True}] * 2,
                                      {"type": "http.request", "body": b"b", "more_body": False}),
                                 2 * MIB + 1, lease)
    assert isinstance(body, bytearray) and body == chunk * 2 + b"b"
    assert budget.used == 2 * MIB + 1
    # No room for another 2 MiB (only ~2 left): BUSY after the wait, nothing read.
    assert await guard.read_body(feed(), 2 * MIB, budget.lease()) == BUSY
    # Declared larger than the whole budget: it could never fit.
    assert await guard.read_body(feed(), 5 * MIB, budget.lease()) == TOO_LARGE
    lease.release()
    assert budget.used == 0


async def test_a_body_of_unknown_length_takes_its_share_as_it_grows() -> None:
    guard = Guard(FrontOptions(max_request_body_bytes=100 * MIB), None)
    budget = BodyBudget(3 * MIB, wait_s=0.05)
    lease = budget.lease()
    chunk = {"type": "http.request", "body": b"c" * MIB, "more_body": True}
    assert await guard.read_body(feed(chunk, chunk, chunk, chunk), -1, lease) == TOO_LARGE  # grew past it
    lease.release()
    lease = budget.lease()
    body = await guard.read_body(feed(chunk, {"type": "http.request", "body": b"", "more_body": False}), -1, lease)
    assert body == b"c" * MIB and budget.used == lease.held >= MIB
    lease.release()


# ---- admission before buffering ------------------------------------------------------------


class Reservation:
    def __init__(self, router: ReservingRouter) -> None:
        self.router = router
        self.released = False

    def release(self) -> None:
        self.released = True


class ReservingRouter:
    def __init__(self, log: list[str], refuse: bool = False) -> None:
        self.log = log
        self.refuse = refuse
        self.reservations: list[Reservation] = []

    def holds_model(self, model_id: str) -> bool:
        return False

    async def reserve(self, model_id: str = "") -> Reservation:
        self.log.append("reserve")
        if self.refuse:
            raise BackPressureError(3, 3)
        r = Reservation(self)
        self.reservations.append(r)
        return r

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta,
                     reserved: Any = None) -> AsyncIterator[list[dict[str, Any]]]:
        self.log.append(f"stream reserved={reserved is not None} body={len(args[1])}")
        yield [{"type": "http.response.start", "status": 200, "headers": []},
               {"type": "http.response.body", "body": b"ok", "more_body": False}]


class Source:
    def __init__(self, router: ReservingRouter) -> None:
        self.r = router

    def router(self, app: str, deployment: str) -> ReservingRouter:
        return self.r


async def call(app: ProxyApp, size: int, log: list[str]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        log.append("receive")
        return {"type": "http.request", "body": b"z" * size, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "headers": [(b"content-length", str(size).encode())]}
    await app(scope, receive, send)
    return sent


def proxy(router: ReservingRouter) -> ProxyApp:
    app = ProxyApp(Source(router), FrontOptions())  # type: ignore[arg-type]
    app.set_routes(Routes({"/": ("root", "R")}))
    return app


@pytest.mark.parametrize("size", [ADMIT_FIRST_BYTES, 10])
async def test_a_large_body_waits_for_a_replica_slot_before_it_is_read(size: int) -> None:
    log: list[str] = []
    router = ReservingRouter(log)
    sent = await call(proxy(router), size, log)
    assert sent[0]["status"] == 200
    if size >= ADMIT_FIRST_BYTES:
        assert log == ["reserve", "receive", f"stream reserved=True body={size}"]
        assert router.reservations[0].released  # released after the request (a no-op once taken)
    else:
        assert log == ["receive", f"stream reserved=False body={size}"]


async def test_a_large_body_refused_a_slot_is_answered_503_without_reading_it() -> None:
    log: list[str] = []
    sent = await call(proxy(ReservingRouter(log, refuse=True)), 2 * ADMIT_FIRST_BYTES, log)
    assert log == ["reserve"]
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
    assert "overloaded" in json.loads(sent[1]["body"])["error"]


# ---- a body travels out of band -------------------------------------------------------------


class Wire:
    """A transport that keeps what was written."""

    def __init__(self) -> None:
        self.data = bytearray()

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, parts: list[Any]) -> None:
        for p in parts:
            self.data += p


async def test_a_large_body_travels_after_its_pickle_and_arrives_as_bytes() -> None:
    import pickle

    from shoal.runtime.wire import REQUEST, FramedProtocol

    sender = FramedProtocol(b"s" * 32, False)
    sender.transport = Wire()  # type: ignore[assignment]
    body = bytearray(b"q" * (3 * MIB))
    sender.send_oob((REQUEST, 1, "__call__", ({"path": "/"}, pickle.PickleBuffer(body)), {}, None))
    sender.send_oob((REQUEST, 2, "__call__", ({"path": "/"}, b"small"), {}, None))  # no buffer: one pickle
    wire: Any = sender.transport
    assert len(wire.data) < 3 * MIB + 1024  # the body once, not pickled into a copy

    got: list[Any] = []
    receiver = FramedProtocol(b"s" * 32, False, on_message=lambda _p, m: got.append((m, _p.frame_size)))
    receiver._state = 2  # authenticated
    data = bytes(wire.data)
    for i in range(0, len(data), 100_000):  # arriving in pieces
        receiver.data_received(data[i:i + 100_000])
    (first, size), (second, _) = got
    assert first[1] == 1 and type(first[3][1]) is bytes and first[3][1] == body
    assert size > 3 * MIB and second[3] == ({"path": "/"}, b"small")
