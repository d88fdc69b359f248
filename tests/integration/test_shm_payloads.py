"""Large numpy arrays and torch tensors through handles, on real replica processes: above the
threshold they travel through shared memory (shoal.runtime.shm), and no fresh segment outlives a
call, a cancellation or a timeout; no segment (pooled ones included) outlives a replica killed
with -9, or the instance."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Instance, child_pids, wait_until

from shoal import serve
from shoal.exceptions import RayServeException
from shoal.handle import DeploymentHandle
from shoal.runtime import shm

MB = 1 << 20


@serve.deployment(max_ongoing_requests=8)
class Arrays:
    def __init__(self) -> None:
        self.holding = 0

    def echo(self, x: Any) -> Any:
        return x

    def make(self, nbytes: int) -> np.ndarray:
        return np.full(nbytes // 8, 7.0)

    def describe(self, *args: Any, **kwargs: Any) -> list[Any]:
        def one(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return ("ndarray", v.shape, float(v.sum()))
            if isinstance(v, torch.Tensor):
                return ("tensor", tuple(v.shape), float(v.sum()))
            if isinstance(v, bytes | bytearray):
                return (type(v).__name__, len(v))
            return v
        return [one(a) for a in args] + [(k, one(v)) for k, v in sorted(kwargs.items())]

    async def hold(self, x: np.ndarray, seconds: float) -> int:
        self.holding += 1
        await asyncio.sleep(seconds)
        return x.nbytes

    def holding_count(self) -> int:
        return self.holding

    async def block(self, marker: str, seconds: float) -> None:
        with open(marker, "w"):
            pass
        time.sleep(seconds)  # the event loop stops: frames that arrive meanwhile stay unread

    def pid(self) -> int:
        return os.getpid()

    def shm_stats(self) -> dict[str, int]:
        return shm.stats()

    def orphan(self, directory: str, pooled: bool) -> str:
        """A segment as one this replica would leave if it were killed while writing it."""
        raws = [memoryview(np.ones(MB // 8)).cast("B")]
        got = shm._write_pooled(shm.SendPool(), directory, raws) if pooled else shm._write_segment(directory, raws)
        assert got is not None
        return got[0]


@serve.deployment
class Step:
    def __init__(self, add: int) -> None:
        self.add = add

    def run(self, x: np.ndarray) -> np.ndarray:
        return x + self.add


@serve.deployment
class Pipeline:
    def __init__(self, first: DeploymentHandle, second: DeploymentHandle) -> None:
        self.first = first
        self.second = second

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        y = await self.first.run.remote(x + 1)
        return await self.second.run.remote(y)


def segments(run_dir: str) -> list[str]:
    try:
        return os.listdir(shm.segment_dir(run_dir))
    except FileNotFoundError:
        return []


def fresh_segments(run_dir: str) -> list[str]:
    """The segments not in a pool (a connection's pooled segments live as long as it does)."""
    return [n for n in segments(run_dir) if "-p" not in n]


def received(before: dict[str, int]) -> int:
    return shm.stats()["segments_received"] - before["segments_received"]


@pytest.mark.parametrize("size", [MB, 10 * MB, 100 * MB], ids=["1MB", "10MB", "100MB"])
def test_numpy_round_trip(instance: Instance, size: int) -> None:
    h = serve.run(Arrays.bind())
    array = np.random.default_rng(size).random(size // 8)
    before = shm.stats()
    got = h.echo.remote(array).result(timeout_s=60)
    assert np.array_equal(got, array) and got.flags.writeable
    assert received(before) == 1  # the result came back through shared memory
    assert h.shm_stats.remote().result()["segments_received"] >= 1  # and the argument went that way
    assert fresh_segments(instance.run_dir) == []


def test_torch_tensor_and_results_above_the_threshold(instance: Instance) -> None:
    h = serve.run(Arrays.bind())
    tensor = torch.randn(10 * MB // 4)
    got = h.echo.remote(tensor).result(timeout_s=60)
    assert isinstance(got, torch.Tensor) and torch.equal(got, tensor)
    before = shm.stats()
    made = h.make.remote(10 * MB).result(timeout_s=60)  # a small argument, a large result
    assert made.shape == (10 * MB // 8,) and bool((made == 7.0).all()) and received(before) == 1
    assert fresh_segments(instance.run_dir) == []


def test_mixed_small_and_large_arguments(instance: Instance) -> None:
    h = serve.run(Arrays.bind())
    big = np.ones(2 * MB // 8)
    out = h.describe.remote(3, big, b"z" * (2 * MB), "text", small=np.arange(4), t=torch.ones(MB)).result()
    assert out == [3, ("ndarray", (2 * MB // 8,), 2 * MB / 8), ("bytes", 2 * MB), "text",
                   ("small", ("ndarray", (4,), 6.0)), ("t", ("tensor", (MB,), float(MB)))]
    assert fresh_segments(instance.run_dir) == []


def test_three_step_pipeline(instance: Instance) -> None:
    h = serve.run(Pipeline.bind(Step.bind(10), Step.options(name="Step2").bind(100)))
    array = np.random.default_rng(1).integers(0, 1 << 40, 10 * MB // 8)
    for _ in range(3):
        assert np.array_equal(h.remote(array).result(timeout_s=60), array + 111)
    assert fresh_segments(instance.run_dir) == []


def test_kill_9_while_the_replica_holds_the_argument(instance: Instance) -> None:
    h = serve.run(Arrays.bind())
    pid = h.pid.remote().result()
    response = h.hold.remote(np.ones(10 * MB // 8), 60)
    assert wait_until(lambda: h.holding_count.remote().result() == 1, 30)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RayServeException):
        response.result(timeout_s=30)  # an error, never a hang
    assert wait_until(lambda: segments(instance.run_dir) == [], 10), segments(instance.run_dir)


def test_kill_9_before_the_replica_read_the_argument(instance: Instance) -> None:
    h = serve.run(Arrays.bind())
    pid = h.pid.remote().result()
    marker = os.path.join(instance.run_dir, "blocked")
    blocked = h.block.remote(marker, 60)
    assert wait_until(lambda: os.path.exists(marker), 30)
    response = h.echo.remote(np.ones(4 * MB // 8))
    assert wait_until(lambda: len(segments(instance.run_dir)) == 1, 10)  # written, not read yet
    os.kill(pid, signal.SIGKILL)
    for r in (response, blocked):
        with pytest.raises(RayServeException):
            r.result(timeout_s=30)
    assert wait_until(lambda: segments(instance.run_dir) == [], 10), segments(instance.run_dir)


def test_kill_9_while_the_caller_holds_a_result(instance: Instance) -> None:
    """The replica's pooled segment (its result) goes when it dies; the caller's array stays readable."""
    h = serve.run(Arrays.bind())
    pid = h.pid.remote().result()
    kept = h.make.remote(10 * MB).result(timeout_s=60)
    assert any(n.startswith(f"{pid}-p") for n in segments(instance.run_dir))
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: segments(instance.run_dir) == [], 10), segments(instance.run_dir)
    assert kept.shape == (10 * MB // 8,) and np.all(kept == 7.0)


@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "pooled"])
def test_kill_9_while_the_replica_writes_a_segment(instance: Instance, pooled: bool) -> None:
    """A segment its writer never sent (killed while writing it) is removed once it is dead."""
    h = serve.run(Arrays.bind())
    pid = h.pid.remote().result()
    name = h.orphan.remote(shm.segment_dir(instance.run_dir), pooled).result()
    assert name.startswith(f"{pid}-") and segments(instance.run_dir) == [name]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: segments(instance.run_dir) == [], 10), segments(instance.run_dir)


def test_cancel_and_timeout_leave_no_segment(instance: Instance) -> None:
    h = serve.run(Arrays.bind())
    big = np.ones(4 * MB // 8)
    with pytest.raises(TimeoutError):
        h.hold.remote(big, 30).result(timeout_s=0.5)
    # Cancelled before the replica could read it: the replica unlinks it once it reads the frame.
    marker = os.path.join(instance.run_dir, "blocked")
    blocked = h.block.remote(marker, 2)
    assert wait_until(lambda: os.path.exists(marker), 30)
    pooled = len(segments(instance.run_dir))  # the one the replica still holds (hold's argument)
    response = h.echo.remote(big)
    assert wait_until(lambda: len(segments(instance.run_dir)) == pooled + 1, 10)
    response.cancel()
    blocked.result(timeout_s=30)
    assert wait_until(lambda: fresh_segments(instance.run_dir) == [], 10), segments(instance.run_dir)
    assert np.array_equal(h.echo.remote(big).result(timeout_s=30), big)


@pytest.fixture
def shm_off(run_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Instance]:
    """An instance started with SHOAL_SHM_THRESHOLD_BYTES=0 (its replicas inherit it)."""
    monkeypatch.setenv(shm.THRESHOLD_ENV, "0")
    before = child_pids()
    serve.start(http_options={"port": 0}, _run_dir=run_dir)
    try:
        yield Instance(serve.http_address(), run_dir)
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def test_threshold_zero_turns_shared_memory_off(shm_off: Instance) -> None:
    h = serve.run(Arrays.bind())
    before = shm.stats()
    array = np.random.default_rng(2).random(10 * MB // 8)
    assert np.array_equal(h.echo.remote(array).result(timeout_s=60), array)
    assert shm.stats() == before
    assert h.shm_stats.remote().result() == {k: 0 for k in before}


def test_shutdown_removes_the_segment_directory(run_dir: str) -> None:
    serve.start(http_options={"port": 0}, _run_dir=run_dir)
    try:
        h = serve.run(Arrays.bind())
        assert np.array_equal(h.echo.remote(np.ones(2 * MB // 8)).result(timeout_s=60), np.ones(2 * MB // 8))
        assert os.path.isdir(shm.segment_dir(run_dir))
    finally:
        serve.shutdown()
    assert not os.path.exists(shm.segment_dir(run_dir))
