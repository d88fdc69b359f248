"""The dashboard's data and responses (shoal.observability.dashboard), without processes."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from shoal import serve
from shoal.deployment import build_app_spec
from shoal.observability.dashboard import describe_apps, page, respond, status_document
from shoal.status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    ServeStatus,
)


@serve.deployment(user_config={"api_token": "sk-very-secret"}, num_replicas=2,
                  ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"DB_PASSWORD": "hunter2"}}})
class Model:
    def __init__(self, password: str) -> None:
        self.password = password

    def reconfigure(self, config: dict[str, str]) -> None:
        pass


@serve.deployment(autoscaling_config={"min_replicas": 0, "max_replicas": 4})
class Front:
    def __init__(self, model: Any, other: Any) -> None:
        pass


@serve.deployment
class Other:
    pass


def spec() -> Any:
    return build_app_spec(Front.bind(Model.bind("init-arg-secret"), Other.bind()), "shop", "/shop")


def test_describe_apps_has_the_graph_and_no_secrets() -> None:
    graphs = describe_apps([spec()])
    shop = graphs["shop"]
    assert shop["ingress"] == "Front" and shop["route_prefix"] == "/shop"
    assert sorted(map(tuple, shop["edges"])) == [("Front", "Model"), ("Front", "Other")]
    model = shop["deployments"]["Model"]
    assert model["num_replicas"] == 2 and model["num_cpus"] == 0.5 and model["has_user_config"] is True
    assert shop["deployments"]["Front"]["autoscaling"] == {"min_replicas": 0, "max_replicas": 4,
                                                           "target_ongoing_requests": 2.0}
    text = json.dumps(graphs)
    for secret in ("sk-very-secret", "hunter2", "DB_PASSWORD", "init-arg-secret", "api_token"):
        assert secret not in text


def sample_status() -> ServeStatus:
    dep = DeploymentStatusOverview(DeploymentStatus.UNHEALTHY, {"RUNNING": 1}, "replica constructor failed: "
                                   "ValueError: boom\nTraceback (most recent call last):\n  File secret.py",
                                   version="v1", target_replicas=2,
                                   metrics={"requests": 3, "errors": 1, "error_rate": 0.3333, "p50_ms": 5.0,
                                            "p95_ms": float("inf"), "p99_ms": float("inf")})
    app = ApplicationStatusOverview(ApplicationStatus.UNHEALTHY, "deployment 'Model': boom\nmore", 1.0,
                                    {"Model": dep}, "/shop", "Front", version="abc", metrics=dict(dep.metrics))
    return ServeStatus(applications={"shop": app}, http_address="http://127.0.0.1:1")


def test_status_document_merges_graph_and_cuts_messages() -> None:
    doc = status_document(sample_status().to_dict(), describe_apps([spec()]), now=12.5)
    assert doc["time"] == 12.5 and doc["http_address"] == "http://127.0.0.1:1"
    shop = doc["applications"]["shop"]
    assert ["Front", "Model"] in shop["edges"]
    model = shop["deployments"]["Model"]
    assert model["message"] == "replica constructor failed: ValueError: boom"
    assert shop["message"] == "deployment 'Model': boom"
    assert model["options"]["num_replicas"] == 2 and model["metrics"]["p99_ms"] == "+Inf"
    json.loads(json.dumps(doc, allow_nan=False))  # valid JSON for a browser: no Infinity


@dataclass
class Options:
    dashboard: bool = True


class Client:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.ops: list[str] = []

    async def call(self, op: str, timeout: float | None = 30.0, **args: Any) -> Any:
        self.ops.append(op)
        if self.fail:
            raise ConnectionError("lost the connection to the controller")
        return sample_status() if op == "status" else describe_apps([spec()])


@dataclass
class Front_:
    options: Any
    client: Any


async def ask(front: Front_, path: str, method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await respond(front, path, {"type": "http", "method": method, "path": path}, send, "rid-1")
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


async def test_status_json() -> None:
    client = Client()
    status, headers, body = await ask(Front_(Options(), client), "/-/status.json")
    assert status == 200 and headers[b"content-type"] == b"application/json"
    assert headers[b"cache-control"] == b"no-store"
    doc = json.loads(body)
    assert doc["applications"]["shop"]["deployments"]["Model"]["options"]["max_ongoing_requests"] == 5
    assert sorted(client.ops) == ["app_graphs", "status"]
    assert headers[b"x-request-id"] == b"rid-1"


async def test_page_has_a_strict_content_security_policy() -> None:
    status, headers, body = await ask(Front_(Options(), Client()), "/-/dashboard")
    assert status == 200 and headers[b"content-type"].startswith(b"text/html")
    csp = headers[b"content-security-policy"].decode()
    script = re.search(r"<script>(.*?)</script>", body.decode(), re.S)
    assert script is not None
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")  # nothing fetched from elsewhere
    assert page()[0] == body


async def test_off_read_only_and_unavailable() -> None:
    assert (await ask(Front_(Options(dashboard=False), Client()), "/-/dashboard"))[0] == 404
    assert (await ask(Front_(Options(dashboard=False), Client()), "/-/status.json"))[0] == 404
    status, headers, _ = await ask(Front_(Options(), Client()), "/-/status.json", method="POST")
    assert status == 405 and headers[b"allow"] == b"GET, HEAD"
    status, _, body = await ask(Front_(Options(), Client()), "/-/dashboard", method="HEAD")
    assert status == 200 and body == b""
    status, headers, _ = await ask(Front_(Options(), Client(fail=True)), "/-/status.json")
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert (await ask(Front_(Options(), object()), "/-/status.json"))[0] == 404  # no controller (a pod)
