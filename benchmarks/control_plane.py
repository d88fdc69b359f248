"""The control plane at scale: a real shoal Controller, in-process, with fake replica processes.

    python benchmarks/control_plane.py [--quick] [--points 100,250,500,1000,2000] [--ticks N]
                                       [--callers N] [--deployments-per-app N] [--max-apps N]
                                       [--rounds N] [--out-dir DIR] [--write-results]
                                       [--profile REPLICAS] [--report-only]

Each point (a number of replicas) runs twice in a fresh interpreter: once for the times and the
resident memory, once under ``tracemalloc`` for the controller's heap. A point of N replicas is
``N // (deployments per app)`` apps (at least 1, at most ``--max-apps``) of ``--deployments-per-app``
deployments (one ingress and its children), the replicas spread evenly over the deployments
(100 apps x 20 deployments x 1 replica at 2,000), and ``--callers`` routers subscribed to the
membership of every deployment, plus one proxy subscribed to the route table.

What is real and what is fake:

* real: :class:`shoal.runtime.controller.Controller` with its registry, reconcile, lifecycle,
  watchdog, health checks, membership/route publication and admin ``status`` call; every
  message the controller sends is pickled as the wire pickles it (``wire_codec.dumps``), and
  its bytes (plus the 4-byte frame header) are counted per kind of peer;
* fake: the process factory (the controller's ``factory`` seam, as the unit tests use it)
  returns a process object that "runs" until killed; its replica connects at once through the
  controller's own message table (``Connections.on_message``: Hello, then ReplicaReady when the
  controller sends ReplicaInit) and answers health checks; routers and the proxy are objects
  whose ``send`` only pickles and counts. No socket, no child process. The watchdog's
  ``/proc/<pid>/stat`` read is made on the benchmark's own pid, so that it costs what a real read
  costs. The controller's clock is a fake that moves ``TICK_S`` (50 ms) per tick.

Per point: the time of one controller tick (``Controller._tick``, the whole control loop body:
reaping, watchdog, reconcile, status, membership, health checks) in steady state over
``--ticks`` ticks (12 s of the fake clock by default, so one round of the default 10 s health
checks falls inside), and during churn (a replica crashes, is replaced, the replacement comes
up); the latency and size of the ``status`` admin call (what ``serve.status()`` and
``shoal status`` ask); the bytes pushed to routers and the proxy at bring-up and per change;
the process's resident memory and the controller's heap (tracemalloc, the benchmark's own fakes
left out). Results: ``control_plane.json``, ``control_plane.png`` and, with ``--write-results``,
a section of ``RESULTS.md`` (see ``control_plane_report.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import itertools
import json
import logging
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a script, sys.path[0] is benchmarks/ and not the checkout
    sys.path.insert(0, ROOT)

from shoal import serve  # noqa: E402
from shoal.deployment import AppSpec, build_app_spec  # noqa: E402
from shoal.runtime.controller import TICK_S, Clock, Controller, Settings  # noqa: E402
from shoal.runtime.controller.admin import dispatch  # noqa: E402
from shoal.runtime.controller.gcpolicy import FULL_EVERY_S, GcPolicy  # noqa: E402
from shoal.runtime.controller.watchdog import Watchdog, read_rss, read_state  # noqa: E402
from shoal.runtime.wire import (  # noqa: E402
    Call,
    Hello,
    ReplicaInit,
    ReplicaReady,
    Reply,
    Role,
    Stop,
    Subscribe,
    SubscribeRoutes,
)
from shoal.runtime.wire_codec import dumps  # noqa: E402
from shoal.status import ApplicationStatus, ReplicaState  # noqa: E402

FRAME_HEADER = 4  # the wire's length prefix (">I")
POINTS = (100, 250, 500, 1000, 2000)
QUICK_POINTS = (100, 250, 500)
STEADY_TICKS = 240  # 12 s of the fake clock: one round of 10 s health checks falls inside
STATUS_CALLS = 20
CHANGES = 20
BRINGUP_TICKS = 400


# ---------------------------------------------------------------------------------------------
# The apps: one ingress and its children per app.

@serve.deployment
class Leaf:
    def __call__(self, x: Any) -> Any:
        return x


@serve.deployment
class Ingress:
    def __init__(self, *children: Any) -> None:
        self.children = children

    def __call__(self, x: Any) -> Any:
        return x


@dataclass(frozen=True)
class Layout:
    replicas: int
    apps: int
    deployments_per_app: int

    @staticmethod
    def of(replicas: int, deployments_per_app: int, max_apps: int) -> Layout:
        if replicas < 1 or deployments_per_app < 1 or max_apps < 1:
            raise ValueError("replicas, deployments per app and max apps must be >= 1")
        per_app = min(deployments_per_app, replicas)  # every deployment gets a replica at least
        return Layout(replicas, max(1, min(max_apps, replicas // per_app)), per_app)

    @property
    def deployments(self) -> int:
        return self.apps * self.deployments_per_app

    def replicas_of(self, index: int) -> int:
        """Replicas of the ``index``-th deployment (0-based, over all apps): an even spread."""
        base, extra = divmod(self.replicas, self.deployments)
        return base + (1 if index < extra else 0)

    def specs(self) -> list[AppSpec]:
        out = []
        for a in range(self.apps):
            first = a * self.deployments_per_app
            children = [Leaf.options(name=f"Leaf{j}", num_replicas=self.replicas_of(first + j)).bind()
                        for j in range(1, self.deployments_per_app)]
            root = Ingress.options(num_replicas=self.replicas_of(first)).bind(*children)
            out.append(build_app_spec(root, f"app{a}", f"/app{a}"))
        return out


# ---------------------------------------------------------------------------------------------
# The fakes: processes, replicas, routers, the proxy.

class FakeProc:
    """A replica process that runs until it is stopped or killed."""

    __slots__ = ("code", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None

    @property
    def returncode(self) -> int | None:
        return self.code

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, sig: int) -> None:
        if self.code is None:
            self.code = -sig

    def kill(self) -> None:
        if self.code is None:
            self.code = -9

    def wait(self, timeout: float | None = None) -> int:
        return self.code if self.code is not None else 0


class Meter:
    """Bytes and messages the controller wrote, by kind of peer, as the wire would frame them."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()
        self.largest: Counter[str] = Counter()

    def add(self, kind: str, msg: Any) -> None:
        n = len(dumps(msg)) + FRAME_HEADER
        self.bytes[kind] += n
        self.messages[kind] += 1
        self.largest[kind] = max(self.largest[kind], n)

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        return Counter(self.bytes), Counter(self.messages)


