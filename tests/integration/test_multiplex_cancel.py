"""Multiplexing, cancellation down the call graph, and client disconnects over HTTP."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
from conftest import Instance, deploy, wait_until
from starlette.requests import Request
from starlette.responses import StreamingResponse

from shoal import serve
from shoal.exceptions import RequestCancelledError
from shoal.handle import DeploymentHandle


class FakeModel:
    deleted: list[str] = []

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def __del__(self) -> None:
        FakeModel.deleted.append(self.model_id)


@serve.deployment(num_replicas=2)
class ModelServer:
    def __init__(self) -> None:
        self.loads: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> FakeModel:
        self.loads.append(model_id)
        await asyncio.sleep(0.01)
        return FakeModel(model_id)

    async def __call__(self, request: Request) -> dict[str, object]:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return {"model": model.model_id, "pid": os.getpid()}

    async def predict(self, x: int) -> dict[str, object]:
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)
        return {"model": model.model_id, "x": x, "pid": os.getpid()}

    def stats(self) -> dict[str, list[str]]:
        return {"loads": self.loads, "deleted": FakeModel.deleted}


def test_multiplexed_lru_and_model_id(mode: str) -> None:
    h = deploy(ModelServer.options(num_replicas=1).bind(), mode)
    for model_id in ["a", "b", "a", "c"]:
        out = h.options(multiplexed_model_id=model_id).predict.remote(1).result()
        assert out["model"] == model_id
    stats = h.stats.remote().result()
    assert stats["loads"] == ["a", "b", "c"]  # "a" was cached the second time
    assert stats["deleted"] == ["b"]  # least recently used evicted, and its __del__ ran
    with pytest.raises(ValueError, match="model id"):
        h.predict.remote(1).result()


def test_router_prefers_replicas_holding_the_model(instance: Instance) -> None:
    h = serve.run(ModelServer.bind())
    first = h.options(multiplexed_model_id="m1").predict.remote(0).result()
    time.sleep(0.3)  # the replica reports the model it now holds; membership follows

    pids = {h.options(multiplexed_model_id="m1").predict.remote(i).result()["pid"] for i in range(10)}
    assert pids == {first["pid"]}
    # Over HTTP the header selects the model.
    with httpx.Client(base_url=instance.url) as c:
        body = c.get("/", headers={"serve_multiplexed_model_id": "m1"}).json()
        assert body == {"model": "m1", "pid": first["pid"]}


@serve.deployment
class Child:
    def __init__(self) -> None:
        self.cancelled = 0
        self.started = 0

    async def slow(self) -> str:
        self.started += 1
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "done"

    async def counts(self) -> tuple[int, int]:
        return self.started, self.cancelled


@serve.deployment
class Parent:
    def __init__(self, child: DeploymentHandle) -> None:
        self.child = child

    async def call_child(self) -> str:
        return await self.child.slow.remote()

    async def child_counts(self) -> tuple[int, int]:
        return await self.child.counts.remote()

    async def __call__(self, request: Request) -> str:
        return await self.child.slow.remote()


def test_cancel_propagates_down_the_graph(mode: str) -> None:
    h = deploy(Parent.bind(Child.bind()), mode)
    resp = h.call_child.remote()
    assert wait_until(lambda: h.child_counts.remote().result()[0] == 1, 10)
    resp.cancel()
    with pytest.raises(RequestCancelledError):
        resp.result(timeout_s=10)
    assert wait_until(lambda: h.child_counts.remote().result() == (1, 1), 10)


def test_http_timeout_cancels_downstream(run_dir: str) -> None:
    serve.start(http_options={"port": 0, "request_timeout_s": 0.5}, _run_dir=run_dir)
    try:
        h = serve.run(Parent.bind(Child.bind()))
        r = httpx.get(serve.http_address() + "/", timeout=20)
        assert r.status_code == 408
        assert wait_until(lambda: h.child_counts.remote().result() == (1, 1), 10)
    finally:
        serve.shutdown()


@serve.deployment
class Tokens:
    def __init__(self) -> None:
        self.produced = 0
        self.stopped = False

    async def __call__(self, request: Request) -> StreamingResponse:
        async def gen():  # type: ignore[no-untyped-def]
            try:
                while True:
                    self.produced += 1
                    yield f"data: token {self.produced}\n\n"
                    await asyncio.sleep(0.05)
            finally:
                self.stopped = True

        return StreamingResponse(gen(), media_type="text/event-stream")

    async def state(self) -> tuple[int, bool]:
        return self.produced, self.stopped

    async def tokens(self, n: int):  # type: ignore[no-untyped-def]
        try:
            for i in range(n):
                yield i
                await asyncio.sleep(0.05)
        finally:
            self.stopped = True


def test_client_disconnect_stops_the_generator(instance: Instance) -> None:
    h = serve.run(Tokens.bind())
    with httpx.stream("GET", instance.url + "/", timeout=10) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
    assert got[0].startswith("data: token")
    t0 = time.monotonic()
    assert wait_until(lambda: h.state.remote().result()[1], 5)
    assert time.monotonic() - t0 < 2  # within about a second
    produced, _ = h.state.remote().result()
    time.sleep(0.3)
    assert h.state.remote().result()[0] == produced  # nothing generated for nobody


def test_handle_stream_cancel_stops_the_generator(mode: str) -> None:
    h = deploy(Tokens.bind(), mode)
    gen = h.options(stream=True).tokens.remote(1000)
    it = iter(gen)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    gen.cancel()
    assert wait_until(lambda: h.state.remote().result()[1], 5)
