"""gRPC in ``shoal k8s build`` (grpc_options): the objects (ports, probes, Service, NetworkPolicies,
GRPCRoute, the ConfigMap the pods read), their schema validation (Kubernetes' and the Gateway API
CRD's), the errors and warnings. The pods serving it are test_sim_grpc.py."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal.exceptions import CompileError
from shoal.kubernetes import names
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.compiler.front import FRONT_LABEL
from shoal.kubernetes.netpol import Endpoint, allowed
from shoal.kubernetes.targets import grpc_options_of, load_apps
from shoal.kubernetes.validate import validate_objects

protoc = pytest.importorskip("grpc_tools.protoc")
from grpc_protos import compiled  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
from k8s_grpc_app import MODULE, PROTO, SERVICER  # noqa: E402

Obj = dict[str, Any]
OPTS = CompileOptions(namespace="ml", image="registry.example.com/echo:1", version="v1", gateway="web")
GRPC = {"port": 9000, "grpc_servicer_functions": [SERVICER]}


@pytest.fixture(scope="module", autouse=True)
def protos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The service's generated modules, importable while compiling (the build imports the servicer functions)."""
    with compiled(tmp_path_factory.mktemp("protos"), MODULE, PROTO) as out:
        yield out


def build(tmp: Path, grpc: Obj | None = GRPC, apps: list[Obj] | None = None, http: Obj | None = None,
          **changes: Any) -> tuple[list[Obj], list[str]]:
    """``shoal k8s build serve.yaml`` of a config with these grpc_options (the CLI's own loading)."""
    config: Obj = {"applications": apps or [{"name": "echo", "route_prefix": "/", "import_path": "k8s_grpc_app:app"}]}
    if grpc is not None:
        config["grpc_options"] = grpc
    if http is not None:
        config["http_options"] = http
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded, http_options = load_apps(str(path))
    res = compile_apps([(a.spec, a.entry) for a in loaded], dataclasses.replace(OPTS, **changes),
                       http_options=http_options, grpc_options=grpc_options_of(str(path)))
    return res.objects, res.warnings


