"""``@serve.batch``: a handler that costs 5 ms + 0.2 ms per item, 64 concurrent callers.

Two kinds of callers: 64 asyncio tasks in the driver process, each awaiting one
``handle.infer.remote(i)`` after another; or 64 HTTP connections (wrk) whose requests the
ingress turns into ``self.infer(0)`` calls (``GET /?stats=1`` returns the batch statistics).
``max_ongoing_requests`` is raised from the default 5 so that all 64 callers can be in the
replica at once: with the default, at most 5 items could ever form a batch and any framework
would reach about 30 % of the ideal.

Ideal throughput = MAX_BATCH_SIZE / (BASE_S + PER_ITEM_S * MAX_BATCH_SIZE) items/s.
"""

import asyncio
import os

if os.environ.get("BENCH_FRAMEWORK") == "ray":
    from ray import serve
else:
    from shoal import serve

BASE_S = 0.005
PER_ITEM_S = 0.0002
MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.01


@serve.deployment(max_ongoing_requests=256)
class Batched:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def infer(self, xs: list[int]) -> list[int]:
        # A simulated accelerator: a fixed launch cost plus a per-item cost, awaited off the CPU.
        await asyncio.sleep(BASE_S + PER_ITEM_S * len(xs))
        self.sizes.append(len(xs))
        return xs

    async def reset(self) -> str:
        self.sizes.clear()
        return "ok"

    async def stats(self) -> dict:
        return {"batches": len(self.sizes), "mean_batch": sum(self.sizes) / max(1, len(self.sizes))}

    async def __call__(self, request):
        if request.query_params.get("stats"):
            return await self.stats()
        if request.query_params.get("reset"):
            return await self.reset()
        return str(await self.infer(0))


app = Batched.bind()
