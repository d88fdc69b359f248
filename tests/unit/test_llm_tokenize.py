"""The gateway's /tokenize, /detokenize, /health and max_model_len (issue 20, build item 5), with the
mock engine in-process."""

from __future__ import annotations

from typing import Any

import pytest
from test_llm_gateway import ECHO, EMB, assert_error, auth

from shoal import testing
from shoal.llm import GatewayConfig, OpenAiIngress, build_embedding_deployment, build_llm_deployment, build_openai_app


@pytest.fixture(scope="module")
def rt() -> Any:
    echo = {**ECHO, "engine_kwargs": {"max_context": 512}}
    app = build_openai_app({"llm_configs": [echo], "embedding_configs": [EMB]})
    with testing.run(app) as runtime:
        yield runtime


def test_tokenize_and_detokenize_round_trip(rt: testing.LocalRuntime) -> None:
    r = rt.http("POST", "/tokenize", json={"model": "echo", "prompt": "the cat saw the dog"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 5 and len(body["tokens"]) == 5 and body["max_model_len"] == 512
    assert body["tokens"][0] == body["tokens"][3]  # "the" twice: one id
    back = rt.http("POST", "/detokenize", json={"model": "echo", "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "the cat saw the dog"}


def test_tokenize_chat_messages_uses_the_template(rt: testing.LocalRuntime) -> None:
    r = rt.http("POST", "/tokenize", json={"model": "echo", "messages": [{"role": "user", "content": "hi there"}]})
    assert r.status_code == 200, r.text
    assert r.json()["count"] > 2  # the rendered prompt holds the role label and the assistant's cue too


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {"model": "echo"}, None),
    ("/tokenize", {"model": "echo", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, None),
    ("/detokenize", {"model": "echo", "tokens": [-1]}, "tokens.0"),
    ("/detokenize", {"model": "echo", "tokens": [987654]}, "tokens"),
    ("/detokenize", {"model": "echo"}, "tokens"),
])
def test_bad_tokenize_requests_are_400(rt: testing.LocalRuntime, path: str, body: dict[str, Any],
                                       param: str | None) -> None:
    err = assert_error(rt.http("POST", path, json=body), 400)
    if param is not None:
        assert err["param"] == param, err


def test_unknown_model_wrong_method_and_embedding_model(rt: testing.LocalRuntime) -> None:
    assert_error(rt.http("POST", "/tokenize", json={"model": "nope", "prompt": "x"}), 404, "model_not_found")
    assert_error(rt.http("GET", "/tokenize"), 405)
    assert_error(rt.http("POST", "/health"), 405)
    assert rt.http("POST", "/tokenize", json={"model": "emb", "prompt": "x"}).status_code == 400


def test_health_and_max_model_len_in_models(rt: testing.LocalRuntime) -> None:
    r = rt.http("GET", "/health")
    assert r.status_code == 200 and r.text == ""
    card = rt.http("GET", "/v1/models/echo").json()
    assert card["max_model_len"] == 512


def test_tokenize_needs_a_key_and_an_allowed_model() -> None:
    gateway = GatewayConfig(api_keys={"sk-bob-0123456789": "bob"}, tenants={"bob": {"allowed_models": ["other"]}})
    app = OpenAiIngress.bind({"echo": build_llm_deployment(ECHO), "other": build_llm_deployment(
        {**ECHO, "model_loading_config": {"model_id": "other"}})}, {"emb": build_embedding_deployment(EMB)}, gateway)
    with testing.run(app) as rt:
        assert_error(rt.http("POST", "/tokenize", json={"model": "echo", "prompt": "x"}), 401)
        assert_error(rt.http("POST", "/tokenize", json={"model": "echo", "prompt": "x"},
                             headers=auth("sk-bob-0123456789")), 404, "model_not_found")
        ok = rt.http("POST", "/tokenize", json={"model": "other", "prompt": "x"}, headers=auth("sk-bob-0123456789"))
        assert ok.status_code == 200, ok.text
        assert rt.http("GET", "/health").status_code == 200  # probes carry no key


def test_serving_metrics_under_vllm_names(rt: testing.LocalRuntime) -> None:
    from prometheus_client import generate_latest

    from shoal.metrics import registry

    def sample(name: str, **labels: str) -> float:
        text = generate_latest(registry()).decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    before = sample("vllm:e2e_request_latency_seconds_count", model_name="echo")
    stops = sample("vllm:request_success_total", model_name="echo", finished_reason="stop")
    r = rt.http("POST", "/v1/chat/completions", json={"model": "echo", "temperature": 0,
                                                      "messages": [{"role": "user", "content": "one two three"}]})
    assert r.status_code == 200, r.text
    assert sample("vllm:e2e_request_latency_seconds_count", model_name="echo") == before + 1
    assert sample("vllm:time_to_first_token_seconds_count", model_name="echo") >= 1
    assert sample("vllm:time_per_output_token_seconds_count", model_name="echo") >= 1  # three tokens
    assert sample("vllm:request_success_total", model_name="echo", finished_reason="stop") == stops + 1
    assert sample("vllm:num_requests_running", model_name="echo") == 0  # back to idle


def test_a_model_server_that_does_not_answer_is_a_503(rt: testing.LocalRuntime,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.llm import _tokenize

    monkeypatch.setattr(_tokenize, "CALL_TIMEOUT_S", 0.0)  # every call "takes too long"
    err = assert_error(rt.http("POST", "/tokenize", json={"model": "echo", "prompt": "x"}), 503, "timeout")
    assert "did not answer tokenize" in err["message"]
