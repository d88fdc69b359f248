"""Start one benchmark app under shoal or Ray Serve, the same way for both, and serve until SIGTERM.

    BENCH_FRAMEWORK=shoal|ray [BENCH_ROOT=TREE] python benchmarks/launcher.py APP --port PORT [--bench handle|batch ...]

The launcher is the driver process: it calls ``serve.start(http_options=...)`` and
``serve.run(app)`` from the app module (``benchmarks/apps/APP.py``; with ``--grpc-port``, also
``grpc_options=gRPCOptions(port=..., grpc_servicer_functions=APP.GRPC_SERVICER_FUNCTIONS)``,
the class the app imported from its framework), prints ``READY`` and then
either blocks until SIGTERM/SIGINT, or, with ``--bench``, drives the app through the handle that
``serve.run`` returned and writes the measurements as JSON to ``--out``. Either way it ends with
``serve.shutdown()`` (and ``ray.shutdown()`` for Ray). The runner starts it in a new session
and cleans up any process of that session that outlives it.

``BENCH_ROOT`` names the tree whose ``benchmarks.apps`` (and with them ``shoal``) are imported:
this checkout by default, or a worktree of an earlier commit (``run.py --baseline REF``). The
launcher prints the file ``shoal`` came from, which the runner checks against that tree.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

ROOT = os.environ.get("BENCH_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Read by run.py (benchmarks/baseline.py SHOAL_FILE_MARK): proof of which tree's shoal is measured.
SHOAL_FILE_MARK = "BENCH shoal imported from "


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


async def _drive(call: Any, callers: int, seconds: float) -> int:
    """``callers`` tasks each awaiting ``call(i)`` back to back for ``seconds``; returns calls done."""
    done = 0
    stop = time.monotonic() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await call(i)
            done += 1

    try:
        # A watchdog, not a per-call timeout: a call lost by the framework fails the run instead of hanging it.
        await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(callers))), seconds + 60)
    except TimeoutError:
        raise RuntimeError(f"{callers} callers: calls still unanswered 60 s after the {seconds:g} s run") from None
    return done


def bench_handle(handle: Any, calls: int, callers: int, seconds: float) -> dict[str, Any]:
    """c1: ``calls`` sequential blocking calls; cN: ``callers`` asyncio callers for ``seconds``."""
    for _ in range(50):
        handle.noop.remote().result()
    lat = []
    t_all = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        handle.noop.remote().result()
        lat.append(time.perf_counter() - t)
    c1_elapsed = time.perf_counter() - t_all

    def call(i: int) -> Any:
        return handle.noop.remote(i)

    asyncio.run(_drive(call, callers, min(1.0, seconds)))  # warm-up
    t0 = time.monotonic()
    done = asyncio.run(_drive(call, callers, seconds))
    elapsed = time.monotonic() - t0
    return {
        "c1_calls": calls,
        "c1_p50_ms": percentile(lat, 50) * 1e3,
        "c1_p99_ms": percentile(lat, 99) * 1e3,
        "c1_mean_ms": statistics.fmean(lat) * 1e3,
        "c1_calls_per_s": calls / c1_elapsed,
        "cN_callers": callers,
        "cN_calls": done,
        "cN_seconds": elapsed,
        "cN_calls_per_s": done / elapsed,
    }


def bench_batch(handle: Any, module: Any, callers: int, seconds: float) -> dict[str, Any]:
    def call(i: int) -> Any:
        return handle.infer.remote(i)

    asyncio.run(_drive(call, callers, min(1.0, seconds)))  # warm-up
    handle.reset.remote().result()
    t0 = time.monotonic()
    done = asyncio.run(_drive(call, callers, seconds))
    elapsed = time.monotonic() - t0
    stats = handle.stats.remote().result()
    ideal = module.MAX_BATCH_SIZE / (module.BASE_S + module.PER_ITEM_S * module.MAX_BATCH_SIZE)
    got = done / elapsed
    return {
        "callers": callers,
        "items": done,
        "seconds": elapsed,
        "items_per_s": got,
        "ideal_items_per_s": ideal,
        "fraction_of_ideal": got / ideal,
        "mean_batch": stats["mean_batch"],
        "batches": stats["batches"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("app", help="module name under benchmarks/apps")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bench", choices=["handle", "batch"])
    parser.add_argument("--out", help="where --bench writes its JSON")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="also serve gRPC on this port: grpc_options with the app's GRPC_SERVICER_FUNCTIONS")
    parser.add_argument("--ray-num-cpus", type=int, default=None,
                        help="Ray only: logical CPUs for ray.init (each Ray replica reserves 1 by default)")
    args = parser.parse_args()

    framework = os.environ.get("BENCH_FRAMEWORK", "shoal")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    ray: Any = None
    if framework == "ray":
        import ray as _ray

        ray = _ray
        # Left to itself, serve.start() would call ray.init() with the defaults; this is that call,
        # with more logical CPUs where an app has more replicas than the machine has cores.
        ray.init(num_cpus=args.ray_num_cpus)
    module = importlib.import_module(f"benchmarks.apps.{args.app}")
    if framework == "shoal":
        print(f"{SHOAL_FILE_MARK}{sys.modules['shoal'].__file__}", flush=True)
    serve = module.serve
    result: dict[str, Any] | None = None
    try:
        options: dict[str, Any] = {"http_options": {"host": "127.0.0.1", "port": args.port}}
        if args.grpc_port is not None:  # the same gRPCOptions fields for both (the app imports the class)
            options["grpc_options"] = module.gRPCOptions(port=args.grpc_port,
                                                         grpc_servicer_functions=module.GRPC_SERVICER_FUNCTIONS)
        serve.start(**options)
        handle = serve.run(module.app, name="bench", route_prefix="/")
        # Installed only now: ray.init() puts in its own SIGTERM handler, which would end the driver
        # without serve.shutdown() and orphan some of Ray's processes.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        print("READY", flush=True)
        if args.bench == "handle":
            result = bench_handle(handle, args.calls, args.callers, args.seconds)
        elif args.bench == "batch":
            result = bench_batch(handle, module, args.callers, args.seconds)
        else:
            while not stop.wait(0.2):
                pass
    finally:
        if result is not None and args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
        # Restore default handlers so a second SIGTERM during a slow shutdown still ends us.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        serve.shutdown()
        if ray is not None:
            ray.shutdown()
    print("STOPPED", flush=True)


if __name__ == "__main__":
    main()
