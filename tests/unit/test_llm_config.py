"""shoal.llm's pure parts: config validation, the builder in config files, stop sequences, token buckets."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import shoal.llm
from shoal.exceptions import wrap_remote_exception
from shoal.llm import GatewayConfig, LLMServingArgs, OpenAIError, build_openai_app, hash_api_key
from shoal.llm._ratelimit import RateLimiter, TokenBucket
from shoal.llm.engines import ContextLengthError, StopMatcher, fallback_chat_prompt
from shoal.loader import build_applications, graph_deployments
from shoal.schema import ConfigError, load_config_file

ECHO = {"model_loading_config": {"model_id": "echo"}, "llm_engine": "mock"}


def test_public_names() -> None:
    assert sorted(shoal.llm.__all__) == shoal.llm.__all__
    assert {"LLMConfig", "LLMServer", "LLMServingArgs", "OpenAiIngress", "build_openai_app"} <= set(shoal.llm.__all__)
    for name in shoal.llm.__all__:
        assert getattr(shoal.llm, name) is not None


def test_importing_shoal_llm_imports_no_ml_library() -> None:
    code = ("import sys, shoal, shoal.llm; "
            "heavy = [m for m in ('torch', 'transformers', 'vllm', 'sentence_transformers', 'numpy') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Config


def test_builder_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as e:
        build_openai_app({"llm_configs": [{"model_loading_config": {}}]})
    assert "llm_configs[0].model_loading_config.model_id" in str(e.value)
    with pytest.raises(ConfigError, match=r"llm_configs\[0\]\.llm_engine: .*unknown engine 'tensorrt'"):
        build_openai_app({"llm_configs": [{**ECHO, "llm_engine": "tensorrt"}]})
    with pytest.raises(ConfigError, match=r"llm_configs\[0\]\.deployment_config\.num_replicas"):
        build_openai_app({"llm_configs": [{**ECHO, "deployment_config": {"num_replicas": -1}}]})
    with pytest.raises(ConfigError, match="already used by llm_configs"):
        build_openai_app({"llm_configs": [ECHO], "embedding_configs": [{"model_loading_config": {"model_id": "echo"}}]})
    with pytest.raises(ConfigError, match=r"model_loading_config\.model_id: .*letters, digits"):
        build_openai_app({"llm_configs": [{**ECHO, "model_loading_config": {"model_id": "base:adapter"}}]})
    with pytest.raises(ConfigError, match="at least one model"):
        build_openai_app({})
    with pytest.raises(ConfigError, match=r"gateway\.tenants\.alice\.requests_per_minute"):
        build_openai_app({"llm_configs": [ECHO], "gateway": {"tenants": {"alice": {"requests_per_minute": 0}}}})
    with pytest.raises(ConfigError, match=r"gateway\.api_keys: .*64 lowercase hex"):
        build_openai_app({"llm_configs": [ECHO], "gateway": {"api_keys": {"sha256:abc": "x"}}})


def test_ray_style_engine_names_and_typed_args() -> None:
    args = LLMServingArgs.model_validate({"llm_configs": [{**ECHO, "llm_engine": "vLLM"}]})
    assert args.llm_configs[0].llm_engine == "vllm"
    # A validated LLMServingArgs is accepted as is; building imports no engine.
    app = build_openai_app(LLMServingArgs.model_validate({"llm_configs": [ECHO]}))
    assert [d.name for d in graph_deployments(app)] == ["LLMServer:echo", "OpenAiIngress"]


def test_relative_model_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    app = build_openai_app({"llm_configs": [{**ECHO, "model_loading_config": {"model_id": "m",
                                                                             "model_source": "models/m"}}]})
    server = graph_deployments(app)[0]
    node = app._args[0]["m"]
    assert server.name == "LLMServer:m"
    assert node._args[0].model_loading_config.model_source == str(tmp_path / "models" / "m")


SERVE_YAML = """\
applications:
  - name: llm
    route_prefix: /
    import_path: shoal.llm:build_openai_app
    args:
      llm_configs:
        - model_loading_config: {{model_id: echo}}
          llm_engine: {engine}
      gateway:
        api_keys: {{sk-test-key: team}}
    deployments:
      - name: "LLMServer:echo"
        num_replicas: 2
