"""Handle calls made from inside an ingress replica (the path a composed app's requests take).

``GET /?calls=500&callers=64&seconds=5`` runs, inside the ingress replica's own event loop, the same
measurement the driver's handle workload makes: ``calls`` sequential awaited calls to the no-op
method of a second deployment (c1 latency), then ``callers`` concurrent callers for ``seconds``
(calls/s), and answers with the numbers as JSON. ``GET /`` without ``calls`` is the readiness probe.
"""

import asyncio
import os
import statistics
import time

if os.environ.get("BENCH_FRAMEWORK") == "ray":
    from ray import serve
else:
    from shoal import serve


@serve.deployment
class Target:
    async def noop(self, x=None):
        return x


def _percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


@serve.deployment
class Caller:
    def __init__(self, target) -> None:
        self.target = target

    async def _drive(self, callers: int, seconds: float) -> tuple[int, float]:
        done = 0
        deadline = time.monotonic() + seconds

        async def caller(i: int) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await self.target.noop.remote(i)
                done += 1

        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(callers))), seconds + 60)
        return done, time.monotonic() - t0

    async def __call__(self, request) -> dict:
        q = request.query_params
        if "calls" not in q:
            await self.target.noop.remote()
            return {"ready": True}
        calls, callers, seconds = int(q["calls"]), int(q.get("callers", 64)), float(q.get("seconds", 5))
        for _ in range(50):
            await self.target.noop.remote()
        lat = []
        t_all = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            await self.target.noop.remote()
            lat.append(time.perf_counter() - t)
        c1_elapsed = time.perf_counter() - t_all
        await self._drive(callers, min(1.0, seconds))  # warm-up
        done, elapsed = await self._drive(callers, seconds)
        return {
            "c1_calls": calls,
            "c1_p50_ms": _percentile(lat, 50) * 1e3,
            "c1_p99_ms": _percentile(lat, 99) * 1e3,
            "c1_mean_ms": statistics.fmean(lat) * 1e3,
            "c1_calls_per_s": calls / c1_elapsed,
            "cN_callers": callers,
            "cN_calls": done,
            "cN_seconds": elapsed,
            "cN_calls_per_s": done / elapsed,
        }


app = Caller.bind(Target.bind())
