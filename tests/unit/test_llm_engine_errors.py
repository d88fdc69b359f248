"""An engine that fails: the error reaches the caller, never a request that waits forever.

No torch here: the transformers engine's reader (``next_item``) is tested with a plain future
standing for its generation thread, and the gateway with an engine that raises (loaded by its
import path, as any custom engine is). The transformers engine itself, with a seed torch
rejects, is tested in ``tests/e2e/test_llm_engine.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from shoal import testing
from shoal.llm import LLMConfig, build_llm_deployment, build_openai_app
from shoal.llm.engines import EngineOutput, GenerationRequest, MockEngine, SamplingParams
from shoal.llm.engines._hf import _END, next_item

BOUND_S = 10.0  # every wait in these tests ends by then


class EngineThreadDied(RuntimeError):
    pass


class FailingEngine(MockEngine):
    """The mock engine, except that generation raises after ``fail_after`` tokens."""

    name = "failing"

    def __init__(self, model_source: str, *, fail_after: int = 0, **kwargs: Any) -> None:
        super().__init__(model_source, **kwargs)
        self.fail_after = fail_after

    async def generate(self, prompt: str, params: SamplingParams, request_id: str, adapter: Any = None,
                       *, from_chat: bool = False) -> AsyncGenerator[EngineOutput, None]:
        for n in range(self.fail_after):
            yield EngineOutput(f" w{n}", 1, n + 1)
        raise EngineThreadDied("the generation thread raised")


def failing(model_id: str, fail_after: int) -> dict[str, Any]:
    return {"model_loading_config": {"model_id": model_id}, "llm_engine": f"{__name__}:FailingEngine",
            "engine_kwargs": {"fail_after": fail_after}}


# -- the transformers engine's reader ---------------------------------------------------------

def run_bounded(coro: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, BOUND_S)

    return asyncio.run(bounded())


def test_reader_returns_when_the_thread_dies_without_a_last_item() -> None:
    async def scenario() -> Any:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        job: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        job.set_exception(EngineThreadDied("died before its streamer ended"))
        item = await next_item(queue, job, poll_s=0.01)
        with pytest.raises(EngineThreadDied):
            await job
        return item

    assert run_bounded(scenario()) is _END


def test_reader_hands_out_what_the_thread_put_before_it_ended() -> None:
    async def scenario() -> list[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        job: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queue.put_nowait([1])
        queue.put_nowait([2])
        job.set_result(None)
        return [await next_item(queue, job, poll_s=0.01) for _ in range(3)]

    assert run_bounded(scenario()) == [[1], [2], _END]


def test_reader_keeps_waiting_while_the_thread_runs() -> None:
    async def scenario() -> Any:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        job: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        reader = asyncio.ensure_future(next_item(queue, job, poll_s=0.01))
        await asyncio.sleep(0.05)  # several polls: the thread still runs, so the reader waits on
        assert not reader.done()
        queue.put_nowait([7])
        return await reader

    assert run_bounded(scenario()) == [7]


def test_reader_rejects_a_non_positive_poll() -> None:
    async def scenario() -> None:
        job: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        with pytest.raises(ValueError, match="poll_s"):
            await next_item(asyncio.Queue(), job, poll_s=0)

    run_bounded(scenario())


# -- through the gateway and a handle ----------------------------------------------------------

@pytest.fixture(scope="module")
def rt() -> Any:
    app = build_openai_app({"llm_configs": [failing("fails-at-once", 0), failing("fails-later", 2),
                                            {"model_loading_config": {"model_id": "echo"}, "llm_engine": "mock"}]})
    with testing.run(app) as runtime:
        yield runtime


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


def assert_openai_error(response: testing.HTTPResponse, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


@pytest.mark.parametrize("seed", [2**70, -(2**63) - 1])
def test_a_seed_outside_int64_is_a_400_naming_seed(rt: testing.LocalRuntime, seed: int) -> None:
    for path, body in [("/v1/chat/completions", chat("echo", seed=seed)),
                       ("/v1/completions", {"model": "echo", "prompt": "hi", "seed": seed}),
                       ("/v1/chat/completions", chat("echo", seed=seed, stream=True))]:
        error = assert_openai_error(rt.http("POST", path, json=body), 400)
        assert error["param"] == "seed" and "seed" in error["message"], error
        assert error["code"] == "invalid_value"


def test_the_int64_bounds_are_valid_seeds(rt: testing.LocalRuntime) -> None:
    for seed in (2**63 - 1, -(2**63)):
        r = rt.http("POST", "/v1/chat/completions", json=chat("echo", seed=seed))
        assert r.status_code == 200, r.text


def test_an_engine_error_is_a_500_in_openai_shape(rt: testing.LocalRuntime) -> None:
    for model in ("fails-at-once", "fails-later"):
        error = assert_openai_error(rt.http("POST", "/v1/chat/completions", json=chat(model)), 500)
        assert error["type"] == "server_error", error


def test_a_streamed_engine_error_reaches_the_client(rt: testing.LocalRuntime) -> None:
    # Before the first chunk: the status is still free, so it is the 500 itself.
    error = assert_openai_error(rt.http("POST", "/v1/chat/completions", json=chat("fails-at-once", stream=True)),
                                500)
    assert error["type"] == "server_error"
    # After some chunks (status 200 sent): an error event in the stream, as OpenAI does.
    r = rt.http("POST", "/v1/chat/completions", json=chat("fails-later", stream=True))
    assert r.status_code == 200, r.text
    events = [json.loads(b.removeprefix("data: ")) for b in r.text.split("\n\n") if b.startswith("data: {")]
    assert any("error" in e and e["error"]["type"] == "server_error" for e in events), r.text


def test_a_handle_gets_the_engine_error() -> None:
    cfg = LLMConfig.model_validate(failing("fails-later", 2))
    with testing.run(build_llm_deployment(cfg)) as runtime:
        request = GenerationRequest("r1", prompt="hello", sampling=SamplingParams(max_tokens=8))
        with pytest.raises(Exception, match="the generation thread raised"):
            streaming: Any = runtime.handle.options(stream=True)
            list(streaming.generate.remote(request))


def test_cuda_switch_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from shoal.llm.engines._hf import CUDA_SWITCH_INTERVAL_S, apply_switch_interval

    before = sys.getswitchinterval()
    try:
        monkeypatch.delenv("SHOAL_LLM_SWITCH_INTERVAL_S", raising=False)
        assert apply_switch_interval() == pytest.approx(CUDA_SWITCH_INTERVAL_S)
        monkeypatch.setenv("SHOAL_LLM_SWITCH_INTERVAL_S", "0.002")
        assert apply_switch_interval() == pytest.approx(0.002)
        monkeypatch.setenv("SHOAL_LLM_SWITCH_INTERVAL_S", "0")  # 0: leave what is in force
        assert apply_switch_interval() == pytest.approx(0.002)
        for bad, says in (("fast", "not a number"), ("-1", ">= 0")):
            monkeypatch.setenv("SHOAL_LLM_SWITCH_INTERVAL_S", bad)
            with pytest.raises(ValueError, match=f"SHOAL_LLM_SWITCH_INTERVAL_S.*{says}"):
                apply_switch_interval()
    finally:
        sys.setswitchinterval(before)
