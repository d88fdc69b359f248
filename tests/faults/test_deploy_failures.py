"""Issue 15: an app that failed to deploy is refused at once (HTTP 503 with the failure, the
handle raises), a constructor that never returns hits its start deadline, and a redeploy
that works lets requests flow again. Nothing waits for a replica that will never come."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from conftest import Instance, wait_until
from loadgen import Load, report, running

from shoal import api, serve
from shoal.deployment import build_app_spec
from shoal.exceptions import DeployError, DeploymentUnavailableError
from shoal.status import ApplicationStatus


@serve.deployment
class Broken:
    def __init__(self) -> None:
        raise ValueError("no model file at /models/x")

    async def __call__(self, request: Any) -> str:
        return "never"


@serve.deployment(replica_start_timeout_s=1.5)
class Stuck:
    def __init__(self) -> None:
        time.sleep(3600)

    async def __call__(self, request: Any) -> str:
        return "never"


@serve.deployment
class Good:
    async def __call__(self, request: Any) -> str:
        return "ok"


def _status() -> ApplicationStatus:
    return serve.status().applications["default"].status


def _deploy_nowait(app: serve.Application) -> None:
    inst = api._instance
    assert inst is not None
    inst.loop.run(inst.controller.deploy(build_app_spec(app, "default", "/")))


def test_a_failed_app_is_refused_at_once_and_comes_back_when_fixed(instance: Instance) -> None:
    with pytest.raises(DeployError, match="no model file"):
        serve.run(Broken.bind())
    t0 = time.monotonic()
    r = httpx.get(instance.url + "/", timeout=20)
    took = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after")
    assert "no model file at /models/x" in r.json()["message"], r.text  # the failure, in the answer
    with pytest.raises(DeploymentUnavailableError, match="failed to deploy: ValueError: no model file"):
        serve.get_app_handle("default").remote().result(timeout_s=20)
    load = Load(instance.url + "/", clients=2, hung_after_s=20.0)
    with running(load):
        assert wait_until(lambda: load.counts().total >= 10, 20)
        t1 = load.mark()
        serve.run(Good.bind())
        recovery = load.wait_recovered(streak=20, timeout=20)
        counts = load.counts(0.0)
    assert counts.hung == 0 and recovery is not None, counts
    assert set(counts.details) <= {"503"}, counts
    report("app in DEPLOY_FAILED (constructor raises), then fixed", counts, recovery,
           "503 at once with the failure; 200 after the fix",
           notes=f"first 503 after {took:.2f} s; body {r.text[:120]}; fixed after {time.monotonic() - t1:.1f} s")
    print(f"deploy failed: 503 after {took:.3f} s: {r.text}; {counts}; recovery {recovery}")


def test_a_constructor_that_never_returns_hits_its_deadline(instance: Instance) -> None:
    load = Load(instance.url + "/", clients=2, hung_after_s=20.0)
    with running(load):
        t0 = load.mark()
        _deploy_nowait(Stuck.bind())
        assert wait_until(lambda: "constructor running for" in serve.status().applications["default"].message, 10)
        assert wait_until(lambda: _status() == ApplicationStatus.DEPLOY_FAILED, 30), serve.status()
        failed_after = time.monotonic() - t0
        assert wait_until(lambda: load.counts().total >= 10, 20)
        counts = load.counts()
    message = serve.status().applications["default"].message
    assert "replica constructor did not finish within 1.5 s" in message, message
    assert counts.hung == 0 and counts.ok == 0, counts
    assert set(counts.details) <= {"503"}, counts
    report("constructor never returns (start deadline 1.5 s)", counts, None,
           "DEPLOY_FAILED with the deadline message; requests answered 503, none hung",
           notes=f"DEPLOY_FAILED after {failed_after:.1f} s")
    print(f"stuck: DEPLOY_FAILED after {failed_after:.2f} s; {counts}; {message}")
