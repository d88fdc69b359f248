"""The LLM gateway's metric labels and usage keys stay bounded whatever model names clients
send: configured model ids and the adapters ``/v1/models`` lists, else ``other`` (in-process,
shoal.testing, mock engine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from shoal import testing
from shoal.llm import build_openai_app

ECHO = {"model_loading_config": {"model_id": "echo"}, "llm_engine": "mock"}
EMB = {"model_loading_config": {"model_id": "emb"}, "engine": "mock"}


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "ahoy"}], "temperature": 0}


def model_labels(page: str) -> set[str]:
    return set(re.findall(r'model="([^"]*)"', page))


def test_only_configured_models_and_listed_adapters_become_labels(tmp_path: Path) -> None:
    for name in ("pirate", "french"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    lora = {**ECHO, "lora_config": {"dynamic_lora_loading_path": str(tmp_path)}}
    with testing.run(build_openai_app({"llm_configs": [lora], "embedding_configs": [EMB]})) as rt:
        # The first adapter request learns the adapters (no /v1/models call needed).
        assert rt.http("POST", "/v1/chat/completions", json=chat("echo:pirate")).status_code == 200
        assert rt.http("POST", "/v1/chat/completions", json=chat("echo")).status_code == 200
        assert rt.http("POST", "/v1/embeddings", json={"model": "emb", "input": "x"}).status_code == 200
        for i in range(20):  # adapters that do not exist, each a new name
            assert rt.http("POST", "/v1/chat/completions", json=chat(f"echo:nope-{i}")).status_code == 404
            assert rt.http("POST", "/v1/chat/completions", json=chat(f"nope-{i}")).status_code == 404
        page = rt.http("GET", "/metrics").text
        assert model_labels(page) == {"echo", "echo:pirate", "emb", "other"}
        assert 'shoal_llm_requests_total{endpoint="chat/completions",model="other",status="404",' \
               'tenant="anonymous"} 20.0' in page
        assert set(re.findall(r'tenant="([^"]*)"', page)) == {"anonymous"}
        assert set(rt.http("GET", "/v1/usage").json()["tenants"]["anonymous"]["models"]) == \
            {"echo", "echo:pirate", "emb", "other"}
        # The same page under /v1/metrics (the path to use with route_prefix "/"); no other path.
        assert rt.http("GET", "/v1/metrics").text.count("shoal_llm_requests_total{") == \
            page.count("shoal_llm_requests_total{")
        assert rt.http("GET", "/v1/models/metrics").status_code == 404
