"""The OpenAI-compatible gateway in-process (shoal.testing), with the mock engine: no torch, no sockets."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from shoal import serve, testing
from shoal.llm import (
    GatewayConfig,
    LLMConfig,
    OpenAiIngress,
    build_embedding_deployment,
    build_llm_deployment,
    build_openai_app,
    hash_api_key,
)
from shoal.llm.engines import GenerationRequest, SamplingParams

ECHO = {"model_loading_config": {"model_id": "echo"}, "llm_engine": "mock"}
EMB = {"model_loading_config": {"model_id": "emb"}, "engine": "mock"}


def chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


def events(response: testing.HTTPResponse) -> list[Any]:
    """The data of each Server-Sent Event ("[DONE]" kept as a string)."""
    out: list[Any] = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(response: testing.HTTPResponse, status: int, code: str | None = None,
                 param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return dict(body["error"])


@pytest.fixture(scope="module")
def rt() -> Any:
    app = build_openai_app({"llm_configs": [ECHO, {**ECHO, "model_loading_config": {"model_id": "echo-2"}}],
                            "embedding_configs": [EMB]})
    with testing.run(app) as runtime:
        yield runtime


def test_models_lists_every_model(rt: testing.LocalRuntime) -> None:
    r = rt.http("GET", "/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["echo", "echo-2", "emb"]
    assert all(m["object"] == "model" and m["owned_by"] == "shoal" for m in body["data"])
    assert rt.http("GET", "/v1/models/echo-2").json()["id"] == "echo-2"
    assert_error(rt.http("GET", "/v1/models/nope"), 404, "model_not_found")


def test_chat_completion(rt: testing.LocalRuntime) -> None:
    r = rt.http("POST", "/v1/chat/completions", json=chat("echo", "hello shoal world"))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "echo"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello shoal world",
                                                        "refusal": None}, "logprobs": None, "finish_reason": "stop"}]
    # The mock's tokens are words: "User: hello shoal world" + "Assistant:" is 5, the answer 3.
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_routing_by_model(rt: testing.LocalRuntime) -> None:
    rt.http("POST", "/v1/chat/completions", json=chat("echo-2", "one two"))
    stats = {m: rt.get_deployment_handle(f"LLMServer:{m}").stats.remote().result() for m in ("echo", "echo-2")}
    before = stats["echo"]["requests"]
    rt.http("POST", "/v1/chat/completions", json=chat("echo-2", "three"))
    assert rt.get_deployment_handle("LLMServer:echo").stats.remote().result()["requests"] == before
    assert rt.get_deployment_handle("LLMServer:echo-2").stats.remote().result()["requests"] == \
        stats["echo-2"]["requests"] + 1


def test_completion_max_tokens_and_stop(rt: testing.LocalRuntime) -> None:
    body = {"model": "echo", "prompt": "a b c d e", "temperature": 0}
    r = rt.http("POST", "/v1/completions", json={**body, "max_tokens": 2})
    out = r.json()
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == "a b" and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 2
    r = rt.http("POST", "/v1/completions", json={**body, "stop": [" d", "zzz"]})
    assert r.json()["choices"][0] == {"index": 0, "text": "a b c", "logprobs": None, "finish_reason": "stop"}
    # The default max_tokens of the completions API is 16 (OpenAI's).
    r = rt.http("POST", "/v1/completions", json={**body, "prompt": "x", "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 16


def test_chat_stream_is_openai_sse(rt: testing.LocalRuntime) -> None:
    r = rt.http("POST", "/v1/chat/completions",
                json=chat("echo", "one two three", stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                           "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completion_stream(rt: testing.LocalRuntime) -> None:
    r = rt.http("POST", "/v1/completions", json={"model": "echo", "prompt": "x y", "temperature": 0, "stream": True})
    evs = events(r)
    assert evs[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in evs[:-1]) == "x y"
    assert evs[-2]["choices"][0]["finish_reason"] == "stop" and "usage" not in evs[-2]


def test_seeded_sampling_is_reproducible(rt: testing.LocalRuntime) -> None:
    words = "a b c d e f g h i j"
    outs = [rt.http("POST", "/v1/chat/completions", json=chat("echo", words, temperature=1.0, seed=seed)).json()
            for seed in (7, 7, 8)]
    texts = [o["choices"][0]["message"]["content"] for o in outs]
    assert texts[0] == texts[1] != texts[2]
    assert sorted(texts[0].split()) == words.split()


def test_embeddings_float_and_base64(rt: testing.LocalRuntime) -> None:
    r = rt.http("POST", "/v1/embeddings", json={"model": "emb", "input": ["alpha", "beta gamma"]})
    body = r.json()
    assert body["object"] == "list" and body["model"] == "emb"
    assert [d["index"] for d in body["data"]] == [0, 1]
    vec = body["data"][0]["embedding"]
    assert len(vec) == 8 and abs(sum(x * x for x in vec) - 1) < 1e-6
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    b64 = rt.http("POST", "/v1/embeddings", json={"model": "emb", "input": "alpha", "encoding_format": "base64"})
    raw = base64.b64decode(b64.json()["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == pytest.approx(vec, abs=1e-6)


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), [
    ("/v1/chat/completions", chat("nope", "x"), 404, "model_not_found", "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "missing_required_parameter",
     "model"),
    ("/v1/chat/completions", chat("echo", "x", temperature=3), 400, "invalid_value", "temperature"),
    ("/v1/chat/completions", chat("echo", "x", n=17), 400, "invalid_value", "n"),
    ("/v1/chat/completions", chat("echo", "x", tools=[{"type": "function"}]), 400, "invalid_value", "tools"),
    ("/v1/chat/completions", chat("echo", "x", max_tokens=10_000), 400, "context_length_exceeded", "messages"),
    ("/v1/chat/completions", chat("emb", "x"), 400, None, "model"),
    ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, None, "messages"),
    ("/v1/completions", {"model": "echo", "prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("/v1/embeddings", {"model": "echo", "input": "x"}, 400, None, "model"),
    ("/v1/embeddings", {"model": "emb", "input": [[1, 2, 3]]}, 400, "invalid_value", "input"),
    ("/v1/embeddings", {"model": "emb", "input": "x", "dimensions": 4}, 400, None, "dimensions"),
])
def test_errors_have_openai_shape(rt: testing.LocalRuntime, path: str, body: dict[str, Any], status: int,
                                  code: str | None, param: str | None) -> None:
    error = assert_error(rt.http("POST", path, json=body), status, code, param)
    assert error["type"] == "invalid_request_error"


def test_bad_json_unknown_url_and_method(rt: testing.LocalRuntime) -> None:
    assert_error(rt.http("POST", "/v1/chat/completions", content=b"{not json"), 400)
    assert_error(rt.http("POST", "/v1/chat/completions", json=["a list"]), 400)
    assert_error(rt.http("POST", "/v1/nothing", json={}), 404)
    assert_error(rt.http("GET", "/v1/chat/completions"), 405)


def test_stream_error_before_first_token_gets_its_status(rt: testing.LocalRuntime) -> None:
    r = rt.http("POST", "/v1/chat/completions", json=chat("echo", "x", max_tokens=10_000, stream=True))
    assert_error(r, 400, "context_length_exceeded")


def test_usage_and_metrics_open_gateway(rt: testing.LocalRuntime) -> None:
    rt.http("POST", "/v1/chat/completions", json=chat("echo", "count me"))
    usage = rt.http("GET", "/v1/usage").json()
    assert usage["object"] == "usage"
    anon = usage["tenants"]["anonymous"]
    assert anon["requests"] >= 1 and anon["models"]["echo"]["completion_tokens"] >= 2
    metrics = rt.http("GET", "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'shoal_llm_requests_total{endpoint="chat/completions",model="echo",status="200",tenant="anonymous"}' \
        in metrics.text
    assert "shoal_llm_completion_tokens_total" in metrics.text
    assert "shoal_llm_time_to_first_token_seconds_bucket" in metrics.text


# --------------------------------------------------------------------------------------------
# Keys, tenants and rate limits (a fake clock drives the token buckets)

KEYS = {"sk-alice-0123456789": "alice", hash_api_key("sk-bob-0123456789"): "bob", "sk-ops-0123456789": "ops"}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def limited() -> Any:
    clock = testing.FakeClock(1000.0)
    gateway = GatewayConfig(api_keys=KEYS, tenants={
        "alice": {"requests_per_minute": 2},
        "bob": {"tokens_per_minute": 60, "allowed_models": ["echo"]},
        "ops": {"admin": True},
    })
    app = OpenAiIngress.bind({"echo": build_llm_deployment(ECHO)}, {"emb": build_embedding_deployment(EMB)},
                             gateway, clock=clock)
    with testing.run(app) as runtime:
        yield runtime, clock


def test_api_keys(limited: tuple[testing.LocalRuntime, testing.FakeClock]) -> None:
    rt, _ = limited
    missing = assert_error(rt.http("POST", "/v1/chat/completions", json=chat("echo", "x")), 401)
    assert "API key" in missing["message"]
    wrong = assert_error(rt.http("POST", "/v1/chat/completions", json=chat("echo", "x"),
                                 headers=auth("sk-wrong-123456789")), 401, "invalid_api_key")
    assert "sk-wrong" not in wrong["message"]  # the key is masked
    assert_error(rt.http("GET", "/v1/models", headers={"authorization": "Basic abc"}), 401)
    assert rt.http("POST", "/v1/chat/completions", json=chat("echo", "x"), headers=auth("sk-bob-0123456789")).ok


def test_request_rate_limit_with_retry_after(limited: tuple[testing.LocalRuntime, testing.FakeClock]) -> None:
    rt, clock = limited
    for _ in range(2):
        r = rt.http("POST", "/v1/chat/completions", json=chat("echo", "x"), headers=auth("sk-alice-0123456789"))
        assert r.ok
        assert r.headers["x-ratelimit-limit-requests"] == "2"
    r = rt.http("POST", "/v1/chat/completions", json=chat("echo", "x"), headers=auth("sk-alice-0123456789"))
    error = assert_error(r, 429, "rate_limit_exceeded")
    assert error["type"] == "requests"
    assert r.headers["retry-after"] == "30"  # one request per 30 s refills
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # Other tenants are not affected.
    assert rt.http("POST", "/v1/chat/completions", json=chat("echo", "x"), headers=auth("sk-ops-0123456789")).ok
    clock.advance(29)
    assert rt.http("POST", "/v1/completions", json={"model": "echo", "prompt": "x"},
                   headers=auth("sk-alice-0123456789")).status_code == 429
    clock.advance(1)
    assert rt.http("POST", "/v1/completions", json={"model": "echo", "prompt": "x"},
                   headers=auth("sk-alice-0123456789")).ok


def test_token_rate_limit(limited: tuple[testing.LocalRuntime, testing.FakeClock]) -> None:
    rt, clock = limited
    bob = auth("sk-bob-0123456789")
    # 60 tokens per minute. A request reserves its prompt estimate (65 characters: 17 tokens) plus
    # max_tokens (40): 57 fit, so it is admitted ...
    words = " ".join(["w"] * 33)
    r = rt.http("POST", "/v1/completions", json={"model": "echo", "prompt": words, "temperature": 0,
                                                 "max_tokens": 40}, headers=bob)
    assert r.ok and r.json()["usage"]["total_tokens"] == 66
    assert r.headers["x-ratelimit-limit-tokens"] == "60" and r.headers["x-ratelimit-remaining-tokens"] == "3"
    # ... and settled at 66 it leaves the bucket 6 tokens in debt. The next request reserves its
    # prompt (1) plus the completions default max_tokens (16): 17 tokens are there after 23 s.
    r = rt.http("POST", "/v1/completions", json={"model": "echo", "prompt": "x"}, headers=bob)
    error = assert_error(r, 429, "rate_limit_exceeded")
    assert error["type"] == "tokens" and r.headers["retry-after"] == "23"
    assert r.headers["x-ratelimit-remaining-tokens"] == "0" and r.headers["x-ratelimit-reset-tokens"] == "1m6s"
    clock.advance(22)
    assert rt.http("POST", "/v1/completions", json={"model": "echo", "prompt": "x"}, headers=bob).status_code == 429
    clock.advance(1)
    assert rt.http("POST", "/v1/completions", json={"model": "echo", "prompt": "x"}, headers=bob).ok


def test_allowed_models(limited: tuple[testing.LocalRuntime, testing.FakeClock]) -> None:
    rt, _ = limited
    bob = auth("sk-bob-0123456789")
    assert [m["id"] for m in rt.http("GET", "/v1/models", headers=bob).json()["data"]] == ["echo"]
    assert_error(rt.http("POST", "/v1/embeddings", json={"model": "emb", "input": "x"}, headers=bob), 404,
                 "model_not_found")
    ops = auth("sk-ops-0123456789")
    assert [m["id"] for m in rt.http("GET", "/v1/models", headers=ops).json()["data"]] == ["echo", "emb"]


def test_usage_needs_an_admin_and_counts_per_tenant(limited: tuple[testing.LocalRuntime, testing.FakeClock]) -> None:
    rt, _ = limited
    alice, ops = auth("sk-alice-0123456789"), auth("sk-ops-0123456789")
    for _ in range(3):  # the third is rate limited
        rt.http("POST", "/v1/chat/completions", json=chat("echo", "a b"), headers=alice)
    rt.http("POST", "/v1/embeddings", json={"model": "emb", "input": "a b c"}, headers=ops)
    assert_error(rt.http("GET", "/v1/usage", headers=alice), 403)
    assert_error(rt.http("GET", "/metrics", headers=alice), 403)
    tenants = rt.http("GET", "/v1/usage", headers=ops).json()["tenants"]
    assert tenants["alice"]["requests"] == 2 and tenants["alice"]["rate_limited"] == 1
    assert tenants["alice"]["models"]["echo"]["completion_tokens"] == 4
    assert tenants["ops"]["models"]["emb"]["prompt_tokens"] == 3
    metrics = rt.http("GET", "/metrics", headers=ops).text
    assert 'shoal_llm_rate_limited_total{limit="requests",tenant="alice"} 1.0' in metrics
    assert 'shoal_llm_prompt_tokens_total{model="emb",tenant="ops"} 3.0' in metrics


def test_metrics_registries_do_not_collide() -> None:
    # Two gateways in one process (e.g. two tests) each have their own counters.
    with testing.run(build_openai_app({"llm_configs": [ECHO]})) as a, \
            testing.run(build_openai_app({"llm_configs": [ECHO]})) as b:
        a.http("POST", "/v1/chat/completions", json=chat("echo", "x"))
        assert 'status="200"' in a.http("GET", "/metrics").text
        assert 'status="200"' not in b.http("GET", "/metrics").text


# --------------------------------------------------------------------------------------------
# LoRA adapters: "base:adapter" routes to base's deployment as a multiplexed model id


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    for name in ("french", "pirate", "legal"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    return tmp_path


def test_adapters_route_as_multiplexed_models(adapters: Path) -> None:
    lora = {**ECHO, "lora_config": {"dynamic_lora_loading_path": str(adapters), "max_num_adapters_per_replica": 2}}
    with testing.run(build_openai_app({"llm_configs": [lora, {**ECHO, "model_loading_config": {"model_id": "b"}}]})) \
            as rt:
        ids = [m["id"] for m in rt.http("GET", "/v1/models").json()["data"]]
        assert ids == ["echo", "echo:french", "echo:legal", "echo:pirate", "b"]
        card = rt.http("GET", "/v1/models/echo:pirate").json()
        assert card["parent"] == "echo"

        def ask(model: str) -> str:
            r = rt.http("POST", "/v1/chat/completions", json=chat(model, "ahoy"))
            assert r.ok, r.text
            assert r.json()["model"] == model
            return str(r.json()["choices"][0]["message"]["content"])

        assert ask("echo:pirate") == "[pirate] ahoy"
        assert ask("echo") == "ahoy"
        assert ask("echo:french") == "[french] ahoy"
        assert ask("echo:pirate") == "[pirate] ahoy"  # still loaded
        assert ask("echo:legal") == "[legal] ahoy"    # evicts the least recently used: french
        assert ask("echo:french") == "[french] ahoy"  # loaded again
        server = rt.instance("LLMServer:echo")
        assert server.engine.adapters_loaded == ["pirate", "french", "legal", "french"]
        assert_error(rt.http("POST", "/v1/chat/completions", json=chat("echo:missing", "x")), 404, "model_not_found")
        assert_error(rt.http("POST", "/v1/chat/completions", json=chat("echo:../french", "x")), 404,
                     "model_not_found")
        # A model without a lora_config has no adapters.
        assert_error(rt.http("POST", "/v1/chat/completions", json=chat("b:french", "x")), 404, "model_not_found")
        assert_error(rt.http("POST", "/v1/chat/completions", json=chat("nope:french", "x")), 404, "model_not_found")


def test_llm_server_from_a_handle() -> None:
    """LLMServer on its own: stream GenerationChunks from Python."""
    with testing.run(build_llm_deployment(LLMConfig.model_validate(ECHO))) as rt:
        request = GenerationRequest("r1", prompt="to be or not to be",
                                    sampling=SamplingParams(temperature=0, stop=("not",)))
        chunks = list(rt.handle.options(stream=True).generate.remote(request))
        assert "".join(c.text for c in chunks) == "to be or "
        assert chunks[-1].finish_reason == "stop" and chunks[-1].prompt_tokens == 6
        info = rt.handle.model_info.remote().result()
        assert info["id"] == "echo" and info["engine"] == "mock"


def test_gateway_deployments_are_named_after_models() -> None:
    app = build_openai_app({"llm_configs": [{**ECHO, "model_loading_config": {"model_id": "org/model-1"}}]})
    with testing.run(app) as rt:
        assert rt.instance("LLMServer:org--model-1").model_id == "org/model-1"
        assert rt.http("POST", "/v1/chat/completions", json=chat("org/model-1", "hi")).ok
        assert rt.http("GET", "/v1/models/org/model-1").json()["id"] == "org/model-1"


def test_deployment_config_reaches_the_deployment() -> None:
    app = build_openai_app({"llm_configs": [{**ECHO, "deployment_config": {"num_replicas": 3,
                                                                          "max_ongoing_requests": 7}}],
                            "ingress_deployment_config": {"max_ongoing_requests": 99}})
    deployments = {d.name: d for d in _graph(app)}
    assert deployments["LLMServer:echo"].num_replicas == 3
    assert deployments["LLMServer:echo"].max_ongoing_requests == 7
    assert deployments["OpenAiIngress"].max_ongoing_requests == 99


def _graph(app: serve.Application) -> list[serve.Deployment]:
    from shoal.loader import graph_deployments

    return graph_deployments(app)
