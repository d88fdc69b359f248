"""Issue 15: kill -9 of one of two ingress replicas that serve HTTP themselves fails only the
requests it was running; the rest of the load goes on.

A connection dies with the process that accepted it, so each replica front holds at most
``max_ongoing_requests`` connections and the proxy, standing by on the shared socket, takes the
rest (shoal.runtime.http.acceptor). Before that, the victim could hold more connections than it
could run requests (8 clients, 2 replicas of 5: 6 failed)."""

from __future__ import annotations

import os
import signal

from conftest import Instance
from loadgen import Load, report, running

from shoal import api, serve


@serve.deployment(num_replicas=2, max_ongoing_requests=5)
class Slowish:
    async def __call__(self, request: object) -> str:
        import asyncio

        await asyncio.sleep(0.05)
        return str(os.getpid())


def test_kill_one_of_two_direct_ingress_replicas(instance: Instance) -> None:
    serve.run(Slowish.bind())
    with running(Load(instance.url + "/", clients=8, hung_after_s=20, pause_s=0.0)) as load:
        assert load.wait_ok(50, timeout=30)
        assert api._instance is not None
        replicas = [r for r in api._instance.controller.replicas.values() if r.deployment == "Slowish"]
        assert len(replicas) == 2 and all(r.serves_http for r in replicas), replicas
        victim = replicas[0].proc.pid
        load.mark()
        os.kill(victim, signal.SIGKILL)
        recovery = load.wait_recovered(streak=50, timeout=30)
        counts = load.stop()
    print(f"after kill -9 of {victim}: {counts}, recovery {recovery}")
    assert counts.hung == 0, counts
    assert recovery is not None, counts
    report("kill -9 of 1 of 2 replicas serving HTTP directly (8 keep-alive clients)", counts, recovery,
           "only the victim's requests fail")
    assert counts.failed <= 5, counts  # max_ongoing_requests: what the victim can be running
