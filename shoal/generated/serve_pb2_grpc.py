"""Client stub and servicer helpers of ``ray.serve.RayServeAPIService`` (the names of Ray's
generated ``serve_pb2_grpc``), written with grpcio's public API.

    stub = RayServeAPIServiceStub(grpc.insecure_channel("127.0.0.1:9000"))
    stub.ListApplications(ListApplicationsRequest()).application_names
    stub.Healthz(HealthzRequest()).message  # "success"
"""

from __future__ import annotations

from typing import Any

import grpc

from shoal.generated import serve_pb2

__all__ = [
    "RayServeAPIServiceServicer",
    "RayServeAPIServiceStub",
    "add_RayServeAPIServiceServicer_to_server",
]

SERVICE_NAME = f"{serve_pb2.PACKAGE}.{serve_pb2.SERVICE}"


def _classes(method: str) -> tuple[Any, Any]:
    request, response = serve_pb2.METHODS[method]
    return getattr(serve_pb2, request), getattr(serve_pb2, response)


class RayServeAPIServiceStub:
    """Calls the service over ``channel`` (a sync or an asyncio channel)."""

    def __init__(self, channel: Any) -> None:
        for method in serve_pb2.METHODS:
            request, response = _classes(method)
            setattr(self, method, channel.unary_unary(f"/{SERVICE_NAME}/{method}",
                                                      request_serializer=request.SerializeToString,
                                                      response_deserializer=response.FromString))


class RayServeAPIServiceServicer:
    """The service's methods; each answers UNIMPLEMENTED unless overridden."""

    def ListApplications(self, request: Any, context: Any) -> Any:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")

    def Healthz(self, request: Any, context: Any) -> Any:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")


def method_handlers(servicer: Any) -> dict[str, Any]:
    """The service's method name -> ``grpc.RpcMethodHandler`` calling ``servicer``."""
    out = {}
    for method in serve_pb2.METHODS:
        request, response = _classes(method)
        out[method] = grpc.unary_unary_rpc_method_handler(getattr(servicer, method),
                                                          request_deserializer=request.FromString,
                                                          response_serializer=response.SerializeToString)
    return out


def add_RayServeAPIServiceServicer_to_server(servicer: Any, server: Any) -> None:
    """Serve ``servicer``'s methods on ``server`` (a ``grpc.Server`` or ``grpc.aio.Server``)."""
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    register = getattr(server, "add_registered_method_handlers", None)
    if register is not None:
        register(SERVICE_NAME, handlers)
