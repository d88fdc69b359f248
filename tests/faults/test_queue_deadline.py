"""Issue 15: a request waiting for a free replica slot waits at most ``max_queue_wait_s``,
then gets 503 (HTTP) or BackPressureError (handle) saying so; a deployment's first replica
is waited for as long as its start takes."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import httpx
import pytest
from conftest import Instance, wait_until
from loadgen import Load, report, running

from shoal import serve
from shoal.exceptions import BackPressureError


@serve.deployment(max_ongoing_requests=1, max_queue_wait_s=0.5)
class Busy:
    async def __call__(self, request: Any) -> str:
        mark = request.query_params.get("mark")
        if mark:
            open(mark, "w").close()  # the test waits for this: the replica's one slot is taken
        await asyncio.sleep(float(request.query_params.get("sleep", "0")))
        return "ok"

    async def hold(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "held"


def _queued_requests_give_up(url: str, run_dir: str, mode: str) -> None:
    handle = serve.run(Busy.bind())
    assert httpx.get(url + "/", timeout=10).text == "ok"
    mark = os.path.join(run_dir, "slot-taken")
    held = threading.Thread(target=lambda: httpx.get(url + f"/?sleep=4&mark={mark}", timeout=20), daemon=True)
    held.start()
    assert wait_until(lambda: os.path.exists(mark), 10)
    with running(Load(url + "/", clients=2, hung_after_s=10.0, pause_s=0.05)) as load:
        load.mark()
        assert wait_until(lambda: load.counts().failed >= 2, 10)
        counts = load.stop()
    r = httpx.get(url + "/", timeout=10)
    assert r.status_code == 503, r.text
    assert "was free within 0.5 s" in r.json()["message"], r.text
    assert r.headers.get("retry-after")
    with pytest.raises(BackPressureError, match=r"free within 0\.5 s"):
        handle.hold.remote(0).result(timeout_s=10)
    assert held.is_alive()  # both gave up while the slot was still taken, not when it came free
    held.join(20)
    assert counts.hung == 0 and counts.failed >= 2 and set(counts.details) <= {"503"}, counts
    report(f"every replica slot busy longer than max_queue_wait_s (0.5 s), {mode}", counts, None,
           "503 naming the wait once it runs out")


def test_a_queued_request_gives_up_through_the_proxy(proxied: Instance) -> None:
    _queued_requests_give_up(proxied.url, proxied.run_dir, "via the proxy")


def test_a_queued_request_gives_up_on_a_replica_front(instance: Instance) -> None:
    _queued_requests_give_up(instance.url, instance.run_dir, "replicas serve HTTP")