class FakeConn:
    """What the controller uses of a ``FramedProtocol``: ``send``, ``closed``, ``close``, ``peer``
    and the two callbacks :meth:`Connections.on_connect` sets."""

    kind = "other"

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.closed = False
        self.peer: Any = None
        self.on_message: Any = None
        self.on_close: Any = None

    def send(self, msg: Any) -> None:
        if self.closed:
            raise ConnectionError("connection is closed")
        self.meter.add(self.kind, msg)
        self.received(msg)

    def received(self, msg: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeRouter(FakeConn):
    kind = "router"


class FakeProxy(FakeConn):
    kind = "proxy"


class FakeReplica(FakeConn):
    """A replica whose constructor finishes at once and whose health checks pass."""

    kind = "replica"

    def __init__(self, meter: Meter, proc: FakeProc, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(meter)
        self.proc = proc
        self.loop = loop

    def received(self, msg: Any) -> None:
        if isinstance(msg, ReplicaInit):
            self.loop.call_soon(self.on_message, self, ReplicaReady(msg.replica_id, self.proc.pid))
        elif isinstance(msg, Call):
            self.loop.call_soon(self.on_message, self, Reply(msg.id, True, None))
        elif isinstance(msg, Stop):
            self.loop.call_soon(self.exit, 0)

    def exit(self, code: int) -> None:
        """The process ends: its connection closes."""
        if self.proc.code is None:
            self.proc.code = code
        if not self.closed:
            self.closed = True
            self.on_close(self, None)


class Rig:
    """A controller and its fake world."""

    def __init__(self, run_dir: str, gc_policy: bool = True) -> None:
        self.now = 1000.0
        self.meter = Meter()
        self.pids = itertools.count(1_000_000)
        self.conns: dict[int, FakeReplica] = {}
        self.loop = asyncio.get_running_loop()
        settings = Settings(run_dir=run_dir, num_gpus=0, spare_replicas=0, start_proxy=False)
        self.ctl = Controller(settings, os.urandom(32), clock=Clock(monotonic=lambda: self.now),
                              factory=self.spawn)
        # As `shoal start`'s controller, which has its process to itself (gcpolicy.py).
        self.ctl.gc_policy = GcPolicy() if gc_policy else None
        own = os.getpid()  # a real /proc read per watched replica, on a process that exists
        self.ctl.guard.watchdog = Watchdog(read_state=lambda _pid: read_state(own),
                                           read_rss=lambda _pid: read_rss(own))

    def spawn(self, argv: list[str], stdin_data: bytes, pass_fds: tuple[int, ...] = (),
              env: dict[str, str] | None = None) -> FakeProc:
        proc = FakeProc(next(self.pids))
        self.loop.call_soon(self._connect, stdin_data, proc)  # the "process" boots after the tick
        return proc

    def _connect(self, stdin_data: bytes, proc: FakeProc) -> None:
        if proc.code is not None:
            return
        boot = pickle.loads(stdin_data)
        conn = FakeReplica(self.meter, proc, self.loop)
        self.conns[proc.pid] = conn
        self.ctl.connections.on_connect(conn)  # type: ignore[arg-type]
        conn.on_message(conn, Hello(Role.REPLICA, boot.process_id, proc.pid))

    def subscribe(self, callers: int) -> list[FakeRouter]:
        proxy = FakeProxy(self.meter)
        self.ctl.connections.on_connect(proxy)  # type: ignore[arg-type]
        proxy.on_message(proxy, SubscribeRoutes())
        routers = []
        for app in self.ctl.apps.values():
            for name in app.deployments:
                for _ in range(callers):
                    r = FakeRouter(self.meter)
                    self.ctl.connections.on_connect(r)  # type: ignore[arg-type]
                    r.on_message(r, Subscribe(app.spec.name, name))
                    routers.append(r)
        return routers

    async def tick(self) -> tuple[float, float]:
        """One control-loop pass on a clock moved by ``TICK_S``: (tick ms, ms the event loop then
        spent on what the tick set off: fake handshakes, health checks and their replies)."""
        self.now += TICK_S
        t0 = time.perf_counter()
        changed = self.ctl._tick()
        t1 = time.perf_counter()
        if changed:
            await self.ctl._notify()
        for _ in range(8):  # handshakes: 2 hops; a health check: 4
            await asyncio.sleep(0)
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

    def all_running(self) -> bool:
        return all(a.status == ApplicationStatus.RUNNING for a in self.ctl.apps.values()) and all(
            r.state == ReplicaState.RUNNING for r in self.ctl.replicas.values())


# ---------------------------------------------------------------------------------------------
# One point, in this process.

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def heap_mb() -> float:
    """The traced heap, without what this file allocated (the fakes and the meter)."""
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, __file__)])
    return sum(s.size for s in snap.statistics("filename")) / 2**20


