"""The standard gRPC health service, ``grpc.health.v1.Health``, on shoal's gRPC ingress servers.

Both the local proxy's gRPC server and a Kubernetes pod's (:mod:`shoal.kubernetes.pod.grpc_ingress`)
register it through :class:`HealthService`, built on grpcio's generic handler API with the messages
of :mod:`shoal.generated.health_pb2` (no ``grpcio-health-checking`` needed). ``Check`` answers
``SERVING`` while the server's ``serving`` callable says so, ``NOT_SERVING`` otherwise (starting,
draining); the service name ``""`` is the server as a whole, and the name of every gRPC service the
ingress serves (``pkg.Service``) is known too, with the same status; another name is ``NOT_FOUND``,
as the health-checking protocol asks. ``Watch`` sends the status at once and again each time it
changes (looked at every :data:`WATCH_POLL_S`), until the client cancels or the server starts to
stop (then it ends the call, OK, after sending ``NOT_SERVING``: an open Watch does not hold up a
drain); for an unknown service it sends ``SERVICE_UNKNOWN``. Neither needs credentials (a kubelet's ``grpc:``
probe sends none), as ``Healthz`` of ``ray.serve.RayServeAPIService`` does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from shoal.generated import health_pb2

__all__ = ["HEALTH_SERVICE", "WATCH_POLL_S", "HealthService", "check"]

HEALTH_SERVICE = f"{health_pb2.PACKAGE}.{health_pb2.SERVICE}"
# How often a Watch call looks at the status.
WATCH_POLL_S = 0.25


class HealthService:
    """``grpc.health.v1.Health`` for one server: ``serving()`` is its status (read on the
    server's event loop, so it must not block); ``services`` the service names it knows besides ``""``;
    ``closing()`` says the server is stopping (Watch calls end)."""

    def __init__(self, serving: Callable[[], bool], services: Iterable[str] = (),
                 closing: Callable[[], bool] = lambda: False) -> None:
        self.serving = serving
        self.closing = closing
        self.services = frozenset({"", *services})

    def status(self, service: str) -> int:
        """The ``ServingStatus`` of ``service`` (``SERVICE_UNKNOWN`` for a name it does not know)."""
        if service not in self.services:
            return health_pb2.SERVICE_UNKNOWN
        return health_pb2.SERVING if self.serving() else health_pb2.NOT_SERVING

    def handlers(self) -> dict[str, Any]:
        """Method path -> ``grpc.RpcMethodHandler``, to add to a server's generic handler."""
        return {
            f"/{HEALTH_SERVICE}/Check": grpc.unary_unary_rpc_method_handler(self._check),
            f"/{HEALTH_SERVICE}/Watch": grpc.unary_stream_rpc_method_handler(self._watch),
        }

    @staticmethod
    def _service(raw: bytes) -> str | None:
        try:
            return str(health_pb2.HealthCheckRequest.FromString(raw).service)
        except Exception:
            return None

    async def _check(self, raw: bytes, context: Any) -> bytes:
        service = self._service(raw)
        if service is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a HealthCheckRequest")
        status = self.status(service or "")
        if status == health_pb2.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return _response(status)

    async def _watch(self, raw: bytes, context: Any) -> None:
        service = self._service(raw)
        if service is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a HealthCheckRequest")
        last: int | None = None
        while True:
            closing = self.closing()
            status = self.status(service or "")
            if status != last:
                await context.write(_response(status))
                last = status
            if closing:
                return
            await asyncio.sleep(WATCH_POLL_S)


def _response(status: int) -> bytes:
    return health_pb2.HealthCheckResponse(status=status).SerializeToString()  # type: ignore[no-any-return]


def check(channel: Any, service: str = "", timeout: float = 5.0) -> str:
    """``Check`` over a (sync) channel: the status name (``SERVING``, ``NOT_SERVING``, ...); raises
    ``grpc.RpcError`` when the call fails (``NOT_FOUND`` for an unknown service)."""
    call = channel.unary_unary(f"/{HEALTH_SERVICE}/Check",
                               request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)
    reply = call(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    names = {health_pb2.UNKNOWN: "UNKNOWN", health_pb2.SERVING: "SERVING", health_pb2.NOT_SERVING: "NOT_SERVING",
             health_pb2.SERVICE_UNKNOWN: "SERVICE_UNKNOWN"}
    return names.get(reply.status, str(reply.status))
