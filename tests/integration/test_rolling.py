"""Redeploying under steady load: new replicas are ready before old ones stop; nothing fails."""

from __future__ import annotations

import threading
import time

import httpx
from conftest import Instance, wait_until
from starlette.requests import Request

from shoal import serve


@serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=5)
class Versioned:
    def __init__(self, version: str) -> None:
        self.version = version

    async def __call__(self, request: Request) -> str:
        return self.version

    async def get(self) -> str:
        return self.version


def test_rolling_update_under_load_loses_nothing(instance: Instance) -> None:
    h = serve.run(Versioned.bind("v1"))
    results: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    deadline = time.monotonic() + 120  # bounded, whatever happens

    def handle_load() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                results.append(h.get.remote().result(timeout_s=30))
            except Exception as e:  # any failure is a lost request
                failures.append(repr(e))
            time.sleep(0.005)

    def http_load() -> None:
        # A new connection per request: a server that restarts may close idle keep-alive
        # connections, and clients retry those; here every request must simply succeed.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=instance.url, limits=limits, timeout=30) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    r = client.get("/")
                    if r.status_code != 200:
                        failures.append(f"HTTP {r.status_code}: {r.text}")
                    else:
                        results.append(r.text)
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                time.sleep(0.005)

    threads = [threading.Thread(target=handle_load), threading.Thread(target=http_load)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(results) > 50, 30)
        serve.run(Versioned.bind("v2"))  # returns once the new version is fully rolled out
        n = len(results)
        assert wait_until(lambda: len(results) > n + 50, 30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"rolling update under load: {len(results)} requests, {len(failures)} failed")
    assert failures == []
    assert "v1" in results and results[-1] == "v2"
    # After the roll-out only v2 answers, and exactly the target count of replicas runs.
    assert {h.get.remote().result() for _ in range(20)} == {"v2"}
    assert serve.status().applications["default"].deployments["Versioned"].replica_states == {"RUNNING": 2}