def stats_ms(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"p50": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "max": s[-1],
            "mean": statistics.fmean(s), "n": len(s)}


async def _bring_up(rig: Rig, layout: Layout, callers: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    for spec in layout.specs():
        await rig.ctl.deploy(spec)
    routers = rig.subscribe(callers)
    ticks: list[float] = []
    while not rig.all_running():
        if len(ticks) >= BRINGUP_TICKS:
            raise RuntimeError(f"not all running after {BRINGUP_TICKS} ticks: "
                               f"{Counter(r.state.value for r in rig.ctl.replicas.values())}")
        ticks.append((await rig.tick())[0])
    if len(rig.ctl.replicas) != layout.replicas:
        raise RuntimeError(f"{len(rig.ctl.replicas)} replicas run, expected {layout.replicas}")
    return {"wall_s": time.perf_counter() - t0, "ticks": len(ticks), "first_tick_ms": ticks[0] if ticks else 0.0,
            "routers": len(routers), "bytes": dict(rig.meter.bytes), "messages": dict(rig.meter.messages)}


async def _churn(rig: Rig, changes: int) -> dict[str, Any]:
    """``changes`` times: a running replica crashes; ticks until its replacement runs."""
    deps = sorted({(r.app, r.deployment) for r in rig.ctl.replicas.values()})
    step = max(1, len(deps) // changes)
    tick_ms: list[float] = []
    bytes_by_change: list[Counter[str]] = []
    msgs_by_change: list[Counter[str]] = []
    for app, dep in deps[::step][:changes]:
        victim = rig.ctl.registry.of(app, dep)[0]
        b0, m0 = rig.meter.snapshot()
        rig.conns[victim.proc.pid].exit(1)
        for _ in range(20):
            tick_ms.append((await rig.tick())[0])
            if victim.replica_id not in rig.ctl.replicas and rig.all_running():
                break
        else:
            raise RuntimeError(f"the replacement of {victim.replica_id} did not run within 20 ticks")
        b1, m1 = rig.meter.snapshot()
        bytes_by_change.append(b1 - b0)
        msgs_by_change.append(m1 - m0)
    n = len(bytes_by_change)
    kinds = ("router", "proxy")
    return {"changes": n, "tick_ms": stats_ms(tick_ms),
            "bytes_per_change": {k: sum(c[k] for c in bytes_by_change) / n for k in kinds},
            "messages_per_change": {k: sum(c[k] for c in msgs_by_change) / n for k in kinds}}


async def _status(rig: Rig, calls: int) -> dict[str, Any]:
    """The admin ``status`` call as the controller serves it: the handler, then the reply's pickle."""
    times, size = [], 0
    for i in range(calls):
        t0 = time.perf_counter()
        reply = await dispatch(rig.ctl.admin, Call(i, "status", {}))
        size = len(dumps(reply)) + FRAME_HEADER
        times.append((time.perf_counter() - t0) * 1e3)
        if not reply.ok:
            raise RuntimeError(f"status failed: {reply.error}")
    return {"ms": stats_ms(times), "bytes": size}


async def measure_point(layout: Layout, callers: int, ticks: int, trace: bool = False,
                        profile: str = "", gc_policy: bool = True) -> dict[str, Any]:
    """Bring ``layout`` up under a fresh controller, then measure steady ticks, status and churn."""
    logging.getLogger("shoal").setLevel(logging.ERROR)  # crashes are on purpose here
    gc.collect()
    rss0 = rss_mb()
    if trace:
        tracemalloc.start()
    with tempfile.TemporaryDirectory(prefix="shoal-cp-") as run_dir:
        rig = Rig(run_dir, gc_policy)
        up = await _bring_up(rig, layout, callers)
        gc_full_ms = None
        if rig.ctl.gc_policy is not None:
            # The steady state of a long-running controller: past its first full collection
            # (which then recurs every FULL_EVERY_S; its time is reported on its own).
            policy = rig.ctl.gc_policy = GcPolicy()
            policy.tick(rig.now - FULL_EVERY_S)
            policy.tick(rig.now)
            gc_full_ms = rig.ctl.gc_policy.last_full_ms
        heap_up = heap_mb() if trace else None
        b0, m0 = rig.meter.snapshot()
        prof = cProfile.Profile() if profile else None
        steady, loop_ms = [], []
        for _ in range(ticks):
            if prof is not None:
                prof.enable()
            t, lp = await rig.tick()
            if prof is not None:
                prof.disable()
            steady.append(t)
            loop_ms.append(lp)
        b1, m1 = rig.meter.snapshot()
        if prof is not None:
            prof.dump_stats(profile)
        status = await _status(rig, STATUS_CALLS)
        churn = await _churn(rig, min(CHANGES, layout.deployments))
        gc.collect()
        out: dict[str, Any] = {
            "replicas": layout.replicas, "apps": layout.apps, "deployments": layout.deployments,
            "gc_policy": gc_policy, "gc_full_ms": gc_full_ms,
            "callers": callers, "routers": up["routers"], "bringup": up,
            "steady": {"ticks": ticks, "tick_ms": stats_ms(steady), "loop_ms": stats_ms(loop_ms),
                       "health_checks": (m1 - m0)["replica"], "bytes": dict(b1 - b0)},
            "status": status, "churn": churn,
            "push": {"membership_bytes_max": rig.meter.largest["router"],
                     "routes_bytes_max": rig.meter.largest["proxy"]},
            "rss_mb": rss_mb(), "rss_growth_mb": rss_mb() - rss0,
        }
        if trace:
            out["heap_mb"] = {"after_bringup": heap_up, "after_all": heap_mb()}
            tracemalloc.stop()
    return out


# ---------------------------------------------------------------------------------------------
# The run: each point in a fresh interpreter, then the report.

def run_child(replicas: int, args: argparse.Namespace, trace: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(replicas), "--ticks", str(args.ticks),
           "--callers", str(args.callers), "--deployments-per-app", str(args.deployments_per_app),
           "--max-apps", str(args.max_apps)]
    if args.no_gc_policy:
        cmd.append("--no-gc-policy")
    if trace:
        cmd.append("--trace")
    if args.profile == replicas and not trace:
        cmd += ["--profile-out", os.path.join(args.out_dir, f"control_plane_{replicas}.prof")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.point_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"point {replicas} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"points {','.join(map(str, QUICK_POINTS))} only")
    p.add_argument("--points", default="", help=f"replica counts (default {','.join(map(str, POINTS))})")
    p.add_argument("--ticks", type=int, default=STEADY_TICKS, help="steady-state ticks measured per point")
    p.add_argument("--callers", type=int, default=20, help="routers subscribed to each deployment")
    p.add_argument("--deployments-per-app", type=int, default=20)
    p.add_argument("--max-apps", type=int, default=100)
    p.add_argument("--out-dir", default=HERE, help="where control_plane.json and control_plane.png go")
    p.add_argument("--write-results", action="store_true", help="update the section in <out-dir>/RESULTS.md")
    p.add_argument("--report-only", action="store_true", help="measure nothing: render control_plane.json")
    p.add_argument("--no-trace", action="store_true", help="skip the tracemalloc runs (no heap numbers)")
    p.add_argument("--profile", type=int, default=0, metavar="REPLICAS",
                   help="cProfile the steady ticks of this point into <out-dir>/control_plane_REPLICAS.prof")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each point N times and keep the round whose steady tick p50 is the median")
    p.add_argument("--point-timeout", type=float, default=900.0, help="seconds one point may take")
    p.add_argument("--no-gc-policy", action="store_true",
                   help="leave CPython's collector as it is (the controller of serve.run); default: as shoal start's")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.points_list = sorted({int(x) for x in args.points.split(",") if x.strip()}) if args.points else \
            list(QUICK_POINTS if args.quick else POINTS)
    except ValueError:
        p.error(f"--points: not a comma list of whole numbers: {args.points!r}")
    for name in ("ticks", "callers", "deployments_per_app", "max_apps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(n < 1 for n in args.points_list):
        p.error("--points: every replica count must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        layout = Layout.of(args.child, args.deployments_per_app, args.max_apps)
        res = asyncio.run(measure_point(layout, args.callers, args.ticks, args.trace, args.profile_out,
                                        not args.no_gc_policy))
        print(json.dumps(res))
        return 0
    from benchmarks import control_plane_report as report

    json_path = os.path.join(args.out_dir, "control_plane.json")
    if args.report_only:
        with open(json_path) as f:
            data = json.load(f)
    else:
        os.makedirs(args.out_dir, exist_ok=True)
        t0, load0 = time.perf_counter(), load_average()
        points = []
        for n in args.points_list:
            rounds = sorted((run_child(n, args, trace=False) for _ in range(args.rounds)),
                            key=lambda r: r["steady"]["tick_ms"]["p50"])
            res = rounds[(len(rounds) - 1) // 2]  # the round of the median tick (others' load comes and goes)
            res["rounds_tick_p50_ms"] = [r["steady"]["tick_ms"]["p50"] for r in rounds]
            if not args.no_trace:
                res["heap_mb"] = run_child(n, args, trace=True)["heap_mb"]
            points.append(res)
            print(report.point_line(res), file=sys.stderr, flush=True)
        data = {"command": " ".join(["python benchmarks/control_plane.py", *(argv if argv is not None else
                                                                              sys.argv[1:])]),
                "machine": report.machine(load0, load_average()), "wall_s": time.perf_counter() - t0,
                "tick_s": TICK_S, "points": points}
        with open(json_path, "w") as f:
            json.dump(data, f, indent=2)
    report.write_chart(os.path.join(args.out_dir, "control_plane.png"), data)
    section = report.markdown(data)
    if args.write_results:
        report.write_section(os.path.join(args.out_dir, "RESULTS.md"), section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
