"""HTTP echo: one deployment, default options, returns a 2-byte string."""

import os

if os.environ.get("BENCH_FRAMEWORK") == "ray":
    from ray import serve
else:
    from shoal import serve


@serve.deployment
class Echo:
    async def __call__(self, request) -> str:
        return "ok"


app = Echo.bind()
