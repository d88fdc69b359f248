"""Rate limits shared across gateway replicas (issue 20, Build item 4): the controller's store
and admin operations, a replica's fallback to its share when the controller does not answer,
settlement, and a Kubernetes pod's share from discovery. Fake channels and fake clocks; the
end-to-end test on a real instance is tests/e2e/test_llm_shared_limits_e2e.py."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shoal.exceptions import ControllerError
from shoal.llm import _shared_limits
from shoal.llm._config import GatewayConfig
from shoal.llm._limit_store import OP_ADMIT, SharedLimitStore
from shoal.llm._shared_limits import RETRY_S, GatewayLimits, share_of
from shoal.runtime.controller.admin import dispatch
from shoal.runtime.controller.shared_limits import shared_limit_handlers
from shoal.runtime.wire import Call
from shoal.testing import FakeClock

SCOPE = ("llm", "OpenAiIngress")


def config(**limits: float) -> GatewayConfig:
    return GatewayConfig(api_keys={"sk-t": "t"}, tenants={"t": limits})


def host(clock: FakeClock, target: int = 2) -> SimpleNamespace:
    """What the controller's handlers read: its clock and one app with the gateway deployment."""
    dep = SimpleNamespace(target=target)
    app = SimpleNamespace(deleting=False, deployments={SCOPE[1]: dep})
    return SimpleNamespace(clock=SimpleNamespace(monotonic=clock.time), apps={SCOPE[0]: app})


class ControllerChannel:
    """A replica's link to the controller, answered by the controller's real admin handlers."""

    def __init__(self, handlers: dict[str, Any]) -> None:
        self.handlers = handlers
        self.connected = True
        self.ops: list[str] = []

    async def call(self, op: str, timeout: float | None = 30.0, **args: Any) -> Any:
        self.ops.append(op)
        reply = await dispatch(self.handlers, Call(len(self.ops), op, args))
        if not reply.ok:
            raise ControllerError(reply.error)
        return reply.value


class SilentChannel:
    """A controller that never answers (connected, but its loop is stuck)."""

    connected = True

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, op: str, timeout: float | None = 30.0, **args: Any) -> Any:
        self.calls += 1
        await asyncio.wait_for(asyncio.Event().wait(), timeout)  # as ControllerClient.call: its deadline


def replicas(cfg: GatewayConfig, channel: Any, clock: FakeClock, n: int = 2) -> list[GatewayLimits]:
    return [GatewayLimits(cfg, clock, channel=channel, scope=SCOPE, replicas=n) for _ in range(n)]


async def test_two_replicas_admit_together_exactly_what_one_would() -> None:
    clock = FakeClock(100.0)
    channel = ControllerChannel(shared_limit_handlers(host(clock)))
    a, b = replicas(config(requests_per_minute=3), channel, clock)
    decisions = [await (a if i % 2 else b).admit("t") for i in range(8)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False, False, False, False]
    assert all(d.shared for d in decisions)
    refused = decisions[3]
    assert refused.limit == "requests" and refused.retry_after_s == pytest.approx(20.0)
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    clock.advance(20)  # the controller's clock: one request refilled, for either replica
    assert (await a.admit("t")).allowed and not (await b.admit("t")).allowed


async def test_settlement_returns_unused_tokens_to_the_shared_bucket() -> None:
    clock = FakeClock(0.0)
    channel = ControllerChannel(shared_limit_handlers(host(clock)))
    a, b = replicas(config(tokens_per_minute=100), channel, clock)
    first = await a.admit("t", 80)
    assert first.allowed and first.reserved == 80
    assert not (await b.admit("t", 80)).allowed  # 20 left
    a.settle("t", first, 5)  # used 5 of 80: 75 go back
    await a.drain()
    second = await b.admit("t", 80)
    assert second.allowed and second.headers["x-ratelimit-remaining-tokens"] == "15"
    b.settle("t", second, 120)  # used more than reserved: charged, below zero
    await b.drain()
    refused = await a.admit("t", 1)
    assert not refused.allowed and refused.limit == "tokens"
    assert channel.ops.count("llm_limits_settle") == 2


