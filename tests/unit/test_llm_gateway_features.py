"""n, tool calls and the refusal of what an engine does not apply, through the gateway in-process
(shoal.testing) with the mock engine and a mock that makes tool calls: no torch, no sockets.

Bodies and chunks are validated with the official ``openai`` client's response types. The same
features on the tiny model, with the client over HTTP, are in tests/e2e/test_llm_conformance.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import pytest

from shoal import testing
from shoal.llm import build_openai_app
from shoal.llm.engines import EngineOutput, MockEngine, SamplingParams, fallback_chat_prompt

openai_types = pytest.importorskip("openai.types")
ChatCompletion = openai_types.chat.ChatCompletion
ChatCompletionChunk = openai_types.chat.ChatCompletionChunk

ECHO = {"model_loading_config": {"model_id": "echo"}, "llm_engine": "mock"}
TOOLY = {"model_loading_config": {"model_id": "tooly"}, "llm_engine": f"{__name__}:ToolEngine"}
WORDS = "a b c d e f g h"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]


class ToolEngine(MockEngine):
    """The mock engine with vLLM's tool features: the chat template lists the tools; a JSON
    schema (a named or required tool choice) gets JSON that fits it; its "parser" finds a call
    of get_weather in the text."""

    name = "tooly"
    sampling_features = frozenset({"tools", "structured_outputs"})
    tool_call_parser = "words"

    def render_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> str:
        listed = "\nTools: " + " ".join(t["function"]["name"] for t in tools) if tools else ""
        return fallback_chat_prompt(messages) + listed

    def extract_tool_calls(self, text: str, tools: Any) -> tuple[str, list[dict[str, Any]]]:
        if "get_weather" not in text:
            return text, []
        return "", [{"name": "get_weather", "arguments": {"city": "Oslo"}}]

    async def generate(self, prompt: str, params: SamplingParams, request_id: str, adapter: Any = None,
                       *, from_chat: bool = False) -> AsyncGenerator[EngineOutput, None]:
        if params.structured is None:
            async for out in super().generate(prompt, params, request_id, adapter, from_chat=from_chat):
                yield out
            return
        schema = json.loads(params.structured.spec)
        text = '[{"name": "now", "parameters": {}}]' if schema.get("type") == "array" else '{"city": "Paris"}'
        half = len(text) // 2
        yield EngineOutput(text[:half], 3, 1)
        yield EngineOutput(text[half:], 3, 2)
        yield EngineOutput("", 3, 2, "stop")


@pytest.fixture(scope="module")
def rt() -> Any:
    with testing.run(build_openai_app({"llm_configs": [ECHO, TOOLY]})) as runtime:
        yield runtime


def post(rt: testing.LocalRuntime, path: str, body: dict[str, Any]) -> Any:
    r = rt.http("POST", path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def events(response: testing.HTTPResponse) -> list[dict[str, Any]]:
    blocks = [b.removeprefix("data: ") for b in response.text.split("\n\n") if b]
    assert blocks[-1] == "[DONE]", blocks
    return [json.loads(b) for b in blocks[:-1]]


def chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


# -- n --------------------------------------------------------------------------------------------

def test_n_choices_are_seeded_one_after_another(rt: testing.LocalRuntime) -> None:
    body = post(rt, "/v1/chat/completions", chat("echo", WORDS, n=3, seed=40))
    parsed = ChatCompletion.model_validate(body)
    assert [c.index for c in parsed.choices] == [0, 1, 2]
    texts = [c.message.content for c in parsed.choices]
    assert all(sorted(t.split()) == WORDS.split() for t in texts)
    # Choice i is the answer to the same request with seed + i.
    single = [post(rt, "/v1/chat/completions", chat("echo", WORDS, seed=40 + i))["choices"][0]["message"]["content"]
              for i in range(3)]
    assert texts == single and len(set(texts)) > 1
    prompt = body["usage"]["prompt_tokens"]
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 24, "total_tokens": prompt + 24}


def test_n_choices_stream_interleaved_with_their_index(rt: testing.LocalRuntime) -> None:
    request = chat("echo", WORDS, n=2, seed=7, stream=True, stream_options={"include_usage": True}, max_tokens=5)
    chunks = events(rt.http("POST", "/v1/chat/completions", json=request))
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    texts = ["", ""]
    for c in chunks[2:-1]:
        texts[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content", "")
    whole = post(rt, "/v1/chat/completions", {**request, "stream": False, "stream_options": None})
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    finals = sorted(c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert finals == [0, 1]
    assert chunks[-1]["usage"]["completion_tokens"] == 10 == whole["usage"]["completion_tokens"]


def test_n_text_completions_and_a_stop_per_choice(rt: testing.LocalRuntime) -> None:
    out = post(rt, "/v1/completions", {"model": "echo", "prompt": WORDS, "n": 4, "seed": 1, "stop": ["d"],
                                       "max_tokens": 8})
    assert len(out["choices"]) == 4
    for choice in out["choices"]:
        assert "d" not in choice["text"] and choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] <= 32


# -- tool calls -----------------------------------------------------------------------------------

def test_a_named_tool_choice_answers_one_call(rt: testing.LocalRuntime) -> None:
    request = chat("tooly", "weather in Paris?", tools=TOOLS,
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = ChatCompletion.model_validate(post(rt, "/v1/chat/completions", request)).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = events(rt.http("POST", "/v1/chat/completions", json={**request, "stream": True}))
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    streamed = [c.choices[0].delta.tool_calls for c in parsed if c.choices[0].delta.tool_calls]
    assert [[t.function.arguments for t in calls] for calls in streamed] == [['{"city": "Paris"}']]
    assert parsed[-1].choices[0].finish_reason == "stop"


def test_required_and_auto_tool_choices(rt: testing.LocalRuntime) -> None:
    required = ChatCompletion.model_validate(post(rt, "/v1/chat/completions", chat(
        "tooly", "what time is it?", tools=TOOLS, tool_choice="required"))).choices[0]
    assert required.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in required.message.tool_calls] == [("now", "{}")]
    # auto (the default with tools): the template got the tools, the model "called" get_weather.
    auto = ChatCompletion.model_validate(post(rt, "/v1/chat/completions", chat("tooly", "hi", tools=TOOLS))).choices[0]
    assert auto.finish_reason == "tool_calls" and auto.message.tool_calls[0].function.name == "get_weather"
    # none: the tools are in the prompt, the answer is text.
    none = post(rt, "/v1/chat/completions", chat("tooly", "hi", tools=TOOLS, tool_choice="none", temperature=0))
    assert none["choices"][0]["message"]["content"] == "Tools: get_weather now"
    assert "tool_calls" not in none["choices"][0]["message"]
    # A multi-turn conversation with a call and its result is accepted.
    turns = [{"role": "user", "content": "weather?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    post(rt, "/v1/chat/completions", {"model": "tooly", "messages": turns, "tools": TOOLS, "tool_choice": "none"})


# -- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "extra", "param", "words"), [
    ("/v1/chat/completions", {"logprobs": True}, "logprobs", "mock"),
    ("/v1/completions", {"logprobs": 2}, "logprobs", "mock"),
    ("/v1/chat/completions", {"top_k": 5}, "top_k", "mock"),
    ("/v1/completions", {"min_p": 0.1}, "min_p", "mock"),
    ("/v1/completions", {"repetition_penalty": 1.2}, "repetition_penalty", "mock"),
    ("/v1/completions", {"min_tokens": 2}, "min_tokens", "mock"),
    ("/v1/completions", {"stop_token_ids": [2]}, "stop_token_ids", "mock"),
    ("/v1/completions", {"skip_special_tokens": False}, "skip_special_tokens", "mock"),
    ("/v1/completions", {"allowed_token_ids": [2]}, "allowed_token_ids", "mock"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format", "vLLM engine supports"),
    ("/v1/completions", {"structured_outputs": {"regex": "a+"}}, "structured_outputs", "regex"),
    ("/v1/chat/completions", {"tools": TOOLS}, "tools", "vLLM engine supports"),
])
def test_what_the_engine_does_not_apply_is_a_400_naming_it(rt: testing.LocalRuntime, path: str, extra: dict[str, Any],
                                                             param: str, words: str) -> None:
    body = chat("echo", "x", **extra) if "chat" in path else {"model": "echo", "prompt": "x", **extra}
    for stream in (False, True):
        r = rt.http("POST", path, json={**body, "stream": stream})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], error


def test_tools_do_not_lift_the_other_checks(rt: testing.LocalRuntime) -> None:
    r = rt.http("POST", "/v1/chat/completions", json=chat("tooly", "x", tools=TOOLS, tool_choice="auto",
                                                          response_format={"type": "json_object"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    r = rt.http("POST", "/v1/chat/completions", json=chat("tooly", "x", tools=TOOLS, max_tokens=100_000))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
