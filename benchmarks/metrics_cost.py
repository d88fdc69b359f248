"""What metrics cost the request path: µs per request of each way to record one.

    python benchmarks/metrics_cost.py [--n 100000]

One "request" is what a replica records per request: a counter increment and a latency
histogram observation, with the labels shoal uses. Measured, each in a fresh interpreter:

* prometheus-client directly, looking the labelled child up each time (``labels()``) and
  with the child cached, in memory and in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``:
  every update writes an mmapped file);
* what shoal does: plain-integer accumulation (``shoal.observability.metrics.ProcessMetrics``) on the
  request path, plus the once-a-second flush into prometheus-client (multiprocess mode),
  reported per flush.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LABELS = ("default", "default", "Model", "Model-1a2b3c4d", "/", "local", "Model-1a2b3c4d")
NAMES = ("application", "app", "deployment", "replica", "route", "namespace", "pod")


def _direct(n: int, cached: bool) -> float:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from shoal.observability.metrics import LATENCY_BUCKETS_MS

    registry = CollectorRegistry()
    counter = Counter("requests", "requests", NAMES, registry=registry)
    hist = Histogram("latency_ms", "latency", NAMES, registry=registry, buckets=LATENCY_BUCKETS_MS)
    c, h = counter.labels(*LABELS), hist.labels(*LABELS)
    t = time.perf_counter()
    if cached:
        for _ in range(n):
            c.inc()
            h.observe(3.0)
    else:
        for _ in range(n):
            counter.labels(*LABELS).inc()
            hist.labels(*LABELS).observe(3.0)
    return (time.perf_counter() - t) / n * 1e6


def _shoal(n: int) -> tuple[float, float]:
    from shoal.observability.metrics import ProcessMetrics

    class Server:
        ongoing = 0
        local_waiters: tuple[int, ...] = ()
        model_ids: tuple[str, ...] = ()

    pm = ProcessMetrics()
    pm.setup("Model-1a2b3c4d", app="default", deployment="Model", server=Server())
    pm.flush()  # creates prometheus-client's objects once
    t = time.perf_counter()
    for _ in range(n):
        pm.request_done("/", time.monotonic(), False)
    per_request = (time.perf_counter() - t) / n * 1e6
    flushes = 200
    t = time.perf_counter()
    for _ in range(flushes):
        pm.request_done("/", time.monotonic(), False)
        pm.flush()
    per_flush = (time.perf_counter() - t) / flushes * 1e6
    return per_request, per_flush


def _child(which: str, n: int) -> None:
    if which == "shoal":
        per_request, per_flush = _shoal(n)
        print(json.dumps({"per_request_us": per_request, "per_flush_us": per_flush}))
    else:
        print(json.dumps({"per_request_us": _direct(n, cached=which.endswith("cached"))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.n)
        return
    rows = []
    for which, multiprocess in (("labels", False), ("cached", False), ("labels", True), ("cached", True),
                                ("shoal", True)):
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with tempfile.TemporaryDirectory() as d:
            if multiprocess:
                env["PROMETHEUS_MULTIPROC_DIR"] = d
            out = subprocess.run([sys.executable, __file__, "--child", which, "--n", str(args.n)], env=env,
                                 check=True, capture_output=True, text=True).stdout
        result = json.loads(out)
        mode = "multiprocess" if multiprocess else "in memory"
        what = {"labels": "prometheus-client, labels() each time", "cached": "prometheus-client, cached child",
                "shoal": "shoal.observability.metrics (plain integers)"}[which]
        rows.append((what, mode, result))
        line = f"{what:40s} {mode:12s} {result['per_request_us']:7.2f} µs/request"
        if "per_flush_us" in result:
            line += f"   (+ {result['per_flush_us']:.0f} µs per one-second flush)"
        print(line)


if __name__ == "__main__":
    main()
