"""The holding front of an ingress that scales to zero: its objects (compiled, validated, NetworkPolicies
evaluated), ``--ingress-at-zero``, the scaler's view of it, and ``shoal front`` as a real process.

The end-to-end behaviour in the pod simulation (held, woken, 503 after the deadline, back to zero)
is test_sim_ingress_zero.py.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from shoal import serve
from shoal.deployment import build_app_spec
from shoal.exceptions import CompileError
from shoal.kubernetes import names
from shoal.kubernetes.cli import k8s
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.compiler.front import FRONT_LABEL
from shoal.kubernetes.netpol import Endpoint, allowed
from shoal.kubernetes.targets import LoadedApp, load_apps
from shoal.kubernetes.validate import restricted_violations, validate_objects

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ZERO = "tests.kubernetes.k8s_zero_app:app"
NS = "ml"
BASE = CompileOptions(namespace=NS, image="registry.example.com/zero:1", version="v1", gateway="web",
                      gateway_namespace="infra", wake_timeout_s=45)
APP = "default"

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def zero() -> LoadedApp:
    apps, _ = load_apps(ZERO)
    return apps[0]


def build(app: LoadedApp, **changes: Any) -> tuple[list[Obj], list[str]]:
    res = compile_apps([(app.spec, app.entry)], dataclasses.replace(BASE, **changes))
    return res.objects, res.warnings


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    (found,) = find(objs, kind, name)
    return found


def env_of(dep: Obj) -> dict[str, Any]:
    container = dep["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_front_objects_validate_and_point_at_each_other(zero: LoadedApp) -> None:
    objs, warnings = build(zero)
    validate_objects(objs)
    assert not any("raised to 1" in w for w in warnings), warnings
    name = names.front_name(APP)
    assert one(objs, "ScaledObject", "default-gate")["spec"]["minReplicaCount"] == 0
    dep = one(objs, "Deployment", name)
    pod = dep["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert dep["spec"]["replicas"] == 1
    assert restricted_violations(pod["spec"]) == []
    assert container["command"] == ["shoal", "front"]
    assert container["args"] == ["--ingress=Gate", "--max-ongoing-requests", "8", "--max-queued-requests", "-1",
                                 "--max-queue-wait", "120", "--drain-timeout", "45"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == FRONT_LABEL
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": names.HTTP_PORT,
                                                                          "admin": names.ADMIN_PORT}
    # Held requests: the wake deadline, the scaler (demand) and its token; the wire secret and TLS.
    env = env_of(dep)
    assert env[names.ENV_WAKE_TIMEOUT] == "45"
    assert env[names.ENV_SCALER_URL] == f"http://{names.scaler_name(APP)}.{NS}.svc.cluster.local:{names.SCALER_PORT}"
    assert env[names.ENV_SCALER_TOKEN]["secretKeyRef"]["name"] == names.scaler_token_secret_name(APP)
    assert env[names.ENV_SECRET]["secretKeyRef"]["name"] == names.secret_name(APP)
    assert env[names.ENV_TLS_DIR] == names.TLS_MOUNT_DIR
    # A stopping front answers what it holds: its drain covers the wake deadline.
    assert pod["spec"]["terminationGracePeriodSeconds"] == BASE.prestop_sleep_s + 45 + 5
    # The route's Service selects the front; the front's headless Service lists it for the scaler.
    selector = dep["spec"]["selector"]["matchLabels"]
    http_svc = one(objs, "Service", names.ingress_service_name(APP))
    assert http_svc["spec"]["selector"] == selector
    headless = one(objs, "Service", name)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == selector
    assert headless["spec"]["ports"][0]["port"] == names.ADMIN_PORT
    (rule,) = one(objs, "HTTPRoute", APP)["spec"]["rules"]
    assert [b["name"] for b in rule["backendRefs"]] == [names.ingress_service_name(APP)]
    scaler = one(objs, "Deployment", names.scaler_name(APP))["spec"]["template"]["spec"]["containers"][0]
    assert scaler["args"][-2:] == ["--ingress-at-zero", "front"]


def _pods(objs: list[Obj]) -> dict[str, Endpoint]:
    """An Endpoint per Deployment (the app's deployments, the scaler and the front), by name."""
    out = {}
    for d in find(objs, "Deployment"):
        tmpl = d["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for p in tmpl["spec"]["containers"][0]["ports"]}
        out[d["metadata"]["name"]] = Endpoint(labels=tmpl["metadata"]["labels"], namespace=NS, ports=ports)
    return out


def test_front_network_policies(zero: LoadedApp) -> None:
    objs, _ = build(zero)
    pods = _pods(objs)
    front, gate, scaler = pods[names.front_name(APP)], pods["default-gate"], pods[names.scaler_name(APP)]
    gateway = Endpoint(labels={"app": "envoy"}, namespace="infra")
    elsewhere = Endpoint(labels={"app": "x"}, namespace="other")
    same_ns = Endpoint(labels={"app": "x"}, namespace=NS)
    # Gateway -> front (HTTP); nobody else, and no longer straight to the ingress pods.
    assert allowed(objs, gateway, front, names.HTTP_PORT)
    assert not allowed(objs, elsewhere, front, names.HTTP_PORT)
    assert not allowed(objs, same_ns, front, names.HTTP_PORT)
    assert not allowed(objs, gateway, gate, names.HTTP_PORT)
    # front -> ingress pods on RPC only.
    assert allowed(objs, front, gate, names.RPC_PORT)
    assert not allowed(objs, front, gate, names.HTTP_PORT)
    assert not allowed(objs, front, gate, names.ADMIN_PORT)
    # front -> scaler (demand); scaler -> front's admin port (the requests it holds).
    assert allowed(objs, front, scaler, names.SCALER_PORT)
    assert allowed(objs, scaler, front, names.ADMIN_PORT)
    assert allowed(objs, Endpoint(labels={}, namespace="monitoring"), front, names.ADMIN_PORT)
    # Nothing else from the front: not the scaler's admin port, not outside.
    assert not allowed(objs, front, scaler, names.ADMIN_PORT)
    assert not allowed(objs, front, elsewhere, 443)


def test_keep_one_and_when_there_is_no_front(zero: LoadedApp) -> None:
    objs, warnings = build(zero, ingress_at_zero="keep-one")
    validate_objects(objs)
    assert not find(objs, "Deployment", names.front_name(APP)) and not find(objs, "Service", names.front_name(APP))
    assert one(objs, "ScaledObject", "default-gate")["spec"]["minReplicaCount"] == 1
    assert any("min_replicas 0 raised to 1 (--ingress-at-zero keep-one)" in w for w in warnings)
    gate = one(objs, "Deployment", "default-gate")
    assert one(objs, "Service", names.ingress_service_name(APP))["spec"]["selector"] == \
        gate["spec"]["selector"]["matchLabels"]
    scaler = one(objs, "Deployment", names.scaler_name(APP))["spec"]["template"]["spec"]["containers"][0]
    assert "--ingress-at-zero" not in scaler["args"]
    pods = _pods(objs)
    assert allowed(objs, Endpoint(labels={}, namespace="infra"), pods["default-gate"], names.HTTP_PORT)
    # HPAs cannot scale to zero at all (an error, as for any deployment); an ingress at 1 needs no front.
    with pytest.raises(CompileError, match="min_replicas 0"):
        build(zero, autoscaler="hpa")

    @serve.deployment(name="Gate", autoscaling_config={"min_replicas": 1, "max_replicas": 2})
    class AtOne:
        pass

    at_one = LoadedApp(spec=build_app_spec(AtOne.bind(), name=APP), entry={"name": APP, "import_path": "x:app"})
    objs, _ = build(at_one)
    assert not find(objs, "Deployment", names.front_name(APP))
    # No route (no HTTP): nothing to hold either.
    no_route = LoadedApp(spec=build_app_spec(AtOne.options(autoscaling_config={"min_replicas": 0}).bind(),
                                             name=APP, route_prefix=None),
                         entry={"name": APP, "import_path": "x:app", "route_prefix": None})
    objs, _ = build(no_route)
    assert not find(objs, "Deployment", names.front_name(APP))
    assert one(objs, "ScaledObject", "default-gate")["spec"]["minReplicaCount"] == 0


def test_names_the_front_takes_are_refused(zero: LoadedApp) -> None:
    with pytest.raises(CompileError, match="--ingress-at-zero"):
        build(zero, ingress_at_zero="sometimes")  # type: ignore[arg-type]

    @serve.deployment(name=FRONT_LABEL)
    class Taker:
        pass

    @serve.deployment(name="Gate", autoscaling_config={"min_replicas": 0, "max_replicas": 2})
    class Gate:
        def __init__(self, other: Any) -> None:
            pass

    spec = build_app_spec(Gate.bind(Taker.bind()), name=APP)
    with pytest.raises(CompileError, match="holding front"):
        build(LoadedApp(spec=spec, entry={"name": APP, "import_path": "x:app"}))


def test_the_cli_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    args = ["build", ZERO, "-n", NS, "--image", "registry.example.com/zero:1", "--version", "v1"]
    front = CliRunner().invoke(k8s, args, catch_exceptions=False)
    assert front.exit_code == 0, front.output
    assert f"name: {names.front_name(APP)}\n" in front.stdout
    keep = CliRunner().invoke(k8s, [*args, "--ingress-at-zero", "keep-one"], catch_exceptions=False)
    assert keep.exit_code == 0, keep.output
    assert names.front_name(APP) not in keep.stdout and "raised to 1" in keep.stderr
    bad = CliRunner().invoke(k8s, [*args, "--ingress-at-zero", "never"])
    assert bad.exit_code == 2 and "--ingress-at-zero" in bad.output


def test_the_scaler_keeps_the_ingress_at_zero_only_with_a_front(tmp_path: Path) -> None:
    from shoal.kubernetes.scaler.command import load_autoscaling

    sys.path.insert(0, str(HERE))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "zero", "import_path": "k8s_zero_app:app"}]}))
    assert load_autoscaling(str(path), None)[2]["Gate"].min_replicas == 1  # keep-one: as compiled without a front
    assert load_autoscaling(str(path), None, "front")[2]["Gate"].min_replicas == 0


