"""Rate limits shared across gateway replicas, end to end (issue 20, Build item 4): a real
instance, an ``OpenAiIngress`` deployment of two replicas and the mock engine. A burst of
concurrent requests spread over both replicas admits exactly what one replica alone would
(429 with ``x-ratelimit-*`` headers for the rest), and a finished request's unused tokens go
back to the budget both replicas share. Counts are asserted, never durations."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import child_pids, wait_until

from shoal import serve
from shoal.llm import build_openai_app

BURST = 10
RPM = 3  # a request back every 20 s: far longer than a burst takes
ROUNDS = 3  # bursts (one tenant each) until one was seen spread over both replicas
OPS = "sk-ops-0123456789"
TPM_KEY = "sk-tokens-0123456789"
KEYS = {**{f"sk-burst{i}-0123456789": f"burst{i}" for i in range(ROUNDS)}, OPS: "ops", TPM_KEY: "tokens"}
GATEWAY = {"api_keys": KEYS, "tenants": {
    **{f"burst{i}": {"requests_per_minute": RPM} for i in range(ROUNDS)},
    "tokens": {"tokens_per_minute": 120}, "ops": {"admin": True}}}
ECHO = {"model_loading_config": {"model_id": "echo"}, "llm_engine": "mock",
        "engine_kwargs": {"token_delay_s": 0.1}}


@pytest.fixture
def gateway(run_dir: str) -> Iterator[str]:
    before = child_pids()
    # The proxy routes each request through the deployment's router, which spreads concurrent
    # requests over the replicas by load.
    serve.start(http_options={"port": 0, "ingress_serves_http": False}, _run_dir=run_dir)
    try:
        serve.run(build_openai_app({"llm_configs": [ECHO], "gateway": GATEWAY,
                                    "ingress_deployment_config": {"num_replicas": 2}}), route_prefix="/")
        yield serve.http_address()
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def completion(words: int, max_tokens: int) -> dict[str, Any]:
    return {"model": "echo", "prompt": " ".join(["w"] * words), "max_tokens": max_tokens, "temperature": 0}


def usage_by_replica(c: httpx.Client) -> dict[str, dict[str, Any]]:
    """Each gateway replica's own counters (``/v1/usage`` answers for the replica it reaches)."""
    seen: dict[str, dict[str, Any]] = {}

    def both() -> bool:
        r = c.get("/v1/usage", headers=bearer(OPS))
        assert r.status_code == 200, r.text
        seen[r.json()["replica"]] = r.json()["tenants"]
        return len(seen) == 2

    assert wait_until(both, 60, 0.0), f"/v1/usage never answered from two replicas: {sorted(seen)}"
    return seen


def test_a_burst_over_two_gateway_replicas_admits_one_limit(gateway: str) -> None:
    spread = False
    with httpx.Client(base_url=gateway, timeout=60) as c, ThreadPoolExecutor(BURST) as pool:
        for i in range(ROUNDS):
            key = f"sk-burst{i}-0123456789"
            answers = list(pool.map(lambda k: c.post("/v1/completions", json=completion(3, 3), headers=bearer(k)),
                                    [key] * BURST))
            ok = [r for r in answers if r.status_code == 200]
            limited = [r for r in answers if r.status_code == 429]
            assert len(ok) == RPM and len(limited) == BURST - RPM, [(r.status_code, r.text) for r in answers]
            for r in limited:
                assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
                assert r.headers["x-ratelimit-limit-requests"] == str(RPM)
                assert r.headers["x-ratelimit-remaining-requests"] == "0"
                assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-reset-requests"]
            for r in ok:
                assert r.headers["x-ratelimit-limit-requests"] == str(RPM)
            # Which replica answered what: both took part in the burst, and together they
            # refused all but one limit's worth.
            per_replica = [t.get(f"burst{i}", {}) for t in usage_by_replica(c).values()]
            handled = [u.get("requests", 0) + u.get("rate_limited", 0) for u in per_replica]
            assert sum(handled) == BURST and sum(u.get("requests", 0) for u in per_replica) == RPM
            if all(handled):
                spread = True
                break
    assert spread, "no burst was spread over both gateway replicas"


def test_token_reservations_and_their_settlement_are_shared(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=60) as c, ThreadPoolExecutor(6) as pool:
        # Each reserves its prompt (10 tokens) and max_tokens (100) of 120, and streams for about
        # two seconds (20 words at 0.1 s): while one holds its reservation no other fits, on
        # either replica, and the settled one leaves too little for a second for ~15 s.
        answers = list(pool.map(lambda _: c.post("/v1/completions", json=completion(20, 100), headers=bearer(TPM_KEY)),
                                range(6)))
        ok = [r for r in answers if r.status_code == 200]
        limited = [r for r in answers if r.status_code == 429]
        assert len(ok) == 1 and len(limited) == 5, [(r.status_code, r.text) for r in answers]
        assert ok[0].json()["usage"]["total_tokens"] == 40
        for r in limited:
            assert r.json()["error"]["type"] == "tokens"
            assert r.headers["x-ratelimit-limit-tokens"] == "120"
        # The one that ran used 40 of its 110: 70 came back. Without that only about 10 (plus 2
        # a second) would be left, and a request reserving 60 would be refused.
        again = c.post("/v1/completions", json=completion(1, 59), headers=bearer(TPM_KEY))
        assert again.status_code == 200, again.text
