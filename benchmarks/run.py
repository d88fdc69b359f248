"""The side-by-side benchmark suite: shoal vs Ray Serve vs bare uvicorn, on this machine, in one run.

    python benchmarks/run.py [--quick] [--only NAME,...] [--framework shoal|ray|bare|both|all|LIST]

Workloads (``--only``): echo, pipeline3, handle, payload, stream, batch, coldstart, memory.
Frameworks: ``both`` (the default) and ``all`` mean shoal, Ray Serve and the bare-uvicorn limit.

Every measurement starts its app in a fresh process (``benchmarks/launcher.py``, or uvicorn for
the bare limit) in a new session, drives it over 127.0.0.1 only, and stops that session's
processes by their ids before the next one starts. Results go to ``benchmarks/results.json``,
``benchmarks/RESULTS.md`` and ``benchmarks/results.png``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAUNCHER = os.path.join(HERE, "launcher.py")
WORKLOADS = ("echo", "pipeline3", "handle", "payload", "stream", "batch", "coldstart", "memory")
FRAMEWORKS = ("shoal", "ray", "bare")
# The workloads the bare-uvicorn limit takes part in (it has no handles, pipelines or batching).
BARE_WORKLOADS = {"echo", "payload", "stream", "memory"}
PAYLOAD_BYTES = 1 << 20


@dataclass(frozen=True)
class Settings:
    quick: bool
    duration_s: float  # one wrk measurement
    warmup_s: float  # a wrk run at the same concurrency, discarded, before each measurement
    echo_conns: tuple[int, ...] = (1, 8, 32, 100)
    pipeline_conns: tuple[int, ...] = (1, 8, 32)
    payload_conns: tuple[int, ...] = (1, 8)
    seq_requests: int = 500
    handle_calls: int = 500
    handle_callers: int = 64
    handle_seconds: float = 5.0
    batch_callers: int = 64
    batch_seconds: float = 5.0
    stream_clients: int = 16
    stream_tokens: int = 1000
    coldstart_runs: int = 3
    idle_s: float = 5.0
    startup_timeout_s: float = 180.0

    @staticmethod
    def make(quick: bool) -> Settings:
        if not quick:
            return Settings(quick=False, duration_s=5.0, warmup_s=1.0)
        return Settings(quick=True, duration_s=2.0, warmup_s=0.5, handle_seconds=2.0, batch_seconds=2.0,
                        stream_tokens=200, coldstart_runs=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


# ---------------------------------------------------------------------------------------------
# Processes: a server is one session; we find its members in /proc and stop them by pid.


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    sid: int
    start: int  # start time in clock ticks since boot: tells a pid apart from a reused one
    name: str


def proc_table() -> dict[int, ProcInfo]:
    table: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ... starttime(22nd field)"; comm may hold spaces and parens.
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        table[int(entry)] = ProcInfo(int(entry), int(fields[1]), int(fields[3]), int(fields[19]), name)
    return table


def session_procs(root: int) -> dict[int, ProcInfo]:
    """``root`` and every process descending from it or sharing its session (``root`` leads it)."""
    table = proc_table()
    members = {pid: p for pid, p in table.items() if p.sid == root or pid == root}
    frontier = list(members)
    while frontier:
        parent = frontier.pop()
        for pid, p in table.items():
            if p.ppid == parent and pid not in members:
                members[pid] = p
                frontier.append(pid)
    return members


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]), idle


def background_cpu(seconds: float = 0.5) -> float:
    """Fraction of the whole machine's CPU busy over ``seconds`` (taken while none of our servers run)."""
    t1, i1 = _cpu_jiffies()
    time.sleep(seconds)
    t2, i2 = _cpu_jiffies()
    return 0.0 if t2 == t1 else 1 - (i2 - i1) / (t2 - t1)


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_label(pid: int, comm: str) -> str:
    """A readable name: the comm, or for a Python process the script or module it runs."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return comm
    if not comm.startswith("python") or len(argv) < 2:
        return comm
    rest = [a for a in argv[1:] if a not in ("-u", "-B")]
    if rest and rest[0] == "-m" and len(rest) > 1:
        return rest[1]
    if rest and rest[0] == "-c":
        return "python -c " + (rest[1].split(";")[0][:40] if len(rest) > 1 else "")
    return os.path.basename(rest[0]) if rest else comm


def alive(p: ProcInfo) -> bool:
    now = proc_table().get(p.pid)
    return now is not None and now.start == p.start


# Every server started for the current measurement: the runner reads how many processes each left behind.
STARTED: list[Server] = []


class Server:
    """One app under one framework, started as the leader of a new session."""


    def __init__(self, framework: str, app: str, workdir: str, extra: list[str] | None = None,
                 ray_num_cpus: int | None = None) -> None:
        self.framework = framework
        self.app = app
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"{framework}-{app}-{self.port}.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        if framework == "bare":
            cmd = [sys.executable, "-m", "uvicorn", f"benchmarks.apps.{app}:app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--no-access-log", "--log-level", "warning"]
        else:
            env["BENCH_FRAMEWORK"] = framework
            # Ray: no usage reports, and the node address on loopback (127.0.0.1) rather than the
            # machine's outward-facing address, so that all of Ray's own traffic stays on 127.0.0.1.
            env["RAY_USAGE_STATS_ENABLED"] = "0"
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            env["SHOAL_RUN_DIR"] = tempfile.mkdtemp(prefix="run-", dir=workdir)
            cmd = [sys.executable, LAUNCHER, app, "--port", str(self.port), *(extra or [])]
            if framework == "ray" and ray_num_cpus:
                cmd += ["--ray-num-cpus", str(ray_num_cpus)]
        self.cmd = cmd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_spawn = 0.0
        self.leftovers = 0

    def start(self) -> Server:
        self._logf = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        STARTED.append(self)
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._logf, stderr=subprocess.STDOUT, start_new_session=True)
        return self

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
                    return time.perf_counter() - self.t_spawn
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
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{self.framework}/{self.app} did not finish within {timeout_s:.0f} s:\n"
                               + self.log_tail()) from e

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
# Load generators.

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsed wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {"requests": 0, "errors": 0, "non_2xx": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        if m := re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M):
            res[f"p{pct}_ms"] = _ms(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        res["requests"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        res["errors"] = sum(int(x) for x in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        res["non_2xx"] = int(m.group(1))
    return res


def wrk(url: str, conns: int, seconds: float, script: str | None = None) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    res = parse_wrk(out)
    if "rps" not in res:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    return res


def wrk_series(url: str, conns: tuple[int, ...], cfg: Settings, script: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in conns:
        wrk(url, c, cfg.warmup_s, script)
        r = wrk(url, c, cfg.duration_s, script)
        bad = f", {r['errors']} socket errors, {r['non_2xx']} non-2xx" if r["errors"] or r["non_2xx"] else ""
        log(f"    c{c}: {r['rps']:.0f} req/s, p50 {r.get('p50_ms', float('nan')):.3f} ms{bad}")
        out[f"c{c}"] = r
    return out


def sequential_gets(port: int, path: str, n: int) -> dict[str, Any]:
    """``n`` back-to-back GETs over one keep-alive connection (Ray Serve's own latency microbenchmark)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(20):
            conn.request("GET", path)
            conn.getresponse().read()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            lat.append(time.perf_counter() - t)
            if resp.status != 200:
                raise RuntimeError(f"GET {path} -> {resp.status}")
    finally:
        conn.close()
    return {"n": n, "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3}


async def _streams(url: str, clients: int, tokens: int) -> dict[str, Any]:
    import httpx

    ttft: list[float] = []
    counts: list[int] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=clients)) as c:
        async def one() -> None:
            t0 = time.perf_counter()
            first = None
            received = 0
            async with c.stream("GET", url, params={"n": tokens}) as r:
                r.raise_for_status()
                async for chunk in r.aiter_raw():
                    if first is None and chunk:
                        first = time.perf_counter() - t0
                    received += len(chunk)
            ttft.append(first if first is not None else float("nan"))
            counts.append(received // 8)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        wall = time.perf_counter() - t0
    total = sum(counts)
    ideal_wall = (tokens - 1) * 0.010
    return {"clients": clients, "tokens_per_stream": tokens, "tokens": total, "complete": total == clients * tokens,
            "wall_s": wall, "tokens_per_s": total / wall, "ideal_tokens_per_s": clients * tokens / ideal_wall,
            "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_max_ms": max(ttft) * 1e3}


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
        asyncio.run(_streams(s.base + path, cfg.stream_clients, 5))  # warm-up
        res = asyncio.run(_streams(s.base + path, cfg.stream_clients, cfg.stream_tokens))
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
    log(f"    c1 p50 {res['c1_p50_ms']:.3f} ms; c{res['cN_callers']} {res['cN_calls_per_s']:.0f} calls/s")
    return res


def _http_get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
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


def w_coldstart(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    times = []
    for _ in range(cfg.coldstart_runs):
        server = Server(fw, "echo", workdir).start()
        try:
            times.append(server.wait_http("/", cfg.startup_timeout_s))
        finally:
            server.stop()
        log(f"    spawn -> first HTTP 200: {times[-1]:.2f} s")
    return {"runs_s": times, "median_s": statistics.median(times)}


def _cpu_ticks(pids: dict[int, ProcInfo]) -> dict[tuple[int, int], int]:
    """utime + stime (clock ticks) of each process, keyed by (pid, start time)."""
    out = {}
    for pid, p in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[(pid, p.start)] = int(fields[11]) + int(fields[12])
    return out


def w_memory(fw: str, cfg: Settings, workdir: str) -> dict[str, Any]:
    with serving(fw, app_for(fw, "echo"), workdir) as s:
        assert s.proc is not None
        # Idle for idle_s; the CPU the server's processes use meanwhile is measured over all but the first second.
        time.sleep(1.0)
        t0, before = time.monotonic(), _cpu_ticks(session_procs(s.proc.pid))
        time.sleep(max(0.0, cfg.idle_s - 1.0))
        members = session_procs(s.proc.pid)
        after, t1 = _cpu_ticks(members), time.monotonic()
        per = {pid: pss_kib(pid) for pid in members}
        names: dict[str, int] = {}
        for pid in members:
            name = process_label(pid, members[pid].name)
            names[name] = names.get(name, 0) + per[pid]
    ticks = sum(v - before.get(k, 0) for k, v in after.items())
    idle_cpu = ticks / os.sysconf("SC_CLK_TCK") / (t1 - t0)
    res = {"pss_mb": sum(per.values()) / 1024, "processes": len(members), "idle_cpu_cores": idle_cpu,
           "by_name_mb": {k: round(v / 1024, 1) for k, v in sorted(names.items(), key=lambda kv: -kv[1])}}
    log(f"    {res['pss_mb']:.0f} MB PSS in {res['processes']} processes; idle CPU {idle_cpu:.1%} of a core")
    return res


RUNNERS: dict[str, Callable[[str, Settings, str], dict[str, Any]]] = {
    "echo": w_echo, "pipeline3": w_pipeline3, "handle": w_handle, "payload": w_payload, "stream": w_stream,
    "batch": w_batch, "coldstart": w_coldstart, "memory": w_memory,
}


# ---------------------------------------------------------------------------------------------
# Report.

# The Ray Serve 2.60 numbers quoted in issue 4 (measured there on a machine like this one).
ISSUE_REF = {
    "echo_c1": "402 req/s, p50 2.35 ms", "echo_c8": "525 req/s, p50 14.7 ms", "echo_c32": "45 req/s, p50 791 ms",
    "pipe_c1": "92 req/s, p50 10.7 ms", "pipe_c8": "105 req/s", "pipe_c32": "11 req/s",
    "handle_c1": "p50 1.9 ms (493 calls/s)", "handle_c64": "19 calls/s", "coldstart": "6.1 s",
    "memory": "741 MB in 11 processes", "batch": "28 % of ideal",
}


@dataclass
class Row:
    key: str
    label: str
    cells: dict[str, str]  # framework -> text
    ratio: float | None  # shoal/Ray of the row's primary metric
    ratio_text: str
    target: str
    met: bool | None
    # For the chart: achieved and target as "higher is better" factors.
    achieved: float | None = None
    goal: float | None = None


def _get(results: dict[str, Any], wl: str, fw: str, *keys: str) -> Any:
    cur: Any = results.get(wl, {}).get(fw)
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _fmt_rps(r: dict[str, Any] | None, unit: str = "req/s") -> str:
    if not r:
        return "—"
    text = f"{r['rps']:,.0f} {unit}, p50 {r['p50_ms']:.2f} ms" if "p50_ms" in r else f"{r['rps']:,.0f} {unit}"
    if r.get("errors") or r.get("non_2xx"):
        text += f" ({r['errors']} socket errors, {r['non_2xx']} non-2xx)"
    return text


def build_rows(results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    # HTTP echo.
    shoal_c8 = _get(results, "echo", "shoal", "c8", "rps")
    for c in (1, 8, 32, 100):
        k = f"c{c}"
        s, r, b = (_get(results, "echo", fw, k) for fw in FRAMEWORKS)
        q = ratio(s and s["rps"], r and r["rps"])
        row = Row(f"echo_{k}", f"HTTP echo, concurrency {c}", {"shoal": _fmt_rps(s), "ray": _fmt_rps(r),
                  "bare": _fmt_rps(b)}, q, f"{q:.1f}x req/s" if q else "—", "", None)
        if c == 8:
            of_bare = ratio(s and s["rps"], b and b["rps"])
            row.target = "≥10x Ray and ≥25 % of bare"
            parts = [x for x in (q, of_bare) if x is not None]
            row.met = (q is None or q >= 10) and (of_bare is None or of_bare >= 0.25) if parts else None
            if of_bare is not None:
                row.ratio_text += f"; {of_bare:.0%} of bare"
            row.achieved, row.goal = q, 10.0
        elif c in (32, 100):
            of_c8 = ratio(s and s["rps"], shoal_c8)
            row.target = "shoal ≥0.95x its c8"
            row.met = None if of_c8 is None else of_c8 >= 0.95
            if of_c8 is not None:
                row.ratio_text += f"; {of_c8:.2f}x shoal c8"
            row.achieved, row.goal = of_c8, 0.95
        rows.append(row)
    seq = {fw: _get(results, "echo", fw, "seq") for fw in FRAMEWORKS}
    q = ratio(seq["shoal"] and seq["shoal"]["p50_ms"], seq["ray"] and seq["ray"]["p50_ms"])
    rows.append(Row("seq", "500 sequential no-op HTTP requests (p50 / p99)",
                    {fw: f"{v['p50_ms']:.2f} / {v['p99_ms']:.2f} ms" if v else "—" for fw, v in seq.items()},
                    q, f"p50 x{q:.3f}" if q else "—", "", None))
    # Pipeline.
    for c in (1, 8, 32):
        k = f"c{c}"
        s, r = _get(results, "pipeline3", "shoal", k), _get(results, "pipeline3", "ray", k)
        if c == 1:
            q = ratio(s and s.get("p50_ms"), r and r.get("p50_ms"))
            rows.append(Row(f"pipe_{k}", "3-deployment pipeline over HTTP, c1", {"shoal": _fmt_rps(s),
                            "ray": _fmt_rps(r), "bare": "—"}, q, f"p50 x{q:.3f}" if q else "—",
                            "p50 ≤ 1/10 of Ray's", None if q is None else q <= 0.1,
                            None if not q else 1 / q, 10.0))
        else:
            q = ratio(s and s["rps"], r and r["rps"])
            rows.append(Row(f"pipe_{k}", f"3-deployment pipeline over HTTP, c{c}", {"shoal": _fmt_rps(s),
                            "ray": _fmt_rps(r), "bare": "—"}, q, f"{q:.1f}x req/s" if q else "—", "", None))
    # Handles.
    h = {fw: results.get("handle", {}).get(fw) for fw in ("shoal", "ray")}
    q = ratio(h["shoal"] and h["shoal"]["c1_p50_ms"], h["ray"] and h["ray"]["c1_p50_ms"])
    rows.append(Row("handle_c1", "handle calls from the driver, c1 (500 sequential)",
                    {**{fw: f"p50 {v['c1_p50_ms']:.3f} ms ({v['c1_calls_per_s']:,.0f} calls/s)" if v else "—"
                        for fw, v in h.items()}, "bare": "—"},
                    q, f"p50 x{q:.3f}" if q else "—", "p50 ≤ 1/10 of Ray's", None if q is None else q <= 0.1,
                    None if not q else 1 / q, 10.0))
    q = ratio(h["shoal"] and h["shoal"]["cN_calls_per_s"], h["ray"] and h["ray"]["cN_calls_per_s"])
    rows.append(Row("handle_c64", "handle calls from the driver, c64",
                    {**{fw: f"{v['cN_calls_per_s']:,.0f} calls/s" if v else "—" for fw, v in h.items()},
                     "bare": "—"}, q, f"{q:.1f}x calls/s" if q else "—", "≥20x Ray",
                    None if q is None else q >= 20, q, 20.0))
    # Payload.
    for c in (1, 8):
        k = f"c{c}"
        s, r, b = (_get(results, "payload", fw, k) for fw in FRAMEWORKS)
        cells = {"shoal": _fmt_rps(s), "ray": _fmt_rps(r), "bare": _fmt_rps(b)}
        if c == 1:
            q = ratio(s and s.get("p50_ms"), r and r.get("p50_ms"))
            rows.append(Row("payload_c1", "1 MB POST body, c1", cells, q, f"p50 x{q:.3f}" if q else "—",
                            "p50 better than Ray's", None if q is None else q < 1, None if not q else 1 / q, 1.0))
        else:
            q = ratio(s and s["rps"], r and r["rps"])
            rows.append(Row("payload_c8", "1 MB POST body, c8", cells, q, f"{q:.1f}x req/s" if q else "—", "", None))
    # Streaming.
    st = {fw: results.get("stream", {}).get(fw) for fw in FRAMEWORKS}
    q = ratio(st["shoal"] and st["shoal"]["tokens_per_s"], st["ray"] and st["ray"]["tokens_per_s"])
    any_st = next((v for v in st.values() if v), None)
    label = (f"token streams: {any_st['clients']} concurrent x {any_st['tokens_per_stream']} tokens, 10 ms gap "
             f"(ideal {any_st['ideal_tokens_per_s']:,.0f} tokens/s)") if any_st else "token streams"
    rows.append(Row("stream", label, {fw: f"{v['tokens_per_s']:,.0f} tokens/s, TTFT p50 {v['ttft_p50_ms']:.1f} ms"
                                      + ("" if v["complete"] else " (incomplete)") if v else "—"
                                      for fw, v in st.items()},
                    q, f"{q:.2f}x tokens/s" if q else "—", "tokens/s better than Ray's",
                    None if q is None else q > 1, q, 1.0))
    # Batching.
    bt = {fw: results.get("batch", {}).get(fw) for fw in ("shoal", "ray")}
    q = ratio(bt["shoal"] and bt["shoal"]["fraction_of_ideal"], bt["ray"] and bt["ray"]["fraction_of_ideal"])
    frac = bt["shoal"]["fraction_of_ideal"] if bt["shoal"] else None
    rows.append(Row("batch", "@serve.batch, 5 ms + 0.2 ms/item, 64 handle callers (% of ideal)",
                    {**{fw: f"{v['fraction_of_ideal']:.0%} ({v['items_per_s']:,.0f} items/s, mean batch "
                        f"{v['mean_batch']:.1f})" if v else "—" for fw, v in bt.items()}, "bare": "—"},
                    q, f"{q:.2f}x" if q else "—", "shoal ≥90 % of ideal", None if frac is None else frac >= 0.9,
                    frac, 0.9))
    bh = {fw: v.get("http") if v else None for fw, v in bt.items()}
    q = ratio(bh["shoal"] and bh["shoal"]["fraction_of_ideal"], bh["ray"] and bh["ray"]["fraction_of_ideal"])
    rows.append(Row("batch_http", "@serve.batch, same handler, 64 HTTP connections (% of ideal)",
                    {**{fw: f"{v['fraction_of_ideal']:.0%} ({v['rps']:,.0f} req/s, mean batch {v['mean_batch']:.1f})"
                        if v else "—" for fw, v in bh.items()}, "bare": "—"},
                    q, f"{q:.2f}x" if q else "—", "", None))
    # Cold start.
    cs = {fw: results.get("coldstart", {}).get(fw) for fw in ("shoal", "ray")}
    q = ratio(cs["shoal"] and cs["shoal"]["median_s"], cs["ray"] and cs["ray"]["median_s"])
    rows.append(Row("coldstart", "new process to first HTTP 200 (median)",
                    {**{fw: f"{v['median_s']:.2f} s" if v else "—" for fw, v in cs.items()}, "bare": "—"},
                    q, f"x{q:.3f}" if q else "—", "≤ 1/10 of Ray's", None if q is None else q <= 0.1,
                    None if not q else 1 / q, 10.0))
    # Idle memory.
    mem = {fw: results.get("memory", {}).get(fw) for fw in FRAMEWORKS}
    q = ratio(mem["shoal"] and mem["shoal"]["pss_mb"], mem["ray"] and mem["ray"]["pss_mb"])
    rows.append(Row("memory", "idle memory, 1-deployment app (PSS, all processes)",
                    {fw: f"{v['pss_mb']:,.0f} MB in {v['processes']} processes" if v else "—"
                     for fw, v in mem.items()},
                    q, f"x{q:.3f}" if q else "—", "≤ 1/5 of Ray's", None if q is None else q <= 0.2,
                    None if not q else 1 / q, 5.0))
    if any(v and "idle_cpu_cores" in v for v in mem.values()):
        rows.append(Row("idle_cpu", "idle CPU of the same app (% of one core, after startup)",
                        {fw: f"{v['idle_cpu_cores']:.1%}" if v and "idle_cpu_cores" in v else "—"
                         for fw, v in mem.items()}, None, "—", "", None))
    return [r for r in rows if any(v != "—" for v in r.cells.values())]


def machine_info() -> dict[str, str]:
    info: dict[str, str] = {}
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["cores"] = str(os.cpu_count())
    with suppress(OSError), open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
        info["ram"] = f"{kib / 1024 / 1024:.1f} GiB"
    os_name = platform.system()
    with suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    info["os"] = f"{os_name}, kernel {platform.release()}"
    info["python"] = platform.python_version()

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "shoal"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    info["shoal"] = f"{version('shoal')} @ {commit or 'unknown'}{' + uncommitted changes in shoal/' if dirty else ''}"
    info["ray"] = version("ray")
    info["uvicorn"] = version("uvicorn")
    wrk_path = shutil.which("wrk")
    if wrk_path:
        out = subprocess.run([wrk_path, "-v"], capture_output=True, text=True)
        info["wrk"] = (out.stdout + out.stderr).split("Copyright")[0].strip() or "wrk"
    info["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return info


def write_markdown(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    m = meta["machine"]
    cfg = meta["settings"]
    lines = [
        "# shoal vs Ray Serve: benchmark results",
        "",
        "Produced by `python benchmarks/run.py" + (" --quick" if cfg["quick"] else "") + "` "
        "(see [README.md](README.md) for what each workload does and how it is measured).",
        "",
        f"- Machine: {m.get('cpu', '?')}, {m['cores']} cores, {m.get('ram', '?')} RAM; {m['os']}",
        f"- Python {m['python']}; shoal {m['shoal']}; Ray {m['ray']}; uvicorn {m['uvicorn']}; "
        f"{m.get('wrk', 'wrk missing')}",
        f"- Date: {m['date']}; suite wall time {meta['wall_s'] / 60:.1f} min; "
        f"wrk runs of {cfg['duration_s']:g} s after a {cfg['warmup_s']:g} s warm-up, one wrk thread",
    ]
    for run in meta.get("earlier_runs") or []:
        rm = run.get("machine", {})
        lines.append(f"- Merged with an earlier run: {rm.get('date', '?')}, shoal {rm.get('shoal', '?')}, "
                     f"{run.get('wall_s', 0) / 60:.1f} min; the entries measured in the latest run are "
                     f"{', '.join(meta['measured'])}")
    bg = meta.get("background_cpu") or []
    if bg:
        lines.append(f"- CPU busy with other processes just before each measurement: mean {statistics.fmean(bg):.0%}, "
                     f"max {max(bg):.0%}" + (" (**noisy run: the machine was not idle**)" if max(bg) > 0.15 else ""))
    lines += [
        "",
        "| workload | shoal | Ray Serve | bare uvicorn | shoal/Ray | target | met? | Ray in issue 4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "—" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.label} | {r.cells.get('shoal', '—')} | {r.cells.get('ray', '—')} | "
                     f"{r.cells.get('bare', '—')} | {r.ratio_text} | {r.target or '—'} | {met} | "
                     f"{ISSUE_REF.get(r.key, '—')} |")
    lines += ["", "Ratios are shoal's number divided by Ray Serve's from this same run: below 1 is better for "
              "latencies, times and memory, above 1 for throughput.", ""]
    if meta.get("leftovers"):
        lines += ["Processes that outlived their launcher and had to be killed: "
                  + ", ".join(f"{k}: {v}" for k, v in meta["leftovers"].items()), ""]
    if meta.get("failures"):
        lines += ["Failures:", ""] + [f"- {k}: {v}" for k, v in meta["failures"].items()] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_chart(path: str, rows: list[Row]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart")
        return False
    data = [r for r in rows if r.achieved is not None and r.goal is not None and r.achieved > 0]
    if not data:
        return False
    fig, ax = plt.subplots(figsize=(13, 5.5))
    xs = range(len(data))
    colors = ["#2e8b57" if r.met else "#c0392b" for r in data]
    ax.bar(xs, [r.achieved for r in data], color=colors, width=0.6, label="shoal (green: target met)")
    ax.scatter(xs, [r.goal for r in data], marker="_", s=900, color="black", linewidths=2.5, zorder=3,
               label="target")
    for x, r in zip(xs, data, strict=True):
        ax.annotate(f"{r.achieved:.3g}", (x, r.achieved), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    short = {"echo_c8": "echo c8\nreq/s vs Ray", "echo_c32": "echo c32\nvs shoal c8",
             "echo_c100": "echo c100\nvs shoal c8", "pipe_c1": "pipeline3 c1\nRay/shoal p50",
             "handle_c1": "handle c1\nRay/shoal p50", "handle_c64": "handle c64\ncalls/s vs Ray",
             "payload_c1": "1 MB POST c1\nRay/shoal p50", "stream": "streaming\ntokens/s vs Ray",
             "batch": "batching\nfraction of ideal", "coldstart": "cold start\nRay / shoal",
             "memory": "idle memory\nRay / shoal"}
    ax.set_xticklabels([short.get(r.key, r.key) for r in data], fontsize=8)
    ax.set_ylabel("higher is better (log scale)")
    ax.set_title("shoal against its targets (ratios to Ray Serve measured in the same run)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------


def parse_frameworks(text: str) -> list[str]:
    if text in ("both", "all"):
        return list(FRAMEWORKS)
    fws = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in fws if x not in FRAMEWORKS]
    if bad:
        raise SystemExit(f"unknown framework(s) {bad}; choose from {', '.join(FRAMEWORKS)}, both, all")
    return fws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s load runs, shorter streams, one cold start")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(WORKLOADS)}")
    parser.add_argument("--framework", default="both",
                        help="shoal, ray, bare, a comma list, or both/all (= shoal,ray,bare; the default)")
    parser.add_argument("--out-dir", default=HERE, help="where results.json, RESULTS.md and results.png go")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other entries of an existing results.json and replace only those run now")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement, wait up to SECONDS for other processes to leave the CPU idle")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite RESULTS.md and results.png from an existing results.json")
    args = parser.parse_args()
    if args.report_only:
        with open(os.path.join(args.out_dir, "results.json")) as f:
            saved = json.load(f)
        rows = build_rows(saved["results"])
        write_markdown(os.path.join(args.out_dir, "RESULTS.md"), rows, saved)
        write_chart(os.path.join(args.out_dir, "results.png"), rows)
        return

    workloads = [w.strip() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    frameworks = parse_frameworks(args.framework)
    if not shutil.which("wrk") and {"echo", "pipeline3", "payload"} & set(workloads):
        raise SystemExit("wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu), or `make bench`")
    for fw, mod in (("ray", "ray.serve"), ("shoal", "shoal")):
        if fw in frameworks:
            try:
                importlib.import_module(mod)
            except ImportError:
                raise SystemExit(f"{mod} is not importable by {sys.executable}; `make bench` sets up "
                                 ".venv-bench with both frameworks") from None

    cfg = Settings.make(args.quick)
    json_path = os.path.join(args.out_dir, "results.json")
    results: dict[str, Any] = {}
    earlier_runs: list[dict[str, Any]] = []
    measured: list[str] = []
    failures: dict[str, str] = {}
    leftovers: dict[str, int] = {}
    if args.merge and os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
        results = old.get("results", {})
        failures = old.get("failures", {})
        leftovers = old.get("leftovers", {})
        previous = {k: old[k] for k in ("machine", "wall_s", "measured") if k in old}
        earlier_runs = [*old.get("earlier_runs", []), previous]

    workdir = tempfile.mkdtemp(prefix="shoal-bench-")
    log(f"logs and scratch files in {workdir}")
    shoal_at_start = machine_info()["shoal"]
    t_suite = time.perf_counter()
    background: list[float] = []
    for wl in workloads:
        for fw in frameworks:
            if fw == "bare" and wl not in BARE_WORKLOADS:
                continue
            key = f"{wl}/{fw}"
            log(f"{key}")
            measured.append(key)
            STARTED.clear()
            busy = background_cpu()
            waited = 0.0
            while busy > 0.15 and waited < args.wait_idle:
                if waited == 0:
                    log(f"  {busy:.0%} of the CPU is busy with other processes; waiting up to {args.wait_idle:.0f} s")
                busy = background_cpu(2.0)
                waited += 2.0
            background.append(busy)
            if busy > 0.15:
                log(f"  warning: {busy:.0%} of the CPU is busy with other processes; numbers will be noisy")
            t0 = time.perf_counter()
            try:
                results.setdefault(wl, {})[fw] = RUNNERS[wl](fw, cfg, workdir)
                failures.pop(key, None)
            except Exception as e:
                failures[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                log(f"  FAILED: {e}")
            n_left = sum(s.leftovers for s in STARTED)
            if n_left:
                leftovers[key] = n_left
            log(f"  {key} took {time.perf_counter() - t0:.0f} s")
    wall = time.perf_counter() - t_suite

    machine = machine_info()
    if machine["shoal"] != shoal_at_start:
        log(f"shoal changed during the run: {shoal_at_start} -> {machine['shoal']}")
        machine["shoal"] = f"{shoal_at_start} (at the start; {machine['shoal']} at the end)"
    meta = {"machine": machine, "settings": cfg.__dict__, "wall_s": wall, "failures": failures,
            "leftovers": leftovers, "workdir": workdir, "background_cpu": background, "measured": measured,
            "earlier_runs": earlier_runs}
    rows = build_rows(results)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({**meta, "results": results, "rows": [r.__dict__ for r in rows]}, f, indent=2)
    write_markdown(os.path.join(args.out_dir, "RESULTS.md"), rows, meta)
    write_chart(os.path.join(args.out_dir, "results.png"), rows)
    log(f"suite took {wall / 60:.1f} min; wrote {args.out_dir}/RESULTS.md, results.json, results.png")
    with open(os.path.join(args.out_dir, "RESULTS.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
