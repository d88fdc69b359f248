"""gRPC to an ingress that scales to zero, end to end in the pod simulation, behind its holding front.

``shoal k8s build`` of a config with ``grpc_options`` and an ingress with ``min_replicas: 0``
(``--ingress-at-zero front``, the default) puts ``shoal front`` behind the app's Service, on its
``grpc`` port as on its HTTP one. Through the real path (the front's held calls -> demand to the
scaler pod -> the ScaledObject's metrics-api URL -> the KEDA stand-in -> the ingress Deployment),
a real grpcio client calling the Service's ``grpc`` port, with the generated NetworkPolicies
enforced on every connection:

* the app starts with no ingress pod; unary calls (client deadline far beyond the wake time) are
  held by the front, the ingress wakes, and every held call succeeds, answered by an ingress pod;
* with the ingress unable to start (its constructor fails), a call gets ``UNAVAILABLE`` naming the
  (shortened) wake deadline once it has passed: no call hangs.

Counts and outcomes are asserted, not latencies (these machines are noisy).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_sim_support import HERE, metric, running, wait_for

from shoal.kubernetes import names
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.sim import PodSim
from shoal.kubernetes.targets import grpc_options_of, load_apps

grpc = pytest.importorskip("grpc")
protoc = pytest.importorskip("grpc_tools.protoc")
from grpc_protos import compiled  # noqa: E402
from k8s_grpc_app import MODULE, PROTO, SERVICER  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")

APP = "gzero"
INGRESS = "Hold"
WAKE_S = 12.0  # the front's wake deadline here (waking Hold takes a few seconds in the simulation)
CLIENT_DEADLINE_S = WAKE_S + 30  # far beyond it: a call the front failed to answer shows up as DEADLINE_EXCEEDED
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with compiled(tmp_path_factory.mktemp("protos"), MODULE, PROTO, HERE) as out:
        yield out


def build(tmp: Path) -> list[dict[str, Any]]:
    config = {"grpc_options": {"port": 9000, "grpc_servicer_functions": [SERVICER],
                               "request_timeout_s": CLIENT_DEADLINE_S + 30},
              "applications": [{"name": APP, "route_prefix": "/", "import_path": "k8s_grpc_zero_app:app"}]}
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    apps, http = load_apps(str(path))
    # The simulation's KEDA stand-in reads the scaler without a TriggerAuthentication: no token here.
    options = CompileOptions(image="shoal:test", wake_timeout_s=WAKE_S, scaler_auth="none")
    return compile_apps([(a.spec, a.entry) for a in apps], options, http_options=http,
                        grpc_options=grpc_options_of(str(path))).objects


def grpc_address(sim: PodSim) -> str:
    """The app's Service, its ``grpc`` port (the simulated ClusterIP)."""
    service = names.ingress_service_name(APP)
    (port,) = [p["port"] for p in sim.services[service]["spec"]["ports"] if p["name"] == "grpc"]
    return f"{sim.network.vips[service]}:{port}"


@dataclasses.dataclass
class Outcome:
    code: Any = None  # grpc.StatusCode
    details: str = ""
    pod: str = ""
    text: str = ""
    seconds: float = 0.0


