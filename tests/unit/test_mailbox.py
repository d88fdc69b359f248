"""Cross-thread calls delivered in batches (shoal/runtime/mailbox.py): order, one wake-up per
batch, and run_coroutine_threadsafe's / wrap_future's semantics kept (results, errors,
cancellation both ways, a closed loop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from shoal.runtime.backend import LoopThread
from shoal.runtime.mailbox import Mailbox, mailbox, submit, wrap

WAIT_S = 10.0


@pytest.fixture
def other() -> Iterator[LoopThread]:
    lt = LoopThread("mailbox-test").start()
    yield lt
    lt.stop()


def test_posts_run_in_order_with_one_wake_up_per_batch(other: LoopThread) -> None:
    box = Mailbox(other.loop)
    wakeups = 0
    real = other.loop.call_soon_threadsafe

    def counting(cb: Any, *args: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return real(cb, *args)

    gate = threading.Event()
    other.loop.call_soon_threadsafe(gate.wait, WAIT_S)  # hold the loop while we post
    box._loop = type("L", (), {"call_soon_threadsafe": staticmethod(counting)})()  # type: ignore[assignment]
    seen: list[int] = []
    for i in range(100):
        box.post(seen.append, i)
    gate.set()
    done = concurrent.futures.Future[None]()
    box.post(done.set_result, None)
    done.result(WAIT_S)
    assert seen == list(range(100)) and wakeups <= 2


def test_a_failing_callback_does_not_drop_the_others(other: LoopThread, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    done = concurrent.futures.Future[None]()
    box = mailbox(other.loop)
    box.post(lambda: 1 / 0)
    box.post(seen.append, "after")
    box.post(done.set_result, None)
    done.result(WAIT_S)
    assert seen == ["after"] and "ZeroDivisionError" in caplog.text
    assert mailbox(other.loop) is box


def test_submit_gives_results_and_errors(other: LoopThread) -> None:
    async def ok(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    async def bad() -> None:
        raise KeyError("nope")

    futures = [submit(ok(i), other.loop) for i in range(50)]
    assert [f.result(WAIT_S) for f in futures] == [i * 2 for i in range(50)]
    with pytest.raises(KeyError, match="nope"):
        submit(bad(), other.loop).result(WAIT_S)


def test_cancelling_the_future_cancels_the_task(other: LoopThread) -> None:
    started, stopped = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped.set()
            raise

    cfut = submit(forever(), other.loop)
    assert started.wait(WAIT_S)
    assert cfut.cancel()
    assert stopped.wait(WAIT_S) and cfut.cancelled()


def test_wrap_follows_the_future_and_its_cancellation_goes_back(other: LoopThread) -> None:
    stopped = threading.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return "never"

    async def quick() -> str:
        return "fine"

    async def main() -> None:
        assert await wrap(submit(quick(), other.loop)) == "fine"
        waiting = asyncio.ensure_future(wrap(submit(slow(), other.loop)))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    assert stopped.wait(WAIT_S)


def test_a_closed_loop_refuses_and_closes_the_coroutine() -> None:
    loop = asyncio.new_event_loop()
    loop.close()

    async def never() -> None:
        raise AssertionError("must not run")

    coro = never()
    with pytest.raises(RuntimeError):
        submit(coro, loop)
    assert coro.cr_frame is None  # closed, so no "never awaited" warning
