"""Issue 15: ``ray_actor_options={"memory": ...}`` is enforced: a replica whose resident memory
grows past it is killed and replaced, and the reason shows in serve.status() and `shoal status`."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
from conftest import Instance, wait_until
from loadgen import Load, report, running
from rich.console import Console

from shoal import api, serve
from shoal.cli.main import print_status
from shoal.status import ReplicaState

MB = 1024 * 1024
LIMIT = 200 * MB
HOARD: list[bytes] = []


@serve.deployment(num_replicas=2, ray_actor_options={"memory": LIMIT})
class Hog:
    async def __call__(self, request: Any) -> str:
        if request.url.path.endswith("/grow"):
            HOARD.append(b"\x01" * (300 * MB))  # touched, so resident
        return "ok"


def _pids() -> set[int]:
    assert api._instance is not None
    return {r.proc.pid for r in list(api._instance.controller.replicas.values()) if r.state == ReplicaState.RUNNING}


def test_a_replica_over_its_memory_is_replaced_with_the_reason(instance: Instance) -> None:
    serve.run(Hog.bind())
    before = _pids()
    load = Load(instance.url + "/", clients=2, hung_after_s=20.0)
    with running(load):
        assert load.wait_ok(10, 20)
        t0 = load.mark()
        try:
            grow = httpx.get(instance.url + "/grow", timeout=20).status_code
        except httpx.HTTPError as e:
            grow = type(e).__name__  # type: ignore[assignment]
        assert wait_until(lambda: len(_pids()) == 2 and len(_pids() - before) == 1, 20), "not replaced"
        replaced = time.monotonic() - t0
        recovery = load.wait_recovered(streak=20, timeout=20)
    counts = load.counts()
    assert counts.hung == 0, counts
    assert recovery is not None, counts
    dep = serve.status().applications["default"].deployments["Hog"]
    assert "exceeded memory 200 MB" in dep.message, dep.message
    out = io.StringIO()
    print_status(Console(file=out, width=250), instance.run_dir, serve.status().to_dict())
    assert "exceeded memory 200 MB" in out.getvalue(), out.getvalue()
    report("replica over ray_actor_options memory (200 MB, 2 clients)", counts, recovery,
           "killed and replaced; reason in status", notes=f"grow request: {grow}; replaced after {replaced:.1f} s")
    print(f"memory: {counts}, grow request {grow}, replaced after {replaced:.2f} s, recovery {recovery}; {dep.message}")