def find(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def container(dep: Obj) -> Obj:
    return dep["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def crd_errors(route: Obj) -> list[str]:
    """The route's spec against the GRPCRoute CRD's own schema (Gateway API v1.1.0, strict)."""
    import jsonschema

    def strict(schema: Any) -> Any:
        if isinstance(schema, dict):
            out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
            if "properties" in schema and "additionalProperties" not in schema:
                out["additionalProperties"] = False
            return out
        return [strict(v) for v in schema] if isinstance(schema, list) else schema

    doc = json.loads((DATA / "gateway-api-v1.1.0-grpcroute-spec.json").read_text())
    validator = jsonschema.Draft7Validator(strict(doc["spec"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(route["spec"])]


def test_the_ingress_pods_serve_grpc_behind_the_service_and_a_grpcroute(tmp_path: Path) -> None:
    pytest.importorskip("jsonschema")
    objs, warnings = build(tmp_path)
    assert warnings == []
    validate_objects(objs)  # Kubernetes 1.30's schemas (grpc probes included), the GRPCRoute's CRD schema
    c = container(one(objs, "Deployment", "echo-echo"))
    assert {"name": "grpc", "containerPort": names.GRPC_PORT, "protocol": "TCP"} in c["ports"]
    assert {"name": names.ENV_GRPC_APP, "value": "echo"} in c["env"]
    # Startup: the kubelet's gRPC probe of the health service; readiness and liveness stay HTTP.
    assert c["startupProbe"]["grpc"] == {"port": names.GRPC_PORT} and "httpGet" not in c["startupProbe"]
    assert c["startupProbe"]["failureThreshold"] > 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/-/healthz"
    # The pods read grpc_options from the ConfigMap, on their own gRPC port.
    serve_yaml = yaml.safe_load(one(objs, "ConfigMap", "echo-config")["data"]["serve.yaml"])
    assert serve_yaml["grpc_options"] == {"port": names.GRPC_PORT, "grpc_servicer_functions": [SERVICER]}
    # The Service: the configured port, to the pods' grpc port.
    ports = one(objs, "Service", "echo-http")["spec"]["ports"]
    assert ports[1] == {"name": "grpc", "port": 9000, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
    # The NetworkPolicy admits gRPC where it admits HTTP.
    rules = one(objs, "NetworkPolicy", "echo-echo")["spec"]["ingress"]
    http_rule = [r for r in rules if {"protocol": "TCP", "port": names.HTTP_PORT} in r["ports"]]
    assert len(http_rule) == 1 and {"protocol": "TCP", "port": names.GRPC_PORT} in http_rule[0]["ports"]
    policies = find(objs, "NetworkPolicy")
    pod_labels = one(objs, "Deployment", "echo-echo")["spec"]["template"]["metadata"]["labels"]
    outside = Endpoint(namespace="ml", labels={"app": "client"})
    pod = Endpoint(namespace="ml", labels=pod_labels)
    assert allowed(policies, outside, pod, names.GRPC_PORT) and allowed(policies, outside, pod, names.HTTP_PORT)
    # The GRPCRoute: on the HTTPRoute's Gateway; by `application`, and the only app for calls naming none.
    route = one(objs, "GRPCRoute", "echo-grpc")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == one(objs, "HTTPRoute", "echo")["spec"]["parentRefs"]
    backend = {"group": "", "kind": "Service", "name": "echo-http", "port": 9000}
    assert route["spec"]["rules"] == [
        {"matches": [{"headers": [{"type": "Exact", "name": "application", "value": "echo"}]}],
         "backendRefs": [backend]},
        {"backendRefs": [backend]},
    ]
    assert crd_errors(route) == []


def test_several_apps_route_by_application_and_the_first_takes_the_rest(tmp_path: Path) -> None:
    apps = [{"name": "first", "route_prefix": "/a", "import_path": "k8s_grpc_app:app"},
            {"name": "inner", "route_prefix": None, "import_path": "k8s_grpc_app:app"},
            {"name": "second", "route_prefix": "/b", "import_path": "k8s_grpc_app:app"}]
    objs, _ = build(tmp_path, apps=apps)
    first, second = one(objs, "GRPCRoute", "first-grpc"), one(objs, "GRPCRoute", "second-grpc")
    assert len(first["spec"]["rules"]) == 2 and "matches" not in first["spec"]["rules"][1]
    assert second["spec"]["rules"] == [{
        "matches": [{"headers": [{"type": "Exact", "name": "application", "value": "second"}]}],
        "backendRefs": [{"group": "", "kind": "Service", "name": "second-http", "port": 9000}]}]
    # The app without a route serves no gRPC (as on one machine): no port, no route.
    assert not [o for o in objs if o["metadata"]["name"].startswith("inner-") and o["kind"] in ("GRPCRoute", "Service")
                and "grpc" in json.dumps(o)]
    inner = container(one(objs, "Deployment", "inner-echo"))
    assert "grpc" not in {p["name"] for p in inner["ports"]} and "grpc_options" not in \
        one(objs, "ConfigMap", "inner-config")["data"]["serve.yaml"]
    assert crd_errors(first) == [] and crd_errors(second) == []


def test_a_canary_splits_grpc_like_http(tmp_path: Path) -> None:
    objs, _ = build(tmp_path, version="v2", canary_of="v1", canary_weight=20)
    http_refs = one(objs, "HTTPRoute", "echo")["spec"]["rules"][0]["backendRefs"]
    route = one(objs, "GRPCRoute", "echo-grpc")
    refs = route["spec"]["rules"][0]["backendRefs"]
    assert [(r["name"], r["weight"], r["port"]) for r in refs] == [(h["name"], h["weight"], 9000) for h in http_refs]
    assert route["metadata"]["annotations"]["shoal.dev/canary-of"] == "v1"
    # Both Services have the grpc port; the canary's pods answer to the app's own name.
    for ref in refs:
        assert "grpc" in {p["name"] for p in one(objs, "Service", ref["name"])["spec"]["ports"]}
    assert {"name": names.ENV_GRPC_APP, "value": "echo"} in container(one(objs, "Deployment", "echo-v2-echo"))["env"]


def test_the_holding_front_serves_grpc_too(tmp_path: Path) -> None:
    apps = [{"name": "zero", "route_prefix": "/", "import_path": "k8s_zero_app:app"}]
    objs, _ = build(tmp_path, apps=apps)
    validate_objects(objs)
    front = container(one(objs, "Deployment", names.front_name("zero")))
    assert {"name": "grpc", "containerPort": names.GRPC_PORT, "protocol": "TCP"} in front["ports"]
    assert front["startupProbe"]["grpc"] == {"port": names.GRPC_PORT}
    policy = one(objs, "NetworkPolicy", names.front_name("zero"))["spec"]["ingress"][0]
    assert policy["ports"] == [{"protocol": "TCP", "port": names.HTTP_PORT},
                               {"protocol": "TCP", "port": names.GRPC_PORT}]
    assert one(objs, "Service", "zero-http")["spec"]["selector"]["app.kubernetes.io/name"] == FRONT_LABEL
    # The ingress pods are reached by the front only (RPC), on neither HTTP nor gRPC.
    gate_rules = one(objs, "NetworkPolicy", "zero-gate")["spec"]["ingress"]
    assert not [r for r in gate_rules if {"protocol": "TCP", "port": names.GRPC_PORT} in r["ports"]]


def test_tls_on_the_http_port_keeps_the_http_startup_probe(tmp_path: Path) -> None:
    # (Files the build can see; in the image they hold the HTTP port's certificate and key.)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("certificate")
    key.write_text("key")
    objs, _ = build(tmp_path, http={"ssl_certfile": str(cert), "ssl_keyfile": str(key)})
    c = container(one(objs, "Deployment", "echo-echo"))
    assert c["startupProbe"]["httpGet"]["path"] == "/-/healthz" and "grpc" not in c["startupProbe"]
    assert "grpc" in {p["name"] for p in c["ports"]}


def test_without_grpc_options_nothing_changes(tmp_path: Path) -> None:
    with_grpc, _ = build(tmp_path)
    without, _ = build(tmp_path, grpc=None)
    assert not find(without, "GRPCRoute") and "grpc" not in json.dumps(without).replace("grpc_", "")
    # A module:app target has no grpc_options.
    assert grpc_options_of("k8s_grpc_app:app") is None
    assert len(with_grpc) == len(without) + 1  # the GRPCRoute


def test_gateway_api_before_1_1_and_ingress_class_get_no_grpc_route(tmp_path: Path) -> None:
    objs, warnings = build(tmp_path, gateway_api_version="1.0")
    assert not find(objs, "GRPCRoute") and any("GRPCRoute" in w and "v1.1" in w for w in warnings)
    objs, warnings = build(tmp_path, gateway=None, ingress_class="nginx")
    assert not find(objs, "GRPCRoute") and any("no gRPC route" in w for w in warnings)


@pytest.mark.parametrize(("grpc", "message"), [
    ({"port": 0, "grpc_servicer_functions": [SERVICER]}, r"grpc_options\.port: 0"),
    ({"port": 8000, "grpc_servicer_functions": [SERVICER]}, r"grpc_options\.port: 8000 is the HTTP port"),
    ({"grpc_servicer_functions": ["no_such_module_pb2_grpc.add_X_to_server"]},
     r"grpc_options\.grpc_servicer_functions\[0\]: cannot import module 'no_such_module_pb2_grpc'"),
    ({"grpc_servicer_functions": [f"{MODULE}_pb2_grpc.add_NopeServicer_to_server"]},
     r"grpc_options\.grpc_servicer_functions\[0\]: .* has no 'add_NopeServicer_to_server'"),
])
def test_grpc_options_that_cannot_be_served_are_refused(tmp_path: Path, grpc: Obj, message: str) -> None:
    with pytest.raises(CompileError, match=message):
        build(tmp_path, grpc=grpc)


def test_grpc_options_without_routed_apps_warn(tmp_path: Path) -> None:
    apps = [{"name": "inner", "route_prefix": None, "import_path": "k8s_grpc_app:app"}]
    objs, warnings = build(tmp_path, apps=apps)
    assert not find(objs, "GRPCRoute") and any("no application has a route_prefix" in w for w in warnings)
