"""Handle calls: a no-op method, called from the driver process through a DeploymentHandle."""

import os

if os.environ.get("BENCH_FRAMEWORK") == "ray":
    from ray import serve
else:
    from shoal import serve


@serve.deployment
class Noop:
    async def noop(self, x=None):
        return x

    async def __call__(self, request) -> str:
        return "ok"


app = Noop.bind()
