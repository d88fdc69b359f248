"""Issue 15: a replica process frozen by SIGSTOP is taken out within seconds, its requests in
flight fail at once (its connections close when it is killed), and it is replaced."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import Instance, wait_until
from loadgen import Load, report, running

from shoal import api, serve
from shoal.runtime.controller.records import ReplicaRecord
from shoal.runtime.controller.watchdog import STOPPED_AFTER_S
from shoal.status import ReplicaState


@serve.deployment(num_replicas=2, health_check_period_s=60)
class Work:
    async def __call__(self, request: object) -> str:
        return "ok"


def _replicas() -> list[ReplicaRecord]:
    assert api._instance is not None
    return [r for r in list(api._instance.controller.replicas.values()) if r.state == ReplicaState.RUNNING]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("front", ["instance", "proxied"])
def test_a_frozen_replica_is_replaced_and_nothing_hangs(front: str, request: pytest.FixtureRequest) -> None:
    instance: Instance = request.getfixturevalue(front)
    serve.run(Work.bind())
    victim = _replicas()[0]
    pid = victim.proc.pid
    load = Load(instance.url + "/", clients=4, hung_after_s=20.0)
    try:
        with running(load):
            assert load.wait_ok(20, 20)
            t0 = load.mark()
            os.kill(pid, signal.SIGSTOP)
            assert wait_until(lambda: not _pid_alive(pid), 15, 0.05), "the frozen replica was not killed"
            detected = time.monotonic() - t0
            assert wait_until(lambda: len(_replicas()) == 2 and pid not in {r.proc.pid for r in _replicas()},
                              20), "no replacement"
            replaced = time.monotonic() - t0
            recovery = load.wait_recovered(streak=20, timeout=20)
        counts = load.counts()
    finally:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
    assert counts.hung == 0, counts
    assert recovery is not None, counts
    assert detected < STOPPED_AFTER_S + 8
    message = serve.status().applications["default"].deployments["Work"].message
    assert "process stopped (SIGSTOP)" in message, message
    via = "ingress replicas serve HTTP" if front == "instance" else "via the proxy"
    report(f"replica SIGSTOP (1 of 2, 4 clients, {via})", counts, recovery,
           "frozen replica killed and replaced within seconds; no request hangs",
           notes=f"killed after {detected:.1f} s, replacement running after {replaced:.1f} s")
    print(f"SIGSTOP: {counts}, killed after {detected:.2f} s, replaced after {replaced:.2f} s, recovery {recovery}")
