"""The gRPC ingress's parts: its options, the methods read from servicer functions, the
context a deployment gets, the status mapping, and the built-in service's messages."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shoal.config import gRPCOptions
from shoal.exceptions import ConfigError
from shoal.grpc_util import RayServegRPCContext
from shoal.runtime import grpc_call
from shoal.schema import ServeDeploySchema

PROTO = """
syntax = "proto3";
package partstest;
message Ping { string text = 1; }
message Pong { string text = 1; }
service Pinger {
  rpc One(Ping) returns (Pong);
  rpc Many(Ping) returns (stream Pong);
  rpc Upload(stream Ping) returns (Pong);
}
"""


def test_options_defaults_and_validation() -> None:
    opts = gRPCOptions()
    assert (opts.port, opts.grpc_servicer_functions, opts.request_timeout_s, opts.enabled) == (9000, [], None, False)
    assert gRPCOptions(grpc_servicer_functions=["a.b.add_XServicer_to_server", " m:f "]).grpc_servicer_functions \
        == ["a.b.add_XServicer_to_server", "m:f"]
    for bad, field in (({"port": 70000}, "port"), ({"port": -1}, "port"),
                       ({"request_timeout_s": 0}, "request_timeout_s"),
                       ({"grpc_servicer_functions": "a.b"}, "grpc_servicer_functions"),
                       ({"grpc_servicer_functions": ["nodots"]}, "grpc_servicer_functions"),
                       ({"grpc_servicer_functions": ["a.b c"]}, "grpc_servicer_functions"),
                       ({"grpc_port": 9000}, "grpc_port")):
        with pytest.raises(ValidationError) as err:
            gRPCOptions(**bad)
        assert err.value.errors()[0]["loc"][0] == field, bad


def test_config_file_grpc_options_name_the_field() -> None:
    grpc = {"port": 9001, "grpc_servicer_functions": ["p_pb2_grpc.add_S_to_server"], "request_timeout_s": 5}
    cfg = ServeDeploySchema.from_dict({"applications": [{"import_path": "m:app"}], "grpc_options": grpc})
    assert cfg.grpc_options == gRPCOptions(port=9001, grpc_servicer_functions=["p_pb2_grpc.add_S_to_server"],
                                           request_timeout_s=5)
    with pytest.raises(ConfigError, match=r"grpc_options\.grpc_servicer_functions: item 0: expected an import path"):
        ServeDeploySchema.from_dict({"applications": [{"import_path": "m:app"}],
                                     "grpc_options": {"grpc_servicer_functions": ["nodots"]}})
    with pytest.raises(ConfigError, match=r"grpc_options\.port"):
        ServeDeploySchema.from_dict({"applications": [{"import_path": "m:app"}], "grpc_options": {"port": 65536}})


def test_servicer_functions_that_cannot_be_imported_name_the_entry() -> None:
    opts = gRPCOptions(grpc_servicer_functions=["json.dumps", "no_such_pkg_xyz.add_S_to_server"])
    with pytest.raises(ValueError, match=r"^grpc_options\.grpc_servicer_functions\[1\]: cannot import module "
                                         r"'no_such_pkg_xyz'"):
        opts.servicer_functions()
    with pytest.raises(ValueError, match=r"^grpc_options\.grpc_servicer_functions\[0\]: module 'json' has no "
                                         r"'add_S_to_server'"):
        gRPCOptions(grpc_servicer_functions=["json.add_S_to_server"]).servicer_functions()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    protoc = pytest.importorskip("grpc_tools.protoc")
    d = tmp_path_factory.mktemp("parts")
    (d / "partstest.proto").write_text(PROTO)
    assert protoc.main(["grpc_tools.protoc", f"-I{d}", f"--python_out={d}", f"--grpc_python_out={d}",
                        str(d / "partstest.proto")]) == 0
    sys.path.insert(0, str(d))
    try:
        yield d
    finally:
        sys.path.remove(str(d))


def test_methods_read_from_a_generated_servicer_function(compiled: Path) -> None:
    from shoal.runtime.grpc_methods import load_methods

    opts = gRPCOptions(grpc_servicer_functions=["partstest_pb2_grpc.add_PingerServicer_to_server"])
    methods = load_methods(list(zip(opts.grpc_servicer_functions, opts.servicer_functions(), strict=True)))
    assert sorted(methods) == ["/partstest.Pinger/Many", "/partstest.Pinger/One", "/partstest.Pinger/Upload"]
    pb = importlib.import_module("partstest_pb2")
    one, many, upload = (methods[f"/partstest.Pinger/{m}"] for m in ("One", "Many", "Upload"))
    assert (one.name, one.service, one.response_streaming, one.supported) == ("One", "partstest.Pinger", False, True)
    assert many.response_streaming and many.supported and not upload.supported
    assert one.response_type is pb.Pong
    assert one.deserialize is not None and one.deserialize(pb.Ping(text="t").SerializeToString()) == pb.Ping(text="t")


def test_a_function_that_registers_nothing_is_refused() -> None:
    from shoal.runtime.grpc_methods import load_methods

    def add_nothing(servicer: Any, server: Any) -> None:
        pass

    def add_broken(servicer: Any, server: Any) -> None:
        raise KeyError("boom")

    with pytest.raises(ValueError, match=r"^f\[0\]: 'm.add_nothing' registered no RPC method"):
        load_methods([("m.add_nothing", add_nothing)], field="f")
    with pytest.raises(ValueError, match=r"^f\[1\]: 'm.add_broken' failed .* KeyError"):
        load_methods([("m.x", lambda s, srv: srv.add_registered_method_handlers("s.S", {"M": object()})),
                      ("m.add_broken", add_broken)], field="f")


def test_context_goes_to_methods_that_declare_it() -> None:
    ctx = RayServegRPCContext([("application", "a"), ("k", "v")], "ipv4:127.0.0.1:1", "/p.S/M")

    def takes(request: Any, grpc_context: RayServegRPCContext) -> None: ...

    def plain(request: Any) -> None: ...

    kwargs, got = grpc_call.prepare(takes, {grpc_call.GRPC_KWARG: ctx, "x": 1})
    assert got is ctx and kwargs == {"grpc_context": ctx, "x": 1}
    kwargs, got = grpc_call.prepare(plain, {grpc_call.GRPC_KWARG: ctx})
    assert got is ctx and kwargs == {}
    same = {"x": 1}
    assert grpc_call.prepare(plain, same) == (same, None)  # a handle call: untouched
    assert grpc_call.reply(5, None) == 5
    wrapped = grpc_call.reply(5, ctx)
    assert isinstance(wrapped, grpc_call.GRPCReply) and (wrapped.result, wrapped.context) == (5, ctx)


def test_context_records_what_the_method_sets() -> None:
    import pickle

    grpc = pytest.importorskip("grpc")
    ctx = RayServegRPCContext([("application", "a")], "peer", "/p.S/M")
    assert ctx.invocation_metadata() == [("application", "a")] and ctx.peer() == "peer"
    assert (ctx.code(), ctx.details(), ctx.trailing_metadata()) == (None, "", [])
    ctx.set_code(grpc.StatusCode.NOT_FOUND)
    ctx.set_details("missing")
    ctx.set_trailing_metadata([("a", "1")])
    ctx.set_trailing_metadata([("b", "2")])  # the last call wins
    back = pickle.loads(pickle.dumps(ctx))  # it travels to the replica and back
    assert (back.code(), back.details(), back.trailing_metadata()) == \
        (grpc.StatusCode.NOT_FOUND, "missing", [("b", "2")])


def test_status_codes_of_errors() -> None:
    grpc = pytest.importorskip("grpc")
    from shoal.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaDiedError,
        RequestCancelledError,
        wrap_remote_exception,
    )
    from shoal.runtime.grpc_front import BadAnswer, grpc_status

    code = grpc.StatusCode
    assert grpc_status(BackPressureError(3, 3))[0] == code.RESOURCE_EXHAUSTED
    assert grpc_status(DeploymentUnavailableError("gone"))[0] == code.UNAVAILABLE
    assert grpc_status(RequestCancelledError("r"))[0] == code.CANCELLED
    assert grpc_status(ReplicaDiedError())[0] == code.INTERNAL
    assert grpc_status(TimeoutError(), 2.5) == (code.DEADLINE_EXCEEDED, "request timed out after 2.5 s")
    assert grpc_status(BadAnswer("wrong type")) == (code.INTERNAL, "wrong type")
    # A user exception (re-raised from the replica): INTERNAL with its message, no traceback;
    # a user's TimeoutError is the user's error, not the request's timeout.
    assert grpc_status(wrap_remote_exception(KeyError("k"), "Traceback ...")) == (code.INTERNAL, "KeyError: 'k'")
    assert grpc_status(wrap_remote_exception(TimeoutError("db"), "tb")) == (code.INTERNAL, "TimeoutError: db")


def test_grpc_status_error_carries_the_code_the_method_set() -> None:
    import pickle

    grpc = pytest.importorskip("grpc")
    from shoal.exceptions import RayServeException, gRPCStatusError
    from shoal.runtime.grpc_front import grpc_status

    code = grpc.StatusCode
    ctx = RayServegRPCContext([], "peer", "/p.S/M")
    err = KeyError("k")
    assert grpc_call.failure(err, ctx) is err  # no code set: the error as it is (INTERNAL)
    assert grpc_call.failure(err, None) is err  # not a gRPC request
    ctx.set_code(code.OK)
    assert grpc_call.failure(err, ctx) is err  # OK and an error: the error wins
    ctx.set_code(code.NOT_FOUND)
    ctx.set_details("no k")
    ctx.set_trailing_metadata([("hint", "h")])
    wrapped = grpc_call.failure(err, ctx)
    assert isinstance(wrapped, gRPCStatusError) and isinstance(wrapped, RayServeException)
    assert (wrapped.original_exception, wrapped.grpc_code, wrapped.grpc_details) == (err, code.NOT_FOUND, "no k")
    assert str(wrapped) == str(err)
    back = pickle.loads(pickle.dumps(wrapped))  # it travels from the replica to the proxy
    assert (back.grpc_code, back.grpc_details, back._trailing_metadata) == (code.NOT_FOUND, "no k", (("hint", "h"),))
    assert isinstance(back.original_exception, KeyError)
    assert grpc_status(back) == (code.NOT_FOUND, "no k")
    # Details not set: the exception's own; no code: INTERNAL; a code given by number is read.
    assert grpc_status(gRPCStatusError(ValueError("v"), code.ABORTED)) == (code.ABORTED, "ValueError: v")
    assert grpc_status(gRPCStatusError(ValueError("v"))) == (code.INTERNAL, "ValueError: v")
    assert grpc_status(gRPCStatusError(ValueError("v"), code.OK, "d")) == (code.INTERNAL, "d")
    assert grpc_status(gRPCStatusError(ValueError("v"), 9, "d")) == (code.FAILED_PRECONDITION, "d")
    # One the method raised itself keeps its code; it takes the context's trailing metadata.
    own = gRPCStatusError(ValueError("v"), code.ABORTED, "busy")
    assert grpc_call.failure(own, ctx) is own and own._trailing_metadata == (("hint", "h"),)

    class Unpicklable(Exception):
        def __reduce__(self) -> Any:
            raise TypeError("no")

    wrapped = grpc_call.failure(Unpicklable("u"), ctx)
    assert isinstance(wrapped, gRPCStatusError) and str(wrapped) == "Unpicklable: u"
    assert pickle.loads(pickle.dumps(wrapped)).grpc_code == code.NOT_FOUND


def test_builtin_service_matches_its_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    from google.protobuf import descriptor_pb2

    import shoal.generated
    from shoal.generated import serve_pb2

    source = Path(shoal.generated.__file__).parent
    out = tmp_path / "set.pb"
    assert protoc.main(["grpc_tools.protoc", f"-I{source}", f"--descriptor_set_out={out}",
                        str(source / "serve.proto")]) == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    built = serve_pb2.file_descriptor_proto()
    for proto in (compiled, built):
        proto.name = "serve.proto"
        for msg in proto.message_type:
            for f in msg.field:
                f.ClearField("json_name")
    assert built == compiled
    assert serve_pb2.ListApplicationsResponse(application_names=["a"]).SerializeToString() == b"\n\x01a"


def tenant_hook(request: Any) -> Any:
    """An auth hook (``http_options.auth``): it sees a gRPC call as a POST to its method path."""
    seen.append((request.method, request.url.path, request.headers.get("tenant")))
    return True if request.headers.get("tenant") == "ok" else 403


seen: list[tuple[str, str, str | None]] = []


async def test_auth_hook_and_keys_see_grpc_calls() -> None:
    grpc = pytest.importorskip("grpc")
    from shoal.runtime.grpc_front import GRPCFront
    from shoal.runtime.grpc_methods import GRPCFrontOptions

    key = "k" * 20
    front = GRPCFront(object(), GRPCFrontOptions("127.0.0.1", 1, ()), {}, api_keys=(key,),  # type: ignore[arg-type]
                      auth=f"{__name__}:tenant_hook")
    path = "/p.S/M"
    assert await front._denied(path, (("x-api-key", key), ("tenant", "ok"))) is None
    assert seen[-1] == ("POST", path, "ok")
    assert await front._denied(path, (("x-api-key", key), ("tenant", "no"))) == \
        (grpc.StatusCode.PERMISSION_DENIED, "request refused (403)")
    assert await front._denied(path, (("tenant", "ok"),)) == (grpc.StatusCode.UNAUTHENTICATED, "unauthorized")
    # Healthz is answered without credentials, as /-/healthz.
    assert await front._denied("/ray.serve.RayServeAPIService/Healthz", ()) is None


def test_routing_by_application_name() -> None:
    pytest.importorskip("grpc")
    from shoal.runtime.grpc_front import GRPCFront
    from shoal.runtime.grpc_methods import GRPCFrontOptions
    from shoal.runtime.wire import Routes

    front = GRPCFront(object(), GRPCFrontOptions("127.0.0.1", 1, ()), {})  # type: ignore[arg-type]
    assert front._route("", "") == (None, "no application is running")
    front.set_routes(Routes({"/a": ("a", "A")}))
    assert front._route("", "") == (("/a", "a", "A"), "")  # the only app needs no name
    assert front._route("a", "") == (("/a", "a", "A"), "")
    front.set_routes(Routes({"/a": ("a", "A"), "/": ("b", "B")}))
    assert front.applications == ["a", "b"]
    assert front._route("b", "") == (("/", "b", "B"), "")
    route, why = front._route("", "")
    assert route is None and "'application' metadata key" in why and "a, b" in why
    route, why = front._route("c", "")
    assert route is None and why == "application 'c' not found; applications: a, b"
