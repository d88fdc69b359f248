"""The gRPC ingress (Ray Serve's grpc_options) through the proxy process to replica processes,
called with grpcio's own client; the service's modules are compiled from a .proto here."""

from __future__ import annotations

import asyncio
import importlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")
protoc = pytest.importorskip("grpc_tools.protoc")

from conftest import child_pids, wait_until  # noqa: E402

from shoal import api, serve  # noqa: E402
from shoal.config import gRPCOptions  # noqa: E402
from shoal.exceptions import gRPCStatusError  # noqa: E402
from shoal.grpc_util import RayServegRPCContext  # noqa: E402

MODULE = "shoal_grpc_test"
KEY = "grpc-test-key-0123456789"
AUTH = (("authorization", f"Bearer {KEY}"),)
TIMEOUT_S = 5.0  # grpc_options.request_timeout_s
PROTO = """
syntax = "proto3";
package shoaltest;

message EchoRequest {
  string text = 1;
  int32 count = 2;
}

message EchoReply {
  string text = 1;
  int32 index = 2;
  string app = 3;
  string model = 4;
}

service Echo {
  rpc Say(EchoRequest) returns (EchoReply);
  rpc Repeat(EchoRequest) returns (stream EchoReply);
  rpc Fail(EchoRequest) returns (EchoReply);
  rpc Sleep(EchoRequest) returns (EchoReply);
  rpc Lookup(EchoRequest) returns (EchoReply);
  rpc Wrong(EchoRequest) returns (EchoReply);
  rpc Refuse(EchoRequest) returns (EchoReply);
  rpc RepeatRefuse(EchoRequest) returns (stream EchoReply);
}
"""


def pb() -> Any:
    """The compiled messages (importable in the test process and in replicas once the
    fixture put their folder on sys.path)."""
    return importlib.import_module(f"{MODULE}_pb2")


