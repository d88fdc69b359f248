"""gRPC echo through shoal's proxy process vs. served by the ingress replica itself.

``python -m benchmarks.grpc_paths proxy|fast [ROUNDS]`` starts a local shoal instance in this
process with ``benchmarks/apps/grpc_echo.py`` (``grpc_options.ingress_serves_grpc`` false for
``proxy``, true for ``fast``) and runs :mod:`benchmarks.grpc_echo`'s loads round after round:
unary with 1 and 8 callers and a 50-message stream with 1 caller, 3 s each after a 0.5 s warm-up,
each on a new channel. With ``fast`` the kernel gives each channel to the proxy or to the
replica (both listen on the port); the proxy's access log tells which one took it, and the
medians are printed per path.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks import grpc_echo as ge

LOADS: dict[str, Callable[[str, str], Awaitable[dict[str, Any]]]] = {
    "unary c1": lambda target, folder: ge.unary_load(target, folder, 1, 3.0, 0.5),
    "unary c8": lambda target, folder: ge.unary_load(target, folder, 8, 3.0, 0.5),
    "stream c1 x50": lambda target, folder: ge.stream_load(target, folder, 1, 50, 3.0, 0.5),
}


def main(mode: str, rounds: int) -> None:
    folder = ge.compile_proto(tempfile.mkdtemp(prefix="grpc-paths"))
    apps = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")
    sys.path[:0] = [folder, apps]
    os.environ["PYTHONPATH"] = os.pathsep.join([folder, apps, os.environ.get("PYTHONPATH", "")])
    import grpc_echo as app  # benchmarks/apps/grpc_echo.py

    from shoal import api, serve

    run_dir = tempfile.mkdtemp(prefix="shoal-b", dir="/tmp")
    proxy_log = os.path.join(run_dir, "logs", "proxy.log")

    def proxy_lines() -> int:
        with open(proxy_log, errors="replace") as f:
            return sum(1 for line in f if " GRPC /" in line)

    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    serve.start(http_options={"port": 0},
                grpc_options=app.gRPCOptions(port=0, grpc_servicer_functions=app.GRPC_SERVICER_FUNCTIONS,
                                             ingress_serves_grpc=mode == "fast"), _run_dir=run_dir)
    try:
        serve.run(app.app, name="bench", route_prefix="/")
        target = api.grpc_address()
        for r in range(rounds):
            for name, load in LOADS.items():
                before = proxy_lines()
                out = asyncio.run(load(target, folder))
                time.sleep(0.3)  # the access log is written
                where = "proxy" if proxy_lines() > before + 5 else "replica"
                rate = out.get("calls_per_s") or out["messages_per_s"]
                p50 = out.get("p50_ms") or out["ttfm_p50_ms"]
                results.setdefault((name, where), []).append((rate, p50))
                print(f"round {r}: {name} via {where}: {rate:.0f}/s, p50 {p50:.3f} ms", flush=True)
    finally:
        serve.shutdown()
    for (name, where), values in sorted(results.items()):
        print(f"{mode}: {name} via {where} (n={len(values)}): median {statistics.median(v for v, _ in values):.0f}/s, "
              f"p50 {statistics.median(p for _, p in values):.3f} ms (first message for streams)")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("proxy", "fast"):
        sys.exit("usage: python -m benchmarks.grpc_paths proxy|fast [ROUNDS]")
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6)
