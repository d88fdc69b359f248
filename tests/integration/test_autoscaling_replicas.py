"""Autoscaling on real replica processes: up under load, down when idle, to zero and back."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from conftest import Instance, wait_until
from starlette.requests import Request

from shoal import serve

FAST = {
    "metrics_interval_s": 0.1,
    "look_back_period_s": 0.5,
    "upscale_delay_s": 0.2,
    "downscale_delay_s": 1.0,
    "target_ongoing_requests": 1,
}


@serve.deployment(max_ongoing_requests=2)
class Work:
    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(float(request.query_params.get("s", "0.2")))
        return "ok"

    async def run(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "ok"


def replicas(app: str = "default", dep: str = "Work") -> int:
    states = serve.status().applications[app].deployments[dep].replica_states
    return states.get("RUNNING", 0)


def test_scales_up_under_load_and_down_when_idle(instance: Instance) -> None:
    h = serve.run(Work.options(autoscaling_config={**FAST, "min_replicas": 1, "max_replicas": 3}).bind())
    assert replicas() == 1
    stop = time.monotonic() + 30
    peak = 0

    def load() -> None:
        while time.monotonic() < stop and peak < 3:
            h.run.remote(0.3).result()

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        def grew() -> bool:
            nonlocal peak
            peak = max(peak, replicas())
            return peak == 3

        assert wait_until(grew, 30, 0.05), f"peak {peak}"
    finally:
        stop = 0
        for t in threads:
            t.join()
    assert wait_until(lambda: replicas() == 1, 30, 0.1)
    assert serve.status().applications["default"].status == "RUNNING"


def test_scale_to_zero_and_back(instance: Instance) -> None:
    cfg = {**FAST, "min_replicas": 0, "max_replicas": 2, "initial_replicas": 1, "downscale_delay_s": 0.5}
    h = serve.run(Work.options(autoscaling_config=cfg).bind(), route_prefix="/work")
    assert h.run.remote(0).result() == "ok"
    assert wait_until(lambda: replicas() == 0 and not serve.status().applications["default"]
                      .deployments["Work"].replica_states, 30, 0.1)
    # A request that arrives with no replica waits while one starts, then succeeds.
    t0 = time.monotonic()
    assert h.run.remote(0).result(timeout_s=30) == "ok"
    print(f"cold start from zero (handle): {time.monotonic() - t0:.2f}s")
    assert wait_until(lambda: replicas() == 0, 30, 0.1)
    # The same over HTTP.
    r = httpx.get(instance.url + "/work", params={"s": "0"}, timeout=30)
    assert r.status_code == 200 and r.text == "ok"


def test_num_replicas_auto(instance: Instance) -> None:
    serve.run(Work.options(num_replicas="auto").bind())
    st = serve.status().applications["default"].deployments["Work"]
    assert st.status == "HEALTHY" and st.replica_states == {"RUNNING": 1}


def test_bad_custom_policy_path_is_a_deploy_error(instance: Instance) -> None:
    import pytest

    from shoal.runtime.controller import DeployError

    with pytest.raises(DeployError, match=r"autoscaling_config\.policy"):
        serve.run(Work.options(autoscaling_config={"max_replicas": 2, "policy": "no.such:policy"}).bind())