async def test_unlimited_tenants_never_call_the_controller() -> None:
    clock = FakeClock(0.0)
    channel = ControllerChannel(shared_limit_handlers(host(clock)))
    (a,) = replicas(GatewayConfig(), channel, clock, n=1)
    d = await a.admit("anonymous", 50)
    assert d.allowed and not d.shared and d.headers == {}
    a.settle("anonymous", d, 10)
    assert channel.ops == []


async def test_a_controller_that_does_not_answer_in_time_falls_back_to_the_share(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(_shared_limits, "CALL_TIMEOUT_S", 0.05)
    clock = FakeClock(0.0)
    channel = SilentChannel()
    limits = GatewayLimits(config(requests_per_minute=6), clock, channel=channel, scope=SCOPE, replicas=3)
    with caplog.at_level(logging.WARNING, logger="shoal.llm.gateway"):
        decisions = [await limits.admit("t") for _ in range(4)]
    # The first call waited out its deadline; the rest did not ask (retry later): 6 / 3 replicas.
    assert channel.calls == 1 and limits.degraded
    assert [d.allowed for d in decisions] == [True, True, False, False]
    assert not any(d.shared for d in decisions)
    assert decisions[2].headers["x-ratelimit-limit-requests"] == "2"
    warnings = [r for r in caplog.records if "did not answer" in r.getMessage()]
    assert len(warnings) == 1 and "1/3" in warnings[0].getMessage()
    clock.advance(RETRY_S)
    await limits.admit("t")
    assert channel.calls == 2  # asked again after RETRY_S, still silent: still one warning
    assert len([r for r in caplog.records if "did not answer" in r.getMessage()]) == 1


async def test_a_disconnected_controller_is_not_waited_for_and_recovery_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0.0)
    channel = ControllerChannel(shared_limit_handlers(host(clock, target=4)))
    cfg = config(requests_per_minute=8, tokens_per_minute=400)
    limits = GatewayLimits(cfg, clock, channel=channel, scope=SCOPE, replicas=2)
    assert (await limits.admit("t", 10)).shared
    assert limits.replicas == 4  # the controller's count of the deployment's replicas
    channel.connected = False
    with caplog.at_level(logging.INFO, logger="shoal.llm.gateway"):
        alone = await limits.admit("t", 10)
        assert channel.ops == [OP_ADMIT]  # not even tried
        assert alone.allowed and not alone.shared
        assert alone.headers["x-ratelimit-limit-requests"] == "2"  # 8 / 4
        assert alone.headers["x-ratelimit-limit-tokens"] == "100"
        limits.settle("t", alone, 3)  # settled in the share it came from, not at the controller
        assert alone.headers["x-ratelimit-remaining-tokens"] == "90"
        assert limits.local().headers("t", clock.time())["x-ratelimit-remaining-tokens"] == "97"
        channel.connected = True
        clock.advance(RETRY_S)
        assert (await limits.admit("t", 10)).shared
    assert not limits.degraded
    assert any("shared through the controller again" in r.getMessage() for r in caplog.records)


async def test_a_refused_call_falls_back_too() -> None:
    clock = FakeClock(0.0)
    handlers = shared_limit_handlers(host(clock))
    channel = ControllerChannel(handlers)
    limits = GatewayLimits(config(requests_per_minute=4), clock, channel=channel, scope=("gone", "OpenAiIngress"),
                           replicas=2)
    d = await limits.admit("t")
    assert d.allowed and not d.shared and limits.degraded
    reply = await dispatch(handlers, Call(9, OP_ADMIT, {"app": "gone", "deployment": "OpenAiIngress"}))
    assert not reply.ok and "no deployment 'OpenAiIngress' in application 'gone'" in reply.error


def test_the_store_names_the_bad_field() -> None:
    store = SharedLimitStore()
    good = {"app": "a", "deployment": "g", "tenant": "t", "requests_per_minute": 5, "tokens_per_minute": None,
            "reserve": 1}
    assert store.admit(good, 0.0)["allowed"]
    for field, value in [("tenant", ""), ("app", 3), ("requests_per_minute", -1), ("tokens_per_minute", "x"),
                         ("reserve", float("nan"))]:
        with pytest.raises(ValueError, match=field):
            store.admit({**good, field: value}, 0.0)
    with pytest.raises(ValueError, match="used"):
        store.settle({**good, "reserved": 1, "used": -2}, 0.0)


