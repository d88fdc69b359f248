"""Using every core: HTTP echo with 1 and 2 replicas, and where the CPU time goes.

The ``cores`` workload of ``run.py``. For each replica count it starts
``apps/echo_replicas.py`` (``max_ongoing_requests=64``), warms up, then runs ``wrk -t1`` at
:data:`CONNS` connections and reads, over the measured seconds, the CPU time of every process of
the app (``/proc/<pid>/stat``, grouped by what the process runs) and of wrk itself (its
``rusage``). Goal (issue 22): 2 replicas >= 1.8x the requests/s of 1 on a 2-core machine.
wrk runs on the same cores: its share is reported, since it is CPU the replicas cannot have.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import Settings, log
from benchmarks.load import wrk
from benchmarks.procs import _cpu_jiffies, cpu_ticks, process_label, session_procs

APP = "echo_replicas"
CONNS = 16
REPLICAS = (1, 2)
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _wrk_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one(make_server: Callable[..., Any], fw: str, replicas: int, cfg: Settings, workdir: str) -> dict[str, Any]:
    """Requests/s and CPU cores per process group for ``replicas`` replicas."""
    server = make_server(fw, APP, workdir)
    server.env["BENCH_REPLICAS"] = str(replicas)
    server.start()
    try:
        server.wait_http("/")
        url = server.base + "/"
        wrk(url, CONNS, cfg.warmup_s)
        procs = session_procs(server.proc.pid)
        labels = {(pid, p.start): process_label(pid, p.name) for pid, p in procs.items()}
        machine0 = _cpu_jiffies()
        before, wrk_before, t0 = cpu_ticks(procs), _wrk_cpu_s(), time.perf_counter()
        res = wrk(url, CONNS, cfg.duration_s)
        wall = time.perf_counter() - t0
        after, wrk_after, machine1 = cpu_ticks(procs), _wrk_cpu_s(), _cpu_jiffies()
    finally:
        server.stop()
    cores: dict[str, float] = {}
    for key, ticks in after.items():
        used = (ticks - before.get(key, ticks)) * TICK_S / wall
        if used > 0.005:
            label = labels.get(key, "?")
            cores[label] = round(cores.get(label, 0.0) + used, 3)
    cores["wrk"] = round((wrk_after - wrk_before) / wall, 3)
    res["cores"] = dict(sorted(cores.items(), key=lambda kv: -kv[1]))
    res["cores_total"] = round(sum(cores.values()), 3)
    # The whole machine's busy cores over the same seconds: the rest of it is other processes
    # (other sessions), or kernel work not charged to a process (softirqs of the loopback).
    total, idle = machine1[0] - machine0[0], machine1[1] - machine0[1]
    res["machine_busy_cores"] = round((os.cpu_count() or 1) * (1 - idle / total), 3) if total else None
    log(f"    {replicas} replica(s): {res['rps']:,.0f} req/s, p50 {res.get('p50_ms', float('nan')):.3f} ms; "
        "cores " + ", ".join(f"{k} {v:.2f}" for k, v in res["cores"].items())
        + f"; machine busy {res['machine_busy_cores']} cores")
    return res


def measure(make_server: Callable[..., Any], fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    out: dict[str, Any] = {"conns": CONNS, "cpus": os.cpu_count()}
    for n in REPLICAS:
        out[f"r{n}"] = one(make_server, fw, n, cfg, workdir)
    out["ratio"] = round(out[f"r{REPLICAS[-1]}"]["rps"] / out[f"r{REPLICAS[0]}"]["rps"], 3)
    log(f"    {REPLICAS[-1]} replicas / 1: {out['ratio']:.2f}x")
    return out
