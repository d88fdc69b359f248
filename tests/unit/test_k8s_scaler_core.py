"""The shoal scaler's pure core on a fake clock, its routes and HTTP server, the scrape step,
the simulation's KEDA/HPA rule, and the callers' bounded wait for a deployment with no pod."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from shoal.config import AutoscalingConfig, AutoscalingContext
from shoal.exceptions import DeploymentUnavailableError
from shoal.kubernetes import names
from shoal.kubernetes.scaler.core import PodSample, ScalerCore, Scrape, UnknownDeployment
from shoal.kubernetes.scaler.scrape import ScrapeTargets, parse_pod_metrics, scrape
from shoal.kubernetes.scaler.server import ScalerServer, ServerLimits
from shoal.kubernetes.scaler.service import ScalerService
from shoal.kubernetes.sim.keda import ScaledState, keda_replicas

QUICK = {"min_replicas": 0, "max_replicas": 5, "target_ongoing_requests": 2, "upscale_delay_s": 3,
         "downscale_delay_s": 10, "look_back_period_s": 1, "metrics_interval_s": 0.5}


def core(**changes: Any) -> ScalerCore:
    return ScalerCore("app", {"W": AutoscalingConfig(**{**QUICK, **changes})}, demand_hold_s=5)


def pods(n: int, ongoing: float, dep: str = "W") -> list[PodSample]:
    return [PodSample(pod=f"10.0.0.{i}", deployment=dep, ongoing=ongoing) for i in range(n)]


def test_no_answer_before_the_first_scrape_then_the_running_count() -> None:
    c = core(min_replicas=1)
    assert c.desired("W") is None and not c.observed
    # A restarted scaler takes over what runs (3 pods), instead of answering min_replicas.
    c.observe(0.0, Scrape(samples=pods(3, 2.0)))
    assert c.desired("W") == 3 and c.observed
    with pytest.raises(UnknownDeployment):
        c.desired("Nope")
    with pytest.raises(UnknownDeployment):
        c.demand(0.0, "Nope")


def test_demand_wakes_a_deployment_at_zero_without_a_scrape() -> None:
    c = core()
    c.observe(0.0, Scrape())
    assert c.decide(0.5) == {"W": 0}
    c.demand(1.0, "W")
    assert c.decide(1.0, ["W"]) == {"W": 1}  # scale from zero: at once, no upscale delay
    # The demand holds (callers still wait, pods start) until demand_hold_s has passed...
    c.observe(4.0, Scrape())
    assert c.decide(4.0) == {"W": 1}
    assert c.status(4.0)["deployments"]["W"]["demand_pending"] is True
    # ...and then, with no load seen, the downscale delay runs as usual.
    for t in range(7, 30):
        c.observe(float(t), Scrape())
        c.decide(float(t))
    assert c.desired("W") == 0


def test_load_from_replicas_and_from_callers_scales_with_the_delays() -> None:
    c = core()
    c.observe(0.0, Scrape(samples=pods(1, 0.0)))
    assert c.decide(0.0) == {"W": 1}
    # 1 pod with 2 ongoing + a caller pod (another deployment) holding 4 for W: load 6 -> 3 replicas.
    caller = PodSample(pod="10.0.1.1", deployment="Front", ongoing=None, queued={"W": 4.0, "Other": 9.0})
    t = 1.0
    while t < 3.9:
        c.observe(t, Scrape(samples=[*pods(1, 2.0), caller]))
        assert c.decide(t) == {"W": 1}, t  # waiting out upscale_delay_s
        t += 0.5
    c.observe(4.5, Scrape(samples=[*pods(1, 2.0), caller]))
    assert c.decide(4.5) == {"W": 3}
    st = c.status(4.5)["deployments"]["W"]
    assert st["load"] == 6.0 and st["queued_in_callers"] == 4.0 and st["current"] == 1


def test_unanswered_pods_are_counted_and_not_running() -> None:
    c = core(min_replicas=1)
    c.observe(0.0, Scrape(samples=pods(2, 1.0), failed={"W": 1}, errors={"W": "GET ...: no answer within 2 s"}))
    st = c.status(0.0)["deployments"]["W"]
    assert st["current"] == 2 and st["unanswered_pods"] == 1 and "no answer" in st["scrape_error"]


def test_custom_policy_runs_in_the_scaler() -> None:
    seen: list[AutoscalingContext] = []

    def always_four(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        seen.append(ctx)
        return 4, {"calls": len(seen)}

    c = core(policy={"policy_function": always_four}, upscale_delay_s=0)
    c.observe(0.0, Scrape(samples=pods(1, 1.0)))
    assert c.decide(0.0) == {"W": 4}
    assert seen[0].app_name == "app" and seen[0].running_replicas == ("10.0.0.0",)
    assert c.autoscaler("W").policy_state["calls"] == 1


def test_an_application_level_policy_decides_for_every_deployment_at_once() -> None:
    from shoal.config import AutoscalingPolicy, DeploymentID
    from shoal.serving.app_policy import AppPolicy

    calls: list[set[str]] = []

    def coordinated(contexts: dict[DeploymentID, AutoscalingContext]) -> tuple[dict[Any, int], dict[Any, Any]]:
        calls.append({d.name for d in contexts})
        load = next(c for d, c in contexts.items() if d.name == "A").total_num_requests
        return {"A": int(load), "B": 99}, {}

    cfg = AutoscalingConfig(min_replicas=0, max_replicas=5, upscale_delay_s=0, downscale_delay_s=0)
    c = ScalerCore("app", {"A": cfg, "B": cfg},
                   policy=AppPolicy("app", AutoscalingPolicy(policy_function=coordinated)))
    c.observe(0.0, Scrape(samples=[PodSample("10.0.0.1", "A", ongoing=3.0)]))
    assert c.decide(0.0) == {"A": 3, "B": 5}  # B's 99 within its max_replicas
    assert calls == [{"A", "B"}]
    c.decide(1.0, ["A"])  # a demand signal for one deployment: still one call for all
    assert calls[-1] == {"A", "B"}


def test_routes() -> None:
    clock = [0.0]
    c = core()
    svc = ScalerService(c, ScrapeTargets("app", {}), _NoPods(), interval_s=1, clock=lambda: clock[0])
    assert svc.handle("GET", "/scale/W", b"")[0] == 503
    assert svc.handle("GET", "/-/ready", b"")[0] == 503 and svc.handle("GET", "/-/healthz", b"")[0] == 200
    asyncio.run(svc.tick())
    assert svc.handle("GET", "/scale/W", b"") == (200, {"deployment": "W", "desired": 0})
    assert svc.handle("GET", "/-/ready", b"")[0] == 200
    clock[0] = 1.0
    assert svc.handle("POST", "/demand/W", b"") == (202, {"deployment": "W", "desired": 1})
    assert svc.handle("GET", "/scale/W", b"")[1]["desired"] == 1
    assert svc.handle("GET", "/scale/Nope", b"")[0] == 404
    assert svc.handle("POST", "/scale/W", b"")[0] == 405 and svc.handle("GET", "/demand/W", b"")[0] == 405
    assert svc.handle("GET", "/other", b"")[0] == 404
    status = svc.handle("GET", "/status", b"")[1]
    assert status["deployments"]["W"]["demands"] == 1 and status["rounds"] == 1


class _NoPods:
    interval = 1.0

    async def resolve(self, name: str) -> list[str] | None:
        return []


class _Resolver:
    interval = 1.0

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records

    async def resolve(self, name: str) -> list[str] | None:
        return self.records.get(name.rstrip("."), [])


async def _raw(port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_http_server_bounds_and_routes() -> None:
    async def main() -> None:
        calls: list[tuple[str, str, bytes]] = []

        def handler(method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
            calls.append((method, path, body))
            return 200, {"ok": True}

        server = ScalerServer(handler, ServerLimits(head_timeout_s=0.5, max_body_bytes=16))
        await server.start("127.0.0.1", 0)
        try:
            assert await _raw(server.port, b"POST /demand/A%20B HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}") == \
                (200, {"ok": True})
            assert calls == [("POST", "/demand/A B", b"{}")]
            assert (await _raw(server.port, b"POST /x HTTP/1.1\r\nContent-Length: 99\r\n\r\n"))[0] == 413
            assert (await _raw(server.port, b"bogus\r\n\r\n"))[0] == 400
            assert (await _raw(server.port, b"GET /x HTTP/1.1\r\n"))[0] == 408  # head never finished
            assert len(calls) == 1
        finally:
            server.close()

    asyncio.run(main())


METRICS = f"""# TYPE {names.METRIC_ONGOING} gauge
{names.METRIC_ONGOING}{{app="app",deployment="W"}} 3.0
# TYPE {names.METRIC_CALLER_QUEUED} gauge
{names.METRIC_CALLER_QUEUED}{{app="app",deployment="V"}} 2.0
{names.METRIC_CALLER_QUEUED}{{app="other",deployment="V"}} 7.0
# TYPE {names.METRIC_AUTOSCALING_CUSTOM} gauge
{names.METRIC_AUTOSCALING_CUSTOM}{{app="app",deployment="W",metric="kv"}} 0.5
"""


def test_parse_pod_metrics() -> None:
    s = parse_pod_metrics(METRICS, "app", "W", "10.0.0.1")
    assert s.ongoing == 3.0 and s.queued == {"V": 2.0} and s.custom == (("kv", 0.5),)


def test_scrape_reads_answering_pods_and_counts_the_others() -> None:
    async def main() -> Scrape:
        async def admin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            body = METRICS.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(admin, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            # 127.0.0.2 listens on nothing: refused, skipped and counted.
            resolver = _Resolver({"w.ns": ["127.0.0.1", "127.0.0.2"]})
            return await scrape(ScrapeTargets("app", {"W": "w.ns"}, port, 1.0), resolver)
        finally:
            server.close()

    result = asyncio.run(main())
    assert [s.pod for s in result.samples] == ["127.0.0.1"] and result.samples[0].ongoing == 3.0
    assert result.failed == {"W": 1} and "127.0.0.2" in result.errors["W"]


def _state(**kw: Any) -> ScaledState:
    base: dict[str, Any] = dict(name="so", target="dep", url="http://x/scale/W", value_location="desired",
                                target_value=1.0, activation=0.0, min_replicas=0, max_replicas=30, polling_s=1.0,
                                cooldown_s=5.0, fallback=(3, 1))
    return ScaledState(**{**base, **kw})


def test_keda_stand_in_rule() -> None:
    st = _state()
    assert keda_replicas(st, 0, 0.0, 0.0) == (0, "inactive")
    assert keda_replicas(st, 0, 2.0, 1.0) == (2, "activated")
    assert keda_replicas(st, 20, 21.0, 2.0) == (20, "hpa")  # within the HPA's 10 % tolerance
    assert keda_replicas(st, 20, 23.0, 2.0) == (23, "hpa")
    assert keda_replicas(st, 20, 99.0, 2.0) == (30, "hpa")  # capped at maxReplicaCount
    assert keda_replicas(st, 4, 2.0, 2.0) == (2, "hpa")
    assert keda_replicas(st, 2, 0.0, 4.0) == (1, "hpa")  # inactive, cooldown not over: the HPA's floor is 1
    assert keda_replicas(st, 2, 0.0, 7.5) == (0, "cooled down")
    st.failures = 2
    assert keda_replicas(st, 3, None, 8.0) == (3, "read failed")
    st.failures = 3
    assert keda_replicas(st, 3, None, 9.0) == (1, "fallback")


def test_callers_wait_for_a_deployment_with_no_pod_at_most_the_deadline(tmp_path: Path) -> None:
    from shoal.kubernetes.pod.discovery import FileResolver, PodBackend, WakeConfig
    from shoal.runtime.http.errors import error_answer
    from shoal.runtime.wire import RequestMeta

    (tmp_path / "dns.json").write_text("{}")
    posted: list[bytes] = []

    async def main() -> BaseException:
        async def scaler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            posted.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(scaler, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        backend = PodBackend(asyncio.get_running_loop(), b"s" * 32, "ns", "cluster.local",
                             FileResolver(str(tmp_path / "dns.json")),
                             wake=WakeConfig(app="app", scaler_url=url, timeout_s=0.3))
        router = backend.router("app", "W")
        other = backend.router("elsewhere", "V")  # another app's deployment: no demand to this scaler
        try:
            results = await asyncio.wait_for(asyncio.gather(
                router.call("__call__", (1,), {}, RequestMeta("r1")),
                router.call("__call__", (2,), {}, RequestMeta("r2")),
                other.call("__call__", (3,), {}, RequestMeta("r3")), return_exceptions=True), 10)
        finally:
            backend.close()
            server.close()
        assert all(isinstance(r, DeploymentUnavailableError) for r in results), results
        assert router.num_queued == 0 and router.wake_timeouts == 2  # type: ignore[attr-defined]
        assert isinstance(results[0], BaseException)
        return results[0]

    exc = asyncio.run(main())
    assert "within 0.3 s" in str(exc) and names.ENV_WAKE_TIMEOUT in str(exc)
    # One demand for W (rate-limited: two requests, one post), none for the other app's V.
    assert len(posted) == 1 and posted[0].startswith(b"POST /demand/W HTTP/1.1")
    status, body, headers = error_answer(exc, "rid")
    assert status == 503 and (b"retry-after", b"1") in headers and "wake deadline" in body["message"]


def test_wake_config_from_env() -> None:
    from shoal.kubernetes.pod.discovery import WakeConfig

    w = WakeConfig.from_env({names.ENV_APP: "a", names.ENV_SCALER_URL: "http://s:8002", names.ENV_WAKE_TIMEOUT: "9"})
    assert (w.app, w.scaler_url, w.timeout_s) == ("a", "http://s:8002", 9.0)
    assert WakeConfig.from_env({names.ENV_WAKE_TIMEOUT: "soon"}).timeout_s == names.DEFAULT_WAKE_TIMEOUT_S
    # Never unbounded: 0 (or junk) gives the default deadline.
    assert WakeConfig.from_env({names.ENV_WAKE_TIMEOUT: "0"}).timeout_s == names.DEFAULT_WAKE_TIMEOUT_S
    assert WakeConfig.from_env({}).scaler_url is None
    with pytest.raises(ValueError, match="positive"):
        WakeConfig(timeout_s=0)
