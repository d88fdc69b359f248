"""The side-by-side benchmark suite: shoal vs Ray Serve vs bare uvicorn, on this machine, in one run.

    python benchmarks/run.py [--quick] [--only NAME,...] [--framework shoal|ray|bare|baseline|both|all|LIST]
                             [--baseline REF [--baseline-tolerance FRACTION]]

Workloads (``--only``): echo, cores, pipeline3, handle, payload, stream, batch, coldstart, memory, grpc, control
(the last shoal only: ``control_plane.py``).
Frameworks: ``both`` (the default) and ``all`` mean shoal, Ray Serve and the bare-uvicorn limit.
``--baseline REF`` adds shoal at the git ref REF (a worktree of it; see ``baseline.py``) as one
more column, measured next to the working tree's shoal workload by workload, and a table of the
ratios new/old.

Every measurement starts its app in a fresh process (``benchmarks/launcher.py``, or uvicorn for
the bare limit) in a new session, drives it over 127.0.0.1 only, and stops that session's
processes by their ids before the next one starts. Results go to ``benchmarks/results.json``,
``benchmarks/RESULTS.md`` and ``benchmarks/results.png``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a script, sys.path[0] is benchmarks/ and not the checkout
    sys.path.insert(0, ROOT)

from benchmarks import baseline as bl  # noqa: E402
from benchmarks import cores as cores_wl  # noqa: E402
from benchmarks import grpc_echo  # noqa: E402
from benchmarks.common import FRAMEWORKS, WORKLOADS, Settings, log  # noqa: E402
from benchmarks.load import sequential_gets, streams, wrk, wrk_series  # noqa: E402
from benchmarks.procs import (  # noqa: E402
    alive,
    background_cpu,
    cpu_ticks,
    proc_table,
    process_label,
    pss_kib,
    session_procs,
)
from benchmarks.report import build_rows, machine_info, write_chart, write_markdown  # noqa: E402

LAUNCHER = os.path.join(HERE, "launcher.py")
# The workloads the bare-uvicorn limit takes part in (it has no handles, pipelines or batching).
BARE_WORKLOADS = {"echo", "payload", "stream", "memory"}
# Workloads of shoal alone (the control plane at scale: control_plane.py).
SHOAL_ONLY = {"control"}
# Where RESULTS.md goes (--out-dir): control_plane.py writes its section and chart there.
OUT_DIR = [HERE]
PAYLOAD_BYTES = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Servers: one app under one framework, a session of processes (see procs.py).

# Every server started for the current measurement: the runner reads how many processes each left behind.
STARTED: list[Server] = []
# The tree each framework's launcher runs in, where not this checkout: the baseline's worktree.
TREES: dict[str, str] = {}
# Where each shoal column imported shoal from (checked against its tree at every start).
SHOAL_FILES: dict[str, str] = {}


def cli_command(framework: str, app: str, port: int, workdir: str) -> list[str]:
    """``shoal run`` / Ray's ``serve run`` of a serve config file naming the app and the port
    (Ray's CLI has no port option; both read the same file)."""
    path = os.path.join(workdir, f"{framework}-{app}-{port}.yaml")
    with open(path, "w") as f:
        f.write(f"http_options:\n  host: 127.0.0.1\n  port: {port}\napplications:\n"
                f"  - name: default\n    route_prefix: /\n    import_path: benchmarks.apps.{app}:app\n")
    exe = "serve" if framework == "ray" else "shoal"
    return [os.path.join(os.path.dirname(sys.executable), exe), "run", path]


class Server:
    """One app under one framework, started as the leader of a new session."""


    def __init__(self, framework: str, app: str, workdir: str, extra: list[str] | None = None,
                 ray_num_cpus: int | None = None, cli: bool = False) -> None:
        self.framework = framework
        self.app = app
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"{framework}-{app}-{self.port}.log")
        # The launcher runs in its tree, which is first on its path: shoal's own child processes
        # (``python -m shoal...``) inherit both, so they import the same shoal as the launcher.
        self.tree = TREES.get(framework, ROOT)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.tree, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        if framework == "bare":
            cmd = [sys.executable, "-m", "uvicorn", f"benchmarks.apps.{app}:app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--no-access-log", "--log-level", "warning"]
        else:
            env["BENCH_FRAMEWORK"] = "shoal" if framework == bl.BASELINE else framework
            env["BENCH_ROOT"] = self.tree
            # Ray: no usage reports, and the node address on loopback (127.0.0.1) rather than the
            # machine's outward-facing address, so that all of Ray's own traffic stays on 127.0.0.1.
            env["RAY_USAGE_STATS_ENABLED"] = "0"
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            env["SHOAL_RUN_DIR"] = tempfile.mkdtemp(prefix="run-", dir=workdir)
            cmd = [sys.executable, LAUNCHER, app, "--port", str(self.port), *(extra or [])]
            if framework == "ray" and ray_num_cpus:
                cmd += ["--ray-num-cpus", str(ray_num_cpus)]
            if cli:
                cmd = cli_command(framework, app, self.port, workdir)
        self.cli = cli
        self.cmd = cmd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_spawn = 0.0
        self.leftovers = 0

    def start(self) -> Server:
        self._logf = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        STARTED.append(self)
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=self.tree, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._logf, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def check_tree(self) -> None:
        """For a shoal column: raise unless the launcher imported shoal from this server's tree."""
        if self.framework not in ("shoal", bl.BASELINE) or self.cli:
            return  # (a CLI does not say; it imports from the tree first on PYTHONPATH)
        with open(self.log_path, errors="replace") as f:
            path = bl.check_tree(f.read(), self.tree)
        if SHOAL_FILES.get(self.framework) != path:
            log(f"  {self.framework}: shoal imported from {path}")
            SHOAL_FILES[self.framework] = path

    def exited(self) -> int | None:
        """The launcher's exit code once it has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, n: int = 30) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def wait_http(self, path: str = "/", timeout_s: float = 180.0) -> float:
        """Poll ``path`` until it answers 200; seconds since spawn."""
        assert self.proc is not None
        deadline = time.perf_counter() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.framework}/{self.app} exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    elapsed = time.perf_counter() - self.t_spawn
                    self.check_tree()
                    return elapsed
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.framework}/{self.app}: no HTTP 200 within {timeout_s:.0f} s:\n"
                                   + self.log_tail())
            time.sleep(0.01)

    def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{self.framework}/{self.app} did not finish within {timeout_s:.0f} s:\n"
                               + self.log_tail()) from e
        if code == 0:  # a failed launcher may have died before saying; its log tail says why
            self.check_tree()
        return code

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM the launcher (its clean shutdown), then SIGKILL whatever of its session is left."""
        if self.proc is None:
            return
        root = self.proc.pid
        members = session_procs(root) if self.proc.poll() is None else {}
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(root, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log(f"{self.framework}/{self.app}: no exit {grace_s:.0f} s after SIGTERM; SIGKILL")
                with suppress(ProcessLookupError):
                    os.kill(root, signal.SIGKILL)
                self.proc.wait(10)
        # Whatever the launcher's shutdown left behind gets a few seconds to go by itself, then SIGKILL.
        deadline = time.monotonic() + 10
        while True:
            members.update({pid: p for pid, p in proc_table().items() if p.sid == root})
            rest = [p for p in members.values() if p.pid != root and alive(p)]
            if not rest or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        if rest:
            self.leftovers = len(rest)
            log(f"{self.framework}/{self.app}: {len(rest)} process(es) outlived the launcher "
                f"({', '.join(sorted({p.name for p in rest}))}); killing them")
            for p in rest:
                if alive(p):
                    with suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
            time.sleep(0.5)
        self._logf.close()
        self.proc = None


@contextmanager
def serving(framework: str, app: str, workdir: str, ready_path: str = "/", **kw: Any) -> Iterator[Server]:
    server = Server(framework, app, workdir, **kw).start()
    try:
        server.wait_http(ready_path)
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Workloads: each returns a dict of measurements for one framework.

PATHS = {  # the path of each workload's endpoint, per framework (the bare app serves all on one port)
    ("bare", "payload"): "/payload",
    ("bare", "stream"): "/stream",
}


def app_for(framework: str, app: str) -> str:
    return "bare_asgi" if framework == "bare" else app


def path_for(framework: str, app: str) -> str:
    return PATHS.get((framework, app), "/")


def w_echo(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    with serving(fw, app_for(fw, "echo"), workdir) as s:
        res = wrk_series(s.base + "/", cfg.echo_conns, cfg)
        res["seq"] = sequential_gets(s.port, "/", cfg.seq_requests)
        log(f"    {cfg.seq_requests} sequential GETs: p50 {res['seq']['p50_ms']:.3f} ms")
    return res


def w_pipeline3(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    # Each Ray replica reserves one logical CPU by default: three deployments need three on a 2-core machine.
    with serving(fw, "pipeline3", workdir, ready_path="/?x=1", ray_num_cpus=max(4, os.cpu_count() or 1)) as s:
        return wrk_series(s.base + "/?x=1", cfg.pipeline_conns, cfg)


def w_payload(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    script = os.path.join(workdir, "post_1mb.lua")
    with open(script, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = string.rep("x", {PAYLOAD_BYTES})\n'
                'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    path = path_for(fw, "payload")
    with serving(fw, app_for(fw, "payload"), workdir) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", path, body=b"x" * PAYLOAD_BYTES)
        got = conn.getresponse().read().decode()
        conn.close()
        if got.strip() != str(PAYLOAD_BYTES):
            raise RuntimeError(f"payload app answered {got[:80]!r}, expected {PAYLOAD_BYTES}")
        return wrk_series(s.base + path, cfg.payload_conns, cfg, script)


def w_stream(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    path = path_for(fw, "stream")
    with serving(fw, app_for(fw, "stream"), workdir, ready_path=path + "?n=1") as s:
        asyncio.run(streams(s.base + path, cfg.stream_clients, 5))  # warm-up
        res = asyncio.run(streams(s.base + path, cfg.stream_clients, cfg.stream_tokens))
    log(f"    {res['clients']} streams x {res['tokens_per_stream']} tokens: {res['tokens_per_s']:.0f} tokens/s "
        f"(ideal {res['ideal_tokens_per_s']:.0f}), TTFT p50 {res['ttft_p50_ms']:.1f} ms")
    return res


def _in_launcher(fw: str, app: str, bench: str, args: list[str], budget_s: float, workdir: str) -> dict[str, Any]:
    out = os.path.join(workdir, f"{fw}-{bench}.json")
    server = Server(fw, app, workdir, extra=["--bench", bench, "--out", out, *args]).start()
    try:
        code = server.wait_exit(budget_s)
        if code != 0 or not os.path.exists(out):
            raise RuntimeError(f"{fw}/{bench} failed ({code}):\n{server.log_tail()}")
    finally:
        server.stop()
    with open(out) as f:
        return dict(json.load(f))


def w_handle(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    res = _in_launcher(fw, "noop", "handle", ["--calls", str(cfg.handle_calls), "--callers",
                       str(cfg.handle_callers), "--seconds", str(cfg.handle_seconds)],
                       cfg.startup_timeout_s + cfg.handle_calls * 0.5 + cfg.handle_seconds * 3 + 60, workdir)
    log(f"    driver: c1 p50 {res['c1_p50_ms']:.3f} ms; c{res['cN_callers']} {res['cN_calls_per_s']:.0f} calls/s")
    # The same two measurements made inside an ingress replica, on its own event loop (handle_ingress.py).
    query = f"/?calls={cfg.handle_calls}&callers={cfg.handle_callers}&seconds={cfg.handle_seconds:g}"
    with serving(fw, "handle_ingress", workdir, ray_num_cpus=max(4, os.cpu_count() or 1)) as s:
        ing = json.loads(_http_get(s.port, query, timeout_s=cfg.handle_calls * 0.5 + cfg.handle_seconds * 3 + 60))
    log(f"    ingress replica: c1 p50 {ing['c1_p50_ms']:.3f} ms; "
        f"c{ing['cN_callers']} {ing['cN_calls_per_s']:.0f} calls/s")
    res["ingress"] = ing
    return res


def _http_get(port: int, path: str, timeout_s: float = 30.0) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path} -> {resp.status}: {body[:200]!r}")
        return body
    finally:
        conn.close()


def w_batch(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    res = _in_launcher(fw, "batch", "batch", ["--callers", str(cfg.batch_callers), "--seconds",
                       str(cfg.batch_seconds)], cfg.startup_timeout_s + cfg.batch_seconds * 3 + 60, workdir)
    log(f"    handles: {res['items_per_s']:.0f} items/s = {res['fraction_of_ideal']:.1%} of ideal, "
        f"mean batch {res['mean_batch']:.1f}")
    # The same batched method behind HTTP: wrk's connections are the callers.
    with serving(fw, "batch", workdir) as s:
        url = s.base + "/"
        wrk(url, cfg.batch_callers, cfg.warmup_s)
        _http_get(s.port, "/?reset=1")
        r = wrk(url, cfg.batch_callers, cfg.batch_seconds)
        stats = json.loads(_http_get(s.port, "/?stats=1"))
    res["http"] = {**r, "fraction_of_ideal": r["rps"] / res["ideal_items_per_s"], "mean_batch": stats["mean_batch"]}
    log(f"    HTTP (wrk c{cfg.batch_callers}): {r['rps']:.0f} req/s = {res['http']['fraction_of_ideal']:.1%} of ideal, "
        f"mean batch {stats['mean_batch']:.1f}")
    return res


def w_grpc(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    """gRPC echo (``grpc_echo.py``): unary and server-streaming calls through the framework's gRPC ingress."""
    folder = grpc_echo.compile_proto(workdir)
    grpc_port = free_port()
    server = Server(fw, grpc_echo.APP, workdir, extra=["--grpc-port", str(grpc_port)])
    if fw == bl.BASELINE and not os.path.exists(os.path.join(server.tree, "shoal", "grpc_util.py")):
        raise RuntimeError(f"shoal in {server.tree} has no gRPC ingress (no shoal/grpc_util.py)")
    # The generated modules, for the launcher, the proxy and the replicas (Ray's workers inherit it too).
    server.env["PYTHONPATH"] = os.pathsep.join((server.env["PYTHONPATH"], folder))
    target = f"127.0.0.1:{grpc_port}"
    server.start()
    try:
        waited = grpc_echo.wait_ready(target, folder, server, cfg.startup_timeout_s)
        server.check_tree()
        log(f"    first gRPC answer {waited:.1f} s after spawn")
        return grpc_echo.drive(target, folder, cfg.grpc_callers, cfg.grpc_stream_messages, cfg.duration_s,
                               cfg.warmup_s)
    finally:
        server.stop()


def w_cores(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    """HTTP echo with 1 and 2 replicas, and each process's share of the cores (``cores.py``)."""
    return cores_wl.measure(Server, fw, cfg, workdir)


def w_coldstart(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    """A driver script (the launcher: import the app, ``serve.start``, ``serve.run``), and the
    framework's CLI running a serve config file: spawn to the first HTTP 200, median of runs."""
    res: dict[str, Any] = {}
    for kind, cli in (("driver", False), ("cli", True)):
        if cli and fw == "bare":
            continue
        times = []
        for _ in range(cfg.coldstart_runs):
            server = Server(fw, "echo", workdir, cli=cli).start()
            try:
                times.append(server.wait_http("/", cfg.startup_timeout_s))
            finally:
                server.stop()
            log(f"    {kind}: spawn -> first HTTP 200: {times[-1]:.2f} s")
        if cli:
            res["cli"] = {"runs_s": times, "median_s": statistics.median(times)}
        else:
            res.update({"runs_s": times, "median_s": statistics.median(times)})
    return res


def _pss_snapshot(root: int) -> dict[str, Any]:
    """PSS of a session's processes: the total, how many, and by process name."""
    members = session_procs(root)
    per = {pid: pss_kib(pid) for pid in members}
    names: dict[str, int] = {}
    for pid in members:
        name = process_label(pid, members[pid].name)
        names[name] = names.get(name, 0) + per[pid]
    return {"pss_mb": sum(per.values()) / 1024, "processes": len(members),
            "by_name_mb": {k: round(v / 1024, 1) for k, v in sorted(names.items(), key=lambda kv: -kv[1])}}


def w_memory(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    with serving(fw, app_for(fw, "echo"), workdir) as s:
        assert s.proc is not None
        t_ready = time.monotonic()
        # Idle for idle_s; the CPU the server's processes use meanwhile is measured over all but the first second.
        time.sleep(1.0)
        t0, before = time.monotonic(), cpu_ticks(session_procs(s.proc.pid))
        time.sleep(max(0.0, cfg.idle_s - 1.0))
        after, t1 = cpu_ticks(session_procs(s.proc.pid)), time.monotonic()
        res = _pss_snapshot(s.proc.pid)
        if cfg.settle_s > 0:
            time.sleep(max(0.0, t_ready + cfg.settle_s - time.monotonic()))
            res["settled"] = {**_pss_snapshot(s.proc.pid), "after_s": cfg.settle_s}
    ticks = sum(v - before.get(k, 0) for k, v in after.items())
    res["idle_cpu_cores"] = ticks / os.sysconf("SC_CLK_TCK") / (t1 - t0)
    log(f"    {res['pss_mb']:.0f} MB PSS in {res['processes']} processes; "
        f"idle CPU {res['idle_cpu_cores']:.1%} of a core")
    if "settled" in res:
        log(f"    {cfg.settle_s:.0f} s after start-up: {res['settled']['pss_mb']:.0f} MB PSS in "
            f"{res['settled']['processes']} processes")
    return res


def w_control(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    """The control plane at scale (``control_plane.py``: a controller with fake replicas, each point in
    its own process); it writes control_plane.json, control_plane.png and its section of RESULTS.md."""
    cmd = [sys.executable, os.path.join(HERE, "control_plane.py"), "--write-results", "--out-dir", OUT_DIR[0],
           *(["--quick"] if cfg.quick else [])]
    with open(os.path.join(workdir, "control_plane.log"), "wb") as logf:
        code = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                              timeout=3600).returncode
    if code != 0:
        raise RuntimeError(f"control_plane.py failed ({code}); its log: {workdir}/control_plane.log")
    with open(os.path.join(OUT_DIR[0], "control_plane.json")) as f:
        points = json.load(f)["points"]
    res = {str(p["replicas"]): {"tick_p50_ms": p["steady"]["tick_ms"]["p50"],
                                "tick_max_ms": p["steady"]["tick_ms"]["max"],
                                "status_p50_ms": p["status"]["ms"]["p50"], "rss_growth_mb": p["rss_growth_mb"]}
           for p in points}
    top = points[-1]
    log(f"    {top['replicas']} replicas: tick p50 {top['steady']['tick_ms']['p50']:.1f} ms, "
        f"status {top['status']['ms']['p50']:.1f} ms")
    return {"points": res}


RUNNERS: dict[str, Callable[[str, Settings, str], dict[str, Any]]] = {
    "echo": w_echo, "cores": w_cores, "pipeline3": w_pipeline3, "handle": w_handle, "payload": w_payload,
    "stream": w_stream,
    "batch": w_batch, "coldstart": w_coldstart, "memory": w_memory, "grpc": w_grpc, "control": w_control,
}


# ---------------------------------------------------------------------------------------------
# The run: which workloads under which frameworks, in which order, and the reports (report.py).


def parse_frameworks(text: str, with_baseline: bool) -> list[str]:
    """The framework columns, in order; the baseline (only with ``--baseline``) right after shoal."""
    known = [*FRAMEWORKS, bl.BASELINE] if with_baseline else list(FRAMEWORKS)
    if text in ("both", "all"):
        fws = list(FRAMEWORKS)
    else:
        fws = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in fws if x not in known]
        if bad:
            hint = "" if with_baseline else " (baseline needs --baseline REF)"
            raise SystemExit(f"unknown framework(s) {bad}; choose from {', '.join(known)}, both, all{hint}")
    if with_baseline and bl.BASELINE not in fws:
        fws.insert(fws.index("shoal") + 1 if "shoal" in fws else len(fws), bl.BASELINE)
    return fws


@dataclass
class Suite:
    """What one run accumulates (and, with ``--merge``, what it inherits from results.json)."""

    results: dict[str, Any]
    failures: dict[str, str]
    leftovers: dict[str, int]
    earlier_runs: list[dict[str, Any]]
    measured: list[str]
    background: list[float]

    @staticmethod
    def load(json_path: str, merge: bool) -> Suite:
        if not (merge and os.path.exists(json_path)):
            return Suite({}, {}, {}, [], [], [])
        with open(json_path) as f:
            old = json.load(f)
        previous = {k: old[k] for k in ("machine", "wall_s", "measured", "command") if k in old}
        return Suite(old.get("results", {}), old.get("failures", {}), old.get("leftovers", {}),
                     [*old.get("earlier_runs", []), previous], [], [])


def wait_for_idle(wait_idle_s: float) -> float:
    """How busy the CPU is with other processes, after waiting up to ``wait_idle_s`` for it to be idle."""
    busy = background_cpu()
    waited = 0.0
    while busy > 0.15 and waited < wait_idle_s:
        if waited == 0:
            log(f"  {busy:.0%} of the CPU is busy with other processes; waiting up to {wait_idle_s:.0f} s")
        busy = background_cpu(2.0)
        waited += 2.0
    if busy > 0.15:
        log(f"  warning: {busy:.0%} of the CPU is busy with other processes; numbers will be noisy")
    return busy


def measure(suite: Suite, workloads: list[str], frameworks: list[str], cfg: Settings, workdir: str,
            wait_idle_s: float, round_no: int = 0) -> dict[str, Any]:
    """One round: each workload under each framework, one after the other, into a fresh results dict.

    Shoal and the baseline alternate who goes first, from workload to workload and round to round.
    """
    results: dict[str, Any] = {}
    for i, wl in enumerate(workloads):
        for fw in bl.interleave(frameworks, i + round_no):
            if (fw == "bare" and wl not in BARE_WORKLOADS) or (wl in SHOAL_ONLY and fw != "shoal"):
                continue
            key = f"{wl}/{fw}"
            log(f"{key}")
            suite.measured.append(key)
            STARTED.clear()
            suite.background.append(wait_for_idle(wait_idle_s))
            t0 = time.perf_counter()
            try:
                results.setdefault(wl, {})[fw] = RUNNERS[wl](fw, cfg, workdir)
                suite.failures.pop(key, None)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                suite.failures[key] = f"{type(e).__name__}: {first}"
                log(f"  FAILED: {e}")
            n_left = sum(s.leftovers for s in STARTED)
            if n_left:
                suite.leftovers[key] = n_left
            log(f"  {key} took {time.perf_counter() - t0:.0f} s")
    return results


def write_reports(out_dir: str, meta: dict[str, Any], results: dict[str, Any]) -> None:
    """results.json, RESULTS.md and results.png from ``meta`` and ``results`` (the baseline table recomputed)."""
    if meta.get("baseline"):
        meta["baseline_comparison"] = bl.compare(results, meta["baseline"]["tolerance"], meta.get("rounds"))
    rows = build_rows(results)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**meta, "results": results, "rows": [r.__dict__ for r in rows]}, f, indent=2)
    write_markdown(os.path.join(out_dir, "RESULTS.md"), rows, meta)
    write_chart(os.path.join(out_dir, "results.png"), rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s load runs, shorter streams, one cold start")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(WORKLOADS)}")
    parser.add_argument("--framework", default="both",
                        help="shoal, ray, bare, baseline, a comma list, or both/all (= shoal,ray,bare; the default); "
                             "with --baseline, the baseline is added after shoal")
    parser.add_argument("--baseline", metavar="REF",
                        help="also measure shoal at git ref REF (e.g. 1d00e29), next to the working tree, "
                             "and report new/old ratios")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="measure everything N times, alternating the order, and keep each number's median "
                             "(each round's results are kept in results.json)")
    parser.add_argument("--baseline-tolerance", type=float, default=0.10, metavar="FRACTION",
                        help="a change smaller than this is reported as 'same' (default 0.10 = 10 %%)")
    parser.add_argument("--out-dir", default=HERE, help="where results.json, RESULTS.md and results.png go")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other entries of an existing results.json and replace only those run now")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement, wait up to SECONDS for other processes to leave the CPU idle")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite RESULTS.md and results.png from an existing results.json")
    return parser.parse_args()


def check_prerequisites(workloads: list[str], frameworks: list[str]) -> None:
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    if not shutil.which("wrk") and {"echo", "cores", "pipeline3", "payload"} & set(workloads):
        raise SystemExit("wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu), or `make bench`")
    for fw, mod in (("ray", "ray.serve"), ("shoal", "shoal")):
        if fw in frameworks:
            try:
                importlib.import_module(mod)
            except ImportError:
                raise SystemExit(f"{mod} is not importable by {sys.executable}; `make bench` sets up "
                                 ".venv-bench with both frameworks") from None


def compile_tree(root: str) -> None:
    """Byte-compile the tree's shoal and benchmark apps, as installing a wheel does: where
    ``PYTHONDONTWRITEBYTECODE`` is set (as on these machines), every process would otherwise
    compile each shoal module from source at every start (+0.25 s to a cold start here)."""
    code = subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(root, "shoal"),
                           os.path.join(root, "benchmarks")], stdout=subprocess.DEVNULL, check=False).returncode
    if code != 0:
        log(f"  compileall of {root} failed ({code}); processes compile their modules at start-up")


def main() -> None:
    args = parse_args()
    if args.report_only:
        with open(os.path.join(args.out_dir, "results.json")) as f:
            saved = json.load(f)
        results = saved.pop("results")
        saved.pop("rows", None)
        write_reports(args.out_dir, saved, results)
        return

    workloads = [w.strip() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    frameworks = parse_frameworks(args.framework, args.baseline is not None)
    check_prerequisites(workloads, frameworks)
    cfg = Settings.make(args.quick)
    OUT_DIR[0] = args.out_dir
    suite = Suite.load(os.path.join(args.out_dir, "results.json"), args.merge)
    workdir = tempfile.mkdtemp(prefix="shoal-bench-")
    log(f"logs and scratch files in {workdir}")
    shoal_at_start = machine_info()["shoal"]
    baseline_meta: dict[str, Any] | None = None
    t_suite = time.perf_counter()
    with ExitStack() as stack:
        compile_tree(ROOT)
        if args.baseline:
            base = stack.enter_context(bl.checkout(ROOT, args.baseline))
            TREES[bl.BASELINE] = base.root
            compile_tree(base.root)
            baseline_meta = {**base.as_json(), "tolerance": args.baseline_tolerance}
            log(f"baseline {base.label} ({args.baseline}) checked out in {base.root}")
        rounds = []
        for r in range(max(1, args.rounds)):
            if args.rounds > 1:
                log(f"round {r + 1} of {args.rounds}")
            rounds.append(measure(suite, workloads, frameworks, cfg, workdir, args.wait_idle, r))
    wall = time.perf_counter() - t_suite
    for wl, by_fw in bl.median_of_rounds(rounds).items():
        suite.results.setdefault(wl, {}).update(by_fw)

    machine = machine_info()
    if machine["shoal"] != shoal_at_start:
        log(f"shoal changed during the run: {shoal_at_start} -> {machine['shoal']}")
        machine["shoal"] = f"{shoal_at_start} (at the start; {machine['shoal']} at the end)"
    meta = {"command": " ".join(["python benchmarks/run.py", *sys.argv[1:]]),
            "machine": machine, "settings": cfg.__dict__, "wall_s": wall, "failures": suite.failures,
            "leftovers": suite.leftovers, "workdir": workdir, "background_cpu": suite.background,
            "measured": suite.measured, "earlier_runs": suite.earlier_runs, "baseline": baseline_meta,
            "shoal_imported_from": dict(SHOAL_FILES), "rounds": rounds if len(rounds) > 1 else None}
    write_reports(args.out_dir, meta, suite.results)
    log(f"suite took {wall / 60:.1f} min; wrote {args.out_dir}/RESULTS.md, results.json, results.png")
    with open(os.path.join(args.out_dir, "RESULTS.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