"""


def test_build_openai_app_from_a_config_file(tmp_path: Path) -> None:
    good = tmp_path / "serve.yaml"
    good.write_text(SERVE_YAML.format(engine="mock"))
    [app] = build_applications(load_config_file(good), str(good))
    deployments = {d.name: d for d in graph_deployments(app)}
    assert deployments["LLMServer:echo"].num_replicas == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(SERVE_YAML.format(engine="nope"))
    with pytest.raises(ConfigError) as e:
        build_applications(load_config_file(bad), str(bad))
    assert f"{bad}: applications[0].args.llm_configs[0].llm_engine: " in str(e.value)


def test_gateway_keys_are_compared_by_hash() -> None:
    cfg = GatewayConfig(api_keys={"plain-key": "a", hash_api_key("hidden-key"): "b"})
    assert cfg.key_hashes() == {hash_api_key("plain-key"): "a", hash_api_key("hidden-key"): "b"}
    assert not cfg.open and GatewayConfig().open


def test_openai_error_crosses_processes() -> None:
    err = OpenAIError(429, "slow down", type="requests", code="rate_limit_exceeded", headers={"retry-after": "3"})
    back = pickle.loads(pickle.dumps(err))
    assert back.body() == err.body() and back.status == 429 and back.headers == {"retry-after": "3"}
    # Raised in a replica, it reaches the gateway as a subclass that keeps its fields.
    remote = pickle.loads(pickle.dumps(wrap_remote_exception(ContextLengthError("too long"), "tb")))
    assert isinstance(remote, ContextLengthError) and remote.message == "too long"


# --------------------------------------------------------------------------------------------
# Stop sequences and prompts


def run_matcher(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out, stopped = "", False
    for d in deltas:
        text, stopped = m.feed(d)
        out += text
        if stopped:
            return out, True
    return out + m.flush(), False


@pytest.mark.parametrize(("stops", "deltas", "expected"), [
    ([], ["a", "b"], ("ab", False)),
    (["\n\n"], ["Hello", "\n", "\nmore"], ("Hello", True)),
    (["\n\n"], ["Hello", "\n", "x"], ("Hello\nx", False)),
    (["END"], ["the E", "N", "D of it"], ("the ", True)),
    (["END"], ["the E", "N"], ("the EN", False)),          # held back, then flushed at the end
    (["xyz", "b"], ["aab", "c"], ("aa", True)),            # the earliest stop wins
    (["abc", "bcd"], ["ab", "cd"], ("", True)),
    (["stop"], ["nonstop"], ("non", True)),
])
def test_stop_matcher(stops: list[str], deltas: list[str], expected: tuple[str, bool]) -> None:
    assert run_matcher(stops, deltas) == expected


def test_stop_matcher_streams_what_cannot_be_a_stop() -> None:
    m = StopMatcher(["###"])
    assert m.feed("abc#") == ("abc", False)
    assert m.feed("#x") == ("##x", False)


def test_fallback_chat_prompt() -> None:
    assert fallback_chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        "System: Be brief.\nUser: Hi\nAssistant:"


# --------------------------------------------------------------------------------------------
# Token buckets (pure, explicit time)


def test_token_bucket() -> None:
    b = TokenBucket(capacity=2, rate=1 / 30)
    assert b.take(1, 0.0) == 0.0 and b.take(1, 0.0) == 0.0
    assert b.take(1, 0.0) == pytest.approx(30.0)
    assert b.take(1, 15.0) == pytest.approx(15.0)
    assert b.take(1, 30.0) == 0.0
    assert b.remaining(30.0) == 0
    assert b.remaining(10_000.0) == 2  # never above capacity


def test_rate_limiter_settles_tokens_after_the_fact() -> None:
    limiter = RateLimiter(GatewayConfig(tenants={"t": {"tokens_per_minute": 120}}))
    first = limiter.admit("t", 0.0)
    assert first.allowed and first.reserved == 1
    limiter.settle("t", first.reserved, 150, 0.0)  # used 149 beyond its reservation: 30 tokens in debt
    decision = limiter.admit("t", 0.0)
    assert not decision.allowed and decision.limit == "tokens"
    assert decision.retry_after_s == pytest.approx(15.5)  # (1 + 30) tokens at 2 per second
    assert limiter.admit("t", 15.5).allowed
    assert limiter.admit("unlimited", 0.0).allowed and limiter.headers("unlimited", 0.0) == {}


def test_example_serve_config_validates() -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "llm" / "serve.yaml"
    config = load_config_file(path)
    args = config.applications[0].args
    LLMServingArgs.model_validate(args)
    assert config.applications[0].import_path == "shoal.llm:build_openai_app"
    assert args["llm_configs"][0]["llm_engine"] == "examples.llm.app:TinyChatEngine"


def test_custom_engine_by_import_path() -> None:
    from shoal import testing

    app = build_openai_app({"llm_configs": [{**ECHO, "llm_engine": "shoal.llm.engines:MockEngine"}]})
    with testing.run(app) as rt:
        body = {"model": "echo", "messages": [{"role": "user", "content": "plug in"}], "temperature": 0}
        assert rt.http("POST", "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == \
            "plug in"
    with pytest.raises(ConfigError, match="module:EngineClass"):
        build_openai_app({"llm_configs": [{**ECHO, "llm_engine": "not a path"}]})
