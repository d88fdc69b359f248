"""The dashboard (/-/dashboard, /-/status.json) of a running instance, and the page in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import child_pids, wait_until
from starlette.requests import Request

from shoal import serve
from shoal.handle import DeploymentHandle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@serve.deployment(num_replicas=2, user_config={"token": "do-not-show-me"})
class Embedder:
    def reconfigure(self, config: dict[str, str]) -> None:
        self.token = config["token"]

    def embed(self, text: str) -> list[int]:
        return [len(text)]


@serve.deployment
class Search:
    def __init__(self, embedder: DeploymentHandle) -> None:
        self.embedder = embedder

    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"v": await self.embedder.embed.remote(request.query_params.get("q", ""))}


def start(run_dir: str, **http: Any) -> Iterator[str]:
    before = child_pids()
    serve.start(http_options={"port": 0, **http}, _run_dir=run_dir)
    try:
        yield serve.http_address()
    finally:
        serve.shutdown()
        assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


@pytest.fixture(params=[True, False], ids=["ingress-serves-http", "via-proxy"])
def url(request: pytest.FixtureRequest, run_dir: str) -> Iterator[str]:
    yield from start(run_dir, ingress_serves_http=request.param)


def deploy_and_load(url: str, requests: int) -> None:
    serve.run(Search.bind(Embedder.bind()), name="search", route_prefix="/search")
    for i in range(requests):
        assert httpx.get(f"{url}/search?q={'x' * i}", timeout=30).status_code == 200

    def counted() -> bool:
        deps = serve.status().applications["search"].deployments
        return all(deps[d].metrics.get("requests", 0) >= requests for d in ("Search", "Embedder"))

    assert wait_until(counted, 15)


def test_status_json_has_graph_metrics_and_no_secrets(url: str) -> None:
    deploy_and_load(url, 7)
    r = httpx.get(f"{url}/-/status.json", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert "do-not-show-me" not in r.text
    doc = r.json()
    app = doc["applications"]["search"]
    assert app["edges"] == [["Search", "Embedder"]] and app["ingress"] == "Search" and app["route_prefix"] == "/search"
    embedder = app["deployments"]["Embedder"]
    assert embedder["replica_states"] == {"RUNNING": 2} and embedder["target_replicas"] == 2
    assert embedder["options"]["num_replicas"] == 2 and embedder["options"]["has_user_config"] is True
    for dep in app["deployments"].values():
        m = dep["metrics"]
        assert m["requests"] == 7 and m["errors"] == 0 and isinstance(m["p50_ms"], float)
    assert httpx.post(f"{url}/-/status.json", timeout=30).status_code == 405
    page = httpx.get(f"{url}/-/dashboard", timeout=30)
    assert page.status_code == 200 and "<svg" not in page.text and "status.json" in page.text
    assert "script-src 'sha256-" in page.headers["content-security-policy"]


def test_dashboard_off(run_dir: str) -> None:
    for url in start(run_dir, dashboard=False, ingress_serves_http=False):
        serve.run(Search.bind(Embedder.bind()), name="search", route_prefix="/")
        for path in ("/-/dashboard", "/-/status.json"):
            r = httpx.get(f"{url}{path}", timeout=30)
            assert r.status_code == 404 and r.json()["error"] == "not found", path
        assert httpx.get(f"{url}/-/healthz", timeout=30).status_code == 200


def render_in_chromium(page_url: str) -> str:
    """The page's DOM after its script ran a few polls, from headless Chromium (bounded, cleaned up)."""
    profile = tempfile.mkdtemp(prefix="shoal-chromium-")
    assert CHROMIUM is not None
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         # Virtual time runs the page's timers and waits for its fetches: a few polls, then the DOM.
         "--virtual-time-budget=4000", "--dump-dom", page_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        dom, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the browser and its helpers: its own process group
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, err[-2000:]
    return dom


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's `chromium` (apt-get install -y chromium)")


