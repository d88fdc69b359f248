"""The transformers engine on a tiny model built here from a config (nothing is downloaded)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from examples.llm.make_tiny_model import build_tiny_model
from shoal import testing
from shoal.llm import LLMConfig, build_llm_deployment, build_openai_app
from shoal.llm.engines import ContextLengthError, EngineOutput, GenerationRequest, SamplingParams
from shoal.llm.engines._hf import TransformersEngine

pytestmark = pytest.mark.llm


def tiny_model_dir(factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built once per test session (the directory is shared by the LLM test modules)."""
    path = factory.getbasetemp() / "tiny-chat"
    if not (path / "config.json").is_file():
        build_tiny_model(path, train_steps=60)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> TransformersEngine:
    e = TransformersEngine(str(model_dir), device="auto", torch_threads=1)
    e.load()
    return e


def generate(engine: TransformersEngine, prompt: str, **params: Any) -> list[EngineOutput]:
    async def run() -> list[EngineOutput]:
        return [o async for o in engine.generate(prompt, SamplingParams(**params), "t")]

    return asyncio.run(run())


def text_of(outputs: list[EngineOutput]) -> str:
    return "".join(o.text for o in outputs)


def test_loads_on_cpu_with_its_context(engine: TransformersEngine) -> None:
    assert engine.device == "cpu"  # no GPU on the test machines: "auto" picks the CPU
    assert engine.max_context == 2048


def test_greedy_is_deterministic_and_counts_tokens(engine: TransformersEngine) -> None:
    a = generate(engine, "the gateway", temperature=0, max_tokens=24, ignore_eos=True)
    b = generate(engine, "the gateway", temperature=0, max_tokens=24, ignore_eos=True)
    assert text_of(a) == text_of(b) and text_of(a).strip()
    last = a[-1]
    assert last.finish_reason == "length" and last.completion_tokens == 24
    assert last.prompt_tokens == len(engine.tokenizer("the gateway")["input_ids"])
    assert all(o.finish_reason is None for o in a[:-1])


def test_seeded_sampling(engine: TransformersEngine) -> None:
    def sample(seed: int) -> str:
        return text_of(generate(engine, "a", temperature=1.5, top_p=1.0, seed=seed, max_tokens=30, ignore_eos=True))

    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_eos_ends_with_stop(engine: TransformersEngine) -> None:
    out = generate(engine, "the gateway", temperature=0, max_tokens=200)
    assert out[-1].finish_reason == "stop" and out[-1].completion_tokens < 200


def test_context_length(engine: TransformersEngine) -> None:
    with pytest.raises(ContextLengthError, match="maximum context length is 2048"):
        generate(engine, "a", max_tokens=5000)


def test_an_error_in_the_generation_thread_reaches_the_caller(engine: TransformersEngine) -> None:
    """torch rejects a seed outside its range inside the generation thread, before any token:
    the caller gets that error (once it hung, waiting for a token that never came)."""
    async def run(seed: int) -> list[EngineOutput]:
        async def collect() -> list[EngineOutput]:
            return [o async for o in engine.generate("a", SamplingParams(seed=seed, max_tokens=4), "e")]

        return await asyncio.wait_for(collect(), 60)  # bounded: a hang fails the test instead

    with pytest.raises((ValueError, RuntimeError), match=r"[Oo]verflow"):
        asyncio.run(run(2**70))
    # The slot came back: the engine still serves, and a seed in range works.
    assert asyncio.run(run(2**63 - 1))[-1].finish_reason is not None
    assert engine.stats()["running"] == 0


def test_llm_server_hands_a_generation_error_to_the_handle(model_dir: Path) -> None:
    cfg = LLMConfig(model_loading_config={"model_id": "tiny", "model_source": str(model_dir)},
                    llm_engine="transformers")
    with testing.run(build_llm_deployment(cfg)) as rt:
        request = GenerationRequest("s", prompt="the", sampling=SamplingParams(seed=2**70, max_tokens=4))
        with pytest.raises(Exception, match=r"[Oo]verflow"):
            list(rt.handle.options(stream=True).generate.remote(request))
        ok = GenerationRequest("t", prompt="the", sampling=SamplingParams(temperature=0, max_tokens=4))
        assert list(rt.handle.options(stream=True).generate.remote(ok))[-1].finish_reason is not None


def test_chat_template_and_fallback(engine: TransformersEngine) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert engine.render_chat(messages) == "<|system|>be brief<|end|><|user|>hello<|end|><|assistant|>"
    template = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = None
    try:
        assert engine.render_chat(messages) == "System: be brief\nUser: hello\nAssistant:"
    finally:
        engine.tokenizer.chat_template = template


