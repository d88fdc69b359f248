"""Batching efficiency: a handler costing 5 ms + 0.2 ms per item, 64 concurrent callers.

    python benchmarks/batching.py [--callers 64] [--max-batch-size 32] [--seconds 5]

Ideal throughput is what a replica would reach if every batch were full and nothing else
took time: max_batch_size / (5 ms + 0.2 ms x max_batch_size). The result is reported as a
fraction of it (Ray Serve 2.60 measured 28 % on a similar machine).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from shoal import serve

BASE_S = 0.005
PER_ITEM_S = 0.0002


@serve.deployment(max_ongoing_requests=256)
class Batched:
    def __init__(self, max_batch_size: int) -> None:
        self.handle.set_max_batch_size(max_batch_size)
        self.sizes: list[int] = []

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def handle(self, xs: list[int]) -> list[int]:
        # A simulated GPU: a fixed launch cost plus a per-item cost, awaited off the CPU.
        await asyncio.sleep(BASE_S + PER_ITEM_S * len(xs))
        self.sizes.append(len(xs))
        return xs

    def mean_batch(self) -> float:
        return sum(self.sizes) / max(1, len(self.sizes))


async def drive(handle: serve.DeploymentHandle, callers: int, seconds: float) -> int:
    done = 0
    stop = time.monotonic() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await handle.handle.remote(i)
            done += 1

    await asyncio.gather(*(caller(i) for i in range(callers)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    serve.start(http_options={"port": 0}, _run_dir=tempfile.mkdtemp(prefix="shoal-b", dir="/tmp"))
    try:
        h = serve.run(Batched.bind(args.max_batch_size))
        asyncio.run(drive(h, args.callers, 1.0))  # warm up
        t0 = time.monotonic()
        done = asyncio.run(drive(h, args.callers, args.seconds))
        elapsed = time.monotonic() - t0
        mean = h.mean_batch.remote().result()
    finally:
        serve.shutdown()
    ideal = args.max_batch_size / (BASE_S + PER_ITEM_S * args.max_batch_size)
    got = done / elapsed
    print(f"callers={args.callers} max_batch_size={args.max_batch_size} mean batch={mean:.1f}")
    print(f"throughput {got:.0f} items/s, ideal {ideal:.0f} items/s -> {got / ideal:.1%} of ideal")


if __name__ == "__main__":
    main()
