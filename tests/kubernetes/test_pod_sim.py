"""The compiled objects of a 3-deployment app (Ingress -> A -> B) run as simulated pods under
steady HTTP traffic: scaling, kill -9 and a rolling update, counting failed requests.

Counts, not latencies, are asserted (these machines are noisy); each phase prints its counts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator

import pytest
from k8s_sim_support import Traffic, build_objects, get, metric, running, wait_for

from shoal.kubernetes import names
from shoal.kubernetes.pod import METRIC_IN_FLIGHT
from shoal.kubernetes.sim import PodSim

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")

APP = "pipe"
B_MAX_ONGOING = 4  # k8s_pipeline_app.B
DEPLOYMENTS = [{"name": "Ingress", "num_replicas": 2}, {"name": "A", "num_replicas": 2},
               {"name": "B", "num_replicas": 2, "user_config": {"version": "v1", "delay_s": 0.02}}]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodSim]:
    tmp = tmp_path_factory.mktemp("podsim")
    with running(build_objects(tmp, deployments=DEPLOYMENTS)) as s:
        s.tmp = tmp  # type: ignore[attr-defined]
        yield s


@pytest.fixture
def traffic(sim: PodSim) -> Iterator[Traffic]:
    host, port = sim.service_address(names.ingress_service_name(APP))
    with Traffic(host, port, threads=4, timeout=10.0) as t:
        t.wait_requests(20)
        yield t


def test_requests_flow_through_every_pod(sim: PodSim, traffic: Traffic) -> None:
    traffic.wait_requests(100)
    traffic.stop()
    print("steady:", traffic.summary())
    assert not traffic.failures
    seen = {key: {b[key] for b in traffic.bodies} for key in ("ingress", "a", "b")}
    for key, dep in (("ingress", "pipe-ingress"), ("a", "pipe-a"), ("b", "pipe-b")):
        assert seen[key] == {p.name for p in sim.pods_of(dep)}, key


def test_serve_status_inside_a_pod(sim: PodSim) -> None:
    host, port = sim.service_address(names.ingress_service_name(APP))
    status, body = get(host, port, "/?status=1")
    assert status == 200, body
    seen = json.loads(body)
    assert seen == {"app": "RUNNING", "deployments": {"Ingress": ["HEALTHY", 2], "A": ["HEALTHY", 2],
                                                      "B": ["HEALTHY", 2]}}, seen


def test_scaling_b_up_and_down_fails_nothing(sim: PodSim, traffic: Traffic) -> None:
    for n in (4, 1, 2):
        sim.scale("pipe-b", n)
        traffic.wait_requests(40)
    sim.wait_gone(30)
    traffic.wait_requests(40)
    traffic.stop()
    print("scale b 2 -> 4 -> 1 -> 2:", traffic.summary())
    assert not traffic.failures, traffic.failures[:5]
    assert all(p.exit_codes == [0] for p in sim.pods if p.gone and p.deployment == "pipe-b")


def test_kill_9_costs_at_most_the_requests_in_flight(sim: PodSim, traffic: Traffic) -> None:
    callers = sim.pods_of("pipe-a")
    victim = sim.pods_of("pipe-b")[0]
    assert wait_for(lambda: (metric(victim, names.METRIC_ONGOING, app=APP, deployment="B") or 0) > 0, 10)
    on_victim = metric(victim, names.METRIC_ONGOING, app=APP, deployment="B")
    sent_to_b = sum(metric(a, METRIC_IN_FLIGHT, app=APP, deployment="B") or 0 for a in callers)
    sim.kill(victim)
    traffic.wait_requests(40)
    sim.wait_ready("pipe-b", 2)  # the ReplicaSet replaced it
    traffic.wait_requests(40)
    traffic.stop()
    print(f"kill -9 {victim.name} with {on_victim:.0f} requests running in it ({sent_to_b:.0f} in flight to B "
          f"from A pods just before): {traffic.summary()}")
    # At most what was in flight on it: each caller pod sends a B pod at most max_ongoing_requests.
    assert len(traffic.failures) <= len(callers) * B_MAX_ONGOING
    # ... and they fail fast with an error, not a hang.
    assert all(f.what == "HTTP 500" for f in traffic.failures), traffic.failures
    assert all(f.seconds < traffic.timeout for f in traffic.failures)
    assert victim.exit_codes == [-9]


def test_rolling_update_to_a_new_version_fails_nothing(sim: PodSim, traffic: Traffic) -> None:
    old = {p.name for p in sim.pods if not p.gone and not p.deleted}
    # B's user_config and A's max_ongoing_requests change. Each pod template follows what its pods
    # read (test_k8s_workloads): B's and A's own entries, and Ingress's router enforces A's limit.
    v2 = [DEPLOYMENTS[0], {"name": "A", "num_replicas": 2, "max_ongoing_requests": 12},
          {"name": "B", "num_replicas": 2, "user_config": {"version": "v2", "delay_s": 0.02}}]
    sim.apply(build_objects(sim.tmp, deployments=v2))  # type: ignore[attr-defined]
    assert not old & {p.name for d in ("pipe-ingress", "pipe-a", "pipe-b") for p in sim.pods_of(d)}
    sim.wait_gone(30)
    n = len(traffic.bodies)
    traffic.wait_requests(60)
    traffic.stop()
    print("rolling update of all three deployments:", traffic.summary())
    assert not traffic.failures, traffic.failures[:5]
    assert {b["version"] for b in traffic.bodies[n:]} == {"v2"}
    # Every replaced pod drained and exited 0 (HTTP ingress pods included).
    assert {tuple(p.exit_codes) for p in sim.pods if p.name in old and p.gone} == {(0,)}


def test_a_crashed_container_restarts_in_place(sim: PodSim) -> None:
    """A process that dies on its own (not a pod deletion) is restarted by the 'kubelet': same pod, same IP."""
    pod = sim.pods_of("pipe-a")[0]
    pid = pod.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # a process this simulation started, by its PID
    assert wait_for(lambda: pod.restarts == 1 and pod.ready, 30), sim.describe()
    assert pod.pid != pid and pod.exit_codes == [-9]
    assert pod.name in {p.name for p in sim.pods_of("pipe-a", ready=True)}
    host, port = sim.service_address(names.ingress_service_name(APP))
    with Traffic(host, port, threads=2) as traffic:
        traffic.wait_requests(40)
    assert not traffic.failures
    assert pod.name in {b["a"] for b in traffic.bodies}