def test_closing_the_stream_stops_generation(engine: TransformersEngine) -> None:
    async def run() -> tuple[int, int]:
        before = engine.stats()["generated_tokens"]
        stream = engine.generate("the", SamplingParams(max_tokens=1500, ignore_eos=True, temperature=0), "c")
        for _ in range(3):
            await anext(stream)
        await stream.aclose()
        # The thread stops within a token; wait for it to let go of the model.
        deadline = time.monotonic() + 10
        while engine._slots is not None and engine._slots.locked() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        settled = engine.stats()["generated_tokens"]
        await asyncio.sleep(0.2)
        return settled - before, engine.stats()["generated_tokens"] - before

    generated, later = asyncio.run(run())
    assert generated == later, "generation went on after the stream was closed"
    assert generated < 100, generated
    assert engine.stats()["cancelled"] >= 1 and engine.stats()["running"] == 0


def test_llm_server_stop_sequences(model_dir: Path) -> None:
    cfg = LLMConfig(model_loading_config={"model_id": "tiny", "model_source": str(model_dir)},
                    llm_engine="transformers")
    with testing.run(build_llm_deployment(cfg)) as rt:
        def run(**params: Any) -> tuple[str, str | None, int]:
            request = GenerationRequest("s", prompt="the", sampling=SamplingParams(temperature=0, **params))
            chunks = list(rt.handle.options(stream=True).generate.remote(request))
            return "".join(c.text for c in chunks), chunks[-1].finish_reason, chunks[-1].completion_tokens

        full, reason, tokens = run(max_tokens=40, ignore_eos=True)
        assert reason == "length" and tokens == 40
        stop = full[len(full) // 2: len(full) // 2 + 3]
        cut, reason, tokens = run(max_tokens=40, ignore_eos=True, stop=(stop, "\u2603never"))
        assert cut == full[: full.find(stop)] and reason == "stop" and tokens < 40
        # LLMServer gives the engine one torch thread per reserved CPU (1 by default).
        import torch

        assert torch.get_num_threads() == 1


def test_gateway_with_the_transformers_engine(model_dir: Path) -> None:
    app = build_openai_app({"llm_configs": [{"model_loading_config": {"model_id": "tiny", "model_source":
                                                                     str(model_dir)},
                                             "llm_engine": "transformers"}]})
    with testing.run(app) as rt:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "what is a replica?"}], "temperature": 0,
                "max_tokens": 12, "ignore_eos": True}
        r = rt.http("POST", "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 12
        # The chat template was applied: <|user|> ... <|end|><|assistant|> is in the prompt's tokens.
        assert out["usage"]["prompt_tokens"] > 6
        stream = rt.http("POST", "/v1/chat/completions", json={**body, "stream": True})
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in stream.text.split("\n\n") if line.startswith("data: {"))
        assert text == out["choices"][0]["message"]["content"]


def test_lora_adapters_with_peft(model_dir: Path, tmp_path: Path) -> None:
    """Real LoRA adapters on the transformers engine (when peft is installed): ``tiny:<adapter>``
    changes the output; the base model's output is unchanged in between."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    for i, name in enumerate(("loud", "quiet")):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft.get_peft_model(base, config).save_pretrained(tmp_path / name)

    def app(max_adapters: int) -> Any:
        cfg = LLMConfig(model_loading_config={"model_id": "tiny", "model_source": str(model_dir)},
                        llm_engine="transformers",
                        lora_config={"dynamic_lora_loading_path": str(tmp_path),
                                     "max_num_adapters_per_replica": max_adapters})
        return build_openai_app({"llm_configs": [cfg]})

    def complete(rt: testing.LocalRuntime, model: str) -> str:
        r = rt.http("POST", "/v1/completions", json={"model": model, "prompt": "the", "max_tokens": 12,
                                                    "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    with testing.run(app(2)) as rt:
        assert [m["id"] for m in rt.http("GET", "/v1/models").json()["data"]] == ["tiny", "tiny:loud", "tiny:quiet"]
        plain = complete(rt, "tiny")
        loud, quiet = complete(rt, "tiny:loud"), complete(rt, "tiny:quiet")
        assert loud != plain and quiet != plain and loud != quiet
        assert complete(rt, "tiny") == plain       # the adapters are off for the base model
        assert complete(rt, "tiny:loud") == loud   # and each comes back as it was
        assert rt.instance("LLMServer:tiny").stats()["adapters_loaded"] == ["loud", "quiet"]

    # One adapter per replica: each load unloads the other (peft's delete_adapter); reloading works.
    with testing.run(app(1)) as rt:
        assert complete(rt, "tiny:quiet") == quiet
        assert complete(rt, "tiny:loud") == loud
        assert complete(rt, "tiny:quiet") == quiet
        assert complete(rt, "tiny") == plain
        assert rt.instance("LLMServer:tiny").stats()["adapters_loaded"] == ["quiet"]
