"""Core-runtime measurements: cold start of `shoal run`, cross-process handle latency, HTTP echo latency.

    python benchmarks/core_latency.py [--calls 500]

Prints a small table. The full side-by-side suite against Ray Serve lives with the performance
work (see benchmarks/README.md); this script gives the numbers the core runtime is judged by.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import httpx

APP = textwrap.dedent('''
    from shoal import serve

    @serve.deployment
    class Echo:
        async def __call__(self, request):
            return "ok"

        async def noop(self, x=None):
            return x

    app = Echo.bind()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cold_start(workdir: str) -> float:
    """Seconds from launching `shoal run app:app` in a new process to the first HTTP 200."""
    port = free_port()
    env = {**os.environ, "SHOAL_RUN_DIR": tempfile.mkdtemp(prefix="shoal-b", dir="/tmp")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "run", "app:app", "--port", str(port)],
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                time.sleep(0.005)
            if time.perf_counter() - t0 > 60:
                raise RuntimeError("no answer within 60 s")
    finally:
        proc.terminate()
        proc.wait(30)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="shoal-bench")
    with open(os.path.join(workdir, "app.py"), "w") as f:
        f.write(APP)
    starts = [cold_start(workdir) for _ in range(3)]

    sys.path.insert(0, workdir)
    from app import app  # type: ignore[import-not-found]

    from shoal import serve

    serve.start(http_options={"port": 0}, _run_dir=tempfile.mkdtemp(prefix="shoal-b", dir="/tmp"))
    try:
        handle = serve.run(app)
        for _ in range(50):
            handle.noop.remote().result()
        lat = []
        for _ in range(args.calls):
            t = time.perf_counter()
            handle.noop.remote().result()
            lat.append(time.perf_counter() - t)
        url = serve.http_address() + "/"
        http_lat = []
        with httpx.Client() as client:
            for _ in range(50):
                client.get(url)
            for _ in range(args.calls):
                t = time.perf_counter()
                client.get(url)
                http_lat.append(time.perf_counter() - t)
    finally:
        serve.shutdown()
    rows = [
        ("`shoal run` to first HTTP 200 (median of 3)", f"{statistics.median(starts):.3f} s"),
        (f"cross-process handle call, p50 of {args.calls}", f"{percentile(lat, 50) * 1e3:.3f} ms"),
        ("cross-process handle call, p99", f"{percentile(lat, 99) * 1e3:.3f} ms"),
        (f"HTTP echo via proxy + 1 replica, c1, p50 of {args.calls}", f"{percentile(http_lat, 50) * 1e3:.3f} ms"),
        ("HTTP echo, c1, p99", f"{percentile(http_lat, 99) * 1e3:.3f} ms"),
    ]
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