@needs_chromium
def test_page_renders_the_graph_and_live_numbers_in_chromium(run_dir: str) -> None:
    for url in start(run_dir):
        deploy_and_load(url, 9)
        dom = render_in_chromium(f"{url}/-/dashboard")
        svg = re.search(r"<svg class=\"graph\".*?</svg>", dom, re.S)
        assert svg is not None, dom[-3000:]
        graph = svg.group(0)
        for name in ("Search", "Embedder"):
            node = re.search(rf'<g class="node s-ok" data-deployment="{name}"[^>]*>(.*?)</g>', graph, re.S)
            assert node is not None, graph
            assert f">{name}" in node.group(1)
        assert 'data-deployment="Embedder" data-running="2" data-target="2"' in graph
        assert "2/2 replicas · HEALTHY" in graph and 'data-from="Search" data-to="Embedder"' in graph
        assert re.search(r"req/s · p50 ≤\d", graph), graph  # latencies came from the polled JSON
        rows = re.findall(r'<td data-field="requests" class="num">(\d+)</td>', dom)
        assert rows == ["9", "9"], dom[-3000:]
        assert re.search(r'<span id="conn" class="muted">updated [^<]+</span>', dom), dom[:2000]


EDGE_CASES: dict[str, Any] = {
    "http_address": "http://127.0.0.1:1", "resources": "", "proxies": {}, "time": 0,
    "applications": {
        "<img src=x onerror=alert(1)>": {
            "status": "DEPLOY_FAILED", "message": "deployment 'Broken': replica constructor failed: ValueError: boom",
            "route_prefix": None, "ingress": "Broken", "version": "v9", "metrics": {}, "canary": None, "edges": [],
            "deployments": {"Broken": {"status": "DEPLOY_FAILED", "replica_states": {}, "message": "boom <b>bold</b>",
                                       "version": "1", "target_replicas": 1, "metrics": {}, "options": {}}}},
        "chat": {
            "status": "RUNNING", "message": "", "route_prefix": "/chat", "ingress": "Api", "version": "v1",
            "metrics": {"requests": 5, "errors": 1, "error_rate": 0.2, "p50_ms": 20.0, "p99_ms": "+Inf"},
            "edges": [["Api", "LLM"], ["Api", "Cache"], ["LLM", "Cache"]],
            "canary": {"weight": 10.0, "status": "RUNNING", "message": "", "version": "v2",
                       "metrics": {"requests": 3, "errors": 0, "p50_ms": 5.0, "p99_ms": 10.0},
                       "deployments": {"Api": {"status": "HEALTHY", "replica_states": {"RUNNING": 1}, "message": ""}}},
            "deployments": {
                "Api": {"status": "HEALTHY", "replica_states": {"RUNNING": 1}, "message": "", "version": "a",
                        "target_replicas": 1, "options": {},
                        "metrics": {"requests": 5, "errors": 1, "error_rate": 0.2, "p50_ms": 20.0, "p99_ms": "+Inf"}},
                "LLM": {"status": "UPSCALING", "replica_states": {"RUNNING": 1, "STARTING": 2}, "message": "",
                        "version": "b", "target_replicas": 3, "options": {}, "metrics": {}},
                "Cache": {"status": "HEALTHY", "replica_states": {}, "message": "", "version": "c",
                          "target_replicas": 0, "options": {}, "metrics": {}}}}},
}


@needs_chromium
def test_page_handles_canaries_failures_and_hostile_names() -> None:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from shoal.observability.dashboard import page

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, csp = page()
            kind = "text/html"
            if self.path.endswith("status.json"):
                body, kind = json.dumps(EDGE_CASES).encode(), "application/json"
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-security-policy", csp)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dom = render_in_chromium(f"http://127.0.0.1:{server.server_address[1]}/-/dashboard")
    finally:
        server.shutdown()
        server.server_close()
    assert "<img src" not in dom and "&lt;img src=x onerror=alert(1)&gt;" in dom  # names are text, never markup
    assert "<b>bold</b>" not in dom and "boom &lt;b&gt;bold&lt;/b&gt;" in dom
    assert "canary 10%" in dom and "version v2" in dom
    assert "1/3 replicas · UPSCALING" in dom and "1 RUNNING, 2 STARTING" in dom and "&gt; 30 s" in dom
    assert dom.count("data-from=") == 3 and dom.count('class="edge"') == 4  # 3 calls + HTTP -> ingress
    assert 'class="node s-bad" data-deployment="Broken"' in dom
    assert "no HTTP route" in dom and 'data-from="LLM" data-to="Cache"' in dom
