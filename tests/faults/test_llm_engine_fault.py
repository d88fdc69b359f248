"""Issue 15: an LLM engine that raises in its generation (and a seed the engine would choke on)
answers the caller at once, while the gateway keeps serving everyone else."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import Instance, wait_until
from loadgen import Load, report, running

from shoal import serve
from shoal.llm import build_openai_app


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, **extra}


def test_an_engine_error_reaches_the_caller_under_load(instance: Instance) -> None:
    failing = {"model_loading_config": {"model_id": "fails"}, "llm_engine": "failing_engine:FailingEngine",
               "engine_kwargs": {"fail_after": 2}}
    serve.run(build_openai_app({"llm_configs": [failing, {"model_loading_config": {"model_id": "echo"},
                                                          "llm_engine": "mock"}]}))
    url = instance.url + "/v1/chat/completions"
    assert httpx.post(url, json=_chat("echo"), timeout=30).status_code == 200

    def faulty(client: httpx.Client) -> httpx.Response:
        return client.post(url, json=_chat("fails"))

    with running(Load(url, clients=2, hung_after_s=20.0,
                      request=lambda c: c.post(url, json=_chat("echo")))) as good, \
            running(Load(url, clients=2, hung_after_s=20.0, request=faulty, ok=lambda r: r.status_code == 500)) as bad:
        good.mark()
        bad.mark()
        assert wait_until(lambda: bad.counts().total >= 10 and good.counts().ok >= 10, 30)
        seed = httpx.post(url, json=_chat("echo", seed=2**70), timeout=20)
        streamed = httpx.post(url, json=_chat("fails", stream=True), timeout=20)
        counts, errors = good.stop(), bad.stop()
    assert seed.status_code == 400 and seed.json()["error"]["param"] == "seed", seed.text
    assert streamed.status_code == 200 and '"server_error"' in streamed.text, streamed.text
    assert errors.hung == 0 and errors.failed == 0 and errors.ok >= 10, errors  # each a 500, at once
    assert counts.hung == 0 and counts.failed == 0, counts
    report("LLM engine raises in generation (2 clients), beside 2 clients of a healthy model", counts, 0.0,
           f"each failing request a 500 in OpenAI shape ({errors.ok} of them, none hung); seed 2**70 a 400")
