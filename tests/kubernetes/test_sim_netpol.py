"""The pod simulation enforces the generated NetworkPolicies on real connections.

The compiled 3-deployment app (Ingress -> A -> B, ``k8s_pipeline_app``) runs with probe pods
beside it (``netpol_prober``): processes in their own pods that open connections on request and
say whether a server answered. Probers wearing A's, B's or the Ingress's labels stand for those
deployments' pods in the policies' eyes (they stay unready, out of the Services); ``rogue`` has
labels no policy knows; ``scraper`` runs in the ``monitoring`` namespace. The test process itself
is the node (always allowed, like the kubelet's probes).
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from k8s_sim_support import HERE, build_objects, get, wait_for

from shoal.kubernetes import names
from shoal.kubernetes.sim import PodSim
from shoal.kubernetes.sim.firewall import NODE, socket_owner_inode

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")

APP = "pipe"
Obj = dict[str, Any]


def prober(name: str, labels: dict[str, str], namespace: str = "default") -> Obj:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": 1, "selector": {"matchLabels": dict(labels)}, "template": {
            "metadata": {"labels": dict(labels)},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [{
                "name": "prober", "command": ["python", "-m", "netpol_prober"],
                "env": [{"name": "PROBER_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "PROBER_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1},
            }]},
        }},
    }


def selector(objects: list[Obj], deployment: str) -> dict[str, str]:
    dep = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == deployment)
    return dict(dep["spec"]["selector"]["matchLabels"])


def app_and_probers(tmp: Path, *, policies: bool = True) -> list[Obj]:
    objects = build_objects(tmp, app=APP)
    if not policies:  # what a build without NetworkPolicies gives
        objects = [o for o in objects if o["kind"] != "NetworkPolicy"]
    else:
        assert sum(o["kind"] == "NetworkPolicy" for o in objects) >= 5
    return [
        *objects,
        prober("rogue", {"app": "rogue"}),
        prober("as-a", selector(objects, "pipe-a")),
        prober("as-b", selector(objects, "pipe-b")),
        prober("as-ingress", selector(objects, "pipe-ingress")),
        prober("scraper", {"app": "scraper"}, namespace="monitoring"),
    ]


@contextmanager
def started(objects: list[Obj], **kwargs: Any) -> Iterator[PodSim]:
    """The app's pods ready and every prober answering; every process stopped (by PID) afterwards."""
    from conftest import child_pids, wait_until

    before = child_pids()
    sim = PodSim(objects, python_path=[str(HERE)], **kwargs)
    try:
        sim.start(wait=False)
        for dep in ("pipe-ingress", "pipe-a", "pipe-b"):
            sim.wait_ready(dep, 1, timeout=90)
        for dep in sim.deployments:
            if not dep.startswith("pipe-"):
                assert wait_for(lambda d=dep: _answers(sim, d), 30), f"prober {dep} never answered\n{sim.logs()}"
        yield sim
    except BaseException:
        print(sim.describe())
        print(sim.logs(15))
        raise
    finally:
        sim.close()
        assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def _answers(sim: PodSim, deployment: str) -> bool:
    pods = sim.pods_of(deployment)
    if not pods:
        return False
    try:
        return get(pods[0].ip, 8080, "/-/healthz", timeout=2)[0] == 200
    except OSError:
        return False


def one(sim: PodSim, deployment: str) -> Any:
    pods = sim.pods_of(deployment)
    assert len(pods) == 1, sim.describe()
    return pods[0]


def probe(sim: PodSim, src: str, dst: str, port: int, kind: str = "tls", timeout: float = 5.0) -> dict[str, Any]:
    """Ask prober ``src`` to connect to the (only) pod of ``dst`` on ``port``."""
    target = one(sim, dst)
    query = urllib.parse.urlencode({"host": target.ip, "port": port, "kind": kind, "timeout": timeout})
    status, body = get(one(sim, src).ip, 8080, f"/probe?{query}", timeout=timeout + 10)
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodSim]:
    with started(app_and_probers(tmp_path_factory.mktemp("netpol"))) as s:
        yield s


