"""HTTP echo with ``$BENCH_REPLICAS`` replicas (default 1), each taking up to 64 requests at once."""

import os

if os.environ.get("BENCH_FRAMEWORK") == "ray":
    from ray import serve
else:
    from shoal import serve


@serve.deployment(num_replicas=int(os.environ.get("BENCH_REPLICAS", "1")), max_ongoing_requests=64)
class Echo:
    async def __call__(self, request) -> str:
        return "ok"


app = Echo.bind()
