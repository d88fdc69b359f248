"""@serve.batch inside real replica processes, called through handles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import Instance

from shoal import serve
from shoal.serving.batching import batch


@serve.deployment(max_ongoing_requests=64)
class Model:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.stream_batches: list[list[int]] = []

    @batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def __call__(self, xs: list[int]) -> list[int]:
        self.batches.append(xs)
        if 13 in xs:
            raise ValueError(f"poison in batch {xs}")
        return [x * 2 for x in xs]

    @batch(max_batch_size=4, batch_wait_timeout_s=0.25)
    async def count(self, ns: list[int]) -> AsyncIterator[list[Any]]:
        self.stream_batches.append(ns)
        for step in range(max(ns)):
            yield [f"{n}-{step}" if step < n else StopIteration for n in ns]

    def seen(self) -> dict[str, list[list[int]]]:
        return {"batches": self.batches, "stream_batches": self.stream_batches}

    def reset(self) -> None:
        self.batches.clear()
        self.stream_batches.clear()


def test_concurrent_calls_are_batched(instance: Instance) -> None:
    h = serve.run(Model.bind())
    xs = list(range(100, 132))  # 13, the poison, is not among them
    responses = [h.remote(x) for x in xs]
    assert [r.result(timeout_s=30) for r in responses] == [2 * x for x in xs]
    batches = h.seen.remote().result()["batches"]
    assert sorted(x for b in batches for x in b) == xs
    assert all(len(b) <= 8 for b in batches)
    assert max(len(b) for b in batches) > 1, batches


def test_streaming_batch(instance: Instance) -> None:
    h = serve.run(Model.bind())
    ns = [3, 1, 4, 2]

    def consume(n: int) -> list[str]:
        return list(h.options(stream=True).count.remote(n))

    with ThreadPoolExecutor(len(ns)) as pool:
        results = list(pool.map(consume, ns))
    assert results == [[f"{n}-{s}" for s in range(n)] for n in ns]
    stream_batches = h.seen.remote().result()["stream_batches"]
    assert sorted(n for b in stream_batches for n in b) == sorted(ns)
    assert max(len(b) for b in stream_batches) > 1, stream_batches


def test_failing_batch_fails_only_its_callers(instance: Instance) -> None:
    h = serve.run(Model.bind())
    xs = [10, 11, 12, 13, 14, 15]
    responses = [h.remote(x) for x in xs]
    outcomes: dict[int, Any] = {}
    for x, r in zip(xs, responses, strict=True):
        try:
            outcomes[x] = r.result(timeout_s=30)
        except ValueError as e:  # the remote error re-raises with its own type
            outcomes[x] = e
    batches = h.seen.remote().result()["batches"]
    poisoned = next(b for b in batches if 13 in b)
    for x in xs:
        if x in poisoned:
            assert isinstance(outcomes[x], ValueError) and "poison" in str(outcomes[x])
        else:
            assert outcomes[x] == 2 * x
    # The replica's batching goes on: the next batch succeeds.
    h.reset.remote().result()
    later = [h.remote(x) for x in range(20, 28)]
    assert [r.result(timeout_s=30) for r in later] == [2 * x for x in range(20, 28)]
    with pytest.raises(ValueError, match="poison"):
        h.remote(13).result(timeout_s=30)
