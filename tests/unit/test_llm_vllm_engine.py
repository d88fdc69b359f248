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
from shoal.llm.engines._base import StructuredOutput


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


# -- sampling parameters, n, logprobs, structured outputs and tools ------------------------------

class FakeStructuredOutputsParams(FakeSamplingParams):
    pass


def with_structured(monkeypatch: pytest.MonkeyPatch, name: str) -> type:
    module = types.ModuleType("vllm.sampling_params")
    cls = type(name, (FakeSamplingParams,), {})
    setattr(module, name, cls)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", module)
    return cls


def test_every_sampling_parameter_reaches_vllm(engine: VLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    structured = with_structured(monkeypatch, "StructuredOutputsParams")
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, stop=("x",), seed=3, ignore_eos=True, presence_penalty=0.1,
        frequency_penalty=0.2, logit_bias=((5, -100.0), (9, 2.0)), n=3, logprobs=4, top_k=20, min_p=0.05,
        repetition_penalty=1.2, min_tokens=2, stop_token_ids=(11, 12), skip_special_tokens=False,
        allowed_token_ids=(1, 2, 3), include_stop_str_in_output=True,
        structured=StructuredOutput("json", '{"type": "object"}'))
    got = engine._sampling_params(params).__dict__
    assert got.pop("structured_outputs").__dict__ == {"json": {"type": "object"}}
    assert got == {"n": 3, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                   "stop": ["x"], "stop_token_ids": [11, 12], "include_stop_str_in_output": True, "seed": 3,
                   "ignore_eos": True, "min_tokens": 2, "presence_penalty": 0.1, "frequency_penalty": 0.2,
                   "repetition_penalty": 1.2, "logit_bias": {5: -100.0, 9: 2.0}, "allowed_token_ids": [1, 2, 3],
                   "logprobs": 4, "skip_special_tokens": False}
    assert isinstance(engine._sampling_params(params).structured_outputs, structured)
    defaults = engine._sampling_params(SamplingParams()).__dict__
    assert (defaults["top_k"], defaults["logit_bias"], defaults["logprobs"], defaults["max_tokens"]) == (
        -1, None, None, 256)
    assert "structured_outputs" not in defaults and "guided_decoding" not in defaults


@pytest.mark.parametrize(("spec", "expected"), [
    (StructuredOutput("json_object", param="response_format"), {"json_object": True}),
    (StructuredOutput("regex", "a+b"), {"regex": "a+b"}),
    (StructuredOutput("choice", '["yes", "no"]'), {"choice": ["yes", "no"]}),
    (StructuredOutput("grammar", "root ::= 'a'"), {"grammar": "root ::= 'a'"}),
])
def test_older_vllm_gets_guided_decoding_params(engine: VLLMEngine, monkeypatch: pytest.MonkeyPatch,
                                                 spec: StructuredOutput, expected: dict[str, Any]) -> None:
    guided = with_structured(monkeypatch, "GuidedDecodingParams")  # vLLM < 0.11: no StructuredOutputsParams
    got = engine._sampling_params(SamplingParams(structured=spec))
    assert isinstance(got.guided_decoding, guided) and got.guided_decoding.__dict__ == expected


@dataclass
class Logprob:
    logprob: float
    rank: int | None
    decoded_token: str | None


@dataclass
class TwoChoices(FakeAsyncLLM):
    """n=2: each step's RequestOutput carries both completions, cumulative, with their logprobs."""

    async def generate(self, prompt: Any, params: Any, request_id: str, lora_request: Any = None
                       ) -> AsyncIterator[RequestOutput]:
        self.calls.append((prompt, params, request_id, lora_request))
        steps = [("a", " b", " c"), ("x", " y")]
        for step in range(3):
            outs = []
            for index, words in enumerate(steps):
                done = min(step + 1, len(words))
                logprobs = [{10 + i: Logprob(-0.5 * (i + 1), 2, words[i]), 99: Logprob(-0.1, 1, " top")}
                            for i in range(done)]
                reason = ("length" if index == 0 else "stop") if done == len(words) else None
                outs.append(Completion("".join(words[:done]), [10 + i for i in range(done)], reason))
                outs[-1].index = index  # type: ignore[attr-defined]
                outs[-1].logprobs = logprobs  # type: ignore[attr-defined]
            yield RequestOutput([1, 2], outs, step == 2)
            await asyncio.sleep(0)


