"""1 MB request bodies over HTTP: the replica reads the whole body and returns its length.

Returning the length (not the bytes) keeps the response small, so the number measures the
request path (proxy -> replica) for a large body; the response path is the same as echo's.
"""

import os

if os.environ.get("BENCH_FRAMEWORK") == "ray":
    from ray import serve
else:
    from shoal import serve


@serve.deployment
class Payload:
    async def __call__(self, request) -> str:
        body = await request.body()
        return str(len(body))


app = Payload.bind()
