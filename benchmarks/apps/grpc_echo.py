"""gRPC echo: one deployment answering a unary RPC and a server-streaming RPC.

``Unary`` returns the request's text; ``Stream`` yields ``count`` replies as fast as it can (no
sleep between them), so that the streaming numbers measure the framework's per-message path.
The messages come from ``bench_echo.proto`` (``benchmarks/grpc_echo.py`` PROTO), which the
runner compiles into a scratch folder and puts on ``PYTHONPATH`` before it starts the launcher;
the launcher passes ``GRPC_SERVICER_FUNCTIONS`` to ``serve.start(grpc_options=...)``.
``max_ongoing_requests`` is raised from the default 5 (identically for both frameworks) so that
all 16 concurrent callers are served at once: the numbers measure the gRPC path, not the queue.
"""

import os

if os.environ.get("BENCH_FRAMEWORK") == "ray":
    from ray import serve
    from ray.serve.config import gRPCOptions
else:
    from shoal import serve
    from shoal.config import gRPCOptions

from bench_echo_pb2 import EchoReply

GRPC_SERVICER_FUNCTIONS = ["bench_echo_pb2_grpc.add_EchoServicer_to_server"]
__all__ = ["GRPC_SERVICER_FUNCTIONS", "app", "gRPCOptions", "serve"]


@serve.deployment(max_ongoing_requests=32)
class Echo:
    async def Unary(self, request):
        return EchoReply(text=request.text)

    async def Stream(self, request):
        for i in range(request.count):
            yield EchoReply(text=request.text, index=i)


app = Echo.bind()