def test_n_choices_and_their_logprobs(engine: VLLMEngine) -> None:
    engine.engine = TwoChoices()
    outs = collect(engine, "hi", SamplingParams(max_tokens=3, n=2, logprobs=1))
    by_index: dict[int, list[Any]] = {0: [], 1: []}
    for o in outs:
        by_index[o.index].append(o)
    assert "".join(o.text for o in by_index[0]) == "a b c" and by_index[0][-1].finish_reason == "length"
    assert "".join(o.text for o in by_index[1]) == "x y" and by_index[1][-1].finish_reason == "stop"
    assert len(by_index[1]) == 2  # nothing after its end
    assert [o.completion_tokens for o in by_index[0]] == [1, 2, 3]
    tokens = [t for o in by_index[0] for t in o.logprobs]
    assert [(t.token, t.logprob) for t in tokens] == [("a", -0.5), (" b", -1.0), (" c", -1.5)]
    assert all(t.top == ((" top", -0.1),) for t in tokens)  # rank 1 only: logprobs=1
    assert engine.stats()["generated_tokens"] == 5


def test_tools_reach_the_chat_template_and_vllms_parser(engine: VLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Tokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages: Any, **kwargs: Any) -> str:
            seen.update(kwargs)
            return "PROMPT"

    @dataclass
    class Function:
        name: str
        arguments: str

    @dataclass
    class Call:
        function: Function

    @dataclass
    class Info:
        tools_called: bool
        tool_calls: list[Call]
        content: str | None

    class Parser:
        def __init__(self, tokenizer: Any) -> None:
            seen["parser_tokenizer"] = tokenizer

        def extract_tool_calls(self, text: str, request: Any) -> Info:
            seen["request"] = request
            if "<call>" not in text:
                return Info(False, [], text)
            return Info(True, [Call(Function("get_weather", '{"city": "Oslo"}'))], "thinking")

    class Manager:
        @staticmethod
        def get_tool_parser(name: str) -> type:
            assert name == "hermes"
            return Parser

    parsers = types.ModuleType("vllm.tool_parsers")
    parsers.ToolParserManager = Manager  # type: ignore[attr-defined]
    protocol = types.ModuleType("vllm.entrypoints.openai.protocol")
    protocol.ChatCompletionRequest = lambda **kw: kw  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.tool_parsers", parsers)
    monkeypatch.setitem(sys.modules, "vllm.entrypoints", types.ModuleType("vllm.entrypoints"))
    monkeypatch.setitem(sys.modules, "vllm.entrypoints.openai", types.ModuleType("vllm.entrypoints.openai"))
    monkeypatch.setitem(sys.modules, "vllm.entrypoints.openai.protocol", protocol)
    tools = ({"type": "function", "function": {"name": "get_weather"}},)
    engine.tokenizer = Tokenizer()
    engine.tool_call_parser = "hermes"
    assert engine.render_chat([{"role": "user", "content": "hi"}], tools=tools) == "PROMPT"
    assert seen["tools"] == [dict(tools[0])] and seen["add_generation_prompt"] is True
    assert engine.extract_tool_calls("x <call>", tools) == (
        "thinking", [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}])
    assert seen["request"]["tools"] == [dict(tools[0])] and seen["request"]["tool_choice"] == "auto"
    assert engine.extract_tool_calls("plain answer", tools) == ("plain answer", [])
    assert {"tools", "n", "logprobs", "structured_outputs", "logit_bias"} <= VLLMEngine.sampling_features
