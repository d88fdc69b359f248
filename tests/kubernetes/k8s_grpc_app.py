"""An application served over gRPC in the Kubernetes tests (compiler and pod simulation).

Its messages are those of ``shoal_k8s_grpc_test.proto`` (:data:`PROTO`), which the tests compile
with grpcio-tools into a temporary folder on ``sys.path`` (and on the simulated pods' path).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from shoal import serve
from shoal.context import get_request_context

MODULE = "shoal_k8s_grpc_test"
SERVICER = f"{MODULE}_pb2_grpc.add_EchoServicer_to_server"
PROTO = """
syntax = "proto3";
package shoalk8stest;

message EchoRequest {
  string text = 1;
  int32 count = 2;
}

message EchoReply {
  string text = 1;
  int32 index = 2;
  string app = 3;
  string model = 4;
  string pod = 5;
  string request_id = 6;
}

service Echo {
  rpc Say(EchoRequest) returns (EchoReply);
  rpc Repeat(EchoRequest) returns (stream EchoReply);
  rpc Fail(EchoRequest) returns (EchoReply);
}
"""


def pb() -> Any:
    return importlib.import_module(f"{MODULE}_pb2")


@serve.deployment(max_ongoing_requests=8)
class Echo:
    def Say(self, request: Any) -> Any:
        ctx = serve.get_replica_context()
        return pb().EchoReply(text=f"hello {request.text}", app=ctx.app_name, model=serve.get_multiplexed_model_id(),
                              pod=os.environ.get("SHOAL_POD_NAME", ""),
                              request_id=get_request_context().request_id)

    def Repeat(self, request: Any) -> Any:
        for i in range(request.count):
            yield pb().EchoReply(text=f"{request.text} {i}", index=i)

    def Fail(self, request: Any) -> Any:
        raise ValueError(f"bad input: {request.text}")

    async def __call__(self, request: Any) -> str:
        return "http ok"


app = Echo.bind()
