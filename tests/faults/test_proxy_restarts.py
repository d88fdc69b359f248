"""Issue 15: a proxy killed again and again is restarted with back-off, never given up on."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
from conftest import Instance, wait_until

from shoal import api, serve
from shoal.runtime.controller.backoff import MAX_DELAY_S
from shoal.runtime.controller.records import ProxyRecord


@serve.deployment
class Echo:
    async def __call__(self, request: object) -> str:
        return "ok"


def _proxy() -> ProxyRecord:
    assert api._instance is not None
    proxy = api._instance.controller.proxy
    assert proxy is not None
    return proxy


def _serves(url: str) -> bool:
    try:
        return httpx.get(url + "/-/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _kill_and_wait_back(url: str, timeout: float) -> None:
    old = _proxy()
    os.kill(old.proc.pid, signal.SIGKILL)
    assert wait_until(lambda: _proxy() is not old and _proxy().ready and _serves(url), timeout, 0.05), (
        f"the proxy was not back within {timeout} s after crash {old.restarts + 1}")


def test_proxy_killed_six_times_keeps_coming_back(proxied: Instance) -> None:
    instance = proxied
    serve.run(Echo.bind())
    assert httpx.get(instance.url + "/", timeout=10).text == "ok"
    for _ in range(6):  # back-offs 0, 1, 2, 4, 8, 16 s: the old limit gave up at the 5th
        _kill_and_wait_back(instance.url, MAX_DELAY_S + 15)
    assert _proxy().restarts == 6
    assert httpx.get(instance.url + "/", timeout=10).text == "ok"

    # A request sent while the proxy is down (waiting out its 30 s back-off) is answered, not hung.
    old = _proxy()
    os.kill(old.proc.pid, signal.SIGKILL)
    assert wait_until(lambda: old.restart_at is not None, 10)
    result: list[object] = []

    def ask() -> None:
        t0 = time.monotonic()
        try:
            r = httpx.get(instance.url + "/", timeout=MAX_DELAY_S + 15)
            result.append((r.status_code, time.monotonic() - t0))
        except httpx.HTTPError as e:
            result.append(e)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(MAX_DELAY_S + 20)
    assert result and isinstance(result[0], tuple) and result[0][0] == 200, result
    print(f"request sent while the proxy was down: {result[0]}")
    assert wait_until(lambda: _proxy() is not old and _proxy().ready, MAX_DELAY_S + 15)
    assert "UNHEALTHY" not in serve.status().proxies.values()