def calls(address: str, texts: list[str]) -> list[Outcome]:
    """One unary ``Say`` per text, concurrently, each on its own channel; every outcome recorded."""
    pb = importlib.import_module(f"{MODULE}_pb2")
    pb_grpc = importlib.import_module(f"{MODULE}_pb2_grpc")
    outcomes = [Outcome() for _ in texts]

    def one(text: str, out: Outcome) -> None:
        t0 = time.monotonic()
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            try:
                reply = pb_grpc.EchoStub(channel).Say(pb.EchoRequest(text=text), timeout=CLIENT_DEADLINE_S,
                                                      metadata=(("application", APP),))
                out.code, out.text, out.pod = grpc.StatusCode.OK, reply.text, reply.pod
            except grpc.RpcError as e:
                out.code, out.details = e.code(), e.details() or ""
            finally:
                out.seconds = time.monotonic() - t0

    threads = [threading.Thread(target=one, args=(t, o), daemon=True) for t, o in zip(texts, outcomes, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CLIENT_DEADLINE_S + 20)
    assert not any(t.is_alive() for t in threads), "a call hung past its client's deadline"
    return outcomes


def at_zero(sim: PodSim, workload: str) -> bool:
    """No pod of ``workload`` left, terminating ones included (one in its preStop still serves)."""
    return not [p for p in sim.pods_of(workload, include_terminating=True) if not p.gone]


def test_grpc_to_an_ingress_at_zero_is_held_woken_and_bounded(tmp_path: Path, protos: Path) -> None:
    fail = tmp_path / "fail"
    objs = build(tmp_path)
    ingress, front_wl = names.workload_name(APP, INGRESS), names.front_name(APP)
    with running(objs, replicas={ingress: 0}, env={"GRPC_ZERO_FAIL_FILE": str(fail)},
                 python_path=[str(HERE), str(protos)]) as sim:
        assert not sim.pods_of(ingress)
        (front,) = sim.pods_of(front_wl, ready=True)  # its grpc: startupProbe passed
        sim.keda.start(polling_s=0.25, cooldown_s=0.5)
        address = grpc_address(sim)
        # The Service selects the front only; what reached its gRPC port so far is the startupProbe.
        assert sim.endpoints(names.ingress_service_name(APP)) == [f"{front.ip}:{names.HTTP_PORT}"]
        probed = sim.firewall.count("allowed", dst=front_wl, port=names.GRPC_PORT)

        # 1. Held while the ingress is at zero, then answered once KEDA woke it.
        answers: list[Outcome] = []
        runner = threading.Thread(target=lambda: answers.extend(calls(address, [f"q{i}" for i in range(3)])),
                                  daemon=True)
        runner.start()
        held = wait_for(lambda: (metric(front, names.METRIC_CALLER_QUEUED, app=APP, deployment=INGRESS) or 0) >= 1,
                        10, 0.02)
        runner.join(CLIENT_DEADLINE_S + 40)
        assert not runner.is_alive()
        assert held, "the front never reported a held call"
        assert [(a.code, a.text) for a in answers] == [(grpc.StatusCode.OK, f"hello q{i}") for i in range(3)], answers
        woken = {p.name for p in sim.pods_of(ingress, include_terminating=True)}
        assert woken and {a.pod for a in answers} <= woken, (answers, woken)
        events = sim.keda.states[ingress].events
        assert sum(1 for _, a, b, _why in events if a == 0 and b >= 1) >= 1  # woken from zero by KEDA

        # 2. An ingress that cannot start: UNAVAILABLE after the wake deadline, not a hang.
        assert wait_for(lambda: at_zero(sim, ingress), 60, 0.1), sim.describe()
        fail.write_text("no")
        (refused,) = calls(address, ["doomed"])
        assert refused.code == grpc.StatusCode.UNAVAILABLE, refused
        assert "wake deadline" in refused.details, refused
        assert refused.seconds >= WAKE_S - 1, refused
        assert (metric(front, names.METRIC_WAKE_TIMEOUTS + "_total", app=APP, deployment=INGRESS) or 0) >= 1
        fail.unlink()

        # Every connection the front made was allowed by the generated NetworkPolicies, and it did reach
        # the ingress pods' RPC port through them.
        assert sim.firewall.count("denied", src=front_wl) == 0
        assert sim.firewall.count("denied", dst=front_wl) == 0
        # The calls reached the front's gRPC port (the client's channels share a connection; the probe made one before).
        assert sim.firewall.count("allowed", dst=front_wl, port=names.GRPC_PORT) > probed
        assert sim.firewall.count("denied", dst=ingress) == 0
        assert sim.firewall.count("allowed", src=front_wl, dst=ingress, port=names.RPC_PORT) >= 1