# --- `shoal front` as a process -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str, headers: dict[str, str] | None = None,
         timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"connection": "close", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@dataclasses.dataclass
class Front:
    proc: subprocess.Popen[bytes]
    http: int
    admin: int
    log: Path


@pytest.fixture
def front_process(tmp_path: Path) -> Iterator[Any]:
    """Start ``shoal front`` processes on free loopback ports; stopped (by PID) afterwards."""
    started: list[Front] = []

    def start(*args: str, config: Obj | None = None, env: dict[str, str] | None = None) -> Front:
        cfg = tmp_path / f"serve-{len(started)}.yaml"
        cfg.write_text(yaml.safe_dump(config or {"applications": [
            {"name": "solo", "route_prefix": "/", "import_path": "k8s_zero_app:app"}]}))
        resolver = tmp_path / "resolver.json"
        resolver.write_text("{}")  # cluster DNS knows no ingress pod
        http_port, admin_port = _free_port(), _free_port()
        log = tmp_path / f"front-{len(started)}.log"
        full_env = {**os.environ, names.ENV_SECRET: "s" * 32, names.ENV_RESOLVER_FILE: str(resolver),
                    names.ENV_POD_NAME: "front-test", names.ENV_WAKE_TIMEOUT: "1.5", **(env or {})}
        argv = [sys.executable, "-m", "shoal.cli.main", "front", "--config", str(cfg), "--host", "127.0.0.1",
                "--http-port", str(http_port), "--admin-port", str(admin_port), "--insecure-no-tls", *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=str(HERE))
        started.append(Front(proc, http_port, admin_port, log))
        return started[-1]

    yield start
    for f in started:
        if f.proc.poll() is None:
            f.proc.send_signal(signal.SIGTERM)
            try:
                f.proc.wait(10)
            except subprocess.TimeoutExpired:
                f.proc.kill()
                f.proc.wait(5)


