"""Issue 15: processes killed at awkward moments, under a steady load.

* a replica killed again and again;
* a replica killed while its constructor runs (crash during start-up);
* a replica killed while it drains (crash during drain, in a rolling update);
* the controller and the proxy of a detached instance killed together.

Each ends in explicit answers and a recovery, never in a hung request.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from conftest import Instance, wait_until
from detached import Instance as Detached
from detached import detached, get, running  # noqa: F401 (a fixture)
from loadgen import Load, report
from loadgen import running as loaded

from shoal import api, serve
from shoal.deployment import build_app_spec
from shoal.runtime.controller.records import ReplicaRecord
from shoal.status import ApplicationStatus, ReplicaState

MAX_ONGOING = 4


@serve.deployment(num_replicas=2, max_ongoing_requests=MAX_ONGOING, graceful_shutdown_timeout_s=10)
class Work:
    def __init__(self, boot_s: float = 0.0) -> None:
        import time

        time.sleep(boot_s)

    async def __call__(self, request: Any) -> str:
        import asyncio

        await asyncio.sleep(float(request.query_params.get("sleep", "0.02")))
        return str(os.getpid())


def _replicas(state: ReplicaState | None = None) -> list[ReplicaRecord]:
    assert api._instance is not None
    return [r for r in api._instance.controller.replicas.values()
            if r.deployment == "Work" and (state is None or r.state == state)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_replica_killed_again_and_again(instance: Instance) -> None:
    serve.run(Work.bind())
    with loaded(Load(instance.url + "/", clients=4, hung_after_s=20.0)) as load:
        assert load.wait_ok(20, 20)
        load.mark()
        for _ in range(4):
            victim = _replicas(ReplicaState.RUNNING)[0]
            os.kill(victim.proc.pid, signal.SIGKILL)
            assert wait_until(lambda v=victim: v.replica_id not in {r.replica_id for r in _replicas()}
                              and len(_replicas(ReplicaState.RUNNING)) == 2, 30), "not replaced"
        recovery = load.wait_recovered(streak=20, timeout=30)
        counts = load.stop()
    assert counts.hung == 0 and recovery is not None, counts
    # Only what the victims were running fails: at most max_ongoing_requests each time.
    assert counts.failed <= 4 * MAX_ONGOING, counts
    assert serve.status().applications["default"].status == ApplicationStatus.RUNNING
    report("replica kill -9, four times in a row (4 clients)", counts, recovery,
           "each replaced; only its requests fail")


def test_a_replica_killed_during_its_constructor(instance: Instance) -> None:
    inst = api._instance
    assert inst is not None
    app = Work.options(num_replicas=1).bind(boot_s=2.0)
    inst.loop.run(inst.controller.deploy(build_app_spec(app, "default", "/")))
    assert wait_until(lambda: bool(_replicas(ReplicaState.STARTING)), 20)
    with loaded(Load(instance.url + "/", clients=2, hung_after_s=30.0)) as load:
        load.mark()
        victim = _replicas(ReplicaState.STARTING)[0]
        os.kill(victim.proc.pid, signal.SIGKILL)
        assert wait_until(lambda: len(_replicas(ReplicaState.RUNNING)) == 1, 30), "no replacement ran"
        assert _replicas(ReplicaState.RUNNING)[0].replica_id != victim.replica_id
        recovery = load.wait_recovered(streak=10, timeout=30)
        counts = load.stop()
    assert counts.hung == 0 and recovery is not None, counts
    assert serve.status().applications["default"].status == ApplicationStatus.RUNNING
    report("replica kill -9 during its constructor (crash during start-up)", counts, recovery,
           "replaced; requests wait for it, none hang")


def test_a_replica_killed_while_it_drains(instance: Instance) -> None:
    serve.run(Work.bind())
    slow = instance.url + "/?sleep=1.0"
    with loaded(Load(slow, clients=4, hung_after_s=30.0, pause_s=0.0)) as load:
        assert load.wait_ok(4, 20)
        old = {r.replica_id for r in _replicas()}
        inst = api._instance
        assert inst is not None
        # A changed option replaces the replicas one by one (a rolling update).
        app = Work.options(ray_actor_options={"num_cpus": 0.5}).bind()
        inst.loop.run(inst.controller.deploy(build_app_spec(app, "default", "/")))
        assert wait_until(lambda: any(r.replica_id in old for r in _replicas(ReplicaState.STOPPING)), 30)
        load.mark()
        draining = next(r for r in _replicas(ReplicaState.STOPPING) if r.replica_id in old)
        os.kill(draining.proc.pid, signal.SIGKILL)
        assert wait_until(lambda: not (old & {r.replica_id for r in _replicas()})
                          and len(_replicas(ReplicaState.RUNNING)) == 2, 40), "the update did not finish"
        recovery = load.wait_recovered(streak=8, timeout=30)
        counts = load.stop()
    assert counts.hung == 0 and recovery is not None, counts
    assert counts.failed <= MAX_ONGOING, counts
    report("replica kill -9 while it drains in a rolling update (crash during drain)", counts, recovery,
           "only the requests it was finishing fail; the update completes")


def test_controller_and_proxy_killed_together(detached: Detached) -> None:  # noqa: F811
    inst = detached
    http, port = inst.start_and_deploy()
    replicas = inst.processes()
    controller = inst.controller_pid()
    proxies = [p for p in replicas if b"shoal.runtime.proxy" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(proxies) == 1, proxies
    load = Load(http + "/", clients=2, pause_s=0.02, hung_after_s=20.0).start()
    try:
        assert load.wait_ok(5, 20)
        load.mark()
        os.kill(controller, signal.SIGKILL)
        os.kill(proxies[0], signal.SIGKILL)
        assert wait_until(lambda: not _alive(controller) and not _alive(proxies[0]), 10)
        assert get(http + "/") == 200, "the ingress replicas keep serving the port"
        started = inst.cli("start", "-p", port)  # the same port: taken over from a replica
        recovery = load.wait_recovered(streak=20, timeout=30)
    finally:
        counts = load.stop()
    assert counts.hung == 0 and recovery is not None, counts
    assert "restored" in started.stdout, started.stdout
    assert get(http + "/") == 200
    status = json.loads(inst.cli("status", "--json").stdout)
    assert status["applications"]["hello"]["status"] == "RUNNING", status
    report("controller and proxy kill -9 together (detached), then `shoal start`", counts, recovery,
           "replicas serve on; the new controller takes the port from them")