def test_the_call_graph_flows_end_to_end_through_the_checks(sim: PodSim) -> None:
    host, port = sim.service_address(names.ingress_service_name(APP))
    for i in range(5):
        status, body = get(host, port, f"/?q={i}")
        assert status == 200, body
        reply = json.loads(body)
        assert reply["x"] == str(i)
        assert (reply["ingress"], reply["a"], reply["b"]) == tuple(one(sim, d).name for d in
                                                                   ("pipe-ingress", "pipe-a", "pipe-b"))
    fw = sim.firewall
    # Every hop went through a check, attributed to the right pods.
    assert fw.count("allowed", src=NODE, dst="pipe-ingress", port=names.HTTP_PORT) >= 5
    assert fw.count("allowed", src="pipe-ingress", dst="pipe-a", port=names.RPC_PORT) >= 1
    assert fw.count("allowed", src="pipe-a", dst="pipe-b", port=names.RPC_PORT) >= 1
    for dep in ("pipe-ingress", "pipe-a", "pipe-b"):
        assert fw.count("denied", src=dep) == 0, fw.reasons
    # The containers listen on private addresses: the pod address is the simulation's.
    for dep in ("pipe-ingress", "pipe-a", "pipe-b"):
        pod = one(sim, dep)
        assert pod.listen_ip and pod.listen_ip != pod.ip


def test_a_pod_that_is_not_a_caller_is_denied(sim: PodSim) -> None:
    fw = sim.firewall
    # Control: A's labels reach B's RPC port (A calls B), so the probe itself works.
    ok = probe(sim, "as-a", "pipe-b", names.RPC_PORT)
    assert ok["reached"], ok
    assert fw.count("allowed", src="as-a", dst="pipe-b", port=names.RPC_PORT) == 1
    # B calling A: B's egress admits nothing but DNS, and A admits only the Ingress.
    before = fw.count("denied", src="as-b", dst="pipe-a", port=names.RPC_PORT)
    denied = probe(sim, "as-b", "pipe-a", names.RPC_PORT)
    assert not denied["reached"], denied
    assert "ConnectionResetError" in denied["detail"] or "closed" in denied["detail"], denied
    assert fw.count("denied", src="as-b", dst="pipe-a", port=names.RPC_PORT) == before + 1
    key = (one(sim, "as-b").name, one(sim, "pipe-a").name, names.RPC_PORT)
    assert fw.denied[key] >= 1 and fw.reasons[key].startswith("egress"), fw.reasons
    # A pod no policy selects may send anything; A's ingress still refuses it.
    rogue = probe(sim, "rogue", "pipe-a", names.RPC_PORT)
    assert not rogue["reached"], rogue
    key = (one(sim, "rogue").name, one(sim, "pipe-a").name, names.RPC_PORT)
    assert fw.denied[key] == 1 and fw.reasons[key].startswith("ingress"), fw.reasons
    # The Ingress's labels may call A, not B directly.
    assert probe(sim, "as-ingress", "pipe-a", names.RPC_PORT)["reached"]
    assert not probe(sim, "as-ingress", "pipe-b", names.RPC_PORT)["reached"]
    assert fw.count("denied", src="as-ingress", dst="pipe-b", port=names.RPC_PORT) == 1


def test_egress_is_enforced_on_its_own(sim: PodSim) -> None:
    # rogue admits everything (no policy selects it); the app's pods may not send to it.
    fw = sim.firewall
    assert probe(sim, "scraper", "rogue", 8080, kind="http")["reached"]
    for src in ("as-ingress", "as-a", "as-b"):
        result = probe(sim, src, "rogue", 8080, kind="http")
        assert not result["reached"], (src, result)
        assert fw.count("denied", src=src, dst="rogue", port=8080) == 1
        key = (one(sim, src).name, one(sim, "rogue").name, 8080)
        assert fw.reasons[key].startswith("egress"), fw.reasons