def _ready(front: Front, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if front.proc.poll() is not None:
            return False
        try:
            if _get(front.admin, "/-/ready", timeout=2)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def test_shoal_front_holds_then_answers_503_and_drains(front_process: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k-0123456789abcdef\n")
    f = front_process("--ingress", "Gate", "--max-ongoing-requests", "3",
                      env={names.ENV_API_KEYS_FILE: str(keys)})
    assert _ready(f), f.log.read_text()
    assert _get(f.admin, "/-/healthz")[0] == 200
    assert _get(f.http, "/?q=1")[0] == 401  # credentials are checked at the front
    status, headers, body = _get(f.http, "/?q=1", {"authorization": "Bearer k-0123456789abcdef"})
    assert status == 503 and headers.get("retry-after"), (status, headers, body)
    assert "wake deadline" in json.loads(body)["message"]
    status, _, page = _get(f.admin, "/metrics")
    assert status == 200
    text = page.decode()
    assert f'{names.METRIC_WAKE_TIMEOUTS}_total{{app="solo",deployment="Gate"}} 1.0' in text
    assert f'{names.METRIC_CALLER_QUEUED}{{app="solo",deployment="Gate"}} 0.0' in text
    f.proc.send_signal(signal.SIGTERM)
    assert f.proc.wait(20) == 0, f.log.read_text()
    assert "drained; exiting" in f.log.read_text()


def test_shoal_front_refuses_bad_options_and_configs(front_process: Any) -> None:
    f = front_process("--ingress", "Gate", "--max-ongoing-requests", "0")
    assert f.proc.wait(30) == 2
    assert "--max-ongoing-requests" in f.log.read_text()
    f = front_process("--ingress", "Gate", config={"applications": [
        {"name": "solo", "route_prefix": None, "import_path": "k8s_zero_app:app"}]})
    assert f.proc.wait(30) == 2
    assert "no route_prefix" in f.log.read_text()
    f = front_process("--ingress", "Gate", "--app", "nope")
    assert f.proc.wait(30) == 2
    assert "no application 'nope'" in f.log.read_text()
