"""The vLLM engine's own logic against a stand-in for vLLM's async API (vLLM itself is not installed here).

This checks what shoal does with vLLM's outputs — cumulative text to deltas, token counts,
finish reasons, abort on close, LoRA requests, context errors — not vLLM itself.
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from shoal.llm.engines import ContextLengthError, SamplingParams, VLLMEngine


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[Completion]
    finished: bool = False


@dataclass
class FakeAsyncLLM:
    """Streams "one two three ..." cumulatively, like vLLM's default output kind."""

    words: list[str] = field(default_factory=lambda: ["one", " two", " three", " four"])
    calls: list[tuple[Any, Any, str, Any]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    loras: list[Any] = field(default_factory=list)

    async def generate(self, prompt: Any, params: Any, request_id: str, lora_request: Any = None
                       ) -> AsyncIterator[RequestOutput]:
        self.calls.append((prompt, params, request_id, lora_request))
        if params.max_tokens > 100:
            raise ValueError("This model's maximum context length is 100 tokens.")
        text = ""
        n = min(params.max_tokens, len(self.words))
        for i in range(n):
            text += self.words[i]
            done = i == n - 1
            reason = ("length" if n == params.max_tokens else "stop") if done else None
            yield RequestOutput([1, 2, 3], [Completion(text, list(range(i + 1)), reason)], done)
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def add_lora(self, request: Any) -> bool:
        self.loras.append(request)
        return True


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> VLLMEngine:
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, int_id, path: (name, int_id, path)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    e = VLLMEngine("org/model", enable_lora=True, max_model_len=100)
    e.engine = FakeAsyncLLM()
    e.tokenizer = lambda text, add_special_tokens=True: {"input_ids": [7] * len(text.split())}
    return e


def collect(engine: VLLMEngine, prompt: str, params: SamplingParams, **kw: Any) -> list[Any]:
    async def run() -> list[Any]:
        return [o async for o in engine.generate(prompt, params, "req", **kw)]

    return asyncio.run(run())


def test_deltas_counts_and_finish(engine: VLLMEngine) -> None:
    outs = collect(engine, "hi", SamplingParams(max_tokens=3, temperature=0, stop=("x",), seed=5))
    assert [o.text for o in outs] == ["one", " two", " three"]
    assert [o.completion_tokens for o in outs] == [1, 2, 3]
    assert outs[-1].finish_reason == "length" and outs[-1].prompt_tokens == 3
    prompt, params, request_id, lora = engine.engine.calls[-1]  # type: ignore[attr-defined]
    assert prompt == {"prompt": "hi"} and request_id.startswith("req-") and lora is None
    assert (params.max_tokens, params.temperature, params.stop, params.seed) == (3, 0, ["x"], 5)
    assert engine.stats()["generated_tokens"] == 3 and engine.engine_args["model"] == "org/model"


def test_chat_prompts_are_sent_as_token_ids(engine: VLLMEngine) -> None:
    collect(engine, "<|user|> hi <|assistant|>", SamplingParams(max_tokens=1), from_chat=True)
    assert engine.engine.calls[-1][0] == {"prompt_token_ids": [7, 7, 7]}  # type: ignore[attr-defined]


def test_closing_the_stream_aborts_the_request(engine: VLLMEngine) -> None:
    async def run() -> None:
        stream = engine.generate("hi", SamplingParams(max_tokens=4), "req")
        await anext(stream)
        await stream.aclose()

    asyncio.run(run())
    fake = engine.engine
    assert fake.aborted == [fake.calls[-1][2]]  # type: ignore[attr-defined]
    assert engine.stats()["cancelled"] == 1 and engine.stats()["running"] == 0


def test_context_errors_and_adapters(engine: VLLMEngine) -> None:
    with pytest.raises(ContextLengthError):
        collect(engine, "hi", SamplingParams(max_tokens=500))
    assert engine.supports_adapters
    adapter = asyncio.run(engine.load_adapter("pirate", "/adapters/pirate"))
    assert adapter == ("pirate", 1, "/adapters/pirate") and engine.engine.loras == [adapter]  # type: ignore[attr-defined]
    collect(engine, "hi", SamplingParams(max_tokens=1), adapter=adapter)
    assert engine.engine.calls[-1][3] == adapter  # type: ignore[attr-defined]
