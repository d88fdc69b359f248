"""shoal.testing: a deployment graph in-process, batches and autoscaling on a fake clock."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import StreamingResponse

import shoal.testing
from shoal import serve, testing
from shoal.exceptions import RayTaskError
from shoal.handle import DeploymentHandle
from shoal.testing import AutoscalingSimulator, FakeClock, LocalRuntime, make_request


def test_exports() -> None:
    assert sorted(shoal.testing.__all__) == shoal.testing.__all__
    assert set(shoal.testing.__all__) == {
        "AutoscalingSimulator", "FakeClock", "FakeTimer", "HTTPResponse", "LocalRuntime", "make_request", "run",
    }


# --------------------------------------------------------------------------------------------
# FakeClock


def test_fake_clock_runs_due_callbacks_in_order_at_their_time() -> None:
    clock = FakeClock(100.0)
    seen: list[tuple[str, float]] = []
    clock.call_later(5, lambda: seen.append(("b", clock.time())))
    clock.call_at(102, lambda: seen.append(("a", clock.time())))
    dropped = clock.call_later(3, lambda: seen.append(("x", clock.time())))
    dropped.cancel()
    assert clock.deadlines == [102.0, 105.0]
    clock.advance(1.5)
    assert seen == [] and clock.time() == 101.5
    clock.advance(10)
    assert seen == [("a", 102.0), ("b", 105.0)]
    assert clock.time() == clock() == clock.monotonic() == 111.5
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)


def test_fake_clock_repeats_and_callbacks_may_schedule_more() -> None:
    clock = FakeClock()
    ticks: list[float] = []
    later: list[float] = []

    def tick() -> None:
        ticks.append(clock.time())
        if len(ticks) == 2:
            clock.call_later(0.5, lambda: later.append(clock.time()))

    timer = clock.call_every(1.0, tick)
    clock.advance(3.2)
    assert ticks == [1.0, 2.0, 3.0] and later == [2.5]
    timer.cancel()
    clock.advance(5)
    assert ticks == [1.0, 2.0, 3.0]


def test_fake_clock_runs_a_loop_timer_on_its_loop_thread_before_advance_returns() -> None:
    clock = FakeClock()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ran_on: list[threading.Thread] = []
    try:
        asyncio.run_coroutine_threadsafe(_schedule(clock, ran_on), loop).result(5)
        clock.advance(1)
        assert ran_on == [thread]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def _schedule(clock: FakeClock, ran_on: list[threading.Thread]) -> None:
    clock.call_later(1, lambda: ran_on.append(threading.current_thread()))


# --------------------------------------------------------------------------------------------
# A deployment graph in-process


@serve.deployment
class Tokenizer:
    def tokens(self, text: str) -> list[str]:
        return text.split()


@serve.deployment(num_replicas=3)
class Counter:
    def __init__(self, tokenizer: DeploymentHandle) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    async def count(self, text: str) -> int:
        self.calls += 1
        return len(await self.tokenizer.tokens.remote(text))

    async def stream(self, text: str) -> AsyncIterator[str]:
        for word in await self.tokenizer.tokens.remote(text):
            yield word


@serve.deployment
class Api:
    def __init__(self, counter: DeploymentHandle) -> None:
        self.counter = counter

    async def __call__(self, request: Request) -> Any:
        if request.url.path.endswith("/stream"):
            words = self.counter.options(stream=True).stream.remote(request.query_params["text"])
            return StreamingResponse((w + "\n" async for w in words), media_type="text/plain")
        text = (await request.json())["text"] if request.method == "POST" else request.query_params["text"]
        if text == "boom":
            raise ValueError("no bombs please")
        return {"words": await self.counter.count.remote(text), "root": request.scope["root_path"]}


def test_graph_in_process_handles_and_http() -> None:
    with testing.run(Api.bind(Counter.bind(Tokenizer.bind())), route_prefix="/api") as rt:
        counter = rt.get_deployment_handle("Counter")
        assert counter.count.remote("a b c").result() == 3
        assert list(counter.options(stream=True).stream.remote("x y")) == ["x", "y"]
        assert rt.instance("Counter").calls == 1

        r = rt.http("GET", "/api", params={"text": "one two"})
        assert r.status_code == 200 and r.json() == {"words": 2, "root": "/api"}
        assert r.headers["content-type"] == "application/json" and r.headers["x-request-id"]
        r = rt.http("POST", "/api/", json={"text": "x y z"}, headers={"x-request-id": "abc"})
        assert r.json()["words"] == 3 and r.headers["x-request-id"] == "abc"
        r = rt.http("GET", "/api/stream?text=p+q+r")
        assert r.chunks == [b"p\n", b"q\n", b"r\n"] and r.text == "p\nq\nr\n"

        r = rt.http("GET", "/api", params={"text": "boom"})
        assert r.status_code == 500 and r.json()["error"] == "internal server error"
        assert isinstance(r.error, ValueError) and isinstance(r.error, RayTaskError)
        assert rt.http("GET", "/elsewhere").status_code == 404
        assert rt.http("GET", "/-/routes").json() == {"/api": "default"}
        assert rt.http("GET", "/-/healthz").ok

        with pytest.raises(ValueError, match="no bombs"):
            rt.handle.remote(make_request("GET", "/api", params={"text": "boom"})).result()
    with pytest.raises(serve.RayServeException, match="shut down"):
        rt.run(Tokenizer.bind())


def test_runtimes_are_isolated_and_objects_are_deleted() -> None:
    deleted: list[str] = []

    @serve.deployment
    class Holder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self) -> str:
            return self.name

        def __del__(self) -> None:
            deleted.append(self.name)

    with LocalRuntime() as a, LocalRuntime() as b:
        assert a.run(Holder.bind("a")).remote().result() == "a"
        assert b.run(Holder.bind("b"), name="other").remote().result() == "b"
        assert a.get_app_handle().remote().result() == "a"
        with pytest.raises(serve.RayServeException, match="does not exist"):
            a.get_app_handle("other")
        b.delete("other")
        assert "b" in deleted and "a" not in deleted
    assert "a" in deleted


def test_make_request_builds_a_starlette_request() -> None:
    request = make_request("POST", "/x?a=1", params={"b": "2"}, json={"k": [1]}, headers={"X-Token": "t"})
    assert request.method == "POST" and request.url.path == "/x"
    assert dict(request.query_params) == {"a": "1", "b": "2"}
    assert request.headers["x-token"] == "t" and request.headers["content-type"] == "application/json"
    assert asyncio.run(request.json()) == {"k": [1]}
    with pytest.raises(ValueError, match="at most one"):
        make_request("POST", "/", json={}, content=b"x")


# --------------------------------------------------------------------------------------------
# @serve.batch on the fake clock


@serve.deployment(max_ongoing_requests=100)
class Embedder:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=10.0)
    async def embed(self, texts: list[str]) -> list[int]:
        self.batches.append(list(texts))
        return [len(t) for t in texts]


def test_a_batch_forms_when_the_fake_clock_reaches_the_timeout() -> None:
    clock = FakeClock()
    started = time.monotonic()
    with testing.run(Embedder.bind(), clock=clock) as rt:
        responses = [rt.handle.embed.remote(t) for t in ("a", "bb", "ccc")]
        rt.settle()
        # Three requests wait for a fourth, or for 10 s of (fake) time.
        assert not any(r.done() for r in responses)
        assert clock.deadlines == [10.0]
        rt.advance(9.99)
        assert not any(r.done() for r in responses)
        rt.advance(0.01)
        assert [r.result(timeout_s=5) for r in responses] == [1, 2, 3]
        assert rt.instance("Embedder").batches == [["a", "bb", "ccc"]]

        # A full batch does not wait for the clock at all.
        full = [rt.handle.embed.remote(t) for t in ("w", "x", "y", "z", "tail")]
        assert [r.result(timeout_s=5) for r in full[:4]] == [1, 1, 1, 1]
        rt.settle()
        assert not full[4].done()
        rt.advance(10)
        assert full[4].result(timeout_s=5) == 4
        assert rt.instance("Embedder").batches[1:] == [["w", "x", "y", "z"], ["tail"]]
    # Twenty seconds of batch timeouts, and no real waiting.
    assert time.monotonic() - started < 5


def test_without_a_clock_batches_use_real_time() -> None:
    @serve.deployment
    class Fast:
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def __call__(self, xs: list[int]) -> list[int]:
            return [x + 1 for x in xs]

    with testing.run(Fast.bind()) as rt:
        assert rt.handle.remote(1).result(timeout_s=5) == 2
        with pytest.raises(serve.RayServeException, match="no clock"):
            rt.advance(1)


# --------------------------------------------------------------------------------------------
# Autoscaling stepped by the fake clock


@serve.deployment(autoscaling_config={
    "min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 2,
    "upscale_delay_s": 30, "downscale_delay_s": 600,
})
class Scaled:
    def __call__(self) -> None: ...


def test_autoscaling_decisions_follow_the_fake_clock() -> None:
    clock = FakeClock()
    sim = AutoscalingSimulator(Scaled, clock=clock, tick_s=0.5)
    assert (sim.target, sim.replicas) == (1, 1)
    sim.ongoing = 10  # 10 requests for 1 replica at a target of 2 each: 5 wanted
    clock.advance(29.5)
    assert sim.target == 1, "upscale_delay_s has not passed yet"
    clock.advance(1.0)
    assert (sim.target, sim.replicas, sim.running) == (5, 5, 5)
    assert sim.decisions == [(30.5, 1, 5)]

    sim.ongoing = 0
    # The load is a time-weighted mean over look_back_period_s (30 s): it drops below 4
    # replicas' worth 6.5 s after the requests stopped, and downscale_delay_s counts from there.
    clock.advance(606)
    assert sim.target == 5, "downscale_delay_s has not passed yet"
    clock.advance(1)
    assert sim.target == 1
    assert sim.decisions == [(30.5, 1, 5), (637.0, 5, 1)]
    sim.stop()
    sim.ongoing = 100
    clock.advance(100)
    assert sim.target == 1


def test_autoscaling_simulator_models_replica_start_up() -> None:
    clock = FakeClock()
    sim = AutoscalingSimulator({"min_replicas": 0, "max_replicas": 2, "upscale_delay_s": 0,
                                "downscale_delay_s": 0}, clock=clock, tick_s=1.0, startup_s=5.0)
    assert sim.replicas == 0
    sim.ongoing = 3
    clock.advance(1)
    assert (sim.target, sim.replicas, sim.running) == (2, 2, 0)
    clock.advance(5)
    assert sim.running == 2
    with pytest.raises(ValueError, match="no autoscaling_config"):
        AutoscalingSimulator(Tokenizer, clock=clock)


def test_http_form_data_and_a_response_that_never_ends() -> None:
    @serve.deployment
    class Forms:
        async def __call__(self, request: Request) -> Any:
            if request.url.path == "/forever":
                async def ticks() -> AsyncIterator[bytes]:
                    while True:
                        yield b"."
                        await asyncio.sleep(0.01)

                return StreamingResponse(ticks())
            return {"type": request.headers["content-type"], "body": (await request.body()).decode()}

    with testing.run(Forms.bind()) as rt:
        assert rt.http("POST", "/", data={"a": "1", "b": "x y"}).json() == {
            "type": "application/x-www-form-urlencoded", "body": "a=1&b=x+y"}
        with pytest.raises(TimeoutError):
            rt.http("GET", "/forever", timeout_s=0.2)
