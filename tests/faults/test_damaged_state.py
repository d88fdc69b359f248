"""Issue 15: a detached instance's state file is damaged and its controller dies.

The replicas and the proxy it started keep running (the proxy holding the port). ``shoal
start`` must notice the damaged file, say so, move it aside, stop the processes nobody can
adopt any more, and serve on the same port; ``shoal status`` and ``shoal shutdown`` must tell
(and, for shutdown, stop) processes a dead controller left behind. Real processes, the real
command line, HTTP on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import wait_until
from detached import HUNG_AFTER_S, Instance, detached, get, running  # noqa: F401 (a fixture)
from loadgen import Load, report

# Bytes of state.db kept: its header survives, its pages do not.
KEEP_BYTES = 100


def _damage_and_kill_controller(inst: Instance) -> None:
    state = Path(inst.rd.state_db)
    pid = inst.controller_pid()
    with open(state, "r+b") as f:
        f.truncate(KEEP_BYTES)
    wal = Path(str(state) + "-wal")
    if wal.exists():
        with open(wal, "r+b") as f:
            f.truncate(0)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not running(pid), 10)


def test_damaged_state_file_is_set_aside_and_orphans_stopped(detached: Instance) -> None:  # noqa: F811
    inst = detached
    http, port = inst.start_and_deploy()
    orphans = inst.processes()
    assert len(orphans) >= 3, orphans  # two replicas and the proxy

    load = Load(http + "/", clients=1, pause_s=0.05, hung_after_s=HUNG_AFTER_S).start()
    load.mark()
    _damage_and_kill_controller(inst)
    assert get(http + "/") == 200, "the orphaned proxy and replicas keep serving"
    st = inst.cli("status", check=False)
    assert st.returncode != 0 and "controller died" in st.stderr, st.stderr

    # The same port: the orphaned proxy holds it until it is stopped.
    try:
        started = inst.cli("start", "-p", port)
        inst.cli("deploy", "hello.yaml")  # the applications were in the damaged file
        recovery = load.wait_recovered(streak=10, timeout=30)
    finally:
        counts = load.stop()
    assert counts.hung == 0, counts
    report("state.db damaged + controller kill -9, then `shoal start` on the same port", counts, recovery,
           expected="file set aside + message; orphans stopped; port served after redeploy",
           notes="failures: the gap between stopping the orphans and the redeploy (404 / refused)")
    assert "is damaged" in started.stderr and "moved it aside to" in started.stderr, started.stderr
    assert "stopped" in started.stderr, started.stderr
    moved = [p for p in os.listdir(inst.address)
             if p.startswith("state.db.damaged-") and not p.endswith(("-wal", "-shm"))]
    assert moved, os.listdir(inst.address)
    assert os.path.join(inst.address, moved[0]) in started.stderr.replace("\n", "")
    assert not [p for p in orphans if running(p)], "orphans left running"
    assert not (inst.processes() & orphans)

    assert inst.cli("status", "--json").returncode == 0
    assert get(http + "/") == 200
    print(f"start on a damaged state: {started.stderr.strip()}")

    # The controller dies again: `shoal shutdown` stops what it left behind.
    second = inst.processes()
    assert second
    os.kill(inst.controller_pid(), signal.SIGKILL)
    assert wait_until(lambda: not inst.rd.is_live(), 10)
    down = inst.cli("shutdown")
    assert "stopped the" in down.stdout, down.stdout
    assert not [p for p in second if running(p)]
    assert not inst.processes()
    assert get(http + "/") == -1