def test_the_metrics_port_admits_only_the_monitoring_namespace(sim: PodSim) -> None:
    fw = sim.firewall
    for dep in ("pipe-ingress", "pipe-a", "pipe-b"):
        scraped = probe(sim, "scraper", dep, names.ADMIN_PORT, kind="http")
        assert scraped["reached"] and scraped["detail"] == "HTTP 200", (dep, scraped)
        assert not probe(sim, "rogue", dep, names.ADMIN_PORT, kind="http")["reached"], dep
        assert fw.count("denied", src="rogue", dst=dep, port=names.ADMIN_PORT) == 1
        # The node (kubelet probes, this test) is always allowed.
        assert get(one(sim, dep).ip, names.ADMIN_PORT, "/-/healthz")[0] == 200
    # Same namespace as the app, even a caller: no scraping.
    assert not probe(sim, "as-ingress", "pipe-a", names.ADMIN_PORT, kind="http")["reached"]
    # The monitoring namespace gets the admin port only, not RPC.
    assert not probe(sim, "scraper", "pipe-a", names.RPC_PORT)["reached"]
    # The HTTP port admits the app's own namespace (no Gateway in this build), not monitoring.
    assert probe(sim, "rogue", "pipe-ingress", names.HTTP_PORT, kind="http")["reached"]
    assert not probe(sim, "scraper", "pipe-ingress", names.HTTP_PORT, kind="http")["reached"]


def test_dropped_connections_time_out_at_the_caller(sim: PodSim) -> None:
    sim.firewall.mode = "drop"
    try:
        result = probe(sim, "rogue", "pipe-b", names.RPC_PORT, timeout=1.0)
    finally:
        sim.firewall.mode = "reset"
    assert not result["reached"] and result["detail"].startswith("timeout"), result
    assert sim.firewall.count("denied", src="rogue", dst="pipe-b", port=names.RPC_PORT) == 1


def test_without_policies_in_the_build_everything_is_allowed(tmp_path: Path) -> None:
    objects = app_and_probers(tmp_path, policies=False)
    with started([o for o in objects if o["metadata"]["name"] not in ("as-ingress", "scraper")]) as s:
        host, port = s.service_address(names.ingress_service_name(APP))
        assert get(host, port, "/?q=x")[0] == 200
        for src, dst, p, kind in (("as-b", "pipe-a", names.RPC_PORT, "tls"), ("rogue", "pipe-a", names.RPC_PORT, "tls"),
                                  ("rogue", "pipe-b", names.ADMIN_PORT, "http"), ("as-a", "rogue", 8080, "http")):
            result = probe(s, src, dst, p, kind)
            assert result["reached"], (src, dst, p, result)
            assert s.firewall.count("allowed", src=src, dst=dst, port=p) == 1
        assert s.firewall.count("denied") == 0
        assert s.firewall.count("allowed", src="pipe-a", dst="pipe-b") >= 1  # still checked, and passed


def test_enforcement_off_leaves_pods_on_their_own_addresses(tmp_path: Path) -> None:
    deny_all = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "deny-all", "namespace": "default"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
    objects = [deny_all, prober("one", {"app": "one"}), prober("two", {"app": "two"})]
    from conftest import child_pids, wait_until

    before = child_pids()
    with PodSim(objects, python_path=[str(HERE)], network_policies=False) as s:
        s.start(wait=False)
        assert wait_for(lambda: _answers(s, "one") and _answers(s, "two"), 30), s.logs()
        assert one(s, "one").listen_ip == ""
        assert probe(s, "one", "two", 8080, kind="http")["reached"]
        assert s.firewall.count("allowed") == s.firewall.count("denied") == 0
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def test_socket_owner_inode_finds_the_client_end() -> None:
    import os
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, peer = server.accept()
    try:
        inode = socket_owner_inode(peer, server.getsockname())
        assert inode == os.fstat(client.fileno()).st_ino
        assert socket_owner_inode(server.getsockname(), peer) == os.fstat(conn.fileno()).st_ino
        assert socket_owner_inode(("127.0.0.1", 1), ("127.0.0.1", 2)) is None
    finally:
        for s in (client, conn, server):
            s.close()