@serve.deployment
class Greeter:
    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.sleeps = 0
        self.cancelled = 0

    def Say(self, request: Any) -> Any:
        return pb().EchoReply(text=f"hello {request.text}", app="a", model=serve.get_multiplexed_model_id())

    def Repeat(self, request: Any) -> Any:
        for i in range(request.count):
            yield pb().EchoReply(text=f"{request.text} {i}", index=i, app="a")

    def Fail(self, request: Any) -> Any:
        raise ValueError(f"bad input: {request.text}")

    async def Sleep(self, request: Any) -> Any:
        self.sleeps += 1
        try:
            await asyncio.sleep(request.count)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return pb().EchoReply(text="slept")

    def counts(self) -> tuple[int, int]:
        return self.sleeps, self.cancelled

    def Lookup(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        # Ray's documentation example: the first lookup of a name is INVALID_ARGUMENT.
        assert ("application", "a") in grpc_context.invocation_metadata()
        if request.text not in self.seen:
            self.seen[request.text] = len(self.seen)
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(f"{request.text} not found, adding it")
        else:
            grpc_context.set_code(grpc.StatusCode.OK)
            grpc_context.set_details(f"{request.text} found")
        grpc_context.set_trailing_metadata([("num", str(self.seen[request.text]))])
        return pb().EchoReply(text=request.text, index=self.seen[request.text])

    def Wrong(self, request: Any) -> Any:
        return "not a message"

    async def Refuse(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        if request.count == 3:  # raised by a deployment called through a handle, not caught here
            return await serve.get_deployment_handle("Busy", "b").Strict.remote(request)
        if request.count == 0:  # a code set on the context, then an exception
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"{request.text} is not known")
            grpc_context.set_trailing_metadata([("hint", "add it first")])
            raise KeyError(request.text)
        if request.count == 1:  # raised directly
            raise gRPCStatusError(ValueError(request.text), grpc.StatusCode.FAILED_PRECONDITION, "not ready")
        grpc_context.set_code(grpc.StatusCode.OK)  # OK, then an exception: the exception wins
        raise ValueError(request.text)

    def RepeatRefuse(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        yield pb().EchoReply(text="first")
        grpc_context.set_code(grpc.StatusCode.ABORTED)
        grpc_context.set_details("stopped after one")
        raise RuntimeError("stop")


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Busy:
    def Say(self, request: Any) -> Any:
        return pb().EchoReply(text=f"busy {request.text}", app="b")

    async def Sleep(self, request: Any) -> Any:
        await asyncio.sleep(request.count)
        return pb().EchoReply(text="slept")

    def Strict(self, request: Any) -> Any:
        raise gRPCStatusError(ValueError(request.text), grpc.StatusCode.PERMISSION_DENIED)


@dataclass
class GRPCInstance:
    address: str
    channel: Any
    stub: Any
    run_dir: str


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GRPCInstance]:
    protos = tmp_path_factory.mktemp("protos")
    (protos / f"{MODULE}.proto").write_text(PROTO)
    rc = protoc.main(["grpc_tools.protoc", f"-I{protos}", f"--python_out={protos}", f"--grpc_python_out={protos}",
                      str(protos / f"{MODULE}.proto")])
    assert rc == 0
    sys.path.insert(0, str(protos))  # before serve.start: the proxy and replicas inherit it
    run_dir = tempfile.mkdtemp(prefix="shoal-t", dir="/tmp")
    before = child_pids()
    servicers = [f"{MODULE}_pb2_grpc.add_EchoServicer_to_server"]
    serve.start(http_options={"port": 0, "api_keys": [KEY]},
                grpc_options=gRPCOptions(port=0, grpc_servicer_functions=servicers, request_timeout_s=TIMEOUT_S),
                _run_dir=run_dir)
    address = ""
    try:
        serve.run(Greeter.bind(), name="a", route_prefix="/a")
        serve.run(Busy.bind(), name="b", route_prefix="/b")
        address = api.grpc_address()
        channel = grpc.insecure_channel(address)
        stub = importlib.import_module(f"{MODULE}_pb2_grpc").EchoStub(channel)
        yield GRPCInstance(address, channel, stub, run_dir)
        channel.close()
    finally:
        serve.shutdown()
        sys.path.remove(str(protos))
        shutil.rmtree(run_dir, ignore_errors=True)
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"
    # Nothing listens on the gRPC port any more.
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        from shoal.generated.serve_pb2 import HealthzRequest
        from shoal.generated.serve_pb2_grpc import RayServeAPIServiceStub

        RayServeAPIServiceStub(channel).Healthz(HealthzRequest(), timeout=2)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def md(app: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("application", app), *AUTH, *extra)


def trailing(call: Any) -> dict[str, str]:
    return dict(call.trailing_metadata() or ())


def test_unary_routes_by_application_metadata(inst: GRPCInstance) -> None:
    reply, call = inst.stub.Say.with_call(pb().EchoRequest(text="x"), metadata=md("a"), timeout=30)
    assert (reply.text, reply.app) == ("hello x", "a") and call.code() == grpc.StatusCode.OK
    assert trailing(call)["request_id"]  # a new id when the client sends none
    reply = inst.stub.Say(pb().EchoRequest(text="y"), metadata=md("b"), timeout=30)
    assert (reply.text, reply.app) == ("busy y", "b")


def test_request_id_and_multiplexed_model_id(inst: GRPCInstance) -> None:
    reply, call = inst.stub.Say.with_call(pb().EchoRequest(text="x"), timeout=30,
                                          metadata=md("a", ("request_id", "req-42"), ("multiplexed_model_id", "m7")))
    assert reply.model == "m7"
    assert trailing(call)["request_id"] == "req-42"


def test_server_streaming(inst: GRPCInstance) -> None:
    replies = list(inst.stub.Repeat(pb().EchoRequest(text="n", count=4), metadata=md("a"), timeout=30))
    assert [(r.text, r.index) for r in replies] == [(f"n {i}", i) for i in range(4)]


def test_application_not_found(inst: GRPCInstance) -> None:
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Say(pb().EchoRequest(text="x"), metadata=md("nope"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope' not found" in err.value.details() and "a, b" in err.value.details()
    # Two applications and none named: NOT_FOUND, listing them.
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Say(pb().EchoRequest(text="x"), metadata=AUTH, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "application" in err.value.details() and "a, b" in err.value.details()
    assert trailing(err.value)["request_id"]


def test_user_exception_is_internal_with_its_message(inst: GRPCInstance) -> None:
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Fail(pb().EchoRequest(text="zzz"), metadata=md("a", ("request_id", "r-fail")), timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "ValueError: bad input: zzz"
    assert trailing(err.value)["request_id"] == "r-fail"


def test_wrong_answer_type_is_internal(inst: GRPCInstance) -> None:
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Wrong(pb().EchoRequest(text="x"), metadata=md("a"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "returned str" in err.value.details() and "EchoReply" in err.value.details()


def test_grpc_context_code_details_and_trailing_metadata(inst: GRPCInstance) -> None:
    request = pb().EchoRequest(text="foo")
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Lookup(request, metadata=md("a"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "foo not found, adding it"
    assert trailing(err.value)["num"] == "0" and trailing(err.value)["request_id"]
    reply, call = inst.stub.Lookup.with_call(request, metadata=md("a"), timeout=30)
    # (Details set with an OK code do not reach the client: grpcio 1.85 does not deliver them.)
    assert call.code() == grpc.StatusCode.OK
    assert reply.text == "foo" and trailing(call)["num"] == "0" and trailing(call)["request_id"]


def test_code_set_before_raising_reaches_the_client(inst: GRPCInstance) -> None:
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Refuse(pb().EchoRequest(text="zed", count=0), metadata=md("a", ("request_id", "r-set")), timeout=30)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.NOT_FOUND, "zed is not known")
    assert trailing(err.value)["hint"] == "add it first" and trailing(err.value)["request_id"] == "r-set"
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Refuse(pb().EchoRequest(text="zed", count=1), metadata=md("a"), timeout=30)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "not ready")
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Refuse(pb().EchoRequest(text="zed", count=2), metadata=md("a"), timeout=30)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INTERNAL, "ValueError: zed")
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Refuse(pb().EchoRequest(text="zed", count=3), metadata=md("a"), timeout=30)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, "ValueError: zed")
    # A streaming method: the items before the error arrive, then its code.
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for reply in inst.stub.RepeatRefuse(pb().EchoRequest(text="s"), metadata=md("a"), timeout=30):
            got.append(reply.text)
    assert got == ["first"]
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.ABORTED, "stopped after one")


def test_list_applications_and_healthz(inst: GRPCInstance) -> None:
    from shoal.generated.serve_pb2 import HealthzRequest, ListApplicationsRequest
    from shoal.generated.serve_pb2_grpc import RayServeAPIServiceStub

    stub = RayServeAPIServiceStub(inst.channel)
    assert list(stub.ListApplications(ListApplicationsRequest(), metadata=AUTH, timeout=30).application_names) \
        == ["a", "b"]
    # Healthz needs no credentials (as /-/healthz); ListApplications does.
    assert stub.Healthz(HealthzRequest(), timeout=30).message == "success"
    with pytest.raises(grpc.RpcError) as err:
        stub.ListApplications(ListApplicationsRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_api_keys(inst: GRPCInstance) -> None:
    for metadata in ((("application", "a"),), (("application", "a"), ("authorization", "Bearer wrong-key-0123456789"))):
        with pytest.raises(grpc.RpcError) as err:
            inst.stub.Say(pb().EchoRequest(text="x"), metadata=metadata, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = inst.stub.Say(pb().EchoRequest(text="k"), metadata=(("application", "a"), ("x-api-key", KEY)), timeout=30)
    assert reply.text == "hello k"


def _counts() -> tuple[int, int]:
    """(Sleep calls begun, Sleep calls cancelled) in app a's replica."""
    sleeps, cancelled = serve.get_app_handle("a").counts.remote().result(timeout_s=30)
    return int(sleeps), int(cancelled)


def _cancellations() -> int:
    return _counts()[1]


def test_client_deadline_cancels_the_replica_call(inst: GRPCInstance) -> None:
    before = _cancellations()
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Sleep(pb().EchoRequest(count=60), metadata=md("a"), timeout=3.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: _cancellations() > before, 15)


def test_client_cancellation_cancels_the_replica_call(inst: GRPCInstance) -> None:
    sleeps, cancelled = _counts()
    future = inst.stub.Sleep.future(pb().EchoRequest(count=60), metadata=md("a"), timeout=60)
    assert wait_until(lambda: _counts()[0] > sleeps, 15)  # the call reached the replica
    assert future.cancel()
    assert wait_until(lambda: _cancellations() > cancelled, 15)


def test_request_timeout_is_deadline_exceeded(inst: GRPCInstance) -> None:
    with pytest.raises(grpc.RpcError) as err:
        inst.stub.Sleep(pb().EchoRequest(count=60), metadata=md("a"), timeout=60)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.value.details() == f"request timed out after {TIMEOUT_S:g} s"


def test_overload_is_resource_exhausted(inst: GRPCInstance) -> None:
    # Busy takes one request at a time and queues one more: a third is refused.
    running = [inst.stub.Sleep.future(pb().EchoRequest(count=60), metadata=md("b"), timeout=60) for _ in range(2)]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                inst.stub.Say(pb().EchoRequest(text="x"), metadata=md("b"), timeout=30)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                assert "max_queued_requests=1" in e.details()
                break
            assert time.monotonic() < deadline, "the third request was never refused"
            time.sleep(0.1)  # the two sleeps are not both admitted yet
    finally:
        for f in running:
            f.cancel()


def test_grpc_address(inst: GRPCInstance) -> None:
    assert inst.address.startswith("127.0.0.1:") and int(inst.address.rsplit(":", 1)[1]) > 0


def test_bad_servicer_function_is_refused_before_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"grpc_options\.grpc_servicer_functions\[0\]: cannot import module "
                                         r"'no_such_module_pb2_grpc'"):
        api._parse_grpc_options({"grpc_servicer_functions": ["no_such_module_pb2_grpc.add_XServicer_to_server"]})


def test_calls_are_counted_under_rays_grpc_metric_names(inst: GRPCInstance) -> None:
    import httpx

    inst.stub.Say(pb().EchoRequest(text="m"), metadata=md("a"), timeout=30)
    with pytest.raises(grpc.RpcError):
        inst.stub.Fail(pb().EchoRequest(text="m"), metadata=md("a"), timeout=30)
    url = serve.status().http_address + "/metrics"

    def page() -> str:
        r = httpx.get(url, headers={"authorization": f"Bearer {KEY}"}, timeout=10)
        return r.text if r.status_code == 200 else ""

    def count(name: str, method: str, code: str) -> float:
        total = 0.0
        for line in page().splitlines():
            if line.startswith(name + "{") and f'method="{method}"' in line and f'status_code="{code}"' in line \
                    and 'deployment="Greeter"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    assert wait_until(lambda: count("ray_serve_num_grpc_requests_total", "/shoaltest.Echo/Say", "OK") >= 1, 30)
    assert wait_until(lambda: count("ray_serve_num_grpc_error_requests_total", "/shoaltest.Echo/Fail",
                                    "INTERNAL") >= 1, 30)
    assert count("ray_serve_grpc_request_latency_ms_count", "/shoaltest.Echo/Say", "OK") >= 1
    assert count("ray_serve_num_grpc_error_requests_total", "/shoaltest.Echo/Say", "OK") == 0


def test_the_standard_health_service_answers_on_the_proxy(inst: GRPCInstance) -> None:
    """grpc.health.v1.Health (shoal.runtime.grpc_health) on the local proxy's gRPC server, without credentials."""
    from shoal.runtime.grpc_health import check

    assert check(inst.channel, "", timeout=10) == "SERVING"
    assert check(inst.channel, "shoaltest.Echo", timeout=10) == "SERVING"
    with pytest.raises(grpc.RpcError) as err:
        check(inst.channel, "no.such.Service", timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
