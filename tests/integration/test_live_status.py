"""`shoal status --watch` against a running instance, as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from conftest import Instance, wait_until
from starlette.requests import Request

from shoal import serve
from shoal.handle import DeploymentHandle


@serve.deployment
class Ranker:
    def rank(self, q: str) -> int:
        return len(q)


@serve.deployment
class Gateway:
    def __init__(self, ranker: DeploymentHandle) -> None:
        self.ranker = ranker

    async def __call__(self, request: Request) -> int:
        return await self.ranker.rank.remote(request.query_params.get("q", ""))


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd(), "COLUMNS": "200"}


def traffic(url: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            client.get(url)
            time.sleep(0.02)


def test_watch_shows_deployments_and_live_numbers(instance: Instance) -> None:
    serve.run(Gateway.bind(Ranker.bind()), name="search", route_prefix="/search")
    stop = threading.Event()
    sender = threading.Thread(target=traffic, args=(f"{instance.url}/search?q=abc", stop), daemon=True)
    sender.start()
    try:
        assert wait_until(lambda: serve.status().applications["search"].deployments["Ranker"].metrics.get(
            "requests", 0) > 0, 20)
        r = subprocess.run([sys.executable, "-m", "shoal.cli", "status", "--watch", "--interval", "0.7",
                            "--iterations", "4", "--address", instance.run_dir], capture_output=True, text=True,
                           timeout=60, env={**env(), "COLUMNS": "200"})  # the full set of columns
    finally:
        stop.set()
        sender.join(10)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "search" in out and "route /search" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("Gateway", "Ranker"))}
    assert set(rows) == {"Gateway", "Ranker"}, out
    for row in rows.values():
        _name, status, replicas, qps, p50, p99, requests = row.split()[:7]
        assert status == "HEALTHY" and replicas == "1/1", row
        assert float(qps) > 0, row  # traffic flowed between refreshes
        assert p50.startswith("≤") and p99.startswith("≤") and int(requests) > 0, row


def test_watch_ctrl_c_exits_cleanly(instance: Instance) -> None:
    serve.run(Gateway.bind(Ranker.bind()), name="search", route_prefix="/search")
    # FORCE_COLOR makes rich draw every frame as on a terminal, so we can see the view is up.
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "status", "--watch", "--interval", "0.2",
                             "--address", instance.run_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**env(), "FORCE_COLOR": "1"})
    out: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(256):
            out.append(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: "Ranker" in "".join(out), 30), "".join(out)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    err = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in err, err
    assert "Gateway" in "".join(out)