def test_the_store_starts_over_when_a_tenants_limits_change_and_drops_gone_gateways() -> None:
    store = SharedLimitStore()
    args = {"app": "a", "deployment": "g", "tenant": "t", "requests_per_minute": 1, "tokens_per_minute": None,
            "reserve": 1}
    assert store.admit(args, 0.0)["allowed"] and not store.admit(args, 0.0)["allowed"]
    raised = store.admit({**args, "requests_per_minute": 2}, 0.0)  # a redeploy with a new limit
    assert raised["allowed"] and raised["headers"]["x-ratelimit-limit-requests"] == "2"
    store.prune(lambda app, dep: False)
    assert store.scopes == []


def test_a_share_keeps_at_least_one_request_per_minute() -> None:
    cfg = GatewayConfig(tenants={"a": {"requests_per_minute": 2, "tokens_per_minute": 90}},
                        default_tenant={"requests_per_minute": 30})
    part = share_of(cfg, 3)
    assert part.tenant("a").requests_per_minute == 1.0 and part.tenant("a").tokens_per_minute == 30.0
    assert part.tenant("other").requests_per_minute == 10.0
    assert share_of(cfg, 1) is cfg


async def test_a_pod_admits_its_share_of_the_ready_pods_behind_its_service(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.kubernetes import names
    from shoal.kubernetes.pod.discovery import FileResolver, PodBackend

    dns = names.service_dns(*SCOPE, "ns", "cluster.local")
    resolver_file = tmp_path / "dns.json"
    resolver_file.write_text(json.dumps({dns: ["10.0.0.1", "10.0.0.2"]}))
    monkeypatch.setenv(names.ENV_POD_IP, "10.0.0.9")  # this pod, not ready yet: three in all
    backend = PodBackend(asyncio.get_running_loop(), b"s" * 32, "ns", "cluster.local", FileResolver(str(resolver_file)))
    peers = _shared_limits._pod_peers(backend, *SCOPE)
    assert peers is not None
    clock = FakeClock(0.0)
    limits = GatewayLimits(config(requests_per_minute=9), clock, peers=peers)
    first = await limits.admit("t")
    assert limits.mode == "pod" and limits.replicas == 3
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    # The pod became ready (it is listed now): two pods, looked up again after PEERS_REFRESH_S.
    resolver_file.write_text(json.dumps({dns: ["10.0.0.1", "10.0.0.9"]}))
    clock.advance(_shared_limits.PEERS_REFRESH_S)
    await limits.admit("t")
    assert limits._peers_task is not None
    await limits._peers_task
    assert limits.replicas == 2
    assert (await limits.admit("t")).headers["x-ratelimit-limit-requests"] == "4"
    assert _shared_limits._pod_peers(object(), *SCOPE) is None


async def test_a_replica_process_shares_through_its_controller_client(monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal import context
    from shoal.runtime import backend
    from shoal.runtime.client import ControllerClient
    from shoal.runtime.wire import Role

    clock = FakeClock(0.0)
    cfg = config(requests_per_minute=4)
    assert GatewayLimits.for_process(cfg, clock).mode == "replica"  # not in a replica: its own buckets
    client = ControllerClient("/nonexistent/controller.sock", b"s" * 32, Role.REPLICA, "r1",
                              asyncio.get_running_loop())
    monkeypatch.setattr(backend, "_current", client)
    monkeypatch.setattr(context, "_process_replica_ctx",
                        context.ReplicaContext(SCOPE[0], SCOPE[1], "r1", world_size=2))
    assert GatewayLimits.for_process(cfg, clock).mode == "replica"  # a driver: local testing mode
    monkeypatch.setattr(context, "_worker_process", "replica")
    limits = GatewayLimits.for_process(cfg, clock)
    assert limits.mode == "shared" and limits.scope == SCOPE and limits.replicas == 2
    # Its controller is gone (never connected here): no wait, the share of 2 replicas.
    d = await limits.admit("t")
    assert d.allowed and not d.shared and d.headers["x-ratelimit-limit-requests"] == "2"
    assert limits.degraded
