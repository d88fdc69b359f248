"""A 3-deployment pipeline over HTTP: Ingress -> A -> B.

The ingress reads ``x`` from the query string, passes it through ``A.add`` and then
``B.add`` (each adds its own constant) through deployment handles, and returns the result:
two handle round-trips behind one HTTP request. All options are the defaults.
"""

import os

if os.environ.get("BENCH_FRAMEWORK") == "ray":
    from ray import serve
    from ray.serve.handle import DeploymentHandle
else:
    from shoal import serve
    from shoal.handle import DeploymentHandle


@serve.deployment
class A:
    async def add(self, x: int) -> int:
        return x + 1


@serve.deployment
class B:
    async def add(self, x: int) -> int:
        return x + 10


@serve.deployment
class Ingress:
    def __init__(self, a: DeploymentHandle, b: DeploymentHandle) -> None:
        self.a = a
        self.b = b

    async def __call__(self, request) -> str:
        x = int(request.query_params.get("x", "0"))
        y = await self.a.add.remote(x)
        z = await self.b.add.remote(y)
        return str(z)


app = Ingress.bind(A.bind(), B.bind())
