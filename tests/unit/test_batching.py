"""@serve.batch: the formation rule on a fake clock, and the decorator on a real event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import cloudpickle
import pytest

from shoal.context import RequestContext, _request_ctx
from shoal.exceptions import RayServeException
from shoal.serving.batching import BatchConfig, BatchDecision, batch, next_batch

# ---------------------------------------------------------------------------------------------
# next_batch: pure, explicit clock.

CFG = BatchConfig(max_batch_size=4, batch_wait_timeout_s=0.5)


def test_nothing_queued_waits_for_an_arrival() -> None:
    assert next_batch(0, None, 10.0, CFG) == BatchDecision(None, None)


def test_full_batch_starts_at_once() -> None:
    assert next_batch(4, 10.0, 10.0, CFG) == BatchDecision(4, None)
    # More than a batch queued: take exactly max_batch_size.
    assert next_batch(9, 10.0, 10.0, CFG) == BatchDecision(4, None)


def test_partial_batch_waits_until_the_timeout_of_its_first_item() -> None:
    d = next_batch(3, 10.0, 10.2, CFG)
    assert d.take is None and d.wait_s == pytest.approx(0.3)
    assert next_batch(3, 10.0, 10.5, CFG) == BatchDecision(3, None)
    assert next_batch(1, 10.0, 99.0, CFG) == BatchDecision(1, None)


def test_zero_timeout_takes_what_is_queued() -> None:
    cfg = BatchConfig(max_batch_size=4, batch_wait_timeout_s=0.0)
    assert next_batch(2, 5.0, 5.0, cfg) == BatchDecision(2, None)


def test_batch_size_fn_limits_the_batch() -> None:
    sizes = [3, 3, 3, 1]

    def size_of(k: int) -> int:
        return sum(sizes[:k])

    cfg = BatchConfig(max_batch_size=8, batch_wait_timeout_s=1.0)
    # 3+3 fits, +3 would exceed 8: the batch is full now, before any timeout.
    assert next_batch(4, 0.0, 0.0, cfg, size_of) == BatchDecision(2, None)
    # Exactly at the limit is full too.
    assert next_batch(2, 0.0, 0.0, BatchConfig(6, 1.0), size_of) == BatchDecision(2, None)
    # Under the limit: wait for the timeout, then take everything that fits.
    d = next_batch(2, 0.0, 0.25, cfg, size_of)
    assert d.take is None and d.wait_s == pytest.approx(0.75)
    assert next_batch(2, 0.0, 1.0, cfg, size_of) == BatchDecision(2, None)


def test_full_only_ignores_the_timeout() -> None:
    assert next_batch(4, 0.0, 0.0, CFG, full_only=True) == BatchDecision(4, None)
    assert next_batch(3, 0.0, 9.0, CFG, full_only=True) == BatchDecision(None, 0.0)


def test_batch_size_fn_oversized_first_item() -> None:
    def size_of(k: int) -> int:
        return [20, 21][k - 1]

    assert next_batch(2, 0.0, 0.0, BatchConfig(10, 1.0), size_of) == BatchDecision(None, None, oversized=True)

    # A too-big item behind a fitting one only ends that batch.
    def size_of2(k: int) -> int:
        return [2, 30][k - 1]

    assert next_batch(2, 0.0, 0.0, BatchConfig(10, 1.0), size_of2) == BatchDecision(1, None)


# ---------------------------------------------------------------------------------------------
# The decorator.


async def test_argument_lists_per_parameter_and_order() -> None:
    seen: list[tuple[Any, ...]] = []

    @batch(max_batch_size=3, batch_wait_timeout_s=10)
    async def f(a: list[int], b: list[int], *, c: Any = "unset", d: Any = "scalar") -> list[int]:
        seen.append((a, b, c, d))
        return [x * 100 + y for x, y in zip(a, b, strict=True)]

    # Positional and keyword spellings batch together; c is passed by some requests only.
    results = await asyncio.gather(f(1, 2), f(3, b=4), f(a=5, b=6, c=7))
    assert results == [102, 304, 506]
    assert seen == [([1, 3, 5], [2, 4, 6], ["unset", "unset", 7], "scalar")]
    with pytest.raises(TypeError, match="missing"):
        await f(1)


async def test_results_routed_to_their_callers() -> None:
    @batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def square(xs: list[int]) -> list[int]:
        await asyncio.sleep(0.001)
        return [x * x for x in xs]

    async def call(i: int) -> int:
        await asyncio.sleep(0.0001 * (i % 7))
        return await square(i)

    assert await asyncio.gather(*(call(i) for i in range(100))) == [i * i for i in range(100)]


async def test_wrong_length_fails_the_batch() -> None:
    @batch(max_batch_size=2, batch_wait_timeout_s=10)
    async def f(xs: list[int]) -> list[int]:
        return xs[:1] if xs[0] < 0 else xs

    results = await asyncio.gather(f(-1), f(-2), return_exceptions=True)
    assert all(isinstance(r, RayServeException) and "2 requests" in str(r) for r in results)
    assert await asyncio.gather(f(1), f(2)) == [1, 2]

    @batch(max_batch_size=1)
    async def not_a_list(xs: list[int]) -> Any:
        return None

    with pytest.raises(TypeError, match="one entry per request"):
        await not_a_list(1)


async def test_exception_fails_only_its_batch() -> None:
    calls: list[list[int]] = []

    @batch(max_batch_size=2, batch_wait_timeout_s=10)
    async def f(xs: list[int]) -> list[int]:
        calls.append(xs)
        if 13 in xs:
            raise ValueError("poison")
        return [x + 1 for x in xs]

    bad = await asyncio.gather(f(13), f(1), return_exceptions=True)
    assert [type(r) for r in bad] == [ValueError, ValueError]
    assert await asyncio.gather(f(2), f(3)) == [3, 4]
    assert calls == [[13, 1], [2, 3]]


async def test_cancelled_while_queued_is_removed() -> None:
    calls: list[list[str]] = []

    @batch(max_batch_size=3, batch_wait_timeout_s=10)
    async def f(xs: list[str]) -> list[str]:
        calls.append(xs)
        return xs

    a = asyncio.create_task(f("a"))
    b = asyncio.create_task(f("b"))
    await asyncio.sleep(0)
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    # "b" left the queue: the batch fills with the next two, and "b" never runs.
    c, d = asyncio.create_task(f("c")), asyncio.create_task(f("d"))
    assert await asyncio.gather(a, c, d) == ["a", "c", "d"]
    assert calls == [["a", "c", "d"]]


async def test_cancelled_while_running_does_not_cancel_the_batch() -> None:
    release = asyncio.Event()
    finished: list[list[int]] = []

    @batch(max_batch_size=3, batch_wait_timeout_s=10)
    async def f(xs: list[int]) -> list[int]:
        await release.wait()
        finished.append(xs)
        return [x * 2 for x in xs]

    tasks = [asyncio.create_task(f(i)) for i in range(3)]
    await asyncio.sleep(0.01)  # the batch is running, waiting on `release`
    tasks[0].cancel()
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert await asyncio.gather(*tasks[1:]) == [2, 4]
    assert finished == [[0, 1, 2]]


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_max_concurrent_batches(limit: int) -> None:
    running = peak = 0

    @batch(max_batch_size=2, batch_wait_timeout_s=0, max_concurrent_batches=limit)
    async def f(xs: list[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return xs

    assert await asyncio.gather(*(f(i) for i in range(12))) == list(range(12))
    assert peak == limit


async def test_setters_take_effect() -> None:
    sizes: list[int] = []

    @batch(max_batch_size=10, batch_wait_timeout_s=10)
    async def f(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return xs

    assert f._get_max_batch_size() == 10 and f._get_batch_wait_timeout_s() == 10
    f.set_max_batch_size(2)
    assert await asyncio.gather(*(f(i) for i in range(4))) == [0, 1, 2, 3]
    assert sizes == [2, 2]
    # A lone request would wait 10 s; lowering the timeout releases the batch already forming.
    task = asyncio.create_task(f(7))
    await asyncio.sleep(0.02)
    assert not task.done()
    f.set_batch_wait_timeout_s(0)
    assert await asyncio.wait_for(task, 2) == 7
    assert f._get_batch_wait_timeout_s() == 0
    with pytest.raises(ValueError):
        f.set_max_batch_size(0)
    with pytest.raises(ValueError):
        f.set_batch_wait_timeout_s(-1)


async def test_setter_from_another_thread() -> None:
    @batch(max_batch_size=10, batch_wait_timeout_s=10)
    async def f(xs: list[int]) -> list[int]:
        return xs

    task = asyncio.create_task(f(1))
    await asyncio.sleep(0.01)
    t = threading.Thread(target=f.set_batch_wait_timeout_s, args=(0.0,))
    t.start()
    t.join()
    assert await asyncio.wait_for(task, 2) == 1


async def test_batch_size_fn_and_oversized_request() -> None:
    batches: list[list[str]] = []

    @batch(max_batch_size=10, batch_wait_timeout_s=0.05, batch_size_fn=lambda items: sum(len(s) for s in items))
    async def f(texts: list[str]) -> list[int]:
        batches.append(texts)
        return [len(t) for t in texts]

    assert await asyncio.gather(f("aaaa"), f("bbbb"), f("cc"), f("dddddd")) == [4, 4, 2, 6]
    assert batches == [["aaaa", "bbbb", "cc"], ["dddddd"]]
    with pytest.raises(RuntimeError, match="greater than max_batch_size"):
        await f("x" * 11)
    # Shrinking max_batch_size fails a queued item that no longer fits any batch.
    f.set_batch_wait_timeout_s(10)
    task = asyncio.create_task(f("abcdef"))
    await asyncio.sleep(0.01)
    f.set_max_batch_size(5)
    with pytest.raises(RuntimeError, match="greater than max_batch_size"):
        await asyncio.wait_for(task, 2)


async def test_streaming_per_caller() -> None:
    @batch(max_batch_size=4, batch_wait_timeout_s=10)
    async def gen(ns: list[int]) -> AsyncIterator[list[Any]]:
        for step in range(max(ns)):
            yield [f"{n}:{step}" if step < n else StopIteration for n in ns]
            await asyncio.sleep(0)

    async def collect(n: int) -> list[str]:
        return [item async for item in gen(n)]

    results = await asyncio.gather(*(collect(n) for n in (1, 3, 0, 2)))
    assert results == [["1:0"], ["3:0", "3:1", "3:2"], [], ["2:0", "2:1"]]


async def test_streaming_caller_that_stops_is_ignored() -> None:
    produced: list[int] = []
    closed = asyncio.Event()

    @batch(max_batch_size=2, batch_wait_timeout_s=10)
    async def gen(xs: list[int]) -> AsyncIterator[list[int]]:
        try:
            for step in range(5):
                produced.append(step)
                yield [x + step for x in xs]
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def first_only() -> int:
        async for v in gen(0):
            return v
        raise AssertionError("no item")

    async def all_items() -> list[int]:
        return [v async for v in gen(100)]

    first, rest = await asyncio.gather(first_only(), all_items())
    assert first == 0 and rest == [100, 101, 102, 103, 104]
    assert produced == [0, 1, 2, 3, 4]

    # When every caller has gone, the generator is closed instead of producing for nobody.
    produced.clear()
    closed.clear()
    await asyncio.gather(first_only(), first_only())
    await asyncio.wait_for(closed.wait(), 2)
    assert len(produced) < 5


async def test_streaming_error_reaches_every_caller() -> None:
    @batch(max_batch_size=2, batch_wait_timeout_s=10)
    async def gen(xs: list[int]) -> AsyncIterator[list[int]]:
        yield xs
        raise KeyError("boom")

    async def collect(x: int) -> list[int]:
        got: list[int] = []
        with pytest.raises(KeyError, match="boom"):
            async for v in gen(x):
                got.append(v)
        return got

    assert await asyncio.gather(collect(1), collect(2)) == [[1], [2]]


async def test_streaming_wrong_step_length() -> None:
    @batch(max_batch_size=2, batch_wait_timeout_s=10)
    async def gen(xs: list[int]) -> AsyncIterator[list[int]]:
        yield [1]

    async def collect(x: int) -> None:
        async for _ in gen(x):
            pass

    results = await asyncio.gather(collect(1), collect(2), return_exceptions=True)
    assert all(isinstance(r, RayServeException) for r in results)


def test_sync_functions_rejected() -> None:
    with pytest.raises(TypeError, match="async"):
        @batch
        def f(xs: list[int]) -> list[int]:
            return xs

    with pytest.raises(TypeError, match="async"):
        @batch(max_batch_size=2)
        def g(xs: list[int]) -> Any:
            yield xs


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_batch_size": -3},
        {"max_batch_size": 2.5},
        {"max_batch_size": True},
        {"batch_wait_timeout_s": -0.1},
        {"batch_wait_timeout_s": "1"},
        {"batch_wait_timeout_s": float("nan")},
        {"max_concurrent_batches": 0},
        {"max_concurrent_batches": 1.5},
        {"batch_size_fn": 3},
    ],
)
def test_bad_arguments_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        batch(**kwargs)


def test_positional_settings_need_keywords() -> None:
    with pytest.raises(TypeError, match="by keyword"):
        batch(8)  # type: ignore[call-overload]


async def test_bare_decorator_defaults() -> None:
    @batch
    async def f(xs: list[int]) -> list[int]:
        return [len(xs)] * len(xs)

    assert f._get_max_batch_size() == 10 and f._get_batch_wait_timeout_s() == 0.01
    assert await asyncio.gather(*(f(i) for i in range(25))) == [10] * 20 + [5] * 5


class Model:
    def __init__(self, name: str) -> None:
        self.name = name
        self.batches: list[list[int]] = []

    @batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def __call__(self, xs: list[int]) -> list[str]:
        self.batches.append(xs)
        return [f"{self.name}{x}" for x in xs]

    @batch(max_batch_size=2, batch_wait_timeout_s=10)
    async def other(self, xs: list[int]) -> list[int]:
        return [-x for x in xs]

    def reconfigure(self, size: int) -> None:
        self.other.set_max_batch_size(size)


async def test_method_queue_per_instance() -> None:
    a, b = Model("a"), Model("b")
    calls = [a(i) if i % 2 else b(i) for i in range(8)]
    assert await asyncio.gather(*calls) == [f"{'a' if i % 2 else 'b'}{i}" for i in range(8)]
    assert a.batches == [[1, 3, 5, 7]] and b.batches == [[0, 2, 4, 6]]
    # Setters through the bound method, as Ray users call them (in reconfigure, say).
    a.reconfigure(3)
    assert a.other._get_max_batch_size() == 3
    assert await asyncio.gather(a.other(1), a.other(2), a.other(3)) == [-1, -2, -3]
    a.reconfigure(2)


async def test_queue_goes_with_its_instance() -> None:
    batcher = Model.__call__._shoal_batcher  # type: ignore[attr-defined]
    before = len(batcher._queues)
    m = Model("m")
    assert await m(1) == "m1"
    assert len(batcher._queues) == before + 1
    del m
    gc.collect()
    assert len(batcher._queues) == before


async def test_unhashable_and_slotted_instances() -> None:
    @dataclasses.dataclass
    class Unhashable:  # eq=True and no __hash__
        k: int

        @batch(max_batch_size=2)
        async def f(self, xs: list[int]) -> list[int]:
            return [x + self.k for x in xs]

    class Slotted:
        __slots__ = ("k",)

        def __init__(self) -> None:
            self.k = 5

        @batch(max_batch_size=2)
        async def f(self, xs: list[int]) -> list[int]:
            return [x + self.k for x in xs]

    u, v = Unhashable(1), Unhashable(1)  # equal, but separate instances: separate queues
    assert await asyncio.gather(u.f(1), v.f(2), u.f(3)) == [2, 3, 4]
    assert await asyncio.gather(Slotted().f(1), Slotted().f(2)) == [6, 7]


def test_instance_survives_pickling() -> None:
    # A class local to a test is pickled by value, as shoal ships classes to replicas.
    class Local:
        @batch(max_batch_size=3, batch_wait_timeout_s=0.01)
        async def double(self, xs: list[int]) -> list[int]:
            return [2 * x for x in xs]

    obj = Local()

    async def use(o: Any) -> list[int]:
        return list(await asyncio.gather(*(o.double(i) for i in range(5))))

    assert asyncio.run(use(obj)) == [0, 2, 4, 6, 8]
    copy = cloudpickle.loads(cloudpickle.dumps(obj))  # after its queue exists
    assert asyncio.run(use(copy)) == [0, 2, 4, 6, 8]
    cls_copy = cloudpickle.loads(cloudpickle.dumps(Local))
    assert asyncio.run(use(cls_copy())) == [0, 2, 4, 6, 8]
    # The same instance on a later event loop gets a queue on that loop.
    assert asyncio.run(use(obj)) == [0, 2, 4, 6, 8]


async def test_multiplexed_models_never_share_a_batch() -> None:
    batches: list[list[str]] = []

    @batch(max_batch_size=4, batch_wait_timeout_s=10)
    async def f(xs: list[str]) -> list[str]:
        batches.append(xs)
        return xs

    async def call(x: str, model: str) -> str:
        _request_ctx.set(RequestContext(multiplexed_model_id=model))
        return await f(x)

    assert await asyncio.gather(call("a1", "A"), call("b1", "B"), call("a2", "A"), call("b2", "B")) == [
        "a1", "b1", "a2", "b2"]
    assert sorted(batches) == [["a1", "a2"], ["b1", "b2"]]


@pytest.mark.parametrize("handler", ["awaits", "blocks"])
async def test_throughput_fraction_of_ideal(handler: str) -> None:
    """A 5 ms + 0.2 ms/item handler, 64 closed-loop callers, batches of up to 32.

    "awaits": the handler's cost is an await (work elsewhere: a GPU, a thread), so the loop
    is free meanwhile. "blocks": the cost is spent on the loop itself. Prints throughput as a
    fraction of the ideal (full batches back to back) and of the same handler called back to
    back on this loop (asyncio.sleep overshoots by up to a millisecond on Linux). Asserts only
    correctness: timing on a shared machine is not a test.
    """
    max_batch, callers, duration = 32, 64, 1.0

    async def cost(n: int) -> None:
        seconds = 0.005 + 0.0002 * n
        if handler == "awaits":
            await asyncio.sleep(seconds)
        else:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass

    sizes: list[int] = []

    @batch(max_batch_size=max_batch, batch_wait_timeout_s=0.01)
    async def model(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        await cost(len(xs))
        return [x + 1 for x in xs]

    t0 = time.perf_counter()
    for _ in range(20):
        await cost(max_batch)
    back_to_back = max_batch / ((time.perf_counter() - t0) / 20)

    done = 0
    stop_at = time.perf_counter() + duration

    async def caller(k: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop_at:
            x = k * 1_000_000 + i
            assert await model(x) == x + 1
            done += 1
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    rate = done / (time.perf_counter() - start)
    ideal = max_batch / (0.005 + 0.0002 * max_batch)
    print(f"\nbatching throughput ({handler}): {rate:.0f} items/s = {rate / ideal:.3f} of ideal {ideal:.0f}/s, "
          f"{rate / back_to_back:.3f} of the handler back to back; mean batch {sum(sizes) / len(sizes):.1f}")
    assert done > 0 and max(sizes) <= max_batch
