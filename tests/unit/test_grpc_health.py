"""The standard gRPC health service (``grpc.health.v1.Health``) on shoal's gRPC ingress server: the
messages match ``health.proto``; Check and Watch over a real socket with grpcio's asyncio client,
as the local proxy's server (:class:`GRPCFront`) serves them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")

from shoal.generated import health_pb2  # noqa: E402
from shoal.runtime.grpc_front import GRPCFront  # noqa: E402
from shoal.runtime.grpc_health import HEALTH_SERVICE  # noqa: E402
from shoal.runtime.grpc_methods import GRPCFrontOptions, MethodSpec  # noqa: E402

KEY = "health-test-key-0123456789"


def test_health_messages_match_their_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    from google.protobuf import descriptor_pb2

    import shoal.generated

    source = Path(shoal.generated.__file__).parent
    out = tmp_path / "set.pb"
    assert protoc.main(["grpc_tools.protoc", f"-I{source}", f"--descriptor_set_out={out}",
                        str(source / "health.proto")]) == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    built = health_pb2.file_descriptor_proto()
    for proto in (compiled, built):
        proto.name = "health.proto"
        for msg in proto.message_type:
            for f in msg.field:
                f.ClearField("json_name")
    assert built == compiled
    assert health_pb2.HealthCheckResponse(status=health_pb2.NOT_SERVING).SerializeToString() == b"\x08\x02"


def _calls(channel: Any) -> tuple[Any, Any]:
    check = channel.unary_unary(f"/{HEALTH_SERVICE}/Check",
                                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                response_deserializer=health_pb2.HealthCheckResponse.FromString)
    watch = channel.unary_stream(f"/{HEALTH_SERVICE}/Watch",
                                 request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                 response_deserializer=health_pb2.HealthCheckResponse.FromString)
    return check, watch


async def test_the_ingress_server_answers_check_and_watch() -> None:
    spec = MethodSpec("/pkg.Svc/Run", "pkg.Svc", "Run", False, False, None, None)
    front = GRPCFront(object(), GRPCFrontOptions("127.0.0.1", 0, ()), {spec.path: spec},  # type: ignore[arg-type]
                      api_keys=(KEY,))
    ready = [True]
    front.ready = lambda: ready[0]
    port = await front.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
            check, watch = _calls(ch)
            req = health_pb2.HealthCheckRequest
            # No credentials needed (the kubelet's probe has none), though the ingress asks for API keys.
            assert (await check(req(), timeout=10)).status == health_pb2.SERVING
            assert (await check(req(service="pkg.Svc"), timeout=10)).status == health_pb2.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await check(req(service="pkg.Other"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/ray.serve.RayServeAPIService/ListApplications")(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Watch: the status now, then each change; an unknown service is SERVICE_UNKNOWN.
            unknown = watch(req(service="pkg.Other"), timeout=10)
            assert (await unknown.read()).status == health_pb2.SERVICE_UNKNOWN
            unknown.cancel()
            stream = watch(req(), timeout=30)
            assert (await stream.read()).status == health_pb2.SERVING
            ready[0] = False
            assert (await stream.read()).status == health_pb2.NOT_SERVING
            assert (await check(req(), timeout=10)).status == health_pb2.NOT_SERVING
            ready[0] = True
            assert (await stream.read()).status == health_pb2.SERVING
            # Stopping: NOT_SERVING, and the Watch ends (it does not hold the drain for its grace).
            stopping = asyncio.ensure_future(front.stop(30))
            assert (await stream.read()).status == health_pb2.NOT_SERVING
            assert await stream.read() is grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK
            await asyncio.wait_for(stopping, 10)
    finally:
        await front.stop(0)
