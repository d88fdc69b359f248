"""Observability behind authentication, through shoal's real processes, with the LLM gateway
(mock engine: no model) on ``route_prefix: /`` where shoal's own ``/metrics`` shares its paths.

* The gateway has keys, the front none: shoal's instance-wide ``/metrics`` page answers
  without a key, so it must not carry the gateway's counters (they name tenants); the
  gateway's own counters answer an admin key only, and label only configured models.
* The front has keys: every observability path (shoal's and the gateway's) needs one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from conftest import child_pids, wait_until

from shoal import serve
from shoal.llm import build_openai_app

FRONTS = pytest.mark.parametrize("front", ["replica", "proxy"])
ECHO = {"model_loading_config": {"model_id": "echo"}, "llm_engine": "mock"}
ALICE, OPS = "sk-alice-0123456789", "sk-ops-0123456789"
GATEWAY = {"api_keys": {ALICE: "tenant-alice-7f3a", OPS: "ops"}, "tenants": {"ops": {"admin": True}}}
FRONT_KEY = "front-key-0123456789abcdef"


@contextmanager
def instance(run_dir: str, front: str, **http: Any) -> Iterator[str]:
    before = child_pids()
    serve.start(http_options={"port": 0, "ingress_serves_http": front == "replica", **http}, _run_dir=run_dir)
    try:
        yield serve.http_address()
    finally:
        serve.shutdown()
        assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "temperature": 0}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@FRONTS
def test_a_keyed_gateway_keeps_tenants_off_the_open_instance_page(run_dir: str, front: str) -> None:
    with instance(run_dir, front) as url:
        serve.run(build_openai_app({"llm_configs": [ECHO], "gateway": GATEWAY}), route_prefix="/")
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.post("/v1/chat/completions", json=chat("echo"), headers=bearer(ALICE)).status_code == 200
            for i in range(5):  # model names a client makes up
                r = c.post("/v1/chat/completions", json=chat(f"echo:made-up-{i}"), headers=bearer(ALICE))
                assert r.status_code == 404, r.text
            # The gateway's own counters: an admin key only.
            for path in ("/v1/metrics", "/v1/usage"):
                r = c.get(path)
                assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error", path
                assert c.get(path, headers=bearer(ALICE)).status_code == 403, path
            page = c.get("/v1/metrics", headers=bearer(OPS)).text
            assert 'tenant="tenant-alice-7f3a"' in page
            assert 'model="echo"' in page and 'model="other"' in page and "made-up" not in page
            usage = c.get("/v1/usage", headers=bearer(OPS)).json()["tenants"]["tenant-alice-7f3a"]["models"]
            assert set(usage) == {"echo", "other"}
            # shoal's instance-wide page answers without a key (the front has none): no tenant on it,
            # once the processes have flushed what they counted.
            assert wait_until(lambda: "ray_serve_num_http_requests" in c.get("/metrics").text, 15)
            page = c.get("/metrics").text
            assert "tenant-alice-7f3a" not in page and "shoal_llm_" not in page


@FRONTS
def test_with_front_keys_every_observability_path_needs_a_key(run_dir: str, front: str) -> None:
    with instance(run_dir, front, api_keys=[FRONT_KEY]) as url:
        serve.run(build_openai_app({"llm_configs": [ECHO]}), route_prefix="/")  # an open gateway
        with httpx.Client(base_url=url, timeout=30) as c:
            key = {"x-api-key": FRONT_KEY}
            assert c.post("/v1/chat/completions", json=chat("echo"), headers=key).status_code == 200
            for path in ("/metrics", "/v1/metrics", "/v1/usage", "/v1/models", "/-/routes", "/-/status.json",
                         "/-/dashboard"):
                r = c.get(path)
                assert r.status_code == 401, path
                assert r.json() == {"error": "unauthorized", "request_id": r.headers["x-request-id"]}, path
                assert r.headers["www-authenticate"] == "Bearer"
                assert c.get(path, headers=key).status_code == 200, path
            assert c.get("/-/healthz").status_code == 200
