"""Large arrays through handles: one deployment that returns what it is given, and a 3-deployment
pipeline (Ingress -> A -> B) whose every step returns what it is given.

``benchmarks/payload_shm.py`` drives both from the driver process through the handles
``serve.run`` returns; nothing goes over HTTP.
"""

import os

if os.environ.get("BENCH_FRAMEWORK") == "ray":
    from ray import serve
    from ray.serve.handle import DeploymentHandle
else:
    from shoal import serve
    from shoal.handle import DeploymentHandle


@serve.deployment
class Echo:
    async def run(self, x):
        return x

    async def __call__(self, request) -> str:
        return "ok"


@serve.deployment
class Step:
    async def run(self, x):
        return x


@serve.deployment
class Ingress:
    def __init__(self, a: DeploymentHandle, b: DeploymentHandle) -> None:
        self.a = a
        self.b = b

    async def run(self, x):
        y = await self.a.run.remote(x)
        return await self.b.run.remote(y)

    async def __call__(self, request) -> str:
        return "ok"


echo_app = Echo.bind()
pipeline_app = Ingress.bind(Step.bind(), Step.options(name="Step2").bind())
