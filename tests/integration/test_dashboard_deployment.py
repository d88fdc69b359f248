"""The dashboard's detail view of one deployment (/-/deployment.json and the page's
#/deployment/<app>/<deployment> view) on a running instance, and in headless Chromium."""

from __future__ import annotations

import html
import os
import re
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from conftest import child_pids, wait_until
from starlette.requests import Request
from test_dashboard import needs_chromium, render_in_chromium, start

from shoal import serve
from shoal.exceptions import DeployError

LONG_ROUTE = "/" + "a-rather-long-route-prefix-segment-" * 4 + "end"


def explode_in_user_code(q: str) -> None:
    raise RuntimeError(f"user code blew up on {q}")


@serve.deployment(num_replicas=2)
class Flaky:
    async def __call__(self, request: Request) -> dict[str, Any]:
        q = request.query_params.get("q", "")
        print(f"flaky handled marker-{q}", flush=True)
        if request.query_params.get("fail"):
            explode_in_user_code(q)
        return {"ok": q}


def detail(url: str, app: str, deployment: str, **kw: Any) -> httpx.Response:
    return httpx.get(f"{url}/-/deployment.json", params={"app": app, "deployment": deployment}, timeout=30, **kw)


def deploy_and_fail(url: str, route: str = "/flaky") -> dict[str, Any]:
    """Deploy Flaky, have it print and fail once; the detail document once both reached its logs."""
    serve.run(Flaky.bind(), name="flaky", route_prefix=route)
    assert httpx.get(f"{url}{route}", params={"q": "ok1"}, timeout=30).status_code == 200
    r = httpx.get(f"{url}{route}", params={"q": "boom7", "fail": "1"}, timeout=30)
    assert r.status_code == 500, r.text
    assert "user code blew up" not in r.text  # the client never sees the traceback
    doc: dict[str, Any] = {}

    def logged() -> bool:
        nonlocal doc
        doc = detail(url, "flaky", "Flaky").json()
        return any("boom7" in e["message"] + e["traceback"] for e in doc.get("errors", [])) \
            and any("marker-boom7" in x["line"] for x in doc.get("logs", []))

    assert wait_until(logged, 20), doc
    return doc


def test_detail_json_has_replicas_errors_and_logs(run_dir: str) -> None:
    for url in start(run_dir, ingress_serves_http=False):
        doc = deploy_and_fail(url)
        assert doc["app"] == "flaky" and doc["deployment"] == "Flaky" and doc["status"] == "HEALTHY"
        replicas = doc["replicas"]
        assert len(replicas) == 2 and {r["state"] for r in replicas} == {"RUNNING"}
        pids = {r["pid"] for r in replicas}
        assert pids <= child_pids() and all(os.path.exists(f"/proc/{p}") for p in pids)  # real processes
        for r in replicas:
            assert r["health"] == "ok" and r["age_s"] >= 0 and r["version"] and r["replica_id"].startswith("Flaky")
        error = next(e for e in doc["errors"] if "boom7" in e["message"] + e["traceback"])
        assert error["level"] == "ERROR" and error["pid"] in pids
        assert "explode_in_user_code" in error["traceback"] and "RuntimeError: user code blew up on boom7" \
            in error["traceback"]
        printed = [x for x in doc["logs"] if "flaky handled marker-boom7" in x["line"]]
        assert len(printed) == 1 and printed[0]["pid"] in pids
        assert printed[0]["replica"] in {r["replica_id"] for r in replicas}
        assert len(doc["logs"]) <= 100 and len(doc["errors"]) <= 20

        r = detail(url, "flaky", "NoSuchDeployment")
        assert r.status_code == 404 and "'NoSuchDeployment'" in r.json()["error"]
        r = detail(url, "nosuchapp", "Flaky")
        assert r.status_code == 404 and "'nosuchapp'" in r.json()["error"]
        r = httpx.get(f"{url}/-/deployment.json", params={"app": "flaky"}, timeout=30)
        assert r.status_code == 400 and "'deployment'" in r.json()["error"]
        assert httpx.post(f"{url}/-/deployment.json?app=flaky&deployment=Flaky", timeout=30).status_code == 405


def test_failed_constructor_traceback_and_api_keys(run_dir: str) -> None:
    @serve.deployment
    class Broken:
        def __init__(self) -> None:
            load_weights_or_fail()

    for url in start(run_dir, ingress_serves_http=False, api_keys=["k-detail-0123456789abcdef"]):
        with pytest.raises(DeployError):
            serve.run(Broken.bind(), name="broken", route_prefix="/broken")
        assert detail(url, "broken", "Broken").status_code == 401  # the API-key check like status.json
        r = detail(url, "broken", "Broken", headers={"authorization": "Bearer k-detail-0123456789abcdef"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["status"] == "DEPLOY_FAILED"
        assert "load_weights_or_fail" in doc["message"] and "weights.bin is missing" in doc["message"]
        assert any("weights.bin is missing" in e["message"] + e["traceback"] for e in doc["errors"]), doc["errors"]


def load_weights_or_fail() -> None:
    raise FileNotFoundError("weights.bin is missing")


def test_detail_off_with_the_dashboard(run_dir: str) -> None:
    for url in start(run_dir, dashboard=False, ingress_serves_http=False):
        serve.run(Flaky.bind(), name="flaky", route_prefix="/flaky")
        r = detail(url, "flaky", "Flaky")
        assert r.status_code == 404 and r.json()["error"] == "not found"


@needs_chromium
def test_detail_view_and_long_route_labels_in_chromium(run_dir: str) -> None:
    for url in start(run_dir):
        doc = deploy_and_fail(url, LONG_ROUTE)
        overview = render_in_chromium(f"{url}/-/dashboard")
        link = 'href="#/deployment/flaky/Flaky"'
        assert link in overview, overview[-3000:]  # the table's name and the graph's box lead to the view
        assert overview.count(link) == 2
        # The long route is cut by CSS (one line, ellipsis) with the whole text in its title.
        route = re.search(r'<span class="label route" title="([^"]*)">', overview)
        assert route is not None and html.unescape(route.group(1)) == f"route {LONG_ROUTE}", overview[-3000:]
        css = re.search(r"\.label \{([^}]*)\}", overview)
        assert css is not None and "text-overflow: ellipsis" in css.group(1) and "overflow: hidden" in css.group(1)
        assert "white-space: nowrap" in css.group(1)
        assert f'<title>HTTP {html.escape(LONG_ROUTE)}</title>' in overview  # the graph's cut label, whole

        dom = render_in_chromium(f"{url}/-/dashboard#/deployment/{quote('flaky', safe='')}/{quote('Flaky', safe='')}")
        assert '<section class="app detail" data-app="flaky" data-deployment="Flaky">' in dom, dom[-3000:]
        rows = re.findall(r'<tr data-replica="([^"]+)" data-pid="(\d+)">', dom)
        assert {p for _, p in rows} == {str(r["pid"]) for r in doc["replicas"]} and len(rows) == 2, dom[-3000:]
        assert "RuntimeError: user code blew up on boom7" in dom and "explode_in_user_code" in dom
        assert re.search(r'<div class="error" data-replica="Flaky[^"]*"><div class="error-head">[^<]* ERROR ', dom)
        assert re.search(r'<div class="logline" data-replica="Flaky[^"]*"><span class="who">\[Flaky[^ ]* pid=\d+\] '
                         r'</span>flaky handled marker-boom7</div>', dom), dom[-3000:]
        assert re.search(r'<span id="conn" class="muted">updated [^<]+</span>', dom)
