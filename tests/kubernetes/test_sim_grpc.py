"""gRPC on Kubernetes, end to end in the pod simulation: ``shoal k8s build`` of a config with
``grpc_options``, its pods run as local processes, a real grpcio client calling the app through the
simulated Service address (the ``grpc`` port of the app's Service, forwarded as kube-proxy does, with
the NetworkPolicies enforced): unary and server-streaming calls, ``application`` routing, metadata,
status codes, and the standard health service (which also makes the pods' ``grpc:`` startupProbe
pass): ``SERVING`` while ready, ``NOT_SERVING`` once the pod drains."""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_sim_support import HERE, running, wait_for

from shoal.kubernetes import names
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.sim import PodSim
from shoal.kubernetes.targets import grpc_options_of, load_apps

grpc = pytest.importorskip("grpc")
protoc = pytest.importorskip("grpc_tools.protoc")
from grpc_protos import compiled  # noqa: E402
from k8s_grpc_app import MODULE, PROTO, SERVICER  # noqa: E402

from shoal.runtime.grpc_health import check  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")

APP = "echo"
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with compiled(tmp_path_factory.mktemp("protos"), MODULE, PROTO, HERE) as out:
        yield out


def build(tmp: Path) -> list[dict[str, Any]]:
    config = {"grpc_options": {"port": 9000, "grpc_servicer_functions": [SERVICER], "request_timeout_s": 20},
              "applications": [{"name": APP, "route_prefix": "/", "import_path": "k8s_grpc_app:app"}]}
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    apps, http = load_apps(str(path))
    return compile_apps([(a.spec, a.entry) for a in apps], CompileOptions(image="shoal:test", prestop_sleep_s=1),
                        http_options=http, grpc_options=grpc_options_of(str(path))).objects


def grpc_address(sim: PodSim) -> str:
    """The app's Service, its ``grpc`` port (the simulated ClusterIP)."""
    service = names.ingress_service_name(APP)
    (port,) = [p["port"] for p in sim.services[service]["spec"]["ports"] if p["name"] == "grpc"]
    return f"{sim.network.vips[service]}:{port}"


def test_grpc_through_the_service_of_a_simulated_cluster(tmp_path: Path, protos: Path) -> None:
    pb = importlib.import_module(f"{MODULE}_pb2")
    pb_grpc = importlib.import_module(f"{MODULE}_pb2_grpc")
    objs = build(tmp_path)
    ingress = names.workload_name(APP, "Echo")
    with running(objs, python_path=[str(HERE), str(protos)]) as sim:
        (pod,) = sim.wait_ready(ingress, 1)  # its grpc: startupProbe passed
        with grpc.insecure_channel(grpc_address(sim), options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.EchoStub(channel)
            # Unary, routed by the `application` metadata; request_id and the multiplexed model id go through.
            reply, call = stub.Say.with_call(pb.EchoRequest(text="k8s"), timeout=30, metadata=(
                ("application", APP), ("request_id", "rid-123"), ("multiplexed_model_id", "m1")))
            assert (reply.text, reply.app, reply.model, reply.pod) == ("hello k8s", APP, "m1", pod.name)
            assert reply.request_id == "rid-123"
            assert ("request_id", "rid-123") in tuple(call.trailing_metadata())
            # No `application`: the pod's only app.
            assert stub.Say(pb.EchoRequest(text="x"), timeout=30).text == "hello x"
            # Another application: NOT_FOUND, naming the one there is.
            with pytest.raises(grpc.RpcError) as err:
                stub.Say(pb.EchoRequest(text="x"), timeout=30, metadata=(("application", "other"),))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and APP in err.value.details()
            # Server streaming.
            items = list(stub.Repeat(pb.EchoRequest(text="s", count=3), timeout=30))
            assert [(i.text, i.index) for i in items] == [("s 0", 0), ("s 1", 1), ("s 2", 2)]
            # A user exception: INTERNAL with its message.
            with pytest.raises(grpc.RpcError) as err:
                stub.Fail(pb.EchoRequest(text="boom"), timeout=30)
            assert err.value.code() == grpc.StatusCode.INTERNAL and "ValueError: bad input: boom" in err.value.details()
            # The health service: the server, its service, an unknown one.
            assert check(channel, "", timeout=10) == "SERVING"
            assert check(channel, "shoalk8stest.Echo", timeout=10) == "SERVING"
            with pytest.raises(grpc.RpcError) as err:
                check(channel, "no.such.Service", timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

        # Watch on the pod itself: SERVING, then NOT_SERVING once it drains, and the call ends.
        seen: list[int] = []
        ended: list[BaseException | None] = []

        def watch() -> None:
            from shoal.generated import health_pb2
            from shoal.runtime.grpc_health import HEALTH_SERVICE

            with grpc.insecure_channel(f"{pod.ip}:{names.GRPC_PORT}", options=CHANNEL_OPTIONS) as ch:
                call = ch.unary_stream(f"/{HEALTH_SERVICE}/Watch",
                                       request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                       response_deserializer=health_pb2.HealthCheckResponse.FromString)
                try:
                    for msg in call(health_pb2.HealthCheckRequest(), timeout=60):
                        seen.append(msg.status)
                    ended.append(None)
                except grpc.RpcError as e:
                    ended.append(e)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert wait_for(lambda: bool(seen), 20), "no first Watch message"
        sim.terminate(pod)
        watcher.join(60)
        assert not watcher.is_alive(), "the Watch call did not end with the drain"
        assert seen == [1, 2], seen  # SERVING, then NOT_SERVING
        assert ended == [None], ended
