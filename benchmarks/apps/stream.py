"""Token streaming over HTTP: ``n`` tokens (default 1,000), one every 10 ms, as a StreamingResponse.

Each token is exactly 8 bytes (7 digits and a newline) so that a client can count tokens by
bytes, however the transport splits the chunks. ``max_ongoing_requests`` is raised from the
default 5 so that every concurrent stream is served at once rather than queued: without it
both frameworks would cap at 5 streams per replica and the benchmark would measure queueing.
"""

import asyncio
import os

from starlette.responses import StreamingResponse

if os.environ.get("BENCH_FRAMEWORK") == "ray":
    from ray import serve
else:
    from shoal import serve

TOKEN_GAP_S = 0.010


@serve.deployment(max_ongoing_requests=256)
class Stream:
    async def __call__(self, request) -> StreamingResponse:
        n = int(request.query_params.get("n", "1000"))

        async def tokens():
            for i in range(n):
                if i:
                    await asyncio.sleep(TOKEN_GAP_S)
                yield f"{i % 10_000_000:07d}\n".encode()

        return StreamingResponse(tokens(), media_type="text/plain")


app = Stream.bind()
