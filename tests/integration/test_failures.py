"""Failure paths on real processes: crashes, failing constructors, overload, health checks."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time

import httpx
import pytest
from conftest import Instance, wait_until
from starlette.requests import Request

from shoal import serve
from shoal.exceptions import BackPressureError, ReplicaDiedError
from shoal.runtime.controller import DeployError


@serve.deployment
class Sleeper:
    def __init__(self) -> None:
        self.active = 0
        self.peak = 0

    async def pid(self) -> int:
        return os.getpid()

    async def sleep(self, seconds: float) -> int:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.active -= 1
        return os.getpid()

    async def get_peak(self) -> int:
        return self.peak

    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(float(request.query_params.get("s", "0")))
        return str(os.getpid())


def test_kill_9_mid_request_fails_fast_then_recovers(instance: Instance) -> None:
    h = serve.run(Sleeper.bind())
    pid = h.pid.remote().result()
    resp = h.sleep.remote(60)
    time.sleep(0.3)  # let the request reach the replica
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ReplicaDiedError):
        resp.result(timeout_s=20)
    assert time.monotonic() - t0 < 10  # promptly, not after a timeout
    # The controller replaces the replica and new requests succeed.
    assert wait_until(lambda: serve.status().applications["default"].deployments["Sleeper"].replica_states
                      == {"RUNNING": 1}, 30)
    new_pid = h.pid.remote().result(timeout_s=30)
    assert new_pid != pid


@pytest.mark.parametrize("direct", [False, True], ids=["via-proxy", "ingress-serves-http"])
def test_kill_9_mid_http_request_fails_fast(run_dir: str, direct: bool) -> None:
    serve.start(http_options={"port": 0, "ingress_serves_http": direct}, _run_dir=run_dir)
    try:
        url = serve.http_address()
        h = serve.run(Sleeper.bind())
        pid = h.pid.remote().result()
        result: dict[str, object] = {}

        def call() -> None:
            try:
                result["r"] = httpx.get(url + "/", params={"s": "60"}, timeout=30)
            except httpx.HTTPError as e:
                result["r"] = e

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        t.join(20)
        assert not t.is_alive()  # promptly, never a hang
        r = result["r"]
        if direct:
            # The dead replica held the client's connection itself: the client sees it close.
            assert isinstance(r, httpx.TransportError)
        else:
            assert isinstance(r, httpx.Response) and r.status_code == 500
            assert "died" in r.json()["error"]
        assert wait_until(lambda: httpx.get(url + "/", timeout=10).status_code == 200, 30)
    finally:
        serve.shutdown()


def test_max_ongoing_requests_is_enforced(instance: Instance) -> None:
    h = serve.run(Sleeper.options(max_ongoing_requests=2).bind())
    responses = [h.sleep.remote(0.3) for _ in range(8)]
    for r in responses:
        r.result(timeout_s=30)
    assert h.get_peak.remote().result() == 2


def test_requests_spread_over_replicas(instance: Instance) -> None:
    h = serve.run(Sleeper.options(num_replicas=2, max_ongoing_requests=1).bind())
    pids = {r.result(timeout_s=30) for r in [h.sleep.remote(0.2) for _ in range(6)]}
    assert len(pids) == 2


def test_back_pressure(instance: Instance) -> None:
    h = serve.run(Sleeper.options(max_ongoing_requests=1, max_queued_requests=1).bind())
    first = h.sleep.remote(1.0)
    time.sleep(0.2)
    queued = h.sleep.remote(0.0)
    time.sleep(0.1)
    with pytest.raises(BackPressureError):
        h.sleep.remote(0.0).result(timeout_s=10)
    assert first.result(timeout_s=10)
    assert queued.result(timeout_s=10)
    # Over HTTP the same overload is a 503 with Retry-After.
    serve.run(Sleeper.options(max_ongoing_requests=1, max_queued_requests=1).bind(), name="web", route_prefix="/w")
    with httpx.Client(base_url=instance.url, timeout=30) as c:
        codes: list[int] = []
        def call() -> None:
            try:
                codes.append(c.get("/w", params={"s": "1"}).status_code)
            except httpx.HTTPError as e:
                codes.append(repr(e))  # type: ignore[arg-type]

        threads = [threading.Thread(target=call) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # Every request got an answer: served, or refused at once with 503 (never a hang).
    assert len(codes) == 5 and set(codes) == {200, 503}


def test_failing_constructor_gives_deploy_failed(instance: Instance) -> None:
    @serve.deployment
    class Broken:
        def __init__(self) -> None:
            raise RuntimeError("cannot load model weights")

    with pytest.raises(DeployError, match="cannot load model weights"):
        serve.run(Broken.bind(), name="broken", route_prefix="/broken")
    st = serve.status().applications["broken"]
    assert st.status == "DEPLOY_FAILED"
    assert st.deployments["Broken"].status == "DEPLOY_FAILED"
    assert "cannot load model weights" in st.deployments["Broken"].message
    # No crash loop: no replica is being started again.
    time.sleep(0.5)
    assert serve.status().applications["broken"].deployments["Broken"].replica_states == {}


def test_failing_health_check_replaces_replica(instance: Instance) -> None:
    @serve.deployment(health_check_period_s=0.2, health_check_timeout_s=1)
    class Flaky:
        def __init__(self) -> None:
            self.healthy = True

        def break_me(self) -> int:
            self.healthy = False
            return os.getpid()

        def pid(self) -> int:
            return os.getpid()

        def check_health(self) -> None:
            if not self.healthy:
                raise RuntimeError("model went bad")

    h = serve.run(Flaky.bind())
    bad = h.break_me.remote().result()
    served: list[int] = []
    failed: list[str] = []

    def replaced() -> bool:
        try:
            served.append(h.pid.remote().result(timeout_s=10))
        except Exception as e:
            failed.append(repr(e))
        return bool(served) and served[-1] != bad

    assert wait_until(replaced, 30)
    assert failed == []  # the unhealthy replica leaves the membership before it stops


def test_bad_deployment_options_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"ray_actor_options\.num_gpu"):
        serve.deployment(ray_actor_options={"num_gpu": 1})(Sleeper.func_or_class)
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        Sleeper.options(max_ongoing_requests=0)
    with pytest.raises(TypeError, match="unknown deployment option"):
        Sleeper.options(num_replica=2)
    with pytest.raises(ValueError, match="route_prefix"):
        serve.run(Sleeper.bind(), route_prefix="no-slash", _local_testing_mode=True)


def test_port_in_use_is_a_clear_error(run_dir: str) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        with pytest.raises(RuntimeError, match=re.escape(f"127.0.0.1:{port}")):
            serve.start(http_options={"port": port}, _run_dir=run_dir)
    finally:
        s.close()
        serve.shutdown()


def test_proxy_crash_is_restarted(instance: Instance) -> None:
    serve.run(Sleeper.bind())
    assert httpx.get(instance.url + "/").status_code == 200
    (ident, _), = serve.status().proxies.items()
    from shoal import api

    assert api._instance is not None
    proxy = api._instance.controller.proxy
    assert proxy is not None
    os.kill(proxy.proc.pid, signal.SIGKILL)

    def recovered() -> bool:
        try:
            return httpx.get(instance.url + "/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(recovered, 30, 0.1)
    assert wait_until(lambda: ident not in serve.status().proxies, 30)  # a new proxy process took over
    (new_ident, _state), = serve.status().proxies.items()
    assert wait_until(lambda: serve.status().proxies.get(new_ident) == "HEALTHY", 30)


@serve.deployment(num_replicas=2)
class Quick:
    async def pid(self) -> int:
        return os.getpid()

    async def work(self) -> int:
        await asyncio.sleep(0.02)
        return os.getpid()


def test_kill_9_under_steady_load_fails_only_in_flight_requests(instance: Instance) -> None:
    """Six callers, each with one request outstanding at a time, against two replicas; one
    replica is killed with -9. Only requests that replica had accepted may fail, each promptly
    with ReplicaDiedError; everything else is served (requests it had not accepted are retried
    on the other replica), and the replacement takes traffic."""
    h = serve.run(Quick.bind())
    victim = h.pid.remote().result()
    served: list[int] = []
    failures: list[tuple[str, float]] = []
    stop = threading.Event()
    deadline = time.monotonic() + 120
    callers = 6

    def load() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                served.append(h.work.remote().result(timeout_s=30))
            except Exception as e:
                failures.append((type(e).__name__, time.monotonic() - t0))

    threads = [threading.Thread(target=load) for _ in range(callers)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: served.count(victim) > 20, 30)
        os.kill(victim, signal.SIGKILL)
        n = len(served)
        assert wait_until(lambda: len(served) > n + 200, 30)
        assert wait_until(lambda: serve.status().applications["default"].deployments["Quick"].replica_states
                          == {"RUNNING": 2}, 30)
        n = len(served)
        assert wait_until(lambda: len(served) > n + 100, 30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"kill -9 under load: {len(served)} served, {len(failures)} failed {failures}")
    assert len(failures) <= callers  # at most the requests in flight on the killed replica
    assert all(name.endswith("ReplicaDiedError") and took < 10 for name, took in failures)
    assert len(set(served[-50:])) == 2 and victim not in served[-50:]  # the replacement serves
