"""Ray compatibility in pods (issue 17): replica ranks from the deployment's ready pods, and custom
request routers fed each target pod's ``record_routing_stats()``."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from k8s_sim_support import RpcClient, build_objects, get, running, wait_for

from shoal.config import DeploymentConfig, RequestRouterConfig
from shoal.kubernetes import names
from shoal.kubernetes.pod import FileResolver, PodBackend
from shoal.kubernetes.pod.discovery import CalleeConfig
from shoal.kubernetes.pod.ranks import RankTracker, own_address, pod_rank
from shoal.kubernetes.pod.routing_stats import keeper
from shoal.request_router import PendingRequest, RequestRouter, RunningReplica
from shoal.runtime.custom_routing import request_router_blob
from shoal.runtime.replica.core import ReplicaCore
from shoal.runtime.replica.ports import NoControl
from shoal.runtime.wire import OK, STATS, STATS_REPLY, FramedProtocol, ReplicaRoutingStats, serve_tcp

APP = "ranks"
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")


# -- ranks --------------------------------------------------------------------------------------


def test_pod_rank_is_the_place_of_the_pod_among_its_deployments_pods() -> None:
    # Ordered by address as numbers, not text: 10.0.0.10 comes after 10.0.0.9.
    ready = ["10.0.0.10", "10.0.0.9", "10.0.0.2"]
    assert [pod_rank(ip, ready) for ip in ("10.0.0.2", "10.0.0.9", "10.0.0.10")] == [(0, 3), (1, 3), (2, 3)]
    # The pod counts itself while it is not ready yet (not listed), and DNS may list it twice.
    assert pod_rank("10.0.0.5", ready) == (1, 4)
    assert pod_rank("10.0.0.9", ["10.0.0.9", "10.0.0.9"]) == (0, 1)
    assert pod_rank("10.0.0.9", []) == (0, 1)
    # IPv4 before IPv6, IPv6 numerically.
    assert pod_rank("fd00::2", ["fd00::10", "10.0.0.1"]) == (1, 3)
    # The set decides, not who asks: every pod of one set gets a distinct rank, 0..N-1.
    pods = [f"10.1.{random.randint(0, 255)}.{i}" for i in range(1, 8)]
    assert sorted(pod_rank(p, pods)[0] for p in pods) == list(range(len(set(pods))))


def test_own_address_is_a_specific_ip() -> None:
    assert own_address("10.244.1.7") == "10.244.1.7" and own_address("fd00::7") == "fd00::7"
    assert own_address("0.0.0.0") is None and own_address("::") is None and own_address("pod-a") is None


class ScriptedDNS:
    interval = 0.01

    def __init__(self) -> None:
        self.answer: list[str] | None = []
        self.hang = False

    async def resolve(self, name: str) -> list[str] | None:
        if self.hang:
            await asyncio.sleep(3600)
        return self.answer


async def test_rank_tracker_follows_the_ready_pods_and_keeps_its_rank_when_dns_fails() -> None:
    dns = ScriptedDNS()
    dns.answer = ["10.0.0.3", "10.0.0.1"]
    changes: list[tuple[int, int]] = []
    tracker = RankTracker(dns, "dep.ns.svc", "10.0.0.2", lambda r, w: changes.append((r, w)))
    assert await tracker.first() == (1, 3) and changes == []  # the first value is not a change
    assert await tracker.refresh() == (1, 3) and changes == []  # same set, same rank
    dns.answer = ["10.0.0.3"]  # 10.0.0.1 scaled away
    assert await tracker.refresh() == (0, 2) and changes == [(0, 2)]
    dns.answer = None  # DNS did not answer: the last rank stays
    assert await tracker.refresh() == (0, 2) and changes == [(0, 2)]
    dns.answer = ["10.0.0.3", "10.0.0.4", "10.0.0.5"]  # scaled up behind this pod: its rank stays
    assert await tracker.refresh() == (0, 4) and changes == [(0, 2), (0, 4)]


async def test_rank_tracker_first_lookup_is_bounded() -> None:
    dns = ScriptedDNS()
    dns.hang = True
    changes: list[tuple[int, int]] = []
    tracker = RankTracker(dns, "dep.ns.svc", "10.0.0.2", lambda r, w: changes.append((r, w)))
    assert await tracker.first(timeout=0.05) == (0, 1)
    dns.hang, dns.answer = False, ["10.0.0.1"]
    assert await tracker.refresh() == (1, 2) and changes == [(1, 2)]  # announced: first() returned


# -- routing stats ------------------------------------------------------------------------------


class Recorder(RequestRouter):
    seen: dict[str, dict[str, Any]] = {}

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        Recorder.seen = {r.replica_id.unique_id: dict(r.routing_stats) for r in replicas}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return [list(candidate_replicas)]


async def test_replica_core_answers_stats_questions_with_what_it_kept() -> None:
    core = ReplicaCore(channel=NoControl(), routers=None)  # type: ignore[arg-type]
    sent: list[Any] = []

    class Proto:
        def send_user(self, msg: Any) -> None:
            sent.append(msg)

    core._on_message(Proto(), (STATS, 7))  # type: ignore[arg-type]
    keep = keeper(core)
    keep(ReplicaRoutingStats("pod-a", {"busy": 3}))
    core._on_message(Proto(), (STATS, 8))  # type: ignore[arg-type]
    assert sent == [(STATS_REPLY, 7, None), (STATS_REPLY, 8, {"busy": 3})]
    with pytest.raises(TypeError):  # what cannot be pickled is refused, and the last stats kept
        keep(ReplicaRoutingStats("pod-a", {"lock": threading.Lock()}))
    assert core.routing_stats == {"busy": 3}


def _loopback_ip() -> str:
    return f"127.{random.randint(16, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"


@linux_only
async def test_callers_router_sees_each_pods_stats_and_keeps_them_when_a_pod_goes_silent(tmp_path: Path) -> None:
    """In-process: two pods answer STATS frames (one stays silent at first); the caller's custom
    router sees what each answered, and keeps a pod's last stats while it does not answer."""
    secret = os.urandom(32)
    ips = [_loopback_ip(), _loopback_ip()]
    while ips[1] == ips[0]:
        ips[1] = _loopback_ip()
    with socket.socket() as s:
        s.bind((ips[0], 0))
        port = s.getsockname()[1]
    answers: dict[str, dict[str, Any] | None] = {ips[0]: {"load": 1}, ips[1]: None}
    silent: set[str] = {ips[1]}

    def on_connect(ip: str) -> Any:
        def connected(proto: FramedProtocol) -> None:
            def on_message(p: FramedProtocol, m: Any) -> None:
                if m[0] == STATS and ip not in silent:
                    p.send_user((STATS_REPLY, m[1], answers[ip]))
                elif m[0] != STATS:
                    p.send_user((OK, m[1], ip))
            proto.on_message = on_message
        return connected

    servers = [await serve_tcp(ip, port, secret, on_connect(ip)) for ip in ips]
    dns = names.service_dns("app", "dep", "ns")
    resolver = tmp_path / "resolver.json"
    resolver.write_text(json.dumps({dns: ips}))
    config = DeploymentConfig(request_router_config=RequestRouterConfig(
        request_router_class=Recorder, request_routing_stats_period_s=0.05, request_routing_stats_timeout_s=0.3))
    callee = CalleeConfig(request_router=request_router_blob(config, "dep"))
    backend = PodBackend(asyncio.get_running_loop(), secret, "ns", "cluster.local", FileResolver(str(resolver)),
                         callees={("app", "dep"): callee}, rpc_port=port)

    async def until(cond: Any, what: str) -> None:
        async with asyncio.timeout(20):
            while not cond():
                await asyncio.sleep(0.02)
        assert cond(), what

    try:
        backend.router("app", "dep")
        watcher = backend._watchers[("app", "dep")]
        await until(lambda: Recorder.seen.get(ips[0]) == {"load": 1}, "the first pod's stats")
        assert Recorder.seen.get(ips[1]) == {}  # silent: nothing yet
        silent.clear()  # it answers, but has recorded nothing yet: still nothing
        await until(lambda: watcher.stats is not None and watcher.stats.answered >= 4, "answers")
        assert Recorder.seen[ips[1]] == {}
        answers[ips[1]] = {"load": 7}
        answers[ips[0]] = {"load": 2}
        await until(lambda: Recorder.seen == {ips[0]: {"load": 2}, ips[1]: {"load": 7}}, "new stats of both")
        # The first pod goes silent: its last stats stay, the other's keep changing.
        silent.add(ips[0])
        answers[ips[0]] = {"load": 99}
        assert watcher.stats is not None
        failed = watcher.stats.failed
        answers[ips[1]] = {"load": 8}
        await until(lambda: Recorder.seen.get(ips[1]) == {"load": 8} and watcher.stats is not None
                    and watcher.stats.failed > failed, "a timed-out question")
        assert Recorder.seen[ips[0]] == {"load": 2}
        # A pod DNS no longer lists: its stats are forgotten.
        resolver.write_text(json.dumps({dns: [ips[1]]}))
        await until(lambda: list(Recorder.seen) == [ips[1]], "the pod to leave")
        assert watcher.stats is not None and list(watcher.stats.stats) == [ips[1]]
    finally:
        backend.close()
        for server in servers:
            server.close()


