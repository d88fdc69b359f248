"""The replica core's parts on their own: the slots, the counters, the HTTP response over RPC."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shoal.exceptions import BackPressureError
from shoal.runtime.replica.accounting import RequestCounters, error_payload
from shoal.runtime.replica.rpc_http import RPCResponse
from shoal.runtime.replica.slots import Slots
from shoal.runtime.wire import END, ITEM, LATENCY_BUCKETS_MS, OK


async def test_slots_refuse_when_full_or_draining_and_hand_over_in_order() -> None:
    slots = Slots(limit=1, max_queued=2)
    assert slots.try_admit() and not slots.try_admit() and not slots.idle.is_set()
    order: list[str] = []

    async def waiter(name: str) -> None:
        await slots.admit()
        order.append(name)

    a, b = asyncio.ensure_future(waiter("a")), asyncio.ensure_future(waiter("b"))
    await asyncio.sleep(0)
    assert slots.load == 3 and slots.refuses()
    with pytest.raises(BackPressureError):
        await slots.admit()
    slots.release()  # to a
    await a
    slots.release()  # to b
    await b
    assert order == ["a", "b"] and slots.ongoing == 1
    slots.release()
    assert slots.ongoing == 0 and slots.idle.is_set()
    slots.draining = True
    assert not slots.try_admit()


async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    slots = Slots(limit=1)
    slots.take()
    task = asyncio.ensure_future(slots.admit())
    await asyncio.sleep(0)
    slots.release()  # handed to the task...
    task.cancel()  # ...which no longer wants it
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slots.ongoing == 0 and slots.idle.is_set()


async def test_a_waiter_gives_up_after_max_wait_and_the_queue_moves_on() -> None:
    slots = Slots(limit=1, max_wait=0.05)
    slots.take()
    with pytest.raises(BackPressureError, match=r"free within 0\.05 s"):
        await slots.admit()
    assert not slots.waiters and slots.ongoing == 1  # the one that gave up left no trace
    later = asyncio.ensure_future(slots.admit())
    await asyncio.sleep(0)
    slots.release()  # handed to the next waiter, within its wait
    await later
    assert slots.ongoing == 1
    slots.release()
    assert slots.ongoing == 0 and slots.idle.is_set()


def test_counters_use_the_injected_clock() -> None:
    now = [10.0]
    c = RequestCounters(lambda: now[0])
    now[0] = 10.0 + LATENCY_BUCKETS_MS[0] / 2000.0
    c.record(10.0, failed=False)
    now[0] = 1e9
    c.record(10.0, failed=True)
    assert (c.requests, c.errors, c.hist[0], c.hist[-1]) == (2, 1, 1, 1)


def test_an_unpicklable_error_is_sent_as_a_named_serve_exception() -> None:
    class Local(Exception):
        def __reduce__(self) -> Any:
            raise TypeError("no")

    exc, tb = error_payload(Local("x"))
    assert "Local: x" in str(exc) and "Local" in tb


class Conn:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any) -> None:
        self.sent.append(msg)


async def test_rpc_response_one_frame_streamed_and_finished() -> None:
    conn = Conn()
    r = RPCResponse(conn, 1)  # type: ignore[arg-type]
    await r.send({"type": "http.response.start", "status": 200})
    await r.send({"type": "http.response.body", "body": b"x"})
    r.finish()
    assert [m[0] for m in conn.sent] == [OK] and len(conn.sent[0][2]) == 2 and r.status == 200

    conn = Conn()
    r = RPCResponse(conn, 2)  # type: ignore[arg-type]
    await r.send({"type": "http.response.start", "status": 206})
    await r.send({"type": "http.response.body", "body": b"a", "more_body": True})
    await r.send({"type": "http.response.body", "body": b"b"})
    assert [m[0] for m in conn.sent] == [ITEM, ITEM, END]

    conn = Conn()
    r = RPCResponse(conn, 3)  # type: ignore[arg-type]
    await r.send({"type": "http.response.start", "status": 204})
    r.finish()  # the app returned without a body
    assert conn.sent == [(OK, 3, [{"type": "http.response.start", "status": 204},
                                  {"type": "http.response.body", "body": b"", "more_body": False}])]
