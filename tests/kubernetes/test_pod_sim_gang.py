"""A gang deployment compiled to a LeaderWorkerSet and run as simulated pods: a 2-rank
tensor-parallel linear layer (gloo on CPU) over HTTP across pods, a dead rank recreating its
whole group, scaling by groups and a group-by-group rolling update, under light traffic,
counting failed requests (each phase prints its counts).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from k8s_sim_support import RpcClient, Traffic, admin, build_objects, get, metric, running, wait_for

from shoal.kubernetes import names
from shoal.kubernetes.sim import Pod, PodSim
from shoal.runtime.wire import OK

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")
pytest.importorskip("torch")

APP = "gang"
LWS = names.gang_name(APP, "TPLinear")
THREADS = 2


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodSim]:
    tmp = tmp_path_factory.mktemp("podsim-gang")
    objects = build_objects(tmp, app=APP, import_path="k8s_gang_app:app",
                            deployments=[{"name": "TPLinear", "num_replicas": 2}])
    assert [o["kind"] for o in objects].count("LeaderWorkerSet") == 1
    assert not [o for o in objects if o["kind"] == "Deployment"]
    with running(objects, timeout=180) as s:
        yield s


def group(sim: PodSim, index: int) -> list[Pod]:
    pods = sorted((p for p in sim.pods_of(LWS) if p.group == index), key=lambda p: p.name)
    assert [p.name for p in pods] == [f"{LWS}-{index}", f"{LWS}-{index}-1"], sim.describe()
    return pods


def traffic(sim: PodSim) -> Traffic:
    host, port = sim.service_address(names.ingress_service_name(APP))
    return Traffic(host, port, threads=THREADS, timeout=30.0, pause_s=0.02)


def test_tensor_parallel_layer_across_pods_matches_the_unsplit_layer(sim: PodSim) -> None:
    import httpx

    leader, worker = group(sim, 0)
    # What LWS gives the pods: labels, and the environment the rendezvous is written in.
    assert leader.labels[names.LWS_LABEL_WORKER_INDEX] == "0" and worker.labels[names.LWS_LABEL_WORKER_INDEX] == "1"
    assert worker.injected_env[names.ENV_LWS_LEADER_ADDRESS] == leader.ip
    # Callers see the leaders only; every rank is in the LWS's own headless Service.
    records = sim.resolver_records()
    dns = names.service_dns(APP, "TPLinear", sim.namespace)
    leaders = [p.ip for p in sim.pods_of(LWS) if p.labels[names.LWS_LABEL_WORKER_INDEX] == "0"]
    assert sorted(records[dns]) == sorted(leaders) and len(leaders) == 2
    assert records[names.rank_dns(leader.name, 1, LWS, sim.namespace)] == [worker.ip]
    assert admin(leader, "/-/ready")[0] == 200 and admin(worker, "/-/ready")[0] == 200

    url = sim.http_url(names.ingress_service_name(APP))
    for x in ([1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.5]):
        r = httpx.post(url + "/", json={"x": x}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rank"] == 0 and body["world_size"] == 2
        assert body["y"] == pytest.approx(body["reference"], abs=1e-5) and len(body["y"]) == 6

    # Both ranks of one group run each request (their all_gather pairs them up).
    secret = sim.secret_value(names.secret_name(APP), names.SECRET_KEY).encode()

    async def pods_of_one_request() -> list[str]:
        client = await RpcClient().connect(leader.ip, names.RPC_PORT, secret)
        try:
            reply = await client.reply(client.send("pods"), timeout=60)
        finally:
            client.close()
        assert reply[0] == OK, reply
        return list(reply[2])

    assert asyncio.run(pods_of_one_request()) == [leader.name, worker.name]
    # A gang's load is counted once, at rank 0 (KEDA sums the metric over every pod).
    assert metric(worker, names.METRIC_ONGOING, app=APP, deployment="TPLinear") == 0


def test_a_killed_worker_recreates_its_group_and_only_requests_in_flight_fail(sim: PodSim) -> None:
    old_leader, old_worker = group(sim, 0)
    with traffic(sim) as t:
        t.wait_requests(20)
        before = t.total
        sim.kill(old_worker)
        assert wait_for(lambda: old_leader.gone and old_worker.gone, 30), sim.describe()
        sim.wait_ready(LWS, 2, timeout=120)
        new_leader, new_worker = group(sim, 0)
        assert new_leader is not old_leader and new_worker is not old_worker
        assert new_leader.ip != old_leader.ip
        t.wait_requests(40, timeout=60)
    print(f"kill -9 {old_worker.name}: group 0 recreated; {t.total - before} requests since: {t.summary()}")
    # Only what was in flight on the old group may fail (one request per client thread at most).
    assert len(t.failures) <= THREADS, t.failures
    assert all(f.what == "HTTP 500" for f in t.failures), t.failures
    assert all(b["y"] == pytest.approx(b["reference"], abs=1e-5) for b in t.bodies)
    assert _serves(sim, new_leader)  # the new group serves
    assert old_worker.exit_codes == [-9]
    assert old_leader.exit_codes == [0]  # drained on SIGTERM
    # The recreated group reuses the pod names; each incarnation keeps its own directory (and log).
    assert new_leader.dir != old_leader.dir and old_leader.log_path.exists()


def test_a_crashed_rank_container_recreates_its_group(sim: PodSim) -> None:
    """A container that dies on its own (no pod deletion) takes its group with it too (RecreateGroupOnPodRestart)."""
    old_leader, old_worker = group(sim, 1)
    assert old_leader.pid is not None
    os.kill(old_leader.pid, signal.SIGKILL)  # a process this simulation started, by its PID
    assert wait_for(lambda: old_leader.gone and old_worker.gone, 30), sim.describe()
    sim.wait_ready(LWS, 2, timeout=120)
    new_leader, _ = group(sim, 1)
    assert new_leader is not old_leader and new_leader.restarts == 0
    assert old_leader.exit_codes == [-9] and old_worker.exit_codes == [0]
    assert _serves(sim, new_leader)


def test_scaling_groups_down_and_up_fails_nothing(sim: PodSim) -> None:
    with traffic(sim) as t:
        t.wait_requests(10)
        sim.scale(LWS, 1, timeout=60)
        sim.wait_gone(30)
        t.wait_requests(20)
        sim.scale(LWS, 2, timeout=120)
        t.wait_requests(20, timeout=60)
    print("scale groups 2 -> 1 -> 2:", t.summary())
    assert not t.failures, t.failures[:5]
    gone = [p for p in sim.pods if p.gone and p.group == 1 and p.exit_codes == [0]]
    assert len(gone) >= 2  # both ranks of the removed group drained and exited 0


def test_a_rolling_update_replaces_groups_one_by_one_and_fails_nothing(sim: PodSim, tmp_path: Path) -> None:
    old = {p.pid for p in sim.pods_of(LWS)}
    v2 = [{"name": "TPLinear", "num_replicas": 2,
           "ray_actor_options": {"runtime_env": {"env_vars": {"MODEL_VERSION": "2"}}}}]
    with traffic(sim) as t:
        t.wait_requests(10)
        sim.apply(build_objects(tmp_path, app=APP, import_path="k8s_gang_app:app", deployments=v2), timeout=180)
        sim.wait_gone(30)
        t.wait_requests(20, timeout=60)
    print("rolling update of both groups:", t.summary())
    assert not t.failures, t.failures[:5]
    assert not old & {p.pid for p in sim.pods_of(LWS)}
    replaced = [p for p in sim.pods if p.gone and p.pids and p.pids[-1] in old]
    assert replaced and all(p.exit_codes == [0] for p in replaced)  # every rank drained and exited 0


def _serves(sim: PodSim, leader: Pod) -> bool:
    """Whether requests reach ``leader`` (the ClusterIP front picks a random ready leader)."""
    host, port = sim.service_address(names.ingress_service_name(APP))

    def once() -> bool:
        status, body = get(host, port, "/?q=probe", timeout=30)
        return status == 200 and json.loads(body)["pod"] == leader.name

    return wait_for(once, 60, interval=0.0)