# -- in the pod simulation ----------------------------------------------------------------------


def _ranks(sim: Any, deployment: str) -> dict[str, tuple[int, int]]:
    """(rank, world_size) each live pod of ``deployment`` reports, asked on its RPC port."""
    secret = sim.secret_value(names.secret_name(APP), names.SECRET_KEY).encode()

    async def ask(ip: str) -> tuple[int, int]:
        client = await RpcClient().connect(ip, names.RPC_PORT, secret)
        try:
            reply = await client.reply(client.send("__call__"), timeout=20)
        finally:
            client.close()
        assert reply[0] == OK, reply
        return reply[2]["rank"], reply[2]["world_size"]

    async def all_of() -> dict[str, tuple[int, int]]:
        pods = sim.pods_of(deployment, ready=True)
        found = await asyncio.gather(*(ask(p.ip) for p in pods))
        return {p.ip: r for p, r in zip(pods, found, strict=True)}

    return asyncio.run(all_of())


@linux_only
def test_pods_of_a_deployment_have_distinct_ranks_and_callers_see_their_routing_stats(tmp_path: Path) -> None:
    objects = build_objects(tmp_path, app=APP, import_path="k8s_rank_app:app")
    with running(objects, timeout=120) as sim:
        ranked = sim.deployment_name(APP, "Ranked")
        pods = sim.wait_ready(ranked, 3)
        host, port = sim.service_address(names.ingress_service_name(APP))

        def three_ranks() -> bool:
            return sorted(_ranks(sim, ranked).values()) == [(0, 3), (1, 3), (2, 3)]

        assert wait_for(three_ranks, 30), _ranks(sim, ranked)
        ranks = _ranks(sim, ranked)
        # Ordered by address: the pods' ranks follow their IPs.
        by_ip = sorted(ranks, key=lambda ip: tuple(int(x) for x in ip.split(".")))
        assert [ranks[ip][0] for ip in by_ip] == [0, 1, 2]

        def seen() -> dict[str, Any]:
            status, body = get(host, port, "/seen")
            assert status == 200, body
            result: dict[str, Any] = json.loads(body)
            return result

        # The Front pod's custom router sees each Ranked pod's record_routing_stats().
        expected = {p.ip: {"pod": p.name, "rank": ranks[p.ip][0], "world_size": 3} for p in pods}
        assert wait_for(lambda: seen() == expected, 30), (seen(), expected)
        status, body = get(host, port, "/")
        assert status == 200 and json.loads(body)["world_size"] == 3, body

        # Scale down: the two pods left renumber to 0..1 of 2, and the router forgets the third.
        sim.scale(ranked, 2, timeout=60)
        assert wait_for(lambda: sorted(_ranks(sim, ranked).values()) == [(0, 2), (1, 2)], 30), _ranks(sim, ranked)
        left = {p.ip for p in sim.pods_of(ranked, ready=True)}
        assert wait_for(lambda: set(seen()) == left and all(s.get("world_size") == 2 for s in seen().values()),
                        30), seen()
