"""The pieces behind n, logprobs, JSON mode and tool calls, without a model or an instance.

The JSON-mode checker (``shoal.llm.engines._json_mode``) on texts and on a toy vocabulary; the
log-probability formats (``shoal.llm._logprobs``) and the choice assembly (``shoal.llm._choices``),
validated with the official ``openai`` client's own response types; the tool-call plans
(``shoal.llm._tool_calls``). The same paths run on the tiny model in tests/e2e/test_llm_conformance.py.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from shoal.llm._choices import Choices
from shoal.llm._logprobs import chat_logprobs, completion_logprobs
from shoal.llm._tool_calls import plan_tools
from shoal.llm.engines import GenerationChunk, InvalidParameterError
from shoal.llm.engines._base import StopMatcher, TokenLogprob
from shoal.llm.engines._json_mode import MAX_WS, START, JsonMode, JsonVocabulary, feed

# -- JSON mode ------------------------------------------------------------------------------------

VALID = ['{}', ' {"a": 1}', '{"a": [1, -2.5e+3, 0, true, false, null, "x\\u00e9\\n\\"", {}], "b": {"c": []}}',
         '{"k": "\ufffd piece of a character"}', '{\n  "indented": [\n    1\n  ]\n}']
INVALID = ['[]', '"text"', '1', '{"a" 1}', '{,}', '{"a": 01}', '{"a": 1,}', '{"a": tru}', '{}x', '{} ',
           '{"a": "\x01"}', '{"a": -}', '{"a": 1.}', '{"a": "\\x"}', '{"a": "\\u12g4"}', "{'a': 1}", '{"a": 1]']


@pytest.mark.parametrize("text", VALID)
def test_every_prefix_of_a_json_object_is_accepted_and_the_whole_is_complete(text: str) -> None:
    json.loads(text)
    for end in range(len(text)):
        assert feed(START, text[:end]) is not None, text[:end]
    state = feed(START, text)
    assert state is not None and state[0] == "done"


@pytest.mark.parametrize("text", INVALID)
def test_text_that_is_not_a_json_object_is_refused(text: str) -> None:
    state = feed(START, text)
    assert state is None or state[0] != "done"
    if text not in ('{"a": tru}',):  # a prefix of a valid object, just not complete
        assert state is None, text


def test_whitespace_runs_are_capped() -> None:
    assert feed(START, "{" + " " * MAX_WS) is not None
    assert feed(START, "{" + " " * (MAX_WS + 1)) is None
    assert feed(START, '{"a": "' + " " * 100) is not None  # inside strings anything goes


VOCAB = ["", "{", "}", '"', "a", " b", ": ", "1", ",", '"}', "x\n", "[", "]", "true", '{"a": 1}', "\\", "n"]
EOS = 0


def vocab() -> JsonVocabulary:
    return JsonVocabulary(VOCAB, {EOS}, len(VOCAB))


def names(ids: list[int]) -> set[str]:
    return {VOCAB[i] if i != EOS else "<eos>" for i in ids}


def test_masks_allow_exactly_the_tokens_that_keep_a_json_prefix() -> None:
    mode = JsonMode(vocab())
    assert names(mode.allowed()) == {"{", '{"a": 1}'}
    mode.advance([1])  # {
    assert names(mode.allowed()) == {"}", '"', '"}'}
    mode.advance([1, 3])  # {"
    # Inside a key: plain tokens, the closing quote, an escape; not a newline, nor a quote and more.
    assert names(mode.allowed()) == {"{", "}", '"', "a", " b", ": ", "1", ",", "[", "]", "true", "\\", "n"}
    mode.advance([1, 3, 4, 3, 6, 7])  # {"a": 1
    assert names(mode.allowed()) == {"}", "1", ","}
    mode.advance([1, 3, 4, 3, 6, 7, 2])  # {"a": 1}
    assert mode.complete and names(mode.allowed()) == {"<eos>"}


def test_a_vocabulary_without_what_json_needs_ends_at_once() -> None:
    mode = JsonMode(JsonVocabulary(["", "a", "b"], {0}, 3))
    assert mode.allowed() == [0]  # no "{": end of sequence rather than anything invalid


def test_masks_are_cached_per_state() -> None:
    v = vocab()
    first = v.allowed(START)
    assert v.allowed(START) is first


# -- log probabilities and choices ------------------------------------------------------------------

def lp(token: str, logprob: float, *top: tuple[str, float], raw: bytes | None = None) -> TokenLogprob:
    return TokenLogprob(token, logprob, tuple(top), raw)


TOKENS = (lp("Hel", -0.5, ("Hel", -0.5), ("He", -1.5)), lp("lo", -math.inf, ("lo!", -0.1), ("lo", -9.0)),
          lp("\ufffd", -2.0, raw=b"\xe2\x80"))


def test_chat_logprobs_shape() -> None:
    body = chat_logprobs(TOKENS)
    assert body["content"][0] == {"token": "Hel", "logprob": -0.5, "bytes": list(b"Hel"),
                                  "top_logprobs": [{"token": "Hel", "logprob": -0.5, "bytes": list(b"Hel")},
                                                   {"token": "He", "logprob": -1.5, "bytes": list(b"He")}]}
    assert body["content"][1]["logprob"] == -9999.0  # JSON has no -Infinity
    assert body["content"][2]["bytes"] == [0xE2, 0x80] and body["content"][2]["top_logprobs"] == []


def test_completion_logprobs_shape_and_offsets() -> None:
    body, end = completion_logprobs(TOKENS[:2], offset=4)
    assert body == {"tokens": ["Hel", "lo"], "token_logprobs": [-0.5, -9999.0],
                    "top_logprobs": [{"Hel": -0.5, "He": -1.5}, {"lo!": -0.1, "lo": -9.0}],
                    "text_offset": [4, 7]}
    assert end == 9
    extra, _ = completion_logprobs([lp("x", -3.0, ("y", -0.1))])
    assert extra["top_logprobs"] == [{"y": -0.1, "x": -3.0}]  # the sampled token is always listed


def chunks_of_two_choices() -> list[GenerationChunk]:
    return [GenerationChunk("a", 5, 1, None, 0, TOKENS[:1]), GenerationChunk("x", 5, 1, None, 1, TOKENS[1:2]),
            GenerationChunk(" b", 5, 3, "length", 0, TOKENS[2:]), GenerationChunk("y", 5, 2, "stop", 1)]


@pytest.mark.parametrize("chat", [True, False])
def test_n_choices_in_one_body(chat: bool) -> None:
    openai_types = pytest.importorskip("openai.types")
    choices = Choices("id-1", "m", chat=chat, n=2, logprobs=True)
    for chunk in chunks_of_two_choices():
        choices.add(chunk)
    body = choices.body()
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}  # prompt once
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    if chat:
        parsed = openai_types.chat.ChatCompletion.model_validate(body)
        assert [c.message.content for c in parsed.choices] == ["a b", "xy"]
        assert [t.token for t in parsed.choices[0].logprobs.content] == ["Hel", "\ufffd"]
    else:
        parsed = openai_types.Completion.model_validate(body)
        assert [c.text for c in parsed.choices] == ["a b", "xy"]
        assert parsed.choices[1].logprobs.tokens == ["lo"]


@pytest.mark.parametrize("chat", [True, False])
def test_n_choices_in_a_stream(chat: bool) -> None:
    openai_types = pytest.importorskip("openai.types")
    choices = Choices("id-1", "m", chat=chat, n=2, logprobs=True, include_usage=True)
    out = choices.first_chunks()
    for chunk in chunks_of_two_choices():
        out += choices.stream_chunks(chunk)
    out.append(choices.usage_chunk())
    # The client validates chat chunks; text completion chunks it builds without validation.
    kind = openai_types.chat.ChatCompletionChunk if chat else openai_types.Completion
    parsed = [kind.model_validate(c) if chat else kind.model_construct(**c) for c in out]
    texts = ["", ""]
    for c in out[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "") if chat else choice["text"]
    assert texts == ["a b", "xy"]
    finals = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in out[:-1]
              if c["choices"][0]["finish_reason"]]
    assert finals == [(0, "length"), (1, "stop")]
    assert out[-1]["usage"]["completion_tokens"] == 5 and out[-1]["choices"] == []
    if chat:
        assert parsed[0].choices[0].delta.role == "assistant" and parsed[1].choices[0].index == 1
    else:  # offsets count each choice's tokens from its start ("Hel" is 3 characters)
        offsets = [c["choices"][0]["logprobs"]["text_offset"] for c in out[:-1] if c["choices"][0]["logprobs"]]
        assert offsets == [[0], [0], [3]]


def test_tool_calls_in_a_body_and_a_stream() -> None:
    openai_types = pytest.importorskip("openai.types")
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    last = GenerationChunk("", 3, 4, "tool_calls", 0, (), (call,))
    choices = Choices("id", "m", chat=True)
    choices.add(last)
    message = openai_types.chat.ChatCompletion.model_validate(choices.body()).choices[0].message
    assert message.content is None and message.tool_calls[0].function.arguments == '{"x": 1}'
    stream = [openai_types.chat.ChatCompletionChunk.model_validate(c) for c in Choices("id", "m", chat=True)
              .stream_chunks(last)]
    assert stream[0].choices[0].delta.tool_calls[0].function.name == "f"
    assert stream[-1].choices[0].finish_reason == "tool_calls"


def test_stop_matcher_can_keep_the_stop_string() -> None:
    keep = StopMatcher(["ab", "abc"], include=True)
    assert keep.feed("xx a") == ("xx ", False)
    assert keep.feed("bcd") == ("abc", True)  # the longer stop sequence at the same place, kept
    assert StopMatcher(["b"]).feed("abc") == ("a", True)


# -- tool plans -----------------------------------------------------------------------------------

TOOLS = ({"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}})


class ToolEngine:
    name = "vllm"
    sampling_features = frozenset({"tools", "structured_outputs"})
    tool_call_parser = "fake"

    def extract_tool_calls(self, text: str, tools: Any) -> tuple[str, list[dict[str, Any]]]:
        head, _, call = text.partition("CALL ")
        return (head, [{"name": call.split()[0], "arguments": {"city": "Oslo"}}]) if call else (text, [])


def test_tool_plans() -> None:
    engine = ToolEngine()
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, engine)
    assert named is not None and named.structured is not None
    assert json.loads(named.structured.spec)["required"] == ["city"] and named.structured.param == "tool_choice"
    content, calls, reason = named.calls('{"city": "Paris"}', "stop", engine)
    assert content == "" and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert reason == "stop" and calls[0]["id"].startswith("call_")
    required = plan_tools(TOOLS, "required", engine)
    assert required is not None and required.structured is not None
    schema = json.loads(required.structured.spec)
    assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2
    _, calls, reason = required.calls('[{"name": "now", "parameters": {}}]', "stop", engine)
    assert [c["function"]["name"] for c in calls] == ["now"] and reason == "tool_calls"
    assert required.calls('[{"name": "now"', "length", engine) == ('[{"name": "now"', [], "length")
    auto = plan_tools(TOOLS, None, engine)  # tools without tool_choice: auto
    assert auto is not None and auto.structured is None
    content, calls, reason = auto.calls("sure. CALL get_weather", "stop", engine)
    assert content == "sure. " and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert reason == "tool_calls"
    assert auto.calls("no call", "stop", engine) == ("no call", [], "stop")
    assert plan_tools(TOOLS, "none", engine) is None and plan_tools((), "auto", engine) is None


def test_tool_plans_refused_where_the_engine_cannot() -> None:
    class Transformers:
        name = "transformers"
        sampling_features = frozenset({"json_object"})

    with pytest.raises(InvalidParameterError) as caught:
        plan_tools(TOOLS, "auto", Transformers())
    assert caught.value.param == "tools" and "vLLM engine supports it" in caught.value.message
    no_parser = ToolEngine()
    no_parser.tool_call_parser = ""
    with pytest.raises(InvalidParameterError) as caught:
        plan_tools(TOOLS, "auto", no_parser)
    assert caught.value.param == "tool_choice" and "tool_call_parser" in caught.value.message


# -- several engine streams for one request ------------------------------------------------------

def test_choice_streams_are_read_together_and_closed_together() -> None:
    import asyncio

    from shoal.llm._outputs import EngineOutputs
    from shoal.llm.engines import EngineOutput

    closed: list[int] = []

    async def stream(i: int, n: int, fail: bool = False) -> Any:
        try:
            for k in range(n):
                await asyncio.sleep(0)
                yield EngineOutput(f"{i}{k}", 1, k + 1)
            if fail:
                raise RuntimeError(f"stream {i} failed")
            await asyncio.Event().wait()  # until closed
        finally:
            closed.append(i)

    async def scenario() -> tuple[list[tuple[int, str]], list[int], str]:
        outputs = EngineOutputs([stream(0, 3), stream(1, 2)], relabel=True)
        got: list[tuple[int, str]] = []
        async for index, out in outputs:
            got.append((index, out.text))
            if len(got) == 5:
                break
        await outputs.stop(1)
        stopped_one = sorted(closed)
        await outputs.aclose()
        failing = EngineOutputs([stream(2, 1), stream(3, 1, fail=True)], relabel=True)
        with pytest.raises(RuntimeError) as caught:
            async for _ in failing:
                pass
        await failing.aclose()
        return got, stopped_one, str(caught.value)

    got, stopped_one, error = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert sorted(got) == [(0, "00"), (0, "01"), (0, "02"), (1, "10"), (1, "11")]
    assert stopped_one == [1]  # stopping a choice closes its stream only
    assert sorted(closed) == [0, 1, 2, 3] and error == "stream 3 failed"
